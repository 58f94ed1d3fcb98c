"""The one exception hierarchy of the ATP core.

::

    ATPError                          anything the core raises on purpose
    ├── InvalidRequest                bad input: nothing was written (I7)
    │   ├── InvalidRules              a rules document that does not validate
    │   ├── CustomerRequired          a buyer limit applies and no customer_id was given
    │   └── NoRoute                   a line without a location, and no routing for it
    ├── NotFound
    │   ├── UnknownReservation
    │   ├── UnknownException
    │   └── UnknownPosition           a call named a position that does not exist
    ├── Refused                       a valid request the current state says no to
    │   ├── InsufficientStock         not enough available to promise (carries the lines)
    │   ├── BuyerLimitExceeded        the customer would hold more than the SKU's buyer limit
    │   ├── NegativeOnHand            on_hand would drop below zero
    │   ├── OverFulfil                more shipped/short than the line has open
    │   ├── UnknownLine               a fulfil line the reservation does not have
    │   └── InvalidTransition         the reservation's state forbids it
    │       ├── HoldExpired
    │       ├── AlreadyReleased
    │       ├── AlreadyFulfilled
    │       └── NotConfirmed
    ├── IdempotencyConflict           the same id was used for a different request (I3)
    │   └── AlreadyResolved           an exception already resolved another way
    ├── RulesVersionConflict          a rules change based on a version no longer current
    ├── WrongChannel                  the reservation belongs to a channel the caller may not touch
    └── BackendError                  Redis or a script misbehaved: a bug or an outage
        └── RulesStale                a bucket kept enforcing another rules version (retried)

Every error has a stable ``code`` (the problem type the HTTP layer maps) and a ``detail``.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any, ClassVar

__all__ = [
    "ATPError",
    "AlreadyFulfilled",
    "AlreadyReleased",
    "AlreadyResolved",
    "BackendError",
    "BuyerLimitExceeded",
    "CustomerRequired",
    "HoldExpired",
    "IdempotencyConflict",
    "InboundExists",
    "InsufficientStock",
    "InvalidRequest",
    "InvalidRules",
    "InvalidTransition",
    "NegativeOnHand",
    "NoRoute",
    "NotConfirmed",
    "NotFound",
    "OverFulfil",
    "Refused",
    "RulesStale",
    "RulesVersionConflict",
    "StillBackordered",
    "UnknownException",
    "UnknownInbound",
    "UnknownLine",
    "UnknownPosition",
    "UnknownReservation",
    "WrongChannel",
]


class ATPError(Exception):
    """Base of every error the core raises on purpose."""

    code: ClassVar[str] = "error"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra: dict[str, Any] = extra


class InvalidRequest(ATPError):
    code = "invalid_request"

    def __init__(self, detail: str, field: str | None = None, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.field = field


class InvalidRules(InvalidRequest):
    code = "invalid_rules"

    @property
    def errors(self) -> list[dict[str, Any]]:
        """Each problem: ``loc`` (the path in the document) and ``msg``."""
        errors: list[dict[str, Any]] = self.extra.get("errors", [])
        return errors


class CustomerRequired(InvalidRequest):
    code = "customer_required"

    def __init__(self, detail: str, field: str | None = "customer_id", **extra: Any) -> None:
        super().__init__(detail, field, **extra)


class NoRoute(InvalidRequest):
    code = "no_route"

    def __init__(self, detail: str, field: str | None = "location", **extra: Any) -> None:
        super().__init__(detail, field, **extra)


class NotFound(ATPError):
    code = "not_found"


class UnknownReservation(NotFound):
    code = "unknown_reservation"


class UnknownException(NotFound):
    code = "unknown_exception"


class UnknownPosition(NotFound):
    code = "unknown_position"


class UnknownInbound(NotFound):
    """No open expected receipt under that reference at the position."""

    code = "unknown_inbound"


class Refused(ATPError):
    code = "refused"


class InsufficientStock(Refused):
    """Each line: ``sku``, ``location``, ``requested``, ``available``, ``limited_by`` and,
    when the inbound schedule can give it later, ``promise_date`` (ISO date, UTC): the
    earliest requested date the line would be accepted for."""

    code = "insufficient_stock"

    def __init__(self, detail: str, **extra: Any) -> None:
        epoch = date(1970, 1, 1)
        for ln in extra.get("lines") or []:
            if isinstance(ln, dict) and "promise_day" in ln:
                ln["promise_date"] = (
                    epoch + timedelta(days=int(ln.pop("promise_day")))
                ).isoformat()
        super().__init__(detail, **extra)

    @property
    def lines(self) -> list[dict[str, Any]]:
        lines: list[dict[str, Any]] = self.extra.get("lines", [])
        return lines


class InboundExists(Refused):
    """The reference is already expected at the position with other figures (``inbound``
    holds them): amend it instead."""

    code = "inbound_exists"


class BuyerLimitExceeded(Refused):
    code = "buyer_limit_exceeded"


class NegativeOnHand(Refused):
    code = "negative_on_hand"


class OverFulfil(Refused):
    code = "over_fulfil"


class UnknownLine(Refused):
    code = "unknown_line"


class InvalidTransition(Refused):
    code = "invalid_transition"


class HoldExpired(InvalidTransition):
    code = "hold_expired"


class AlreadyReleased(InvalidTransition):
    code = "already_released"


class AlreadyFulfilled(InvalidTransition):
    code = "already_fulfilled"


class NotConfirmed(InvalidTransition):
    code = "not_confirmed"


class StillBackordered(InvalidTransition):
    """The reservation waits in a backorder queue: it is confirmed when supply fills it,
    and holds nothing to confirm or ship before (release cancels it)."""

    code = "backordered"


class IdempotencyConflict(ATPError):
    code = "idempotency_conflict"


class AlreadyResolved(IdempotencyConflict):
    code = "already_resolved"


class RulesVersionConflict(ATPError):
    code = "rules_version_conflict"


class WrongChannel(ATPError):
    code = "wrong_channel"


class BackendError(ATPError):
    code = "backend_error"


class RulesStale(BackendError):
    code = "rules_stale"


# The scripts' refusal codes, decoded in one place (atp.scripts.decode).
SCRIPT_ERRORS: dict[str, type[ATPError]] = {
    "bad_request": InvalidRequest,
    "unknown_reservation": UnknownReservation,
    "unknown_position": UnknownPosition,
    "insufficient": InsufficientStock,
    "negative_on_hand": NegativeOnHand,
    "over_fulfil": OverFulfil,
    "unknown_line": UnknownLine,
    "hold_expired": HoldExpired,
    "released": AlreadyReleased,
    "fulfilled": AlreadyFulfilled,
    "not_confirmed": NotConfirmed,
    "conflict": IdempotencyConflict,
    "buyer_limit": BuyerLimitExceeded,
    "backordered": StillBackordered,
    "unknown_inbound": UnknownInbound,
    "inbound_exists": InboundExists,
    "customer_required": CustomerRequired,
    "rules_stale": RulesStale,
    "version_conflict": RulesVersionConflict,
    "unknown_exception": UnknownException,
    "already_resolved": AlreadyResolved,
}
