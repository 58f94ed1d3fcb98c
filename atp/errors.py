"""The one exception hierarchy of the ATP core.

::

    ATPError                          anything the core raises on purpose
    ├── InvalidRequest                bad input: nothing was written (I7)
    ├── NotFound
    │   ├── UnknownReservation
    │   └── UnknownPosition           a call named a position that does not exist
    ├── Refused                       a valid request the current state says no to
    │   ├── InsufficientStock         not enough available to promise (carries the lines)
    │   ├── NegativeOnHand            on_hand would drop below zero
    │   ├── OverFulfil                more shipped/short than the line has open
    │   ├── UnknownLine               a fulfil line the reservation does not have
    │   └── InvalidTransition         the reservation's state forbids it
    │       ├── HoldExpired
    │       ├── AlreadyReleased
    │       ├── AlreadyFulfilled
    │       └── NotConfirmed
    ├── IdempotencyConflict           the same id was used for a different request (I3)
    ├── WrongChannel                  the reservation belongs to a channel the caller may not touch
    └── BackendError                  Redis or a script misbehaved: a bug or an outage

Every error has a stable ``code`` (the problem type the HTTP layer maps) and a ``detail``.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "ATPError",
    "AlreadyFulfilled",
    "AlreadyReleased",
    "BackendError",
    "HoldExpired",
    "IdempotencyConflict",
    "InsufficientStock",
    "InvalidRequest",
    "InvalidTransition",
    "NegativeOnHand",
    "NotConfirmed",
    "NotFound",
    "OverFulfil",
    "Refused",
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


class NotFound(ATPError):
    code = "not_found"


class UnknownReservation(NotFound):
    code = "unknown_reservation"


class UnknownPosition(NotFound):
    code = "unknown_position"


class Refused(ATPError):
    code = "refused"


class InsufficientStock(Refused):
    code = "insufficient_stock"

    @property
    def lines(self) -> list[dict[str, Any]]:
        lines: list[dict[str, Any]] = self.extra.get("lines", [])
        return lines


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


class IdempotencyConflict(ATPError):
    code = "idempotency_conflict"


class WrongChannel(ATPError):
    code = "wrong_channel"


class BackendError(ATPError):
    code = "backend_error"


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
}
