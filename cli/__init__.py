"""rnx, the joblet command-line client."""
