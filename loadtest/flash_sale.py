"""A flash sale on one hot SKU: many buyers, N units, and a check that no unit sold twice.

    ATP_ADMIN_KEY=… locust -f loadtest/flash_sale.py --headless -u 200 -r 100 -t 15s --host URL

Setup (``test_start``, once, on the local or master runner), all through the API with the
admin key: a fresh SKU ``FLASH-<time>`` at ``WH1`` with ``ATP_FLASH_UNITS`` units (100),
rules that protect ``ATP_FLASH_PROTECT`` units (N/5) of it for ``web`` against ``market``
(merged into the rules in force, so other SKUs keep theirs), and one key per channel
(``reserve:web`` and ``reserve:market``) plus a ``fulfil`` key, as a storefront would hold.

Buyers reserve 1 or 2 units each under a unique id: some buy at once (``hold_seconds`` 0),
some hold then confirm, some hold then release, some hold for 1-2 s and walk away (the hold
expires), some retry the same id as after a timeout (the replay must give the same answer),
some come from ``market``. The load shape ramps up, spikes to the peak (``-u``), then
drains: in the last ~45 % of the run every buyer buys at once and keeps trying until the
units are gone, so a run long enough ends sold out with no hold left (exactly N sold).

Every acknowledged outcome is recorded here. At ``test_stop`` it checks: the acknowledged
confirmed units are at most N (no unit sold twice), ``market`` stayed out of the protected
share, every acknowledged reservation is present once with its quantity and a status that
agrees with what the buyer was told, the position's ``committed`` equals the live units of
those reservations and is at most ``on_hand``, and ``GET /v1/verify`` passes (if the server
has it). It prints what it checked and sets Locust's exit code to 1 on any failure.
``ATP_FLASH_REPORT=path`` also writes the result as JSON, and ``ATP_FLASH_ACKS=path`` the
record of acknowledged reservations as JSON Lines (``reservation_id``, ``qty``), which
``atp verify --acknowledged path`` (or with ``--url``) checks against the book again.

The record lives in this process: run it with the local runner (``--headless`` or the web
UI), not distributed over workers.
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import gevent
import requests
from common import admin_request, run_check, run_setup, verify
from common import ok as _ok
from gevent.pool import Pool
from locust import FastHttpUser, LoadTestShape, between, events, task

LOCATION = "WH1"
EXPIRING_HOLD = (1, 2)  # seconds: the holds buyers walk away from
LIVE = ("held", "confirmed")


@dataclass
class Ack:
    """What a buyer was told about one reservation."""

    rid: str
    channel: str
    qty: int
    status: str  # the last acknowledged: held, confirmed or released
    expiring: bool = False  # a hold the buyer walked away from
    # when its units were surely the buyer's (monotonic): from the answer to the reserve
    # until the release was sent or the hold's time ran out counted from the request's
    # sending; the server's own span is wider on both ends, so overlaps here are real
    since: float = 0.0
    until: float = float("inf")


@dataclass
class Sale:
    host: str = ""
    admin_key: str = ""
    sku: str = ""
    units: int = 0
    protect: int = 0
    keys: dict[str, str] = field(default_factory=dict)
    started: float = 0.0
    drain_at: float = float("inf")  # monotonic time the drain phase starts
    ready: bool = False
    acks: dict[str, Ack] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # no answer even after retries


SALE = Sale()


def _admin(method: str, path: str, body: Any = None, **kw: Any) -> requests.Response:
    return admin_request(SALE.host, SALE.admin_key, method, path, body, **kw)


def _setup(environment: Any) -> None:
    # a fresh record per run (the web UI can start several in one process)
    SALE.ready, SALE.drain_at = False, float("inf")
    SALE.acks.clear()
    SALE.problems.clear()
    SALE.unknown.clear()
    SALE.keys.clear()
    SALE.host = environment.host or ""
    SALE.admin_key = os.environ.get("ATP_ADMIN_KEY", "")
    if not SALE.host or not SALE.admin_key:
        raise RuntimeError("set --host and ATP_ADMIN_KEY (the server's admin key)")
    SALE.units = int(os.environ.get("ATP_FLASH_UNITS", "100"))
    SALE.protect = int(os.environ.get("ATP_FLASH_PROTECT", str(SALE.units // 5)))
    SALE.sku = f"FLASH-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:6]}"
    _ok(
        _admin(
            "PUT",
            f"/v1/positions/{SALE.sku}/{LOCATION}",
            {"on_hand": SALE.units, "safety_stock": 0, "reason": "flash sale load test"},
        ),
        "set the position",
    )
    # merge into the rules in force (other SKUs keep theirs); If-Match: another writer wins
    for _ in range(5):
        resp = _admin("GET", "/v1/rules")
        current = _ok(resp, "read the rules")
        doc = current.get("rules") or {}
        channels = doc.setdefault("channels", {})
        channels.setdefault("web", {"priority": 100})
        channels.setdefault("market", {"priority": 10})
        doc.setdefault("skus", {})[SALE.sku] = {"protect": {"web": SALE.protect}}
        resp = _admin("PUT", "/v1/rules", doc, headers={"If-Match": f'"{current["version"]}"'})
        if resp.status_code != 412:
            _ok(resp, "apply the rules")
            break
    else:
        raise RuntimeError("the rules kept changing under the load test")
    for name, scopes in (("web", ["reserve:web"]), ("market", ["reserve:market"])):
        made = _ok(
            _admin("POST", "/v1/keys", {"name": f"flash-{name}", "scopes": scopes}),
            f"create the {name} key",
        )
        SALE.keys[name] = made["key"]
    SALE.keys["fulfil"] = _ok(
        _admin("POST", "/v1/keys", {"name": "flash-fulfil", "scopes": ["fulfil"]}),
        "create the fulfil key",
    )["key"]
    SALE.started = time.monotonic()
    SALE.ready = True
    print(
        f"flash sale: {SALE.sku} at {LOCATION}, {SALE.units} units, "
        f"{SALE.protect} protected for web against market",
        flush=True,
    )


@events.test_start.add_listener
def on_test_start(environment: Any, **_: Any) -> None:
    run_setup(environment, "flash sale", _setup)


class Buyer(FastHttpUser):
    wait_time = between(0.05, 0.3)

    def _reserve(self, channel: str, qty: int, hold: int) -> tuple[str, dict[str, Any] | None]:
        """Reserve under a fresh id; a lost answer is retried with the same id, as a client
        does after a timeout. Returns (id, the reservation or None when refused)."""
        rid = f"{SALE.sku}-{uuid.uuid4().hex[:16]}"
        body = {
            "reservation_id": rid,
            "channel": channel,
            "lines": [{"sku": SALE.sku, "location": LOCATION, "qty": qty}],
            "hold_seconds": hold,
        }
        sent = time.monotonic()  # the first sending: a retry's hold may date from it
        for _ in range(4):
            with self.client.post(
                "/v1/reservations",
                json=body,
                headers=self._auth(channel),
                name="reserve",
                catch_response=True,
            ) as resp:
                if resp.status_code == 201:
                    out = resp.json()
                    got = sum(ln["qty"] for ln in out["lines"])
                    if out["reservation_id"] != rid or got != qty:
                        self._problem(f"{rid}: reserve answered {got} units for {qty}")
                    ack = Ack(rid, channel, qty, out["status"], since=time.monotonic())
                    if 0 < hold < 5:
                        ack.expiring, ack.until = True, sent + hold
                    SALE.acks.setdefault(rid, ack)  # a retried request: the first answer
                    resp.success()
                    return rid, out
                if resp.status_code == 409:
                    resp.success()  # sold out (or the protected share): a normal answer
                    return rid, None
                if resp.status_code not in (0, 502, 503, 504):
                    resp.failure(f"reserve: HTTP {resp.status_code} {resp.text[:200]}")
                    return rid, None
            gevent.sleep(0.1)
        SALE.unknown.append(rid)
        return rid, None

    def _auth(self, channel: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {SALE.keys[channel]}"}

    def _problem(self, text: str) -> None:
        SALE.problems.append(text)

    def _transition(self, rid: str, action: str, expect: str) -> None:
        ack = SALE.acks[rid]
        if action == "release":
            ack.until = time.monotonic()
        for _ in range(4):
            with self.client.post(
                f"/v1/reservations/{rid}/{action}",
                headers=self._auth(ack.channel),
                name=action,
                catch_response=True,
            ) as resp:
                if resp.status_code == 200:
                    status = resp.json()["status"]
                    if status != expect:
                        self._problem(f"{rid}: {action} answered {status}, not {expect}")
                    ack.status = status
                    resp.success()
                    return
                if resp.status_code not in (0, 502, 503, 504):
                    resp.failure(f"{action}: HTTP {resp.status_code} {resp.text[:200]}")
                    self._problem(f"{rid}: {action} refused: HTTP {resp.status_code}")
                    ack.until = float("inf")
                    return
            gevent.sleep(0.1)
        SALE.unknown.append(rid)

    def _draining(self) -> bool:
        return time.monotonic() >= SALE.drain_at

    @task
    def buy(self) -> None:
        if not SALE.ready:
            return
        qty = random.choice((1, 2))
        roll = random.random()
        if self._draining():
            # the end of the sale: everyone buys at once, so it ends sold out with no hold
            channel = "market" if roll < 0.15 else "web"
            self._reserve(channel, qty, 0)
            return
        if roll < 0.15:  # market, protected share aside
            rid, out = self._reserve("market", qty, 0 if random.random() < 0.5 else 30)
            if out and out["status"] == "held":
                self._transition(rid, "confirm", "confirmed")
        elif roll < 0.35:  # buy now
            self._reserve("web", qty, 0)
        elif roll < 0.55:  # hold, pay, confirm
            rid, out = self._reserve("web", qty, 30)
            if out:
                gevent.sleep(random.uniform(0, 0.3))
                self._transition(rid, "confirm", "confirmed")
        elif roll < 0.70:  # hold, then abandon the cart
            rid, out = self._reserve("web", qty, 30)
            if out:
                self._transition(rid, "release", "released")
        elif roll < 0.85:  # hold and walk away: the hold expires by itself
            self._reserve("web", qty, random.randint(*EXPIRING_HOLD))
        else:  # the answer was lost: retry the same id, same body
            self._retry(qty)

    def _retry(self, qty: int) -> None:
        rid, out = self._reserve("web", qty, 30)
        if not out:
            return
        body = {
            "reservation_id": rid,
            "channel": "web",
            "lines": [{"sku": SALE.sku, "location": LOCATION, "qty": qty}],
            "hold_seconds": 30,
        }
        with self.client.post(
            "/v1/reservations",
            json=body,
            headers=self._auth("web"),
            name="reserve (replay)",
            catch_response=True,
        ) as resp:
            again = resp.json() if resp.status_code == 201 else None
            same = again is not None and all(
                again[k] == out[k] for k in ("reservation_id", "channel", "status", "lines")
            )
            if same:
                resp.success()
            else:
                resp.failure(f"replay differs: HTTP {resp.status_code}")
                self._problem(f"{rid}: the replay answered HTTP {resp.status_code} {again}")
        self._transition(rid, "confirm", "confirmed")


class SpikeShape(LoadTestShape):
    """Ramp to a quarter of the peak, spike to the peak (``-u``, at ``-r``), then drain at
    the peak; stops by itself a second before ``-t`` (or after ``ATP_FLASH_SECONDS``, 14)."""

    use_common_options = True

    def tick(self) -> tuple[int, float] | None:
        opts = self.runner.environment.parsed_options if self.runner else None
        peak = int(getattr(opts, "num_users", None) or 200)
        rate = float(getattr(opts, "spawn_rate", None) or 100)
        run_time = getattr(opts, "run_time", None)
        total = max(run_time - 1, 5) if run_time else float(os.environ.get("ATP_FLASH_SECONDS", 14))
        t = self.get_run_time()
        if SALE.ready and SALE.drain_at == float("inf"):
            SALE.drain_at = SALE.started + total * 0.55
        if t < total * 0.2:
            return max(peak // 4, 1), max(rate / 4, 1)
        if t < total:
            return peak, rate
        return None


# -- the check at the end ------------------------------------------------------------------


def _fetch(rid: str) -> tuple[str, requests.Response | None]:
    for _ in range(3):
        try:
            return rid, _admin("GET", f"/v1/reservations/{rid}")
        except requests.RequestException:
            gevent.sleep(0.2)
    return rid, None


def _peak(acks: list[Ack]) -> tuple[int, float]:
    """The most units acknowledged as held or confirmed at the same moment, and when."""
    steps = sorted(
        [(a.since, a.qty) for a in acks]
        + [(a.until, -a.qty) for a in acks if a.until != float("inf")],
        key=lambda s: (s[0], s[1]),  # at a tie, the end first: never a false overlap
    )
    peak, at, now = 0, 0.0, 0
    for t, dq in steps:
        now += dq
        if now > peak:
            peak, at = now, t - SALE.started
    return peak, at


def check() -> dict[str, Any]:
    """Check the book against what the buyers were told; returns the report."""
    failures: list[str] = list(SALE.problems)
    checked: list[str] = []
    acks = list(SALE.acks.values())
    n = SALE.units

    told_confirmed = sum(a.qty for a in acks if a.status == "confirmed")
    market = sum(a.qty for a in acks if a.status == "confirmed" and a.channel == "market")
    checked.append(
        f"acknowledged confirmed units: {told_confirmed} of {n} on hand"
        f" ({market} to market, at most {n - SALE.protect})"
    )
    if told_confirmed > n:
        failures.append(
            f"DOUBLE COMMIT: buyers were told {told_confirmed} units are theirs (confirmed),"
            f" only {n} exist: {told_confirmed - n} units sold twice"
        )
    peak, at = _peak(acks)
    checked.append(f"most units acknowledged as the buyers' at one moment: {peak} of {n}")
    if peak > n:
        failures.append(
            f"DOUBLE COMMIT: {at:.2f} s into the sale, buyers held acknowledged"
            f" reservations for {peak} units at once, only {n} exist"
        )
    if market > n - SALE.protect:
        failures.append(f"market took {market} units, into web's protected {SALE.protect}")

    server: dict[str, dict[str, Any]] = {}
    for rid, resp in Pool(16).imap_unordered(_fetch, [a.rid for a in acks]):
        if resp is None or resp.status_code != 200:
            code = "no answer" if resp is None else f"HTTP {resp.status_code}"
            failures.append(f"{rid}: acknowledged, but GET answers {code}")
        else:
            server[rid] = resp.json()
    live = 0
    for a in acks:
        got = server.get(a.rid)
        if got is None:
            continue
        qty = sum(ln["qty"] for ln in got["lines"])
        if got["reservation_id"] != a.rid or qty != a.qty:
            failures.append(f"{a.rid}: acknowledged {a.qty} units, the book has {qty}")
        status = got["status"]
        allowed = {"confirmed": {"confirmed", "fulfilled"}, "released": {"released"}}.get(
            a.status, {"held", "expired"} if a.expiring else {"held"}
        )
        if status not in allowed:
            failures.append(f"{a.rid}: the buyer was told {a.status}, the book says {status}")
        if status in LIVE:
            live += sum(ln["open"] for ln in got["lines"])
    checked.append(f"{len(server)} of {len(acks)} acknowledged reservations found, once each")
    # a reserve never answered may still have been taken: its units count in the book
    unanswered = [rid for rid in dict.fromkeys(SALE.unknown) if rid not in SALE.acks]
    for _, resp in Pool(16).imap_unordered(_fetch, unanswered):
        if resp is not None and resp.status_code == 200 and resp.json()["status"] in LIVE:
            live += sum(ln["open"] for ln in resp.json()["lines"])

    pos = _ok(_admin("GET", f"/v1/positions/{SALE.sku}/{LOCATION}"), "read the position")
    checked.append(
        f"position {SALE.sku}/{LOCATION}: on_hand {pos['on_hand']}, committed {pos['committed']},"
        f" live units of acknowledged reservations {live}"
    )
    if pos["committed"] > pos["on_hand"]:
        failures.append(
            f"DOUBLE COMMIT: committed {pos['committed']} > on_hand {pos['on_hand']} (I1)"
        )
    if pos["committed"] != live:
        failures.append(
            f"committed {pos['committed']} != the live units of the acknowledged "
            f"reservations {live}"
        )
    if SALE.unknown:
        checked.append(
            f"{len(SALE.unknown)} requests never answered: not acknowledged, so not checked,"
            " but a reservation they took counts in the live units"
        )

    verified, failed = verify(_admin("GET", "/v1/verify"))
    if failed:
        failures.append(failed)
    checked.append(
        f"GET /v1/verify: {verified if isinstance(verified, str) else verified['summary']}"
    )
    sold = sum(
        ln["shipped"] + (ln["open"] if r["status"] == "confirmed" else 0)
        for r in server.values()
        for ln in r["lines"]
    )
    statuses = [r["status"] for r in server.values()]
    return {
        "ok": not failures,
        "sku": SALE.sku,
        "units": n,
        "sold": told_confirmed,
        "peak": peak,
        "sold_in_book": sold,
        "position": pos,
        "reservations": len(acks),
        "by_status": {st: statuses.count(st) for st in sorted(set(statuses))},
        "checked": checked,
        "failures": failures,
        "verify": verified,
    }


@events.test_stop.add_listener
def on_test_stop(environment: Any, **_: Any) -> None:
    if not SALE.ready:
        return
    report = run_check(environment, "flash sale", check, shown=10**6)
    if report is None:
        return
    print(
        f"flash sale: {'PASSED' if report['ok'] else 'FAILED'}, "
        f"sold {report.get('sold')} of {report.get('units')}",
        flush=True,
    )
    if path := os.environ.get("ATP_FLASH_REPORT"):
        with open(path, "w") as f:
            json.dump(report, f, indent=2, default=str)
    if path := os.environ.get("ATP_FLASH_ACKS"):
        with open(path, "w") as f:
            for a in SALE.acks.values():
                f.write(json.dumps({"reservation_id": a.rid, "qty": a.qty}) + "\n")
