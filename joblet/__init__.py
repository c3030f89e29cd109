"""joblet: a Linux job runner with isolated, resource-limited jobs and live logs."""

__version__ = "0.1.0"
