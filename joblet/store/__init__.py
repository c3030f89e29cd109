"""State and log storage (no network)."""
