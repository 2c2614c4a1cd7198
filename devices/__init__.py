"""Execution-provider detection and placement."""
