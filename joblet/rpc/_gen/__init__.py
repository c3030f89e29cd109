"""Code generated from proto/ by ``python -m joblet.rpc.gen``; do not edit."""
