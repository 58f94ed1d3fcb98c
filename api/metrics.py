"""Prometheus metrics operators expect. With several worker processes, set
PROMETHEUS_MULTIPROC_DIR (``atp serve --workers N`` does) and /metrics aggregates them."""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
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
    "atp_reservation_transitions_total", "Confirm, release and fulfil calls by outcome", ["action", "outcome"]
)
UNITS_RESERVED = Counter(
    "atp_units_reserved_total", "Units reserved, by channel and kind (held or confirmed)", ["channel", "kind"]
)
UNITS_SHIPPED = Counter("atp_units_shipped_total", "Units shipped by fulfilments")
HOLDS_RECLAIMED = Counter("atp_holds_reclaimed_total", "Expired holds reclaimed by the reaper")
UNITS_RECLAIMED = Counter("atp_units_reclaimed_total", "Units returned by expired holds")
SHORT_PICKS = Counter("atp_short_picks_total", "Fulfil lines that reported a short pick")
SHORT_UNITS = Counter("atp_short_pick_units_total", "Units found missing at picking")


def render() -> tuple[bytes, str]:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
