"""The ``atp`` command: ``serve``, ``worker``, ``verify``, ``reap``, ``rules apply``,
``rules show`` (and the reconciliation commands).

``atp serve`` with no ``ATP_REDIS_URL`` starts the embedded server (``atp.embedded``) with
its data in ``ATP_DATA_DIR`` (default ``./.atp-data``), writes the server's URL to
``<data dir>/server.url`` so other commands (``atp verify``) find it, serves the HTTP API
with uvicorn, and stops the embedded server with itself. It also runs one worker
(``atp worker``, a child process: reaps expired holds, applies queued counts) and stops it
with itself; with ``--no-worker`` it runs none and the app reaps expired holds itself
(``ATP_REAPER_INTERVAL``), for deployments that run their own workers.

``atp verify`` checks the whole book (atp.verify) against Redis; ``atp verify --url URL``
asks a running server's ``GET /v1/verify`` instead (admin key from ``--key`` or
``ATP_ADMIN_KEY``). Exit 0 when the book is sound, 1 when not, 2 when it cannot be checked.

``atp worker`` reaps expired holds and applies queued count batches until SIGTERM/SIGINT
(atp.worker); ``--once`` drains the queue and exits (cron, tests).

``atp reconcile-orders SOURCE`` compares the live reservations with the system of
record's open order lines (atp.book): ghosts, missing reservations and mismatches, as a
table (or ``--json``, ``--report PATH``); ``--fix`` releases the ghosts and recreates the
missing ones.

``atp reconcile SOURCE`` applies a cycle count (a CSV or JSON Lines file, or an SQL query
or table) as of each row's time (atp.reconcile) with a progress bar on a terminal, and
prints the report (``--json``; ``--report PATH`` writes it); ``--dry-run`` changes
nothing. The count id it prints resumes an interrupted count without applying a row twice.

``atp rules apply FILE`` validates a rules document (YAML or JSON, atp.rules) and applies
it as the next version; a document that does not validate is listed problem by problem
(``path: message``), exit status 2, and nothing changes. ``atp rules show`` prints the
rules in force (or ``--version N``) as YAML that ``atp rules apply`` takes back.

``atp replenishment settings SKU --service-level P --lead-time DAYS [--review DAYS]
[--window DAYS]`` stores how a SKU's levels are planned; ``atp replenishment plan
[--sku SKU …] [--dry-run] [--apply-safety-stock] [--json]`` computes each planned
position's reorder point and order-up-to level from its demand history and writes them
(atp.replenishment); ``atp replenishment list`` prints the open signals (what to order).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .embedded import EmbeddedServer
from .settings import Settings

if TYPE_CHECKING:
    from .sources import RowSource
    from .store import ATP

T = TypeVar("T")

__all__ = ["main"]

DEMO_SKUS = [("DEMO-TEE", 100), ("DEMO-HOODIE", 40), ("DEMO-CAP", 250), ("DEMO-SNEAKER", 12)]


def _url_file(settings: Settings) -> Path:
    return settings.data_dir.resolve() / "server.url"


def resolve_url(settings: Settings) -> str | None:
    """The Redis URL the commands use: ATP_REDIS_URL, else a running embedded server's."""
    if settings.redis_url:
        return settings.redis_url
    f = _url_file(settings)
    return f.read_text().strip() if f.exists() else None


async def _has_stored_keys(url: str, settings: Settings) -> bool:
    from redis.asyncio import Redis

    r = Redis.from_url(url)
    try:
        return bool(await r.hlen(f"{settings.key_prefix}keys"))
    finally:
        await r.aclose()


