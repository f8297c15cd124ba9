"""Identifiers: time-ordered UUIDs (version 7), so new rows land at the end of an index."""

from __future__ import annotations

import os
import threading
import time

_IDS_PER_READ = 256
_random = threading.local()


def _forget_random_bytes() -> None:
    _random.__dict__.clear()  # a forked child must not reuse its parent's bytes


os.register_at_fork(after_in_child=_forget_random_bytes)


def _random_80_bits() -> int:
    """80 bits from the OS's CSPRNG, read for 256 ids at a time (a syscall is ~10 us
    on some VMs: more than the rest of an append), per thread."""
    state = _random.__dict__
    buffer: bytes = state.get("buffer", b"")
    offset: int = state.get("offset", 0)
    if offset >= len(buffer):
        buffer, offset = os.urandom(10 * _IDS_PER_READ), 0
        state["buffer"] = buffer
    state["offset"] = offset + 10
    return int.from_bytes(buffer[offset : offset + 10], "big")


def new_id() -> str:
    """Return a fresh UUIDv7 string: 48 bits of Unix milliseconds, then 74 random bits."""
    millis = time.time_ns() // 1_000_000
    rand = _random_80_bits()
    value = (millis & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76  # version
    value |= ((rand >> 62) & 0xFFF) << 64  # rand_a
    value |= 0b10 << 62  # variant
    value |= rand & 0x3FFF_FFFF_FFFF_FFFF  # rand_b
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
