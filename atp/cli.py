"""The ``atp`` command: ``serve``, ``verify``, ``reap``, ``rules apply``, ``rules show``.

``atp serve`` with no ``ATP_REDIS_URL`` starts the embedded server (``atp.embedded``) with
its data in ``ATP_DATA_DIR`` (default ``./.atp-data``), writes the server's URL to
``<data dir>/server.url`` so other commands (``atp verify``) find it, serves the HTTP API
with uvicorn, and stops the embedded server with itself.

``atp rules apply FILE`` validates a rules document (YAML or JSON, atp.rules) and applies
it as the next version; a document that does not validate is listed problem by problem
(``path: message``), exit status 2, and nothing changes. ``atp rules show`` prints the
rules in force (or ``--version N``) as YAML that ``atp rules apply`` takes back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from .embedded import EmbeddedServer
from .settings import Settings

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
    demo_key: str | None = None
    try:
        url = settings.redis_url
        if not url:
            server = EmbeddedServer(settings.data_dir, appendfsync=settings.appendfsync).start()
            url = server.url
            _url_file(settings).write_text(url + "\n")
            print(
                f"atp: embedded {Path(server.binary).name} at {url}, data in {server.data_dir} "
                f"(AOF appendfsync={settings.appendfsync})",
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
        if server is not None:
            server.stop()
            _url_file(settings).unlink(missing_ok=True)
            print("atp: embedded server stopped", flush=True)


def _no_server() -> int:
    print("atp: no server: set ATP_REDIS_URL, or start `atp serve` first", file=sys.stderr)
    return 2


def cmd_verify(args: argparse.Namespace) -> int:
    from .store import ATP
    from .verify import verify

    settings = Settings()
    url = resolve_url(settings)
    if url is None:
        return _no_server()

    async def run() -> Any:
        core = ATP.from_url(url, settings)
        try:
            return await verify(core, allow_uncovered=args.allow_uncovered)
        finally:
            await core.aclose()

    rep = asyncio.run(run())
    if args.json:
        print(
            json.dumps(
                {
                    "ok": rep.ok,
                    "positions": rep.positions,
                    "reservations": rep.reservations,
                    "movements": rep.movements,
                    "problems": rep.problems,
                    "uncovered": rep.uncovered,
                }
            )
        )
    else:
        for p in rep.problems:
            print(f"  FAIL {p}")
        print(rep.summary())
    return 0 if rep.ok else 1


def cmd_reap(args: argparse.Namespace) -> int:
    from .store import ATP

    settings = Settings()
    url = resolve_url(settings)
    if url is None:
        return _no_server()

    async def run() -> tuple[int, int]:
        async with ATP.from_url(url, settings) as core:
            res = await core.expire_holds()
            return len(res.expired), res.units

    n, units = asyncio.run(run())
    print(f"reclaimed {n} expired holds, {units} units")
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
    from .store import ATP

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
    settings = Settings()
    url = resolve_url(settings)
    if url is None:
        return _no_server()

    async def run() -> int:
        async with ATP.from_url(url, settings) as core:
            rules = await core.apply_rules(
                doc, expect_version=args.expect_version, actor=_cli_actor()
            )
            return rules.version

    try:
        version = asyncio.run(run())
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
    from .store import ATP

    settings = Settings()
    url = resolve_url(settings)
    if url is None:
        return _no_server()

    async def run() -> Rules | None:
        async with ATP.from_url(url, settings) as core:
            if args.version is None:
                return await core.rules(max_age=0)
            return await core.rules_version(args.version)

    rules = asyncio.run(run())
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
    p.set_defaults(func=cmd_serve)
    v = sub.add_parser("verify", help="check the whole book against the invariants")
    v.add_argument(
        "--allow-uncovered",
        action="store_true",
        help="report, don't fail, positions left uncovered by short picks or counts",
    )
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_verify)
    r = sub.add_parser("reap", help="reclaim expired holds once")
    r.set_defaults(func=cmd_reap)
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
    args = parser.parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