async def _seed_demo(url: str, settings: Settings) -> None:
    from .store import ATP

    async with ATP.from_url(url, settings) as core:
        for sku, qty in DEMO_SKUS:
            if await core.position(sku, "WH1") is None:
                await core.set_position(
                    sku, "WH1", qty, reason="demo seed", actor="atp serve --demo"
                )


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # uvicorn re-raises the signal it caught once it has shut down; turning SIGTERM into
    # SystemExit lets the `finally` below stop the embedded server instead of leaking it.
    raise SystemExit(0)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    settings = Settings()
    server: EmbeddedServer | None = None
    worker: _WorkerChild | None = None
    demo_key: str | None = None
    try:
        url = settings.redis_url
        if not url:
            server = EmbeddedServer(
                settings.data_dir,
                appendfsync=settings.appendfsync,
                allocator=settings.embedded_allocator,
            ).start()
            url = server.url
            _url_file(settings).write_text(url + "\n")
            print(
                f"atp: embedded {Path(server.binary).name} at {url}, data in {server.data_dir} "
                f"(AOF appendfsync={settings.appendfsync}, allocator {server.allocator})",
                flush=True,
            )
        os.environ["ATP_REDIS_URL"] = url
        if args.demo:
            if settings.admin_key is None:
                demo_key = "atp_demo_" + secrets.token_urlsafe(24)
                os.environ["ATP_ADMIN_KEY"] = demo_key
            else:
                demo_key = settings.admin_key.get_secret_value()
            asyncio.run(_seed_demo(url, settings))
        elif settings.admin_key is None and not asyncio.run(_has_stored_keys(url, settings)):
            print(
                "atp: refusing to start without an API key. Set one, e.g.\n"
                "  export ATP_ADMIN_KEY="
                "$(python -c 'import secrets; print(secrets.token_urlsafe(32))')\n"
                "or try it out with: atp serve --demo",
                file=sys.stderr,
            )
            return 2
        if demo_key:
            base = f"http://{args.host}:{args.port}"
            auth = f'-H "Authorization: Bearer {demo_key}"'
            print(f"atp: demo admin key: {demo_key}", flush=True)
            print("atp: try:", flush=True)
            print(
                f"  curl -s {auth} -X POST {base}/v1/reservations "
                "-H 'Content-Type: application/json' "
                '-d \'{"reservation_id":"demo-1","channel":"web","lines":[{"sku":"DEMO-TEE",'
                '"location":"WH1","qty":2}],"hold_seconds":600}\'',
                flush=True,
            )
            print(f"  curl -s {auth} -X POST {base}/v1/reservations/demo-1/confirm", flush=True)
            print(f"  curl -s {auth} -X POST {base}/v1/reservations/demo-1/release", flush=True)
        if not args.no_worker:
            worker = _WorkerChild(dict(os.environ)).start()
            # the worker reaps expired holds: the app's own reaper is for --no-worker
            os.environ["ATP_REAPER_INTERVAL"] = "0"
        if args.workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="atp-metrics-")
        uvicorn.run(
            "api.app:create_app",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_level=args.log_level,
            access_log=False,
        )
        return 0
    finally:
        if worker is not None:  # before the server: it finishes its chunk against it
            worker.stop()
        if server is not None:
            server.stop()
            _url_file(settings).unlink(missing_ok=True)
            print("atp: embedded server stopped", flush=True)


class _WorkerChild:
    """``atp serve``'s worker: ``python -m atp worker`` in a session of its own (a Ctrl-C
    reaches serve, which stops it), restarted if it dies while serve runs, stopped with
    serve. It also stops by itself if serve disappears (``--exit-with-parent``)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def _spawn(self) -> None:
        cmd = [sys.executable, "-m", "atp", "worker", "--exit-with-parent", str(os.getpid())]
        self.proc = subprocess.Popen(cmd, env=self.env, start_new_session=True)
        print(f"atp: worker started (pid {self.proc.pid})", flush=True)

    def start(self) -> _WorkerChild:
        with self._lock:
            self._spawn()
        threading.Thread(target=self._watch, name="atp-worker-watch", daemon=True).start()
        return self

    def _watch(self) -> None:
        while True:
            proc = self.proc
            assert proc is not None
            rc = proc.wait()
            if self._stopping.wait(1.0):  # a pause, so a worker that cannot start is no spin
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                print(f"atp: worker exited ({rc}); starting another", file=sys.stderr, flush=True)
                self._spawn()

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (it finishes its chunk), then SIGKILL after ``timeout`` seconds."""
        with self._lock:
            self._stopping.set()
            proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        print("atp: worker stopped", flush=True)


def _no_server() -> int:
    print("atp: no server: set ATP_REDIS_URL, or start `atp serve` first", file=sys.stderr)
    return 2


