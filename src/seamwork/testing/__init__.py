"""Test helpers for seamwork users: a manual clock and contract suites for every port.

The contract suites (``seamwork.testing.saga_store``) import pytest; import them from
your test code only.
"""

from seamwork.testing._clock import ManualClock

__all__ = ["ManualClock"]
