"""The embedded server's allocator (atp.embedded): jemalloc preloaded into a libc-malloc
build when asked and found, never when told libc, a clear error when insisted on and
missing; a jemalloc build is left as built. A preloaded server is a working server."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from atp import ATP, EmbeddedServer, Settings
from atp.embedded import _built_malloc, find_jemalloc, find_server_binary
from atp.verify import verify

LIBC_BUILD = _built_malloc(find_server_binary()) == "libc"


def _maps(server: EmbeddedServer) -> str:
    assert server.proc is not None
    return Path(f"/proc/{server.proc.pid}/maps").read_text()


def _fake_binary(tmp_path: Path, malloc: str) -> str:
    """A 'server' that only answers --version, built with ``malloc``."""
    f = tmp_path / f"fake-{malloc}-server"
    f.write_text(f"#!/bin/sh\necho 'Valkey server v=9.9.9 sha=0:0 malloc={malloc} bits=64'\n")
    f.chmod(f.stat().st_mode | stat.S_IXUSR)
    return str(f)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
@pytest.mark.skipif(not LIBC_BUILD, reason="the server binary is not a libc-malloc build")
@pytest.mark.skipif(find_jemalloc() is None, reason="no jemalloc library on this machine")
async def test_jemalloc_preloaded_server_works(tmp_path: Path, settings: Settings) -> None:
    with EmbeddedServer(tmp_path / "je", allocator="jemalloc") as server:
        assert server.allocator == "jemalloc (preloaded)"
        assert "jemalloc" in _maps(server)
        client = aioredis.Redis.from_url(server.url)
        try:
            core = ATP(client, settings)
            await core.start()
            await core.set_position("JE", "W1", 10, reason="init")
            for i in range(5):
                await core.reserve(f"je{i}", "web", [("JE", "W1", 2)], hold_seconds=0)
            pos = await core.position("JE", "W1")
            assert pos is not None and pos.committed == 10
            assert (await verify(core)).ok
        finally:
            await client.aclose()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_libc_never_preloads(tmp_path: Path) -> None:
    with EmbeddedServer(tmp_path / "libc", allocator="libc") as server:
        assert server.preload is None
        assert "libjemalloc" not in _maps(server) or not LIBC_BUILD


def test_missing_jemalloc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATP_JEMALLOC_PATH", str(tmp_path / "no-such-libjemalloc.so"))
    binary = _fake_binary(tmp_path, "libc")
    with pytest.raises(RuntimeError, match="no jemalloc library found"):
        EmbeddedServer(tmp_path / "d", binary=binary, allocator="jemalloc")
    # auto goes on without it
    assert EmbeddedServer(tmp_path / "d", binary=binary, allocator="auto").preload is None


def test_a_jemalloc_build_is_left_as_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    monkeypatch.setenv("ATP_JEMALLOC_PATH", str(lib))
    je = EmbeddedServer(tmp_path / "d", binary=_fake_binary(tmp_path, "jemalloc"), allocator="auto")
    assert je.preload is None and je.allocator == "jemalloc"
    libc = EmbeddedServer(tmp_path / "d", binary=_fake_binary(tmp_path, "libc"), allocator="auto")
    assert libc.preload == str(lib) and libc.allocator == "jemalloc (preloaded)"
    with pytest.raises(ValueError, match="allocator must be"):
        EmbeddedServer(tmp_path / "d", binary=_fake_binary(tmp_path, "libc"), allocator="tc")  # type: ignore[arg-type]
