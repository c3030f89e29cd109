"""Actors: who owns what while the daemon runs."""
