"""Loading the Lua scripts and calling them by SHA, with the NOSCRIPT fallback.

Scripts ship as ``lua/<name>.lua`` inside the wheel (package data ``atp/lua``); in a source
checkout they are read from the repository's ``lua/``. A line ``--- @include "_lib"`` is
replaced by ``lua/_lib.lua`` (BullMQ's convention), so each script is one body with one SHA.
(``_reserve`` is included the same way by reserve and reserve_many.)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import DataError, NoScriptError, ResponseError

from .errors import SCRIPT_ERRORS, ATPError, BackendError

__all__ = ["NAMES", "AutoPipeline", "ScriptRunner", "decode", "load_source"]

NAMES = (
    "reserve",
    "reserve_many",
    "confirm",
    "release",
    "fulfil",
    "expire_holds",
    "set_position",
    "adjust",
    "receive",
    "inbound",
    "bo_restamp",
    "explain",
    "rules_apply",
    "rules_bump",
    "count",
    "resolve",
    "replen_levels",
    "replen_config",
    "noop",
)
_INCLUDE = re.compile(r'^--- @include "([a-z_]+)"\s*$', re.MULTILINE)


def _lua_dir() -> Path:
    packaged = resources.files("atp") / "lua"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "lua"


def load_source(name: str) -> str:
    """The full text of one script, its includes inlined."""
    base = _lua_dir()
    text = (base / f"{name}.lua").read_text()

    def inline(m: re.Match[str]) -> str:
        return (base / f"{m.group(1)}.lua").read_text()

    return _INCLUDE.sub(inline, text)


_scan_once: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def decode(raw: Any) -> dict[str, Any]:
    """Decode a script's JSON reply; raise the typed error for a refusal."""
    if isinstance(raw, bytes):
        raw = raw.decode()
    if not isinstance(raw, str):
        raise BackendError(f"unexpected script reply {raw!r:.200}")
    reply: dict[str, Any]
    try:  # json.loads without its checks for what a script never sends (outer spaces)
        reply, end = _scan_once(raw, 0)
    except StopIteration:
        end = -1
    if end != len(raw):  # not one bare JSON text: json.loads decides (and words the error)
        reply = json.loads(raw)
    code = reply.get("err")
    if code is not None:
        cls: type[ATPError] = SCRIPT_ERRORS.get(code, BackendError)
        extra = {k: v for k, v in reply.items() if k not in ("err", "detail")}
        raise cls(reply.get("detail") or code, **extra)
    return reply


def _enc(v: Any) -> bytes:
    """An argument as redis-py's Encoder writes it (text as UTF-8, numbers by repr)."""
    if isinstance(v, str):
        return v.encode()
    if isinstance(v, bytes):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return repr(v).encode()
    raise DataError(f"invalid script argument of type {type(v).__name__}")


@lru_cache(maxsize=65536)
def _bulk(key: str) -> bytes:
    """A key name (or a small number) as one RESP bulk string."""
    b = _enc(key)
    return b"$%d\r\n%s\r\n" % (len(b), b)


