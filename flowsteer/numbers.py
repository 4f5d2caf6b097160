"""Whole numbers in user text, read the same way everywhere, and counts of things, said the same way."""

from __future__ import annotations


def is_whole_number(text: str) -> bool:
    """Returns whether ``text`` is a non-empty run of ASCII digits (``str.isdigit`` alone also accepts
    characters such as ``²`` that ``int`` refuses)."""
    return text.isascii() and text.isdigit()


def counted(count: int, noun: str) -> str:
    """Returns ``1 binding``, ``2 bindings``, ``0 bindings``: ``noun`` takes an ``s`` unless ``count`` is 1."""
    return f"{count} {noun}{'' if count == 1 else 's'}"
