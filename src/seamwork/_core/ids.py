"""Identifiers: time-ordered UUIDs (version 7), so new rows land at the end of an index."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

_IDS_PER_READ = 256
_random = threading.local()
# The id's first 13 characters for the last millisecond seen (every thread's ids of
# that millisecond share it): (millisecond, "xxxxxxxx-xxxx")
_prefix: tuple[int, str] = (-1, "")
# A random hex digit's two low bits under the variant bits 10 (8, 9, a or b).
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def _forget_random_bytes() -> None:
    _random.__dict__.clear()  # a forked child must not reuse its parent's bytes


os.register_at_fork(after_in_child=_forget_random_bytes)


def _random_tails() -> Iterator[str]:
    """The last 23 characters of 256 ids - version 7, 74 random bits, variant 10 - from
    one read of the OS's CSPRNG (a syscall is ~10 us on some VMs: more than the rest of
    an append), per thread."""
    digits = os.urandom(10 * _IDS_PER_READ).hex()
    variant = _VARIANT
    return iter(
        [
            f"-7{digits[i : i + 3]}-{variant[digits[i + 3]]}{digits[i + 4 : i + 7]}-"
            f"{digits[i + 7 : i + 19]}"
            for i in range(0, len(digits), 20)
        ]
    )


def new_id() -> str:
    """Return a fresh UUIDv7 string: 48 bits of Unix milliseconds, then 74 random bits."""
    global _prefix
    millis = time.time_ns() // 1_000_000
    last, prefix = _prefix
    if millis != last:
        h = f"{millis & 0xFFFF_FFFF_FFFF:012x}"
        prefix = f"{h[:8]}-{h[8:]}"
        _prefix = (millis, prefix)
    try:
        tails: Iterator[str] = _random.tails
        return prefix + next(tails)
    except (AttributeError, StopIteration):  # this thread's first id, or its tails ran out
        _random.tails = tails = _random_tails()
        return prefix + next(tails)
