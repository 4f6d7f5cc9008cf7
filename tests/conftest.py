"""Shared fixtures. Each block is one concern; blocks only add fixtures, never hooks."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from tests.redis_server import RedisServer

# -- Redis ---------------------------------------------------------------------------------------
# One real redis-server per test session (started only if a test asks for it), with a password;
# tests share it and stay apart by key prefix.


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(password=secrets.token_hex(16), workdir=tmp_path_factory.mktemp("redis"))
    with server:
        yield server


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix no other test uses."""
    return f"t-{secrets.token_hex(6)}"


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    if not redis_server.running:  # a test that stopped it must not take the others down
        redis_server.start()
    return redis_server.url


# -- end Redis -----------------------------------------------------------------------------------
