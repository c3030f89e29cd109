"""Kernel-facing code: cgroups, namespaces, processes."""
