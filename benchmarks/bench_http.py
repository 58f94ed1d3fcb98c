"""HTTP reserve throughput against the same server's trivial endpoint, in one run.

Starts an embedded server and the API (uvicorn, one worker by default) on loopback, seeds
one hot SKU, and drives both endpoints with wrk (Debian package ``wrk``) at 64 connections,
interleaved over several rounds (the machine is shared and noisy: compare the ratio, from
medians of one run). Prints requests/s, p50 and p99 for

* ``GET /healthz`` (the trivial endpoint: routing, no auth, no Redis), and
* ``POST /v1/reservations`` (auth, validation, one script call, a 201 body),

and their ratio. Every reserve must answer 201 (the SKU holds far more than is sold).

    python benchmarks/bench_http.py [--seconds 8] [--rounds 3] [--connections 64]
                                    [--workers 1] [--appendfsync everysec]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from atp.embedded import EmbeddedServer, free_port  # noqa: E402

ADMIN = "bench-admin-key-" + os.urandom(8).hex()

RESERVE_LUA = """
local counter = 0
local prefix = "%s"
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
request = function()
  counter = counter + 1
  local body = string.format('{"reservation_id":"%%s-%%d","channel":"web",' ..
    '"lines":[{"sku":"HOT","location":"WH1","qty":1}]}', prefix, counter)
  return wrk.format(nil, "/v1/reservations", nil, body)
end
"""


def call(base: str, method: str, path: str, body: object | None = None, key: str = ADMIN) -> object:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {key}")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def wait_http(base: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(base + "/healthz", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the API did not come up")


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(url: str, seconds: int, connections: int, script: str | None) -> dict[str, float]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "5s"]
    if script:
        cmd += ["-s", script]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=seconds + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = {
        m.group(1): _ms(m.group(2), m.group(3))
        for m in re.finditer(r"\s(50|99)%\s+([\d.]+)(us|ms|s)\b", out)
    }
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    return {
        "rps": rps,
        "p50": lat.get("50", float("nan")),
        "p99": lat.get("99", float("nan")),
        "non2xx": float(bad.group(1)) if bad else 0.0,
        "socket_errors": 1.0 if errors else 0.0,
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--appendfsync", default="everysec", choices=["always", "everysec", "no"])
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        print("bench_http needs wrk: apt-get install wrk", file=sys.stderr)
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="atp-bench-http-"))
    server = EmbeddedServer(tmp / "redis", appendfsync=args.appendfsync)
    api: subprocess.Popen[bytes] | None = None
    try:
        server.start()
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "ATP_REDIS_URL": server.url,
            "ATP_ADMIN_KEY": ADMIN,
            "ATP_KEY_PREFIX": "bench:",
        }
        api = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory",
             "--host", "127.0.0.1", "--port", str(port), "--workers", str(args.workers),
             "--log-level", "warning", "--no-access-log"],
            cwd=ROOT, env=env,
        )  # fmt: skip
        wait_http(base)
        call(base, "PUT", "/v1/positions/HOT/WH1", {"on_hand": 10**12, "reason": "bench"})
        key = call(base, "POST", "/v1/keys", {"name": "bench", "scopes": ["reserve:web"]})["key"]  # type: ignore[index]
        script = tmp / "reserve.lua"

        def reserve_script(round_no: int) -> str:
            script.write_text(RESERVE_LUA % (f"r{round_no}-{os.urandom(3).hex()}", key))
            return str(script)

        print(f"server {server.binary} {Path(server.binary).name}, appendfsync={args.appendfsync}; "
              f"uvicorn workers={args.workers}; wrk -t1 -c{args.connections} -d{args.seconds}s; "
              f"python {platform.python_version()}, {os.cpu_count()} cpus")  # fmt: skip
        # warm-up
        run_wrk(base + "/healthz", 2, args.connections, None)
        run_wrk(base + "/v1/reservations", 2, args.connections, reserve_script(0))
        trivial: list[dict[str, float]] = []
        reserve: list[dict[str, float]] = []
        for r in range(1, args.rounds + 1):
            trivial.append(run_wrk(base + "/healthz", args.seconds, args.connections, None))
            reserve.append(
                run_wrk(
                    base + "/v1/reservations", args.seconds, args.connections, reserve_script(r)
                )
            )
            print(f"  round {r}: trivial {trivial[-1]['rps']:.0f}/s, "
                  f"reserve {reserve[-1]['rps']:.0f}/s "
                  f"(non-2xx {reserve[-1]['non2xx']:.0f})", flush=True)  # fmt: skip

        def med(rows: list[dict[str, float]], k: str) -> float:
            return statistics.median(row[k] for row in rows)

        print()
        print(f"{'endpoint':<28}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
        for name, rows in (("GET /healthz (trivial)", trivial), ("POST /v1/reservations", reserve)):
            print(
                f"{name:<28}{med(rows, 'rps'):>10.0f}"
                f"{med(rows, 'p50'):>10.2f}{med(rows, 'p99'):>10.2f}"
            )
        ratio = med(reserve, "rps") / med(trivial, "rps")
        print(f"\nratio reserve / trivial: {ratio:.2f}  (aim >= 0.60)")
        print(
            f"reserve p99: {med(reserve, 'p99'):.1f} ms at {args.connections} connections "
            "(aim < 50 ms)"
        )
        failed = sum(row["non2xx"] for row in reserve)
        print(f"reserve answers other than 201: {failed:.0f}")
        pos = call(base, "GET", "/v1/positions/HOT/WH1")
        print(f"units committed on the hot SKU: {pos['committed']}")  # type: ignore[index]
        return 0 if failed == 0 else 1
    finally:
        if api is not None:
            api.terminate()
            try:
                api.wait(10)
            except subprocess.TimeoutExpired:
                api.kill()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
