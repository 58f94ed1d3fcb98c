"""Prometheus metrics operators expect. With several worker processes, set
PROMETHEUS_MULTIPROC_DIR (``atp serve --workers N`` does) and /metrics aggregates them."""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

REQUEST_LATENCY = Histogram(
    "atp_http_request_duration_seconds",
    "HTTP request latency by route and status",
    ["method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
RESERVATIONS = Counter(
    "atp_reservations_total", "Reserve calls by outcome and channel", ["outcome", "channel"]
)
TRANSITIONS = Counter(
    "atp_reservation_transitions_total",
    "Confirm, release and fulfil calls by outcome",
    ["action", "outcome"],
)
UNITS_RESERVED = Counter(
    "atp_units_reserved_total",
    "Units reserved, by channel and kind (held or confirmed)",
    ["channel", "kind"],
)
UNITS_SHIPPED = Counter("atp_units_shipped_total", "Units shipped by fulfilments")
HOLDS_RECLAIMED = Counter("atp_holds_reclaimed_total", "Expired holds reclaimed by the reaper")
UNITS_RECLAIMED = Counter("atp_units_reclaimed_total", "Units returned by expired holds")
SHORT_PICKS = Counter("atp_short_picks_total", "Fulfil lines that reported a short pick")
SHORT_UNITS = Counter("atp_short_pick_units_total", "Units found missing at picking")


# ``labels()`` validates the values, takes a lock and looks the child up on every call; a
# label combination's child is the same object for the life of the process, so the request
# path looks each one up once (the registry keeps every child it made anyway).
_latency: dict[tuple[str, str, int], Histogram] = {}
_counters: dict[tuple[Counter, str, str], Counter] = {}


def observe_request(method: str, route: str, status: int, seconds: float) -> None:
    child = _latency.get((method, route, status))
    if child is None:
        child = _latency[(method, route, status)] = REQUEST_LATENCY.labels(
            method, route, str(status)
        )
    child.observe(seconds)


def child(counter: Counter, a: str, b: str) -> Counter:
    """``counter.labels(a, b)``, looked up once (for the two-label counters here)."""
    c = _counters.get((counter, a, b))
    if c is None:
        c = _counters[(counter, a, b)] = counter.labels(a, b)
    return c


def render() -> tuple[bytes, str]:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


# Read from Redis at scrape time (the scripts keep per-bucket totals): the same figure in
# every process, so with several workers the largest (any) one is reported.
UNITS_COMMITTED = Gauge(
    "atp_units_committed", "Units committed to live reservations", multiprocess_mode="max"
)
UNITS_HELD = Gauge(
    "atp_units_held", "Units on hold (reservations not yet confirmed)", multiprocess_mode="max"
)
SCRAPE_ERRORS = Counter(
    "atp_metrics_scrape_errors_total", "Scrapes that could not read the unit totals"
)