class _NoServer(Exception):
    """Neither ATP_REDIS_URL nor a running `atp serve` to reach (main() says so, exit 2)."""


def _on_core(work: Callable[[ATP], Awaitable[T]]) -> T:
    """Run ``work`` with a started core on the server the commands use (``resolve_url``)."""
    from .store import ATP

    settings = Settings()
    url = resolve_url(settings)
    if url is None:
        raise _NoServer

    async def run() -> T:
        async with ATP.from_url(url, settings) as core:
            return await work(core)

    return asyncio.run(run())


def _print_verify(body: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(body))
    else:
        for p in body["problems"]:
            print(f"  FAIL {p}")
        print(body["summary"])
        ack = body.get("acknowledged")
        if ack is not None:
            for p in ack["problems"]:
                print(f"  FAIL {p}")
            verdict = "OK" if not ack["problems"] else f"FAILED ({len(ack['problems'])} problems)"
            print(f"{verdict}: {ack['checked']} acknowledged reservations checked")


def _read_acks(path: str) -> list[dict[str, Any]]:
    """``--acknowledged FILE``: JSON Lines of {"reservation_id", "qty"} (a load test's record)."""
    acks = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e})") from None
                acks.append(obj if isinstance(obj, dict) else {"line": n})
    return acks


def _with_acks(body: dict[str, Any], checked: int, problems: list[str]) -> int:
    body["acknowledged"] = {"checked": checked, "problems": problems}
    return 0 if body["ok"] is True and not problems else 1


def cmd_verify(args: argparse.Namespace) -> int:
    acks = None
    if args.acknowledged is not None:
        try:
            acks = _read_acks(args.acknowledged)
        except (OSError, ValueError) as e:
            print(f"atp: --acknowledged: {e}", file=sys.stderr)
            return 2
    if args.url is not None:
        return _verify_remote(args, acks)
    from .verify import VerifyReport, check_acknowledged, verify

    async def run(core: ATP) -> tuple[VerifyReport, tuple[int, list[str]] | None]:
        rep = await verify(core, allow_uncovered=args.allow_uncovered)
        return rep, None if acks is None else await check_acknowledged(core, acks)

    rep, checked = _on_core(run)
    body = {
        "ok": rep.ok,
        "positions": rep.positions,
        "reservations": rep.reservations,
        "movements": rep.movements,
        "problems": rep.problems,
        "uncovered": rep.uncovered,
        "summary": rep.summary(),
    }
    rc = 0 if rep.ok else 1
    if checked is not None:
        rc = _with_acks(body, *checked)
    _print_verify(body, args.json)
    return rc


