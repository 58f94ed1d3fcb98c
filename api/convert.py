"""Core results to JSON bodies (shape only; no inventory logic)."""

from __future__ import annotations

from typing import Any

from atp import Availability, Movement, Position, Reservation


def position(p: Position) -> dict[str, Any]:
    return {
        "sku": p.sku,
        "location": p.location,
        "on_hand": p.on_hand,
        "committed": p.committed,
        "safety_stock": p.safety_stock,
        "available": p.available,
        "committed_by_channel": p.committed_by_channel,
    }


def movement(m: Movement) -> dict[str, Any]:
    return {
        "id": m.id,
        "at": m.at.isoformat(),
        "kind": m.kind,
        "reason": m.reason,
        "actor": m.actor,
        "source": m.source,
        "ref": m.ref,
        "reservation_id": m.reservation_id,
        "channel": m.channel,
        "on_hand_before": m.on_hand_before,
        "on_hand_after": m.on_hand_after,
        "committed_before": m.committed_before,
        "committed_after": m.committed_after,
    }


def availability(a: Availability) -> dict[str, Any]:
    return {
        "sku": a.sku,
        "location": a.location,
        "channel": a.channel,
        "atp": a.atp,
        "exists": a.exists,
    }


def reservation(r: Reservation) -> dict[str, Any]:
    return r.to_dict()
