"""Types of the compiled per-packet path (``_nfqueue.c``); see its functions' docstrings."""

from _typeshed import ReadableBuffer, WriteableBuffer

Parsed = tuple[int, int, bytes, int, int, int, bool, bytes] | int | None
"""The fields of a Delivery for a packet message, a refused verdict's error number, or None."""

def parse(buffer: ReadableBuffer, base: int, received: int, /) -> Parsed: ...
def receive(fd: int, buffer: WriteableBuffer, /) -> Parsed: ...
def accept(fd: int, queue: int, packet_id: int, /) -> None: ...