def _verify_remote(args: argparse.Namespace, acks: list[dict[str, Any]] | None = None) -> int:
    """``atp verify --url``: ``GET /v1/verify`` on a running server, with the standard
    library's client (httpx is only a test dependency). Exit 2 when the server cannot be
    reached or refuses the key; the key itself is never printed."""
    import http.client
    import urllib.error
    import urllib.parse
    import urllib.request

    key = args.key or os.environ.get("ATP_ADMIN_KEY")
    if not key:
        print("atp: --url needs an admin key: --key KEY or ATP_ADMIN_KEY", file=sys.stderr)
        return 2
    base = args.url.rstrip("/")
    if urllib.parse.urlsplit(base).scheme not in ("http", "https"):
        print(f"atp: --url takes an http:// or https:// URL, got {args.url!r}", file=sys.stderr)
        return 2
    endpoint = base if base.endswith("/v1/verify") else f"{base}/v1/verify"
    query = urllib.parse.urlencode({"allow_uncovered": str(args.allow_uncovered).lower()})
    req = urllib.request.Request(
        f"{endpoint}?{query}",
        headers={"Authorization": f"Bearer {key}", "Accept": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read()).get("detail") or e.reason
        except (ValueError, AttributeError, OSError):
            detail = e.reason
        what = "refused the key" if e.code in (401, 403) else "failed"
        print(f"atp: {endpoint} {what} (HTTP {e.code}): {detail}", file=sys.stderr)
        return 2
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError is an OSError
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        print(f"atp: cannot reach {endpoint}: {reason}", file=sys.stderr)
        return 2
    try:
        body = json.loads(raw)
    except ValueError:
        print(f"atp: {endpoint} did not answer with JSON", file=sys.stderr)
        return 2
    if not (isinstance(body, dict) and {"ok", "problems", "summary"} <= body.keys()):
        print(f"atp: {endpoint} did not answer with a verify report", file=sys.stderr)
        return 2
    rc = 0 if body["ok"] is True else 1
    if acks is not None:
        rc = _with_acks(body, *_acks_remote(base, key, acks, args.timeout))
    _print_verify(body, args.json)
    return rc


def _acks_remote(
    base: str, key: str, acks: list[dict[str, Any]], timeout: float
) -> tuple[int, list[str]]:
    """``check_acknowledged`` through ``GET /v1/reservations/{id}`` on a running server."""
    import urllib.error
    import urllib.parse
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    root = base.removesuffix("/v1/verify")
    want: dict[str, int] = {}
    problems: list[str] = []
    for n, a in enumerate(acks, start=1):
        rid, qty = a.get("reservation_id"), a.get("qty")
        if not isinstance(rid, str) or not isinstance(qty, int) or isinstance(qty, bool):
            problems.append(f"acknowledgement {n}: needs reservation_id and a whole qty")
            continue
        if rid in want and want[rid] != qty:
            problems.append(f"{rid}: acknowledged twice, with {want[rid]} and {qty} units")
        want[rid] = qty

    def one(item: tuple[str, int]) -> str | None:
        rid, qty = item
        url = f"{root}/v1/reservations/{urllib.parse.quote(rid, safe='')}"
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                res = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return f"{rid}: acknowledged ({qty} units) but not in the book"
            return f"{rid}: the server answered HTTP {e.code}"
        except (OSError, ValueError) as e:
            return f"{rid}: cannot read it: {e}"
        held = sum(int(ln["qty"]) for ln in res.get("lines", []))
        return None if held == qty else f"{rid}: acknowledged {qty} units, the book has {held}"

    with ThreadPoolExecutor(16) as pool:
        problems += [p for p in pool.map(one, want.items()) if p is not None]
    return len(want), problems[:200]


def cmd_reap(args: argparse.Namespace) -> int:
    res = _on_core(lambda core: core.expire_holds())
    print(f"reclaimed {len(res.expired)} expired holds, {res.units} units")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import logging

    from .store import ATP
    from .worker import Worker

    settings = Settings()
    url = resolve_url(settings)
    if url is None:
        return _no_server()
    logging.basicConfig(level=logging.INFO, format="atp worker %(message)s", stream=sys.stderr)

    async def run() -> int:
        async with ATP.from_url(url, settings) as core:
            w = Worker(core, name=args.name, parent_pid=args.exit_with_parent)
            if args.once:
                st = await w.run_once()
            else:
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, w.stop)
                st = await w.run()
        print(
            f"atp worker: {st.batches} count batches done ({st.rows} rows); "
            f"reclaimed {st.holds} expired holds, {st.units} units",
            flush=True,
        )
        return 0

    return asyncio.run(run())


def _grace_seconds(text: str) -> int:
    if not text.isdigit() or int(text) > 10**9:
        raise argparse.ArgumentTypeError("a number of seconds, 0 or more")
    return int(text)


def cmd_reconcile_orders(args: argparse.Namespace) -> int:
    from .book import reconcile_orders
    from .errors import InvalidRequest
    from .store import ATP

    settings = Settings()
    url = resolve_url(settings)
    if url is None:
        return _no_server()
    src = _open_cli_source(args)
    if src is None:
        return 2

    def progress(msg: str) -> None:
        if not args.json:
            print(f"atp: {msg}", file=sys.stderr, flush=True)

    async def run() -> Any:
        async with ATP.from_url(url, settings) as core:
            return await reconcile_orders(
                core,
                src,
                source=src.name,
                fix=args.fix,
                grace_seconds=args.grace_seconds,
                actor=_cli_actor(),
                progress=progress,
            )

    try:
        rep = asyncio.run(run())
    except InvalidRequest as e:  # the source failed while read: nothing was changed
        print(f"atp: {e.detail}; nothing changed", file=sys.stderr)
        return 2
    out = rep.to_dict()
    if args.report:
        Path(args.report).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(rep.table())
    return 0 if rep.ok else 1


