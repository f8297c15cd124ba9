"""Shared test configuration.

Integration tests that need a server skip when it is unreachable, unless
``SEAMWORK_REQUIRE_SERVICES=1`` (CI), where an unreachable service fails the test.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

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


PG_ADMIN_DSN = os.environ.get(
    "SEAMWORK_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
)


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this test run, dropped at the end."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    import psycopg

    name = f"seamwork_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"'.encode())
    try:
        yield _with_dbname(PG_ADMIN_DSN, name)
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


@pytest.fixture
def pg_dsn(pg_database: str) -> str:
    """A DSN whose tables land in a fresh schema of the run's database."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"'.encode())
    return f"{pg_database} options='-c search_path={schema}'"


def _with_dbname(dsn: str, dbname: str) -> str:
    parts = [p for p in dsn.split() if not p.startswith("dbname=")]
    return " ".join([*parts, f"dbname={dbname}"])


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The PostgreSQL server CI runs on 5432, as its admin DSN (for a test that makes
    and drops what it needs there itself, such as ``seamwork demo --postgres``)."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    return PG_ADMIN_DSN


@pytest.fixture(scope="session")
def nats_service() -> str:
    """The NATS server with JetStream that CI runs on 4222."""
    require_service("NATS", "127.0.0.1", 4222)
    return "nats://127.0.0.1:4222"


@pytest.fixture
def rabbitmq_service() -> str:
    """The RabbitMQ server that CI runs on 5672 (guest/guest)."""
    require_service("RabbitMQ", "127.0.0.1", 5672)
    return "amqp://guest:guest@127.0.0.1:5672/"
