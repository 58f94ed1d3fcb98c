"""A catalog under load: listing pages read availability while buyers reserve across it.

    ATP_ADMIN_KEY=… locust -f loadtest/catalog.py --headless -u 100 -r 50 -t 20s --host URL

Setup (``test_start``, once, on the local or master runner), all through the API with the
admin key: ``ATP_CATALOG_SKUS`` (10,000) fresh SKUs ``CAT-<time>-<hex>-NNNNN`` at ``WH1``,
each with 20-100 units (``PUT /v1/positions/{sku}/{location}``, 32 at a time), and one
``reserve:web`` key, as a storefront holds. Popularity is Zipf: the SKU of rank k is picked
with weight 1/k^s, s = ``ATP_CATALOG_ZIPF`` (1.1), so the first few SKUs sell out and the
long tail is barely touched.

``Buyer`` reserves 1 or 2 units of a SKU picked by popularity under a unique id: some buy
at once (``hold_seconds`` 0), some hold then confirm, some hold then release. ``Shopper``
loads listing pages: ``GET /v1/availability`` for 20-50 SKUs at once (the API takes up to
500), half of them picked by popularity (a "best sellers" page), half a contiguous slice of
the catalog (a category page); every answer must list the SKUs asked for, in order, with an
ATP of 0 or more.

Every acknowledged reservation is recorded here. At ``test_stop`` it checks: for each SKU
reserved, the acknowledged live units (held or confirmed, not released) are at most its
stock, and the position's ``committed`` equals them (unless a request on it went
unanswered) and is at most ``on_hand``; for the most popular SKUs (``ATP_CATALOG_SPOT``,
50), ``GET /v1/availability`` agrees with the positions (ATP = on_hand - committed -
safety_stock, or at most that when the rules in force have a default); and ``GET /v1/verify``
passes. It prints what it checked and sets Locust's exit code to 1 on any failure.

The record lives in this process: run it with the local runner (``--headless`` or the web
UI), not distributed over workers.
"""

from __future__ import annotations

import itertools
import os
import random
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import gevent
import requests
from common import admin_request, ok, run_check, run_setup, verify
from gevent.pool import Pool
from locust import FastHttpUser, between, events, task

LOCATION = "WH1"
CHANNEL = "web"
HOLD = 300  # seconds: every hold is confirmed or released long before it could expire
PAGE = (20, 50)  # SKUs on a listing page
SETUP_POOL = 32  # concurrent admin requests while setting up and checking


@dataclass
class Ack:
    """What a buyer was told about one reservation."""

    rid: str
    sku: str
    qty: int
    status: str  # the last acknowledged: held, confirmed or released


@dataclass
class Catalog:
    host: str = ""
    admin_key: str = ""
    key: str = ""
    prefix: str = ""
    exponent: float = 1.1
    skus: list[str] = field(default_factory=list)  # by popularity: index 0 is rank 1
    stock: dict[str, int] = field(default_factory=dict)
    cum_weights: list[float] = field(default_factory=list)
    rules_default: bool = False  # the rules in force have a default section
    ready: bool = False
    acks: dict[str, Ack] = field(default_factory=dict)
    # rid -> sku: never answered (after retries, or cut off by the end of the test while in
    # flight: a request counts as unanswered from its sending until its answer)
    unknown: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    pages: int = 0
    items_read: int = 0


CAT = Catalog()
SESSION = requests.Session()
SESSION.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=SETUP_POOL))


def _admin(method: str, path: str, body: Any = None, **kw: Any) -> requests.Response:
    return admin_request(CAT.host, CAT.admin_key, method, path, body, session=SESSION, **kw)


def _units(rank: int) -> int:
    """The stock of the SKU of this rank (1-based): 20-100, spread over the catalog."""
    return 20 + (rank * 37) % 81


