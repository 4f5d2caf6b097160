"""Reading the files users hand to flowsteer (binding files, host files): bounded, regular files only."""

from __future__ import annotations

import os
import stat

from flowsteer.errors import InvalidInput

MAX_INPUT_BYTES = 64 << 20  # 64 MiB: room for the largest binding set the dispatcher holds


def read_input(path: str, limit: int = MAX_INPUT_BYTES) -> bytes:
    """Returns the contents of the regular file at ``path`` (a symbolic link to one is fine).

    Never blocks and never reads more than ``limit`` bytes: raises InvalidInput naming the file when it
    cannot be opened, is not a regular file (a FIFO, device, socket or directory) or holds more than
    ``limit`` bytes.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}", errno=exc.errno) from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise InvalidInput(f"{path} is {_kind(mode)}, not a regular file; give a file")
        data = f.read(limit + 1)  # the file may grow after any size check: bound the read itself
    if len(data) > limit:
        raise InvalidInput(f"{path} is larger than {limit:,} bytes, the most flowsteer reads from a file")
    return data


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))
    return next((name for test, name in kinds if test(mode)), "a special file")