class ScriptRunner:
    """Holds the scripts' bodies and SHAs; calls them with EVALSHA."""

    def __init__(self) -> None:
        self.sources = {name: load_source(name) for name in NAMES}
        self.shas = {
            name: hashlib.sha1(src.encode()).hexdigest() for name, src in self.sources.items()
        }
        self._sha_bytes = {name: sha.encode() for name, sha in self.shas.items()}

    def pack(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> bytes:
        """One EVALSHA in the wire protocol (RESP), byte for byte what redis-py writes: what
        the auto-pipeline sends, without redis-py's per-argument packing (about a sixth of
        the client's CPU per reserve call through a redis-py pipeline). Key names come from
        a small set (bucket and position keys), so their encoded form is cached."""
        out = [b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n" % (3 + len(keys) + len(args),
               self._sha_bytes[name]), _bulk(str(len(keys)))]  # fmt: skip
        out += map(_bulk, keys)
        for a in args:
            b = _enc(a)
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        return b"".join(out)

    async def load(self, client: Redis) -> None:
        """SCRIPT LOAD every script (also done lazily on NOSCRIPT)."""
        for name, src in self.sources.items():
            sha = await client.script_load(src)
            if sha != self.shas[name]:  # pragma: no cover - would mean a broken server
                raise BackendError(f"server hashed {name} to {sha}, expected {self.shas[name]}")

    async def loaded(self, client: Redis) -> bool:
        flags = await client.script_exists(*self.shas.values())
        return all(flags)

    async def call(self, client: Redis, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """EVALSHA; on NOSCRIPT load the script and try once more."""
        sha = self.shas[name]
        try:
            try:
                return await client.evalsha(sha, len(keys), *keys, *args)
            except NoScriptError:
                await client.script_load(self.sources[name])
                return await client.evalsha(sha, len(keys), *keys, *args)
        except ResponseError as e:  # the retry's error too
            raise BackendError(f"script {name} failed: {e}") from e

    async def call_many(
        self, client: Redis, calls: Sequence[tuple[str, Sequence[str], Sequence[Any]]]
    ) -> list[Any]:
        """Several script calls in one pipeline (one round trip), with the NOSCRIPT
        fallback that redis-py's pipeline does not do: calls that failed with NOSCRIPT did
        not run, so after loading their scripts exactly those are sent again."""
        results = await self.call_many_raw(client, calls)
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results

    async def call_many_raw(
        self, client: Redis, calls: Sequence[tuple[str, Sequence[str], Sequence[Any]]]
    ) -> list[Any]:
        """As :meth:`call_many`, but each call's error (a ``BackendError``) is returned in
        its place instead of raised, so one bad call does not fail the others."""
        results = await self._pipeline(client, calls)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            for name in {calls[i][0] for i in missing}:
                await client.script_load(self.sources[name])
            again = await self._pipeline(client, [calls[i] for i in missing])
            for i, r in zip(missing, again, strict=True):
                results[i] = r
        return [
            BackendError(f"script {calls[i][0]} failed: {r}") if isinstance(r, ResponseError) else r
            for i, r in enumerate(results)
        ]

    async def _pipeline(
        self, client: Redis, calls: Sequence[tuple[str, Sequence[str], Sequence[Any]]]
    ) -> list[Any]:
        pipe: Pipeline = client.pipeline(transaction=False)
        for name, keys, args in calls:
            pipe.evalsha(self.shas[name], len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))