def _put(i: int) -> str | None:
    sku = CAT.skus[i]
    body = {"on_hand": CAT.stock[sku], "safety_stock": 0, "reason": "catalog load test"}
    last = ""
    for _ in range(3):
        try:
            resp = _admin("PUT", f"/v1/positions/{sku}/{LOCATION}", body)
        except requests.RequestException as e:
            last = repr(e)
        else:
            if resp.status_code < 300:
                return None
            last = f"HTTP {resp.status_code} {resp.text[:200]}"
        gevent.sleep(0.2)
    return f"{sku}: {last}"


def _setup(environment: Any) -> None:
    CAT.ready = False
    CAT.acks.clear()
    CAT.unknown.clear()
    CAT.problems.clear()
    CAT.pages = CAT.items_read = 0
    CAT.host = environment.host or ""
    CAT.admin_key = os.environ.get("ATP_ADMIN_KEY", "")
    if not CAT.host or not CAT.admin_key:
        raise RuntimeError("set --host and ATP_ADMIN_KEY (the server's admin key)")
    n = int(os.environ.get("ATP_CATALOG_SKUS", "10000"))
    CAT.exponent = float(os.environ.get("ATP_CATALOG_ZIPF", "1.1"))
    if n < PAGE[1]:
        raise RuntimeError(f"ATP_CATALOG_SKUS must be at least {PAGE[1]} (a listing page)")
    CAT.prefix = f"CAT-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:6]}"
    CAT.skus = [f"{CAT.prefix}-{k:05d}" for k in range(1, n + 1)]
    CAT.stock = {sku: _units(k) for k, sku in enumerate(CAT.skus, 1)}
    CAT.cum_weights = list(itertools.accumulate(1 / k**CAT.exponent for k in range(1, n + 1)))
    CAT.rules_default = bool(
        (ok(_admin("GET", "/v1/rules"), "read the rules").get("rules") or {}).get("default")
    )
    t0 = time.monotonic()
    failed = [e for e in Pool(SETUP_POOL).imap_unordered(_put, range(n)) if e]
    if failed:
        raise RuntimeError(f"{len(failed)} positions not set, e.g. {failed[:3]}")
    took = time.monotonic() - t0
    CAT.key = ok(
        _admin("POST", "/v1/keys", {"name": "catalog-web", "scopes": [f"reserve:{CHANNEL}"]}),
        "create the reserve key",
    )["key"]
    CAT.ready = True
    top = CAT.cum_weights[0] / CAT.cum_weights[-1]
    print(
        f"catalog: {n} SKUs {CAT.prefix}-NNNNN at {LOCATION} set up in {took:.1f} s,"
        f" Zipf s={CAT.exponent} (the top SKU draws {top:.1%} of picks)",
        flush=True,
    )


@events.test_start.add_listener
def on_test_start(environment: Any, **_: Any) -> None:
    run_setup(environment, "catalog", _setup)


def _popular(k: int = 1) -> list[str]:
    return random.choices(CAT.skus, cum_weights=CAT.cum_weights, k=k)


