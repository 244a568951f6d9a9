"""Loom: a server for live data streams."""

__version__ = "0.1.0"