class AutoPipeline:
    """Script calls made in the same event-loop turn leave together, as one pipeline.

    In one API process many requests are in flight at once, and the Python client, not
    Redis, is the bottleneck (../shared/PERFORMANCE.md: one round trip costs the process
    about as much CPU as a whole request; pipelines of 32 buy ~3x). Each call still runs as
    its own atomic script, in order, and gets its own answer or error; nothing about the
    scripts changes, only how many calls share a write and a read on the socket. A batch of
    one is sent as a plain EVALSHA; a larger one is packed here (``ScriptRunner.pack``) and
    written on one pooled connection, not through a redis-py pipeline, whose per-argument
    packing cost more client CPU than the rest of a reserve call's Python.

    Two or more ``reserve`` calls in one batch (with the same settings argument) go as one
    ``reserve_many`` call (lua/reserve_many.lua), which runs them one after another, each
    exactly as reserve.lua alone, and answers each: the server's fixed cost per script call
    is paid once for them. Calls in one batch were all made before any of them was answered,
    so running them in any order is one their callers could have seen.

    :param max_batch: the most calls in one pipeline; a full batch leaves at once.
    :param reserve_many: send a batch's reserve calls as one reserve_many call.
    """

    def __init__(
        self, client: Redis, runner: ScriptRunner, max_batch: int = 128, reserve_many: bool = True
    ) -> None:
        self.client = client
        self.runner = runner
        self.max_batch = max_batch
        self.reserve_many = reserve_many
        self._queue: list[tuple[str, Sequence[str], Sequence[Any], asyncio.Future[Any]]] = []
        self._scheduled = False
        self._sending: set[asyncio.Task[None]] = set()

    async def call(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await self.submit(name, keys, args)

    def submit(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> asyncio.Future[Any]:
        """Queue the call (as :meth:`call`); the future is its reply or its error."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        queue = self._queue
        queue.append((name, keys, args, fut))
        if len(queue) >= self.max_batch:
            self._flush()
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._scheduled = False
        batch, self._queue = self._queue, []
        if batch:
            task = asyncio.ensure_future(self._send(batch))
            self._sending.add(task)  # keep a reference until it is done
            task.add_done_callback(self._sending.discard)

    async def _send(
        self, batch: list[tuple[str, Sequence[str], Sequence[Any], asyncio.Future[Any]]]
    ) -> None:
        try:
            if len(batch) == 1:
                name, keys, args, _ = batch[0]
                results: list[Any] = [await self.runner.call(self.client, name, keys, args)]
            else:
                calls = [(n, k, a) for n, k, a, _ in batch]
                if self.reserve_many:
                    results = await self._round_trip_coalesced(calls)
                else:
                    results = await self._round_trip(calls)
        except BaseException as e:
            err = e if isinstance(e, Exception) else BackendError("the call was cancelled")
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(err)
            if not isinstance(e, Exception):
                raise
            return
        for (*_, fut), r in zip(batch, results, strict=True):
            if fut.done():  # the caller gave up waiting
                continue
            if isinstance(r, Exception):
                fut.set_exception(r)
            else:
                fut.set_result(r)

    async def _round_trip_coalesced(
        self, calls: list[tuple[str, Sequence[str], Sequence[Any]]]
    ) -> list[Any]:
        """As :meth:`_round_trip`, with the reserve calls that share a settings argument
        sent as one reserve_many call (in the place of the first of them), its replies
        handed back to each. An entry reserve_many marks ``!`` is that reservation's runtime
        error, a ``BackendError`` for its caller only; an error of the whole call (NOSCRIPT
        is handled as for any call) goes to every caller in it."""
        groups: dict[Any, list[int]] = {}
        for i, (name, _, args) in enumerate(calls):
            if name == "reserve" and len(args) == 2:
                groups.setdefault(args[0], []).append(i)
        firsts = {g[0]: g for g in groups.values() if len(g) > 1}
        if not firsts:
            return await self._round_trip(calls)
        wire: list[tuple[str, Sequence[str], Sequence[Any]]] = []
        where: list[tuple[int, int]] = [(-1, -1)] * len(calls)  # (wire index, entry or -1)
        for i, call in enumerate(calls):
            g = firsts.get(i)
            if g is not None:
                keys: list[str] = []
                counts: list[str] = []
                reqs: list[Any] = []
                for e, m in enumerate(g):
                    _, mkeys, margs = calls[m]
                    keys += mkeys
                    counts.append(str(len(mkeys)))
                    reqs.append(margs[1])
                    where[m] = (len(wire), e)
                header = "[" + ",".join(counts) + "]"
                wire.append(("reserve_many", keys, (call[2][0], header, *reqs)))
            elif where[i][0] < 0:
                where[i] = (len(wire), -1)
                wire.append(call)
        replies = await self._round_trip(wire)
        out: list[Any] = []
        for j, e in where:
            r = replies[j]
            if e < 0 or isinstance(r, Exception):
                out.append(r)
                continue
            if not isinstance(r, list) or len(r) <= e:
                out.append(BackendError(f"unexpected reserve_many reply {r!r:.200}"))
                continue
            one = r[e]
            mark = one[:1]
            if mark in (b"!", "!"):
                text = one[1:].decode() if isinstance(one, bytes) else one[1:]
                out.append(BackendError(f"script reserve failed: {text}"))
            else:
                out.append(one)
        return out

    async def _round_trip(self, calls: list[tuple[str, Sequence[str], Sequence[Any]]]) -> list[Any]:
        """Send the calls as one write and read their replies: each call's reply, or its
        error as a ``BackendError`` in its place. Calls refused with NOSCRIPT did not run:
        their scripts are loaded and exactly those are sent again (as ``call_many_raw``)."""
        pack = self.runner.pack
        results = await self._exchange(b"".join([pack(*c) for c in calls]), len(calls))
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            for name in {calls[i][0] for i in missing}:
                await self.client.script_load(self.runner.sources[name])
            again = await self._exchange(b"".join([pack(*calls[i]) for i in missing]), len(missing))
            for i, r in zip(missing, again, strict=True):
                results[i] = r
        return [
            BackendError(f"script {calls[i][0]} failed: {r}") if isinstance(r, ResponseError) else r
            for i, r in enumerate(results)
        ]

    async def _exchange(self, packed: bytes, n: int) -> list[Any]:
        """Write ``packed`` (``n`` commands) on one pooled connection and read ``n`` replies,
        an error reply in its command's place. The connection's retry policy applies as in a
        redis-py pipeline (a connection error disconnects and sends the whole batch again,
        which every script's idempotency makes safe); a connection left with replies unread
        (cancelled, timed out) is disconnected before it goes back to the pool."""
        pool = self.client.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]

        async def once() -> list[Any]:
            await conn.send_packed_command(packed)
            out: list[Any] = []
            for _ in range(n):
                try:
                    out.append(await conn.read_response())
                except ResponseError as e:
                    out.append(e)
            return out

        async def fail(_error: Exception) -> None:
            await conn.disconnect()

        try:
            out: list[Any] = await conn.retry.call_with_retry(once, fail)
            return out
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)
