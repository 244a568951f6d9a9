"""Loom's HTTP layer: the only part of Loom that imports twisted.web."""
