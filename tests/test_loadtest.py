"""The flash-sale load test (loadtest/flash_sale.py), CI-sized, as an operator runs it:
``atp serve`` in a subprocess on loopback, then ``locust --headless`` in another, 200 users
for 15 s on 100 units. It must sell exactly 100, none twice, and pass its checks; and the
same run against a deliberately broken reserve (tests/broken_app.py) must fail them.

Locust runs on gevent, so it is only ever a subprocess here, never imported."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from atp import EmbeddedServer
from atp.embedded import free_port

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = ROOT / "loadtest" / "flash_sale.py"
LOCUST = shutil.which("locust", path=str(Path(sys.executable).parent)) or shutil.which("locust")
KEY = "loadtest-admin-key-0123456789abcdef"
UNITS = 100

pytestmark = pytest.mark.skipif(LOCUST is None, reason="locust is not installed (test extras)")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATP_")}
    env.update(
        {
            "ATP_DATA_DIR": str(tmp_path / "data"),
            "ATP_ADMIN_KEY": KEY,
            "ATP_REAPER_INTERVAL": "0.2",
            **extra,
        }
    )
    return env


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def _served(cmd: list[str], env: dict[str, str], port: int, log: Path) -> Iterator[str]:
    """Run a server command until the block ends; stop it (SIGTERM, then kill) in a finally."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not _port_open(port):
                assert proc.poll() is None, log.read_text()
                time.sleep(0.1)
            assert _port_open(port), f"the server did not listen\n{log.read_text()}"
            yield f"http://127.0.0.1:{port}"
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _flash_sale(url: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], Any]:
    report = tmp_path / "flash-report.json"
    assert LOCUST is not None
    cmd = [LOCUST, "-f", str(LOCUSTFILE), "--headless", "-u", "200", "-r", "100", "-t", "15s"]
    out = subprocess.run(
        [*cmd, "--host", url, "--only-summary"],
        env=_env(
            tmp_path,
            ATP_FLASH_UNITS=str(UNITS),
            ATP_FLASH_REPORT=str(report),
            ATP_FLASH_ACKS=str(tmp_path / "acks.jsonl"),
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
    )
    text = out.stdout + out.stderr
    assert report.exists(), f"locust wrote no report (exit {out.returncode})\n{text[-4000:]}"
    return out, json.loads(report.read_text())


def _get(url: str, path: str) -> Any:
    req = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_flash_sale_sells_exactly_the_units_none_twice(tmp_path: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "atp", "serve", "--port", str(port), "--log-level", "warning"]
    with _served(cmd, _env(tmp_path), port, tmp_path / "serve.log") as url:
        out, report = _flash_sale(url, tmp_path)
        text = out.stdout + out.stderr
        assert out.returncode == 0, text[-4000:]
        assert report["ok"] and not report["failures"], report["failures"]
        assert "flash sale: PASSED, sold 100 of 100" in text
        # sold out, every unit confirmed once, no hold left over
        assert report["sold"] == report["sold_in_book"] == UNITS
        pos = _get(url, f"/v1/positions/{report['sku']}/WH1")
        assert pos["on_hand"] == pos["committed"] == UNITS and pos["available"] == 0
        assert report["verify"]["ok"] is True, report["verify"]
        # the record checked again by the verifier, through the server
        acks = tmp_path / "acks.jsonl"
        again = subprocess.run(
            [sys.executable, "-m", "atp", "verify", "--url", url, "--key", KEY,
             "--acknowledged", str(acks)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert again.returncode == 0, again.stdout + again.stderr
        n = len(acks.read_text().splitlines())
        assert again.stdout.strip().splitlines()[-1] == f"OK: {n} acknowledged reservations checked"
        assert report["by_status"].get("confirmed", 0) >= UNITS // 2
        assert report["position"]["committed_by_channel"].get("market", 0) <= UNITS - UNITS // 5


def test_flash_sale_catches_a_read_then_write_reserve(tmp_path: Path) -> None:
    srv = EmbeddedServer(tmp_path / "redis", appendfsync="everysec")
    srv.start()
    try:
        port = free_port()
        cmd = [sys.executable, "-m", "uvicorn", "--factory", "--app-dir", "tests"]
        cmd += ["broken_app:create", "--port", str(port), "--log-level", "warning"]
        env = _env(tmp_path, ATP_REDIS_URL=srv.url)
        with _served(cmd, env, port, tmp_path / "serve.log") as url:
            out, report = _flash_sale(url, tmp_path)
    finally:
        srv.stop()
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-4000:]
    assert "DOUBLE COMMIT" in text and "flash sale: FAILED" in text, report["failures"]
    assert report["peak"] > UNITS  # units acknowledged to two buyers at the same moment
    assert report["verify"]["ok"] is False  # the server's own verifier agrees


CATALOG = ROOT / "loadtest" / "catalog.py"


def _catalog(url: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """loadtest/catalog.py, CI-sized: 300 SKUs (Zipf popularity), 40 users for 8 s."""
    assert LOCUST is not None
    cmd = [LOCUST, "-f", str(CATALOG), "--headless", "-u", "40", "-r", "40", "-t", "8s"]
    return subprocess.run(
        [*cmd, "--host", url, "--only-summary"],
        env=_env(tmp_path, ATP_CATALOG_SKUS="300", ATP_CATALOG_SPOT="30"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_catalog_load_test_checks_the_book(tmp_path: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "atp", "serve", "--port", str(port), "--log-level", "warning"]
    with _served(cmd, _env(tmp_path), port, tmp_path / "serve.log") as url:
        out = _catalog(url, tmp_path)
    text = out.stdout + out.stderr
    said = "\n".join(ln for ln in text.splitlines() if "checked:" in ln or "FAILED" in ln)
    assert out.returncode == 0, said or text[-4000:]
    assert "catalog: PASSED" in text, said
    checked = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("checked:")]
    assert any("availability agrees with the position on the 30 most popular" in c for c in checked)
    assert any(c.startswith("checked: GET /v1/verify: OK") for c in checked), checked
    assert "FAILED:" not in text


def test_catalog_load_test_catches_a_read_then_write_reserve(tmp_path: Path) -> None:
    srv = EmbeddedServer(tmp_path / "redis", appendfsync="everysec")
    srv.start()
    try:
        port = free_port()
        cmd = [sys.executable, "-m", "uvicorn", "--factory", "--app-dir", "tests"]
        cmd += ["broken_app:create", "--port", str(port), "--log-level", "warning"]
        env = _env(tmp_path, ATP_REDIS_URL=srv.url)
        with _served(cmd, env, port, tmp_path / "serve.log") as url:
            out = _catalog(url, tmp_path)
    finally:
        srv.stop()
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-4000:]
    assert "catalog: FAILED" in text, text[-4000:]
