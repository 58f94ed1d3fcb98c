"""I8: nothing acknowledged is lost when the server crashes.

A server of its own (own data directory, AOF with ``appendfsync always``) takes reserves
(and some releases) from 32 concurrent clients; another task SIGKILLs it mid-run, as a
crash would. The writers never pause, so requests are in flight at the kill (their answers
may or may not have left the server before it died). A new server on the same data
directory and port must then hold every reservation (and every release) acknowledged
before the kill, with its quantity, and the book must balance. Requests in flight at the
kill may or may not have landed; only what was acknowledged must be there, and nothing may
be there that no client sent.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from atp import ATP, EmbeddedServer, Settings
from atp.verify import verify

SKU, LOC = "DUR", "W1"
WRITERS = 32


def _client(url: str) -> aioredis.Redis:
    # no client-side retries: a request either got its answer from the server that was
    # killed, or failed; nothing is silently re-sent to the restarted server
    return aioredis.Redis.from_url(url, max_connections=64, retry=Retry(NoBackoff(), 0))


async def test_acknowledged_writes_survive_sigkill(tmp_path: Path, settings: Settings) -> None:
    data_dir = tmp_path / "durable"
    first = EmbeddedServer(data_dir, appendfsync="always")
    second: EmbeddedServer | None = None
    first.start()
    try:
        core = ATP(_client(first.url), settings)
        await core.start()
        await core.set_position(SKU, LOC, 1_000_000, 0, reason="initial count")

        reserved: dict[str, int] = {}  # acknowledged reserves: id -> qty
        released: set[str] = set()  # acknowledged releases
        in_flight: set[str] = set()  # sent, no answer: may or may not have landed
        killed = asyncio.Event()
        loop = asyncio.get_running_loop()

        async def writer(n: int) -> None:
            i = 0
            while not killed.is_set():
                i += 1
                rid = f"d{n}-{i}"
                release = i % 5 == 0 and f"d{n}-{i - 1}" in reserved
                target = f"d{n}-{i - 1}" if release else rid
                in_flight.add(target)
                try:
                    if release:
                        res = await core.release(target, reason="cancelled")
                        assert res.status == "released", res
                        released.add(target)
                    else:
                        res = await core.reserve(
                            rid, "web", [(SKU, LOC, 1 + i % 3)], hold_seconds=0
                        )
                        assert res.status == "confirmed" and not res.replayed, res
                        reserved[rid] = 1 + i % 3
                except (RedisConnectionError, RedisTimeoutError, OSError):
                    return  # the server is gone: this request may or may not have landed
                in_flight.discard(target)

        async def killer() -> None:
            start = loop.time()
            # mid-run: after half a second and a good number of acknowledged writes
            while loop.time() - start < 0.5 or len(reserved) < 200:
                assert loop.time() - start < 30, f"only {len(reserved)} reserves in 30 s"
                await asyncio.sleep(0.01)
            first.kill()  # SIGKILL: no chance to flush anything
            killed.set()

        await asyncio.gather(killer(), *(writer(n) for n in range(WRITERS)))
        await core.aclose()
        assert not first.running

        second = EmbeddedServer(data_dir, port=first.port, appendfsync="always")
        second.start()
        core = ATP(_client(second.url), settings)
        try:
            await core.start()
            for rid, qty in reserved.items():
                res = await core.reservation(rid)
                assert [(ln.sku, ln.location, ln.qty) for ln in res.lines] == [(SKU, LOC, qty)], res
                want = "released" if rid in released else ("confirmed", "released")
                if isinstance(want, str):
                    assert res.status == want, (rid, res)
                else:  # a release was in flight for it at the kill
                    assert res.status in want and (res.status == "confirmed" or rid in in_flight), (
                        res
                    )

            # nothing that no client sent; in-flight requests landed whole or not at all
            book: dict[str, str] = {}
            ks = core.keys
            for b in range(ks.buckets):
                async for rid_raw, raw in core.redis.hscan_iter(ks.bucket_keys(b).res):
                    book[rid_raw.decode()] = raw.decode()
            assert reserved.keys() <= book.keys()
            assert book.keys() - reserved.keys() <= in_flight, sorted(
                book.keys() - reserved.keys()
            )[:5]

            live = 0
            for rid in book:
                res = await core.reservation(rid)
                live += res.open_units
            pos = await core.position(SKU, LOC)
            assert pos is not None
            assert pos.on_hand == 1_000_000
            assert pos.committed == live
            rep = await verify(core)
            assert rep.ok, rep.problems[:10]
            assert rep.reservations == len(book)
        finally:
            await core.aclose()
    finally:
        first.stop()
        if second is not None:
            second.stop()
