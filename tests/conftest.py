"""Shared test configuration.

Integration tests that need a server skip when it is unreachable, unless
``SEAMWORK_REQUIRE_SERVICES=1`` (CI), where an unreachable service fails the test.
"""

from __future__ import annotations

import os
import socket

import pytest

REQUIRE_SERVICES = os.environ.get("SEAMWORK_REQUIRE_SERVICES") == "1"


def require_service(name: str, host: str, port: int) -> None:
    """Skip (or, under SEAMWORK_REQUIRE_SERVICES=1, fail) when ``host:port`` is closed."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return
    except OSError as exc:
        message = f"{name} is not reachable at {host}:{port}: {exc}"
        if REQUIRE_SERVICES:
            pytest.fail(message)
        pytest.skip(message)