def _chunk(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 10_000:
        raise argparse.ArgumentTypeError("rows per call, from 1 to 10000")
    return int(text)


def _units(text: str) -> int:
    if not text.isdigit() or int(text) > 10**15:
        raise argparse.ArgumentTypeError("a whole number of units, 0 or more")
    return int(text)


def _open_cli_source(args: argparse.Namespace) -> RowSource | None:
    """The source a reconcile command names (file or database, ``--query``/``--table``,
    ``--column`` renamings, ``--format``); None after saying why it cannot be opened."""
    from .errors import InvalidRequest
    from .reconcile import parse_columns
    from .sources import open_source

    try:
        columns = parse_columns(args.column or [])
    except ValueError as e:
        print(f"atp: --column: {e}", file=sys.stderr)
        return None
    try:
        return open_source(
            args.source, query=args.query, table=args.table, columns=columns or None,
            fmt=args.format,
        )  # fmt: skip
    except InvalidRequest as e:
        print(f"atp: {e.detail}", file=sys.stderr)
        return None


def _add_source_args(p: argparse.ArgumentParser, rows: str, column_example: str) -> None:
    """The options of a command that reads a source from the system of record."""
    sql = p.add_mutually_exclusive_group()
    sql.add_argument("--query", help=f"SQL returning the {rows} (database source)")
    sql.add_argument("--table", help="read every row of this table (database source)")
    p.add_argument(
        "--column",
        action="append",
        metavar="OURS=THEIRS",
        help=f"read the source's column THEIRS as OURS (repeatable): --column {column_example}",
    )
    p.add_argument("--format", choices=["csv", "jsonl"], help="file format (default: extension)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--report", metavar="PATH", help="also write the JSON report to PATH")


def cmd_reconcile(args: argparse.Namespace) -> int:
    import redis
    from tqdm import tqdm

    from .errors import ATPError, InvalidRequest
    from .reconcile import (
        DEFAULT_CHUNK,
        CountReport,
        default_count_id,
        reconcile,
        write_report,
    )
    from .store import ATP

    settings = Settings()
    url = resolve_url(settings)
    if url is None:
        return _no_server()
    src = _open_cli_source(args)
    if src is None:
        return 2
    # a table's name (schema.table) has no extension to drop, a file's has
    count_id = args.count_id or default_count_id(
        args.table.replace(".", "-") if args.table else src.name
    )
    if not args.count_id:
        # on stderr, so that --json output stays one document
        print(
            f"atp: count id {count_id} (to resume it, run again with --count-id {count_id})",
            file=sys.stderr,
            flush=True,
        )
    bar = tqdm(
        desc="dry run" if args.dry_run else "counting", unit=" rows", file=sys.stderr,
        disable=not sys.stderr.isatty(), dynamic_ncols=True,
    )  # fmt: skip

    def progress(done: int) -> None:
        bar.update(done - bar.n)

    async def run() -> CountReport:
        async with ATP.from_url(url, settings) as core:
            return await reconcile(
                core, src, count_id=count_id, source=src.name, dry_run=args.dry_run,
                tolerance=args.tolerance, assume_utc=args.assume_utc,
                chunk=args.chunk or DEFAULT_CHUNK,
                actor=_cli_actor(), progress=progress,
            )  # fmt: skip

    try:
        report = asyncio.run(run())
    except InvalidRequest as e:  # a bad count id, or the source failed while being read
        bar.close()
        print(f"atp: {e.detail}", file=sys.stderr)
        partial = e.extra.get("report")
        if isinstance(partial, CountReport):
            print(partial.table(), file=sys.stderr)
        return 2
    except (redis.RedisError, ATPError) as e:
        bar.close()
        print(
            f"atp: the backend failed: {e.__class__.__name__}: {e}; rows sent before it may "
            f"have been applied: run again with --count-id {count_id} to finish the count "
            "(no row is applied twice)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        bar.close()
        print(
            f"atp: interrupted; to finish the count, run again with --count-id {count_id} "
            "(no row is applied twice)",
            file=sys.stderr,
        )
        return 130
    bar.close()
    if args.report:
        try:
            write_report(report, args.report)
        except OSError as e:
            print(f"atp: cannot write the report to {args.report}: {e}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.table())
    return 0


def _load_document(path: Path) -> Any:
    """A rules file's data: JSON for ``.json``, YAML for ``.yaml``/``.yml``, else by its
    first character. Raises ValueError (unreadable, not JSON or YAML)."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read it: {e}") from None
    as_json = path.suffix.lower() == ".json" or (
        path.suffix.lower() not in (".yaml", ".yml") and text.lstrip().startswith(("{", "["))
    )
    try:
        return json.loads(text) if as_json else _string_keys(yaml.safe_load(text))
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"not YAML: {e}") from None


def _string_keys(data: Any) -> Any:
    # YAML reads a SKU or location named 12345 as a number; in the document it is a name
    if isinstance(data, dict):
        return {
            str(k) if isinstance(k, int) and not isinstance(k, bool) else k: _string_keys(v)
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [_string_keys(v) for v in data]
    return data


def _version(least: int) -> Any:
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < least or int(text) > 10**15:
            raise argparse.ArgumentTypeError(f"a version is a whole number from {least}")
        return int(text)

    return parse


def _where(loc: list[Any]) -> str:
    return ".".join(str(p) for p in loc) or "(document)"


def _cli_actor() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"[:128]
    except Exception:  # no user name to be had (containers): still say where it came from
        return "cli"


def cmd_rules_apply(args: argparse.Namespace) -> int:
    from .errors import InvalidRules, RulesVersionConflict
    from .rules import parse_rules

    path = Path(args.file)
    try:
        data = _load_document(path)
        doc = parse_rules(data)
    except ValueError as e:
        print(f"{path}: {e}", file=sys.stderr)
        return 2
    except InvalidRules as e:
        print(f"{path}: {e.detail}; nothing applied", file=sys.stderr)
        for err in e.errors:
            print(f"  {_where(err['loc'])}: {err['msg']}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(
            f"{path}: valid ({len(doc.channels)} channels, {len(doc.skus)} SKUs); "
            "nothing applied (--dry-run)"
        )
        return 0
    try:
        version = _on_core(
            lambda core: core.apply_rules(
                doc, expect_version=args.expect_version, actor=_cli_actor()
            )
        ).version
    except RulesVersionConflict as e:
        print(
            f"atp: {e.detail}, not {args.expect_version}; nothing applied (see `atp rules show`)",
            file=sys.stderr,
        )
        return 1
    print(f"rules version {version} applied")
    return 0


def cmd_rules_show(args: argparse.Namespace) -> int:
    import yaml

    from .rules import Rules

    rules: Rules | None = _on_core(
        lambda core: (
            core.rules(max_age=0) if args.version is None else core.rules_version(args.version)
        )
    )
    if rules is None:
        print(f"atp: rules version {args.version} is not kept", file=sys.stderr)
        return 1
    out = rules.to_dict()
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    if rules.version == 0:
        print("# no rules applied (version 0)")
    else:
        print(f"# rules version {rules.version}, applied {out['applied_at']} by {rules.applied_by}")
    if out["rules"]:
        print(yaml.safe_dump(out["rules"], sort_keys=False, allow_unicode=True), end="")
    else:
        print("{}")
    return 0


def cmd_replenishment_settings(args: argparse.Namespace) -> int:
    from .errors import InvalidRequest
    from .replenishment import ReplenishmentSettings

    st = ReplenishmentSettings(args.service_level, args.lead_time, args.review, args.window)
    try:
        _on_core(lambda core: core.set_replenishment_settings(args.sku, st, actor=_cli_actor()))
    except InvalidRequest as e:
        print(f"atp: {e.detail}; nothing stored", file=sys.stderr)
        return 2
    print(
        f"{args.sku}: service level {st.service_level}, lead time {st.lead_time_days} days, "
        f"review {st.review_days} days, window {st.window_days} days"
    )
    return 0


def cmd_replenishment_plan(args: argparse.Namespace) -> int:
    from .errors import InvalidRequest

    try:
        rows = _on_core(
            lambda core: core.plan_replenishment(
                args.sku or None,
                dry_run=args.dry_run,
                apply_safety_stock=args.apply_safety_stock,
                actor=_cli_actor(),
                source="cli",
            )
        )
    except InvalidRequest as e:
        print(f"atp: {e.detail}; nothing written", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return 0
    head = ("sku", "location", "mean/day", "sd/day", "z", "safety", "reorder pt", "order-up-to")
    print("  ".join(f"{h:>12}" for h in head) + "  signal")
    for r in rows:
        cells = (r.sku, r.location, f"{r.mean_daily_demand:.2f}", f"{r.std_daily_demand:.2f}",
                 f"{r.z:.3f}", f"{r.safety_stock:.1f}", r.reorder_point, r.order_up_to)  # fmt: skip
        print("  ".join(f"{c:>12}" for c in cells) + f"  {r.signal or ''}")
    what = "computed, nothing written (--dry-run)" if args.dry_run else "written"
    print(f"{len(rows)} positions {what}")
    return 0


def cmd_replenishment_list(args: argparse.Namespace) -> int:
    sigs = _on_core(lambda core: core.replenishment(limit=args.limit, sku=args.sku))
    if args.json:
        print(json.dumps([s.to_dict() for s in sigs], indent=2))
        return 0
    for s in sigs:
        print(
            f"{s.sku} at {s.location}: order {s.suggested_qty} (position {s.inventory_position}, "
            f"reorder point {s.reorder_point}, order-up-to {s.order_up_to})"
        )
    print(f"{len(sigs)} open signals")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="atp", description="Available-to-promise core")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="serve the HTTP API (embedded Redis unless ATP_REDIS_URL)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--demo", action="store_true", help="seed a demo catalog and print a demo key")
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    p.add_argument(
        "--no-worker",
        action="store_true",
        help="run no background worker (dedicated `atp worker` processes do the work); "
        "the app then reaps expired holds itself",
    )
    p.set_defaults(func=cmd_serve)
    w = sub.add_parser("worker", help="reap expired holds and apply queued counts")
    w.add_argument("--once", action="store_true", help="drain the queue, reap once, and exit")
    w.add_argument("--name", help="consumer name (default: <host>:<pid>:<random>, unique)")
    w.add_argument("--exit-with-parent", type=int, metavar="PID", help=argparse.SUPPRESS)
    w.set_defaults(func=cmd_worker)
    v = sub.add_parser("verify", help="check the whole book against the invariants")
    v.add_argument(
        "--allow-uncovered",
        action="store_true",
        help="report, don't fail, positions left uncovered by short picks or counts",
    )
    v.add_argument("--json", action="store_true")
    v.add_argument(
        "--url",
        metavar="URL",
        help="check through a running server's GET /v1/verify (http://host:port) instead of "
        "reaching Redis; needs an admin key",
    )
    v.add_argument(
        "--acknowledged",
        metavar="FILE",
        help="also check a client's record (JSON Lines of reservation_id, qty): each "
        "acknowledged reservation is in the book once, with that quantity",
    )
    v.add_argument(
        "--key",
        metavar="KEY",
        help="the admin key for --url (default: ATP_ADMIN_KEY)",
    )
    v.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="how long --url waits for the report (default 600)",
    )
    v.set_defaults(func=cmd_verify)
    r = sub.add_parser("reap", help="reclaim expired holds once")
    r.set_defaults(func=cmd_reap)
    ro = sub.add_parser(
        "reconcile-orders",
        help="compare the reservations with the system of record's open orders",
        description="Find ghost reservations (live here, absent there, older than the grace "
        "period), missing ones (open there, absent here) and mismatches (reported, never "
        "fixed); --fix releases the ghosts and recreates the missing. Exit status 0 when "
        "nothing is left to act on, 1 when something is, 2 when the source cannot be read.",
    )
    ro.add_argument(
        "source",
        help="open order lines: a .csv or .jsonl file, or a database URL with --query/--table "
        "(columns reservation_id, channel, sku, location, qty; optional customer_id, ordered_at)",
    )
    ro.add_argument(
        "--fix", action="store_true", help="release the ghosts and recreate the missing"
    )
    ro.add_argument(
        "--grace-seconds",
        type=_grace_seconds,
        default=900,
        metavar="N",
        help="a reservation younger than this is not a ghost (default 900)",
    )
    _add_source_args(ro, "order lines", "sku=item_no")
    ro.set_defaults(func=cmd_reconcile_orders)
    rc_ = sub.add_parser(
        "reconcile",
        help="apply a cycle count from the system of record, as of each count's time",
        description="Bring on_hand in line with counted quantities (columns sku, location, "
        "counted_qty, counted_at: ISO 8601 with a time zone), each as of its counted_at, and "
        "report the drift. Exit status 0 when the count ran (refused rows are in the report), "
        "2 on bad arguments or a source that cannot be read, 1 when Redis fails.",
    )
    rc_.add_argument(
        "source",
        help="a .csv or .jsonl count file, or a database URL (postgresql://..., "
        "sqlite:///counts.db) with --query or --table",
    )
    rc_.add_argument(
        "--count-id",
        metavar="ID",
        help="names the count; running again with the same id resumes it and applies no row "
        "twice (default: the source's name and the time, printed)",
    )
    rc_.add_argument("--dry-run", action="store_true", help="show the drift; change nothing")
    rc_.add_argument(
        "--tolerance",
        type=_units,
        default=0,
        metavar="N",
        help="a position whose drift is at most N units counts as accurate (default 0)",
    )
    rc_.add_argument(
        "--assume-utc", action="store_true", help="read a counted_at without a time zone as UTC"
    )
    _add_source_args(rc_, "count rows", "counted_qty=qty")
    rc_.add_argument(
        "--chunk",
        type=_chunk,
        default=None,
        metavar="N",
        help="rows per script call (default 100)",
    )
    rc_.set_defaults(func=cmd_reconcile)
    rules = sub.add_parser("rules", help="apply or show the allocation rules")
    rsub = rules.add_subparsers(dest="rules_command", required=True)
    ra = rsub.add_parser("apply", help="validate a rules document and apply it as the next version")
    ra.add_argument("file", help="the rules document, YAML or JSON")
    ra.add_argument(
        "--expect-version",
        type=_version(0),
        metavar="N",
        help="apply only if the rules in force are version N (else exit 1)",
    )
    ra.add_argument("--dry-run", action="store_true", help="validate only; apply nothing")
    ra.set_defaults(func=cmd_rules_apply)
    rs = rsub.add_parser("show", help="print the rules in force (YAML)")
    rs.add_argument("--version", type=_version(1), metavar="N", help="an earlier version")
    rs.add_argument("--json", action="store_true", help="JSON, with version and when applied")
    rs.set_defaults(func=cmd_rules_show)
    rp = sub.add_parser("replenishment", help="replenishment settings, plan and open signals")
    rpsub = rp.add_subparsers(dest="replenishment_command", required=True)
    rpc = rpsub.add_parser("settings", help="store how a SKU's levels are planned")
    rpc.add_argument("sku")
    rpc.add_argument("--service-level", type=float, required=True, help="0 < P < 1, e.g. 0.95")
    rpc.add_argument("--lead-time", type=float, required=True, help="lead time in days (> 0)")
    rpc.add_argument("--review", type=float, default=7.0, help="review period, days (default 7)")
    rpc.add_argument("--window", type=int, default=56, help="days of history (default 56)")
    rpc.set_defaults(func=cmd_replenishment_settings)
    rpp = rpsub.add_parser("plan", help="compute and write reorder points from demand history")
    rpp.add_argument("--sku", action="append", help="only this SKU (repeatable)")
    rpp.add_argument("--dry-run", action="store_true", help="compute and print; write nothing")
    rpp.add_argument(
        "--apply-safety-stock",
        action="store_true",
        help="also set each position's ATP safety stock to the computed one",
    )
    rpp.add_argument("--json", action="store_true")
    rpp.set_defaults(func=cmd_replenishment_plan)
    rpl = rpsub.add_parser("list", help="the open signals: what to order, and how much")
    rpl.add_argument("--sku")
    rpl.add_argument("--limit", type=int, default=1000)
    rpl.add_argument("--json", action="store_true")
    rpl.set_defaults(func=cmd_replenishment_list)
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
    except _NoServer:
        return _no_server()
    return rc


if __name__ == "__main__":
    sys.exit(main())