class Buyer(FastHttpUser):
    weight = 2
    wait_time = between(0.05, 0.3)

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {CAT.key}"}

    def _reserve(self, sku: str, qty: int, hold: int) -> tuple[str, dict[str, Any] | None]:
        """Reserve under a fresh id; a lost answer is retried with the same id."""
        rid = f"{sku}-{uuid.uuid4().hex[:16]}"
        body = {
            "reservation_id": rid,
            "channel": CHANNEL,
            "lines": [{"sku": sku, "location": LOCATION, "qty": qty}],
            "hold_seconds": hold,
        }
        CAT.unknown[rid] = sku  # until it is answered (the test may stop it in flight)
        for _ in range(4):
            with self.client.post(
                "/v1/reservations",
                json=body,
                headers=self._auth(),
                name="reserve",
                catch_response=True,
            ) as resp:
                if resp.status_code == 201:
                    out = resp.json()
                    got = sum(ln["qty"] for ln in out["lines"])
                    if out["reservation_id"] != rid or got != qty:
                        CAT.problems.append(f"{rid}: reserve answered {got} units for {qty}")
                    CAT.acks.setdefault(rid, Ack(rid, sku, qty, out["status"]))
                    del CAT.unknown[rid]
                    resp.success()
                    return rid, out
                if resp.status_code == 409:
                    del CAT.unknown[rid]
                    resp.success()  # sold out: a normal answer
                    return rid, None
                if resp.status_code not in (0, 500, 502, 503, 504):
                    del CAT.unknown[rid]  # refused as a request: nothing was taken
                    resp.failure(f"reserve: HTTP {resp.status_code} {resp.text[:200]}")
                    return rid, None
                if resp.status_code == 500:  # its effect is unknown: stays so
                    resp.failure(f"reserve: HTTP 500 {resp.text[:200]}")
                    return rid, None
            gevent.sleep(0.1)
        return rid, None

    def _transition(self, rid: str, action: str, expect: str) -> None:
        ack = CAT.acks[rid]
        CAT.unknown[rid] = ack.sku  # until it is answered (the test may stop it in flight)
        for _ in range(4):
            with self.client.post(
                f"/v1/reservations/{rid}/{action}",
                headers=self._auth(),
                name=action,
                catch_response=True,
            ) as resp:
                if resp.status_code == 200:
                    status = resp.json()["status"]
                    if status != expect:
                        CAT.problems.append(f"{rid}: {action} answered {status}, not {expect}")
                    ack.status = status
                    del CAT.unknown[rid]
                    resp.success()
                    return
                if resp.status_code not in (0, 502, 503, 504):
                    if resp.status_code < 500:
                        del CAT.unknown[rid]
                    resp.failure(f"{action}: HTTP {resp.status_code} {resp.text[:200]}")
                    CAT.problems.append(f"{rid}: {action} refused: HTTP {resp.status_code}")
                    return
            gevent.sleep(0.1)

    @task
    def buy(self) -> None:
        if not CAT.ready:
            return
        sku, qty, roll = _popular()[0], random.choice((1, 2)), random.random()
        if roll < 0.4:  # buy now
            self._reserve(sku, qty, 0)
        elif roll < 0.75:  # hold, pay, confirm
            rid, out = self._reserve(sku, qty, HOLD)
            if out and out["status"] == "held":
                gevent.sleep(random.uniform(0, 0.3))
                self._transition(rid, "confirm", "confirmed")
        else:  # hold, then abandon the cart
            rid, out = self._reserve(sku, qty, HOLD)
            if out and out["status"] == "held":
                gevent.sleep(random.uniform(0, 0.3))
                self._transition(rid, "release", "released")


class Shopper(FastHttpUser):
    weight = 1
    wait_time = between(0.05, 0.3)

    @task
    def listing(self) -> None:
        if not CAT.ready:
            return
        size = random.randint(*PAGE)
        if random.random() < 0.5:  # best sellers: by popularity, each SKU once
            skus = list(dict.fromkeys(_popular(size * 2)))[:size]
        else:  # a category page: a slice of the catalog
            start = random.randrange(len(CAT.skus) - size + 1)
            skus = CAT.skus[start : start + size]
        params = [("sku", s) for s in skus] + [("location", LOCATION), ("channel", CHANNEL)]
        with self.client.get(
            "/v1/availability",
            params=params,
            headers={"Authorization": f"Bearer {CAT.key}"},
            name=f"availability ({PAGE[0]}-{PAGE[1]} SKUs)",
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"availability: HTTP {resp.status_code} {resp.text[:200]}")
                return
            items = resp.json()["items"]
            bad = [
                it
                for it in items
                if it["atp"] < 0 or not it["exists"] or it["atp"] > CAT.stock.get(it["sku"], -1)
            ]
            if [it["sku"] for it in items] != skus or bad:
                resp.failure(f"availability: {len(items)} items for {len(skus)}, bad: {bad[:3]}")
                CAT.problems.append(f"availability answered {bad[:3] or 'other SKUs'}")
                return
            CAT.pages += 1
            CAT.items_read += len(items)
            resp.success()


# -- the check at the end ------------------------------------------------------------------


