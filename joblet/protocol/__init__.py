"""Code generated from proto/ by ``python -m tools.gen_proto``; do not edit."""
