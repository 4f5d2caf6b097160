"""The C library, loaded once for every ctypes call flowsteer makes. Loaded with ``use_errno``, so that
``ctypes.get_errno()`` tells why a call failed."""

from __future__ import annotations

import ctypes

libc = ctypes.CDLL(None, use_errno=True)
