"""Identifiers: time-ordered UUIDs (version 7), so new rows land at the end of an index."""

from __future__ import annotations

import os
import time
import uuid


def new_id() -> str:
    """Return a fresh UUIDv7 string: 48 bits of Unix milliseconds, then 74 random bits."""
    millis = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (millis & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76  # version
    value |= ((rand >> 62) & 0xFFF) << 64  # rand_a
    value |= 0b10 << 62  # variant
    value |= rand & 0x3FFF_FFFF_FFFF_FFFF  # rand_b
    return str(uuid.UUID(int=value))
