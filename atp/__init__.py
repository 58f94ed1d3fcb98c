"""ATP core: available-to-promise positions and reservations in Redis, changed only by
atomic Lua scripts."""

from .embedded import EmbeddedServer, find_server_binary
from .errors import (
    AlreadyFulfilled,
    AlreadyReleased,
    ATPError,
    BackendError,
    HoldExpired,
    IdempotencyConflict,
    InsufficientStock,
    InvalidRequest,
    InvalidTransition,
    NegativeOnHand,
    NotConfirmed,
    NotFound,
    OverFulfil,
    Refused,
    UnknownLine,
    UnknownPosition,
    UnknownReservation,
)
from .keys import KeySpace
from .models import (
    Availability,
    ExpireResult,
    FulfilLine,
    Line,
    Movement,
    Position,
    Reservation,
    ReservationLine,
)
from .settings import Settings
from .store import ATP

__all__ = [
    "ATP",
    "ATPError",
    "AlreadyFulfilled",
    "AlreadyReleased",
    "Availability",
    "BackendError",
    "EmbeddedServer",
    "ExpireResult",
    "FulfilLine",
    "HoldExpired",
    "IdempotencyConflict",
    "InsufficientStock",
    "InvalidRequest",
    "InvalidTransition",
    "KeySpace",
    "Line",
    "Movement",
    "NegativeOnHand",
    "NotConfirmed",
    "NotFound",
    "OverFulfil",
    "Position",
    "Refused",
    "Reservation",
    "ReservationLine",
    "Settings",
    "UnknownLine",
    "UnknownPosition",
    "UnknownReservation",
    "find_server_binary",
]
