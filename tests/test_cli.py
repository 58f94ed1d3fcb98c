"""`atp serve` as a user runs it: embedded server, demo, refusal without a key, clean stop,
and `atp verify` against what it serves. Each test runs the real command in a subprocess
on loopback and stops it (and with it the embedded server) in a `finally`.

`atp rules apply` and `atp rules show` run as subprocesses against the session server."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import yaml

from atp import ATP, EmbeddedServer
from atp.embedded import free_port


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATP_")}
    env.update({"ATP_DATA_DIR": str(tmp_path / "data"), "ATP_REAPER_INTERVAL": "0.2", **extra})
    return env


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _call(
    port: int, method: str, path: str, key: str, body: object | None = None
) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class Served:
    def __init__(self, proc: subprocess.Popen[str], port: int, lines: list[str]) -> None:
        self.proc, self.port, self.lines = proc, port, lines

    @property
    def redis_url(self) -> str:
        m = re.search(r"embedded \S+ at (redis://\S+),", "\n".join(self.lines))
        assert m, self.lines
        return m.group(1)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Served]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "atp",
            "serve",
            "--demo",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 30
        assert proc.stdout is not None
        while time.monotonic() < deadline and not _port_open(port):
            assert proc.poll() is None, "".join(lines) + proc.stdout.read()
            time.sleep(0.1)
        assert _port_open(port), "atp serve did not listen"
        os.set_blocking(proc.stdout.fileno(), False)
        lines = (proc.stdout.read() or "").splitlines()
        yield Served(proc, port, lines)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_serve_demo_prints_key_and_curl_lines_that_work(serve: Served, tmp_path: Path) -> None:
    text = "\n".join(serve.lines)
    assert "data in" in text and str(tmp_path / "data") in text
    key = re.search(r"demo admin key: (\S+)", text).group(1)  # type: ignore[union-attr]
    curls = [ln.strip() for ln in serve.lines if ln.strip().startswith("curl ")]
    assert len(curls) == 3
    assert "/v1/reservations" in curls[0] and "confirm" in curls[1] and "release" in curls[2]
    # what the three lines do, done here without curl
    status, body = _call(serve.port, "POST", "/v1/reservations", key, {
        "reservation_id": "demo-1", "channel": "web", "hold_seconds": 600,
        "lines": [{"sku": "DEMO-TEE", "location": "WH1", "qty": 2}],
    })  # fmt: skip
    assert status == 201 and body["status"] == "held"
    assert (
        _call(serve.port, "POST", "/v1/reservations/demo-1/confirm", key)[1]["status"]
        == "confirmed"
    )
    assert (
        _call(serve.port, "POST", "/v1/reservations/demo-1/release", key)[1]["status"] == "released"
    )
    status, pos = _call(serve.port, "GET", "/v1/positions/DEMO-TEE/WH1", key)
    assert status == 200 and (pos["on_hand"], pos["committed"]) == (100, 0)
    # atp verify finds the embedded server through the data directory
    out = subprocess.run(
        [sys.executable, "-m", "atp", "verify"],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1].startswith("OK:")


def test_serve_stops_cleanly_with_its_embedded_server(serve: Served, tmp_path: Path) -> None:
    redis_port = int(serve.redis_url.rsplit(":", 1)[1].split("/")[0])
    assert _port_open(redis_port)
    serve.proc.send_signal(signal.SIGTERM)
    assert serve.proc.wait(20) == 0
    assert not _port_open(serve.port)
    deadline = time.monotonic() + 10
    while _port_open(redis_port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _port_open(redis_port), "the embedded server outlived atp serve"
    assert not (tmp_path / "data" / "server.url").exists()
    # the data survived the stop: the AOF is on disk
    assert any((tmp_path / "data").rglob("*.aof"))


def test_serve_refuses_without_a_key(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "atp", "serve", "--port", str(free_port())],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "ATP_ADMIN_KEY" in out.stderr and "--demo" in out.stderr


def test_verify_without_a_server_says_how(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "atp", "verify"],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "ATP_REDIS_URL" in out.stderr


# -- atp rules ----------------------------------------------------------------------------

RULES_YAML = """\
description: flash sale
channels:
  web:    {priority: 100, locations: [DC1, DC2], regions: {EU: [DC2, DC1]}}
  stores: {priority: 50, locations: [DC2], allow_split: true}
  market: {priority: 10}
