"""Fixtures of the hostile tier: one live round per test module (see ``harness.py``)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from tests.hostile.harness import Live, hostile_job, live_round
from tests.redis_server import RedisServer


@pytest.fixture(scope="module")
def live(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[Live]:
    """A round in its reporting phase, devices selected through the device API; each module
    gets its own job (named after the module) and key prefix."""
    if not redis_server.running:
        redis_server.start()
    name = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_").replace("_", "-")
    with live_round(hostile_job(name), redis_server.url, f"h-{secrets.token_hex(6)}") as lv:
        yield lv
