"""Helpers the locustfiles share: admin calls through the API, and ``GET /v1/verify``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import requests


def admin_request(
    host: str, key: str, method: str, path: str, body: Any = None, **kw: Any
) -> requests.Response:
    """One call with the admin key; ``session=`` reuses connections (default: none)."""
    session = kw.pop("session", None) or requests
    return session.request(
        method,
        host.rstrip("/") + path,
        json=body,
        headers={"Authorization": f"Bearer {key}", **kw.pop("headers", {})},
        timeout=30,
        **kw,
    )


def ok(resp: requests.Response, what: str) -> Any:
    """The JSON body, or a RuntimeError naming what failed."""
    if resp.status_code >= 300:
        raise RuntimeError(f"{what}: HTTP {resp.status_code} {resp.text[:300]}")
    return resp.json()


def verify(resp: requests.Response) -> tuple[Any, str | None]:
    """``GET /v1/verify``'s answer as (what to report, the failure or None); a 404 (a server
    without it) is reported, not failed."""
    if resp.status_code == 404:
        return "not available (404): only the checks above", None
    rep = ok(resp, "GET /v1/verify")
    out = {k: rep.get(k) for k in ("ok", "summary", "problems")}
    if not rep.get("ok"):
        return out, f"GET /v1/verify failed: {rep.get('summary')} {rep.get('problems')}"
    return out, None


def run_setup(environment: Any, name: str, setup: Callable[[Any], None]) -> None:
    """Run a locustfile's set-up once, on the local or master runner (not on workers); a
    failure is printed, sets the exit code and stops the run."""
    from locust.runners import WorkerRunner

    if isinstance(environment.runner, WorkerRunner):
        return
    try:
        setup(environment)
    except Exception as e:
        print(f"{name} setup FAILED: {e}", file=sys.stderr, flush=True)
        environment.process_exit_code = 1
        if environment.runner is not None:
            environment.runner.quit()


def run_check(
    environment: Any, name: str, check: Callable[[], dict[str, Any]], shown: int = 50
) -> dict[str, Any] | None:
    """Run a locustfile's end-of-test check on the local runner, print what it checked and
    what failed, and set the exit code; None on a worker or when the record is elsewhere
    (a distributed run keeps its record in the workers: not checkable here)."""
    from locust.runners import MasterRunner, WorkerRunner

    if isinstance(environment.runner, WorkerRunner):
        return None
    if isinstance(environment.runner, MasterRunner):
        print(f"{name}: distributed run; the record lives in the workers: not checked")
        environment.process_exit_code = 1
        return None
    try:
        report = check()
    except Exception as e:
        report = {"ok": False, "failures": [f"the check itself failed: {e!r}"], "checked": []}
    print(f"\n{name} check:", flush=True)
    for line in report["checked"]:
        print(f"  checked: {line}")
    for line in report["failures"][:shown]:
        print(f"  FAILED: {line}")
    if len(report["failures"]) > shown:
        print(f"  … and {len(report['failures']) - shown} more failures")
    if not report["ok"]:
        environment.process_exit_code = 1
    return report