default:
  protect: {web: 5}
  cap: {market: 100}
  buyer_limit: 4
skus:
  FLASH-1:
    protect: {web: 50}
    cap: {market: 20}
    buyer_limit: 1
    locations:
      DC2: {protect: {stores: 10}}
  12345: {buyer_limit: null}
"""
RULES_DOC = {
    "description": "flash sale",
    "channels": {
        "web": {"priority": 100, "locations": ["DC1", "DC2"], "regions": {"EU": ["DC2", "DC1"]}},
        "stores": {"priority": 50, "locations": ["DC2"], "allow_split": True},
        "market": {"priority": 10},
    },
    "default": {"protect": {"web": 5}, "cap": {"market": 100}, "buyer_limit": 4},
    "skus": {
        "FLASH-1": {
            "protect": {"web": 50},
            "cap": {"market": 20},
            "buyer_limit": 1,
            "locations": {"DC2": {"protect": {"stores": 10}}},
        },
        "12345": {"buyer_limit": None},  # a numeric name in YAML is still a name
    },
}
INVALID_YAML = """\
channels:
  web: {priority: 100, locations: [DC1, DC1]}
default:
  protect: {stores: 5}
"""


async def _snapshot(atp: ATP) -> dict[bytes, bytes]:
    out = {}
    async for key in atp.redis.scan_iter(count=1000):
        out[key] = await atp.redis.dump(key)
    return out


Cli = Callable[..., Awaitable["subprocess.CompletedProcess[str]"]]


@pytest.fixture
def cli(server: EmbeddedServer, tmp_path: Path) -> Cli:
    """Runs ``atp`` on the session server, with the ``atp`` fixture's prefix and buckets
    (so that fixture's core sees what the command did and its flush cleans up)."""

    async def run(
        *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "atp",
            *args,
            env=env
            or _env(tmp_path, ATP_REDIS_URL=server.url, ATP_KEY_PREFIX="t:", ATP_BUCKETS="16"),
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())

    return run


async def test_rules_apply_yaml_then_show(cli: Cli, atp: ATP, tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(RULES_YAML)
    out = await cli("rules", "apply", "rules.yaml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "rules version 1 applied"
    rules = await atp.rules(max_age=0)
    assert rules.version == 1 and rules.applied_by.startswith("cli")
    assert rules.to_dict()["rules"] == RULES_DOC
    # as it holds: FLASH-1's own buyer limit over the default's, none for 12345
    assert (rules.buyer_limit("FLASH-1"), rules.buyer_limit("12345"), rules.buyer_limit("X")) == (
        1,
        None,
        4,
    )

    shown = await cli("rules", "show")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("# rules version 1, applied ")
    assert yaml.safe_load(shown.stdout) == RULES_DOC
    # what show prints, apply takes back: the same document as version 2
    (tmp_path / "again.yaml").write_text(shown.stdout)
    out = await cli("rules", "apply", "again.yaml", "--expect-version", "1")
    assert out.returncode == 0 and out.stdout.strip() == "rules version 2 applied", out.stderr
    assert (await atp.rules(max_age=0)).to_dict()["rules"] == RULES_DOC

    as_json = await cli("rules", "show", "--json", "--version", "1")
    assert as_json.returncode == 0
    body = json.loads(as_json.stdout)
    assert set(body) == {"version", "applied_at", "applied_by", "rules"}
    assert body["version"] == 1 and body["rules"] == RULES_DOC
    gone = await cli("rules", "show", "--version", "9")
    assert gone.returncode == 1 and "9" in gone.stderr


async def test_rules_show_without_rules(cli: Cli, atp: ATP) -> None:
    out = await cli("rules", "show")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["# no rules applied (version 0)", "{}"]
    out = await cli("rules", "show", "--json")
    assert json.loads(out.stdout) == {
        "version": 0,
        "applied_at": None,
        "applied_by": "",
        "rules": {},
    }


async def test_rules_apply_invalid_lists_problems_and_changes_nothing(
    cli: Cli, atp: ATP, tmp_path: Path
) -> None:
    (tmp_path / "rules.yaml").write_text(RULES_YAML)
    assert (await cli("rules", "apply", "rules.yaml")).returncode == 0
    before = await _snapshot(atp)
    (tmp_path / "bad.yaml").write_text(INVALID_YAML)
    out = await cli("rules", "apply", "bad.yaml")
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert "nothing applied" in lines[0]
    assert sorted(ln.strip() for ln in lines[1:]) == [
        "channels.web.locations: a location is listed twice",
        "default.protect.stores: channel 'stores' is not declared under channels",
    ]
    (tmp_path / "types.yaml").write_text("channels: {web: {priority: high}}\nextra: 1\n")
    out = await cli("rules", "apply", "types.yaml")
    assert out.returncode == 2
    assert [ln.split(":")[0].strip() for ln in out.stderr.splitlines()[1:]] == [
        "channels.web.priority",
        "extra",
    ]
    for text in ("channels: [unclosed", "- just\n- a list\n"):
        (tmp_path / "worse.yaml").write_text(text)
        out = await cli("rules", "apply", "worse.yaml")
        assert out.returncode == 2 and out.stderr.startswith("worse.yaml: "), out.stderr
    out = await cli("rules", "apply", "missing.yaml")
    assert out.returncode == 2 and "missing.yaml" in out.stderr
    # a dry run of a bad document: the same problems
    out = await cli("rules", "apply", "bad.yaml", "--dry-run")
    assert out.returncode == 2 and "a location is listed twice" in out.stderr
    assert await _snapshot(atp) == before
    assert (await atp.rules(max_age=0)).version == 1


async def test_rules_apply_dry_run_json_and_expect_version(
    cli: Cli, atp: ATP, tmp_path: Path
) -> None:
    (tmp_path / "rules.json").write_text(json.dumps(RULES_DOC))
    out = await cli("rules", "apply", "rules.json", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "valid" in out.stdout and "nothing applied" in out.stdout
    assert (await atp.rules(max_age=0)).version == 0
    out = await cli("rules", "apply", "rules.json", "--expect-version", "0")
    assert out.returncode == 0 and out.stdout.strip() == "rules version 1 applied", out.stderr
    # JSON by its content, whatever the file is called
    (tmp_path / "rules.txt").write_text(json.dumps({"channels": {"web": {}}}))
    before = await _snapshot(atp)
    out = await cli("rules", "apply", "rules.txt", "--expect-version", "0")
    assert out.returncode == 1
    assert "version 1" in out.stderr and "nothing applied" in out.stderr
    assert await _snapshot(atp) == before
    out = await cli("rules", "apply", "rules.txt", "--expect-version", "1")
    assert out.returncode == 0 and out.stdout.strip() == "rules version 2 applied"
    assert (await atp.rules(max_age=0)).to_dict()["rules"] == {"channels": {"web": {}}}
    out = await cli("rules", "apply", "rules.txt", "--expect-version", "-1")
    assert out.returncode == 2 and "--expect-version" in out.stderr


async def test_rules_find_the_embedded_server_as_verify_does(
    cli: Cli, server: EmbeddedServer, atp: ATP, tmp_path: Path
) -> None:
    (tmp_path / "rules.yaml").write_text(RULES_YAML)
    env = _env(tmp_path, ATP_KEY_PREFIX="t:", ATP_BUCKETS="16")
    out = await cli("rules", "apply", "rules.yaml", env=env)
    assert out.returncode == 2 and "ATP_REDIS_URL" in out.stderr
    assert (await atp.rules(max_age=0)).version == 0
    # `atp serve` writes the embedded server's URL here
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "server.url").write_text(server.url + "\n")
    out = await cli("rules", "apply", "rules.yaml", env=env)
    assert out.returncode == 0, out.stderr
    assert (await atp.rules(max_age=0)).version == 1
    out = await cli("rules", "show", env=env)
    assert yaml.safe_load(out.stdout) == RULES_DOC


# -- atp verify --url ---------------------------------------------------------------------

SERVED_KEY = "atp_verify_url_0123456789abcdefXYZ"


@pytest.fixture
def served_api(server: EmbeddedServer, tmp_path: Path) -> Iterator[str]:
    """``atp serve --no-worker`` on the session server, with the ``atp`` fixture's prefix
    and buckets (the test writes the book through that core); yields the base URL."""
    port = free_port()
    env = _env(
        tmp_path,
        ATP_REDIS_URL=server.url,
        ATP_KEY_PREFIX="t:",
        ATP_BUCKETS="16",
        ATP_ADMIN_KEY=SERVED_KEY,
    )
    cmd = [sys.executable, "-m", "atp", "serve", "--no-worker", "--port", str(port)]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [*cmd, "--log-level", "warning"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _port_open(port):
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            time.sleep(0.1)
        assert _port_open(port), "atp serve did not listen"
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


async def test_verify_url_passes_then_fails_on_a_broken_book(
    cli: Cli, atp: ATP, served_api: str, tmp_path: Path
) -> None:
    await atp.set_position("SKU-1", "DC1", 10, reason="initial load")
    await atp.reserve("r-1", "web", [("SKU-1", "DC1", 3)])
    # the key from the environment, as the locustfiles pass it
    with_key = _env(tmp_path, ATP_ADMIN_KEY=SERVED_KEY)
    out = await cli("verify", "--url", served_api, env=with_key)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines() == [
        "OK: 1 positions, 1 reservation parts, 2 movements checked; 0 uncovered positions"
    ]
    # the same report as the direct mode reads from Redis
    direct = await cli("verify", "--json")
    remote = await cli("verify", "--url", served_api + "/", "--key", SERVED_KEY, "--json")
    assert remote.returncode == direct.returncode == 0
    assert json.loads(remote.stdout) == json.loads(direct.stdout)
    # a unit committed behind the scripts' back
    await atp.redis.hincrby(atp.keys.position("SKU-1", "DC1").pos, "committed", 1)
    out = await cli("verify", "--url", served_api, env=with_key)
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stdout.rstrip().splitlines()
    assert "  FAIL SKU-1@DC1: committed 4 but live reservations hold 3 (I2)" in lines
    assert lines[-1].startswith("FAILED (")
    assert all(ln.startswith("  FAIL ") for ln in lines[:-1])
    body = json.loads((await cli("verify", "--url", served_api, "--json", env=with_key)).stdout)
    assert body["ok"] is False and body["problems"] == [ln[7:] for ln in lines[:-1]]
    assert SERVED_KEY not in out.stdout + out.stderr


async def test_verify_url_exits_2_on_auth_and_connection_errors(
    cli: Cli, served_api: str, tmp_path: Path
) -> None:
    wrong = "atp_not_the_key_0123456789abcdef"
    out = await cli("verify", "--url", served_api, "--key", wrong)
    assert out.returncode == 2 and out.stdout == ""
    assert "refused the key (HTTP 401)" in out.stderr and wrong not in out.stderr
    # no key at all
    out = await cli("verify", "--url", served_api, env=_env(tmp_path))
    assert out.returncode == 2 and "ATP_ADMIN_KEY" in out.stderr
    # nothing listening
    out = await cli("verify", "--url", f"http://127.0.0.1:{free_port()}", "--key", SERVED_KEY)
    assert out.returncode == 2 and "cannot reach" in out.stderr
    assert SERVED_KEY not in out.stderr
    out = await cli("verify", "--url", "127.0.0.1:8000", "--key", SERVED_KEY)
    assert out.returncode == 2 and "http://" in out.stderr


async def test_verify_checks_a_clients_record_of_acknowledged_reservations(
    cli: Cli, atp: ATP, served_api: str, tmp_path: Path
) -> None:
    await atp.set_position("SKU-1", "DC1", 10, reason="initial load")
    await atp.reserve("r-1", "web", [("SKU-1", "DC1", 3)])
    await atp.reserve("r-2", "web", [("SKU-1", "DC1", 2)])
    good = tmp_path / "acks.jsonl"
    good.write_text('{"reservation_id": "r-1", "qty": 3}\n{"reservation_id": "r-2", "qty": 2}\n')
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"reservation_id": "r-1", "qty": 3}\n{"reservation_id": "r-2", "qty": 1}\n'
        '{"reservation_id": "r-9", "qty": 1}\n'
    )
    with_key = _env(tmp_path, ATP_ADMIN_KEY=SERVED_KEY)
    for remote in ([], ["--url", served_api]):
        env = with_key if remote else None  # direct: the session server, as set up
        out = await cli("verify", *remote, "--acknowledged", str(good), env=env)
        assert out.returncode == 0, out.stdout + out.stderr
        assert out.stdout.strip().splitlines()[-1] == "OK: 2 acknowledged reservations checked"
        out = await cli("verify", *remote, "--acknowledged", str(bad), env=env)
        assert out.returncode == 1, out.stdout + out.stderr
        assert "  FAIL r-2: acknowledged 1 units, the book has 2" in out.stdout
        assert "  FAIL r-9: acknowledged (1 units) but not in the book" in out.stdout
        body = json.loads(
            (await cli("verify", *remote, "--acknowledged", str(bad), "--json", env=env)).stdout
        )
        assert body["ok"] is True and body["acknowledged"]["checked"] == 3
        assert len(body["acknowledged"]["problems"]) == 2
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    out = await cli("verify", "--acknowledged", str(tmp_path / "broken.jsonl"))
    assert out.returncode == 2 and "not JSON" in out.stderr


# -- atp replenishment -----------------------------------------------------------------------


async def test_replenishment_settings_plan_and_list(cli: Cli, atp: ATP) -> None:
    await atp.set_position("RP-1", "DC1", 100, reason="init")
    bad = await cli(
        "replenishment", "settings", "RP-1", "--service-level", "1.5", "--lead-time", "3"
    )
    assert bad.returncode == 2 and "service_level" in bad.stderr
    assert await atp.replenishment_settings("RP-1") is None
    ok = await cli(
        "replenishment", "settings", "RP-1", "--service-level", "0.95", "--lead-time", "4",
        "--review", "0", "--window", "7",
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    dry = await cli("replenishment", "plan", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    [row] = json.loads(dry.stdout)
    assert (row["sku"], row["location"], row["applied"], row["days"]) == ("RP-1", "DC1", False, 7)
    lv = await atp.replenishment_levels("RP-1", "DC1")
    assert lv is not None and lv.reorder_point is None  # a dry run writes nothing
    done = await cli("replenishment", "plan", "--sku", "RP-1")
    assert done.returncode == 0 and "1 positions written" in done.stdout, done.stderr
    lv = await atp.replenishment_levels("RP-1", "DC1")
    assert lv is not None and lv.reorder_point == 0  # no demand before today
    await atp.set_replenishment("RP-1", "DC1", 40, 150)
    await atp.reserve("rp-big", "b2b", [("RP-1", "DC1", 70)], hold_seconds=0)
    listed = await cli("replenishment", "list")
    assert listed.returncode == 0, listed.stderr
    assert "RP-1 at DC1: order 120 (position 30, reorder point 40" in listed.stdout
    unplanned = await cli("replenishment", "plan", "--sku", "NOPE")
    assert unplanned.returncode == 2 and "no replenishment settings" in unplanned.stderr
