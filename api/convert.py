"""Core results to JSON bodies (shape only; no inventory logic)."""

from __future__ import annotations

from typing import Any

from atp import (
    Availability,
    Explanation,
    Inbound,
    InboundResult,
    Movement,
    Position,
    Promise,
    Reservation,
)


def position(p: Position) -> dict[str, Any]:
    return {
        "sku": p.sku,
        "location": p.location,
        "on_hand": p.on_hand,
        "committed": p.committed,
        "safety_stock": p.safety_stock,
        "available": p.available,
        "committed_by_channel": p.committed_by_channel,
        "in_transit": p.in_transit,
        "committed_dated": p.committed_dated,
        "backordered": p.backordered,
    }


def inbound(i: Inbound) -> dict[str, Any]:
    return {
        "sku": i.sku,
        "location": i.location,
        "reference": i.reference,
        "qty": i.qty,
        "ordered": i.ordered,
        "received": i.received,
        "expected_at": i.expected_at.isoformat(),
        "expected_date": i.expected_date.isoformat(),
        "created_at": i.created_at.isoformat(),
        "updated_at": i.updated_at.isoformat(),
    }


def inbound_result(r: InboundResult) -> dict[str, Any]:
    return {
        "position": position(r.position),
        "inbound": inbound(r.inbound) if r.inbound else None,
        "replayed": r.replayed,
        "exception_id": r.exception_id,
    }


def promise(p: Promise) -> dict[str, Any]:
    return {
        "sku": p.sku,
        "location": p.location,
        "channel": p.channel,
        "qty": p.qty,
        "promise_date": p.promise_date.isoformat() if p.promise_date else None,
        "available_now": p.available_now,
        "blocked_by": p.blocked_by,
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


def explanation(e: Explanation) -> dict[str, Any]:
    return {
        "sku": e.sku,
        "location": e.location,
        "channel": e.channel,
        "customer_id": e.customer_id,
        "rules_version": e.rules_version,
        "atp": e.atp,
        "limited_by": e.limited_by,
        "position_atp": e.position_atp,
        "on_hand": e.on_hand,
        "committed": e.committed,
        "committed_by_channel": e.committed_by_channel,
        "safety_stock": e.safety_stock,
        "expired_holds_reclaimable": e.expired_holds_reclaimable,
        "protected_for_others": e.protected_for_others,
        "protected_for_others_total": e.protected_for_others_total,
        "cap": e.cap,
        "cap_used": e.cap_used,
        "cap_left": e.cap_left,
        "buyer_limit": e.buyer_limit,
        "buyer_used": e.buyer_used,
        "buyer_left": e.buyer_left,
        "holds_expiring_window_seconds": e.holds_expiring_window_seconds,
        "holds_expiring_count": e.holds_expiring_count,
        "holds_expiring": [
            {
                "reservation_id": h.reservation_id,
                "channel": h.channel,
                "qty": h.qty,
                "expires_at": h.expires_at.isoformat(),
            }
            for h in e.holds_expiring
        ],
        "at": e.at.isoformat(),
        "in_transit": e.in_transit,
        "committed_dated": e.committed_dated,
        "requested_date": e.requested_date.isoformat() if e.requested_date else None,
        "schedule": [
            {"date": d.date.isoformat(), "inbound": d.inbound, "dated": d.dated, "atp": d.atp}
            for d in e.schedule
        ],
        "promise_date": e.promise_date.isoformat() if e.promise_date else None,
        "promise_blocked_by": e.promise_blocked_by,
        "backorders_ahead": e.backorders_ahead,
        "backordered": e.backordered,
    }
