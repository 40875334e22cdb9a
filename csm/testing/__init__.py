"""Test fixtures: model folders with random weights (noise, never speech)."""

from .tiny import make_tiny

__all__ = ["make_tiny"]
