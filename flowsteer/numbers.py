"""Reading whole numbers from user text the same way everywhere."""

from __future__ import annotations


def is_whole_number(text: str) -> bool:
    """Returns whether ``text`` is a non-empty run of ASCII digits (``str.isdigit`` alone also accepts
    characters such as ``²`` that ``int`` refuses)."""
    return text.isascii() and text.isdigit()