def _position(sku: str) -> tuple[str, dict[str, Any] | None]:
    for _ in range(3):
        try:
            resp = _admin("GET", f"/v1/positions/{sku}/{LOCATION}")
            if resp.status_code == 200:
                return sku, resp.json()
        except requests.RequestException:
            pass
        gevent.sleep(0.2)
    return sku, None


def check() -> dict[str, Any]:
    failures: list[str] = list(CAT.problems)
    checked: list[str] = []
    acks = list(CAT.acks.values())
    live: dict[str, int] = defaultdict(int)
    for a in acks:
        if a.status in ("held", "confirmed"):
            live[a.sku] += a.qty
    touched = sorted({a.sku for a in acks} | set(CAT.unknown.values()))
    by_status = {st: sum(a.status == st for a in acks) for st in ("held", "confirmed", "released")}
    checked.append(
        f"{len(acks)} acknowledged reservations on {len(touched)} SKUs ({by_status}),"
        f" {CAT.pages} listing pages read ({CAT.items_read} SKU answers)"
    )
    over = [(s, live[s], CAT.stock[s]) for s in touched if live[s] > CAT.stock[s]]
    for sku, units, stock in over:
        failures.append(f"DOUBLE COMMIT: {sku}: buyers were told {units} units, stock {stock}")
    checked.append(
        f"acknowledged live units at most the stock on every SKU reserved: "
        f"{len(touched) - len(over)} of {len(touched)}"
    )

    positions = dict(Pool(SETUP_POOL).imap_unordered(_position, touched))
    agree = 0
    for sku in touched:
        pos = positions.get(sku)
        if pos is None:
            failures.append(f"{sku}: GET /v1/positions gave no answer")
            continue
        if pos["committed"] > pos["on_hand"]:
            failures.append(f"DOUBLE COMMIT: {sku}: committed {pos['committed']} > on_hand (I1)")
        if sku in CAT.unknown.values():  # a request never answered: its effect is unknown
            agree += 1
            continue
        if pos["committed"] != live[sku]:
            failures.append(
                f"{sku}: committed {pos['committed']}, acknowledged live units {live[sku]}"
            )
        else:
            agree += 1
    checked.append(
        f"positions whose committed equals the acknowledged live units: {agree} of"
        f" {len(touched)} ({len(CAT.unknown)} requests never answered)"
    )

    spot = CAT.skus[: int(os.environ.get("ATP_CATALOG_SPOT", "50"))]
    params = [("sku", s) for s in spot] + [("location", LOCATION), ("channel", CHANNEL)]
    items = ok(_admin("GET", "/v1/availability", params=params), "read the availability")["items"]
    positions = dict(Pool(SETUP_POOL).imap_unordered(_position, spot))
    mismatched = 0
    for it in items:
        pos = positions.get(it["sku"])
        if pos is None:
            failures.append(f"{it['sku']}: GET /v1/positions gave no answer")
            continue
        free = max(pos["on_hand"] - pos["committed"] - pos["safety_stock"], 0)
        if it["atp"] > free or (not CAT.rules_default and it["atp"] != free):
            mismatched += 1
            failures.append(f"{it['sku']}: availability says {it['atp']}, the position {pos}")
    sold_out = sum(it["atp"] == 0 for it in items)
    checked.append(
        f"availability agrees with the position on the {len(spot)} most popular SKUs:"
        f" {len(items) - mismatched} of {len(spot)} ({sold_out} sold out)"
        + (" (rules have a default: ATP at most the free units)" if CAT.rules_default else "")
    )

    verified, failed = verify(_admin("GET", "/v1/verify"))
    if failed:
        failures.append(failed)
    checked.append(
        f"GET /v1/verify: {verified if isinstance(verified, str) else verified['summary']}"
    )
    return {"ok": not failures, "checked": checked, "failures": failures}


@events.test_stop.add_listener
def on_test_stop(environment: Any, **_: Any) -> None:
    if not CAT.ready:
        return
    report = run_check(environment, "catalog", check)
    if report is not None:
        print(f"catalog: {'PASSED' if report['ok'] else 'FAILED'}", flush=True)
