"""`atp serve` as a user runs it: embedded server, demo, refusal without a key, clean stop,
and `atp verify` against what it serves. Each test runs the real command in a subprocess
on loopback and stops it (and with it the embedded server) in a `finally`."""

from __future__ import annotations

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
from collections.abc import Iterator
from pathlib import Path

import pytest

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
