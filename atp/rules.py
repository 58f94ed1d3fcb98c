"""Allocation rules, defined once: channel priority, protected and capped quantities, buyer
limits and location routing (DESIGN.md, I6).

The document
============

::

    channels:                      # every channel the rules speak of
      web:    {priority: 100, locations: [DC1, DC2], regions: {EU: [DC2, DC1]}}
      stores: {priority: 50,  locations: [DC2], allow_split: true}
      market: {priority: 10}
    default:                       # for every SKU, unless the SKU says otherwise
      protect: {web: 5}            # units of each position set aside for web
      cap: {market: 100}           # the most market may have committed, per SKU
      buyer_limit: 4               # the most units one customer may hold, per SKU
    skus:
      FLASH-1:
        protect: {web: 50}         # merged over the default, channel by channel
        cap: {market: 20}
        buyer_limit: 1             # null: no limit for this SKU, whatever the default
        locations:
          DC2: {protect: {stores: 10}}

* **priority**: higher is more important. It decides who loses under shortage (the
  shortage rule, ``at_risk`` in ``lua/_lib.lua``: lowest priority first, then holds before
  confirmed, newest first). A channel the rules do not name has priority 0.
* **protect** is per *position*: each location of the SKU sets that many units aside,
  because protected units must physically be where the channel's orders ship from. ATP
  for channel c at a position is ``on_hand - committed - safety_stock - sum over other
  channels g of max(0, protected_g - committed_g)``, with ``committed_g`` g's
  commitments at that position.
* **cap** is per *SKU* over all its locations: a flash-sale quota.
* **buyer_limit** is per SKU over all its locations: units a customer (the reservation's
  ``customer_id``) may hold in live reservations (held or confirmed, not yet shipped).
  A reservation for a SKU with a buyer limit must name its customer.
* **locations / regions** route a reservation line that names no location: the region's
  list when the order names a region the channel lists, else the channel's list. The
  first location that can give the whole line takes it; with ``allow_split`` (the
  channel's default, or the request's) the line is split over the locations in order
  when none holds it whole.

Versions
========

``apply`` stores a new version (1, 2, …) in Redis (``atp.keys``) and, in the same atomic
step on one server, moves every bucket to it: the reserving script refuses a request
resolved with another version (``rules_stale``), and the caller reloads and retries. So a
change holds from the moment it is acknowledged, in every process, and no reservation is
decided by a mix of two versions; each reservation records the version that decided it.
On a cluster the buckets move one by one after the document, and a process that meets a
bucket still behind moves it itself (``rules_bump``), so an interrupted apply completes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from .errors import InvalidRules
from .models import CHANNEL_RE, IDENT_RE, ms_to_dt

__all__ = [
    "EMPTY_RULES",
    "ChannelRule",
    "LocationRule",
    "Rules",
    "RulesDocument",
    "SkuRule",
    "parse_rules",
]

MAX_QTY = 10**12

Channel = Annotated[str, StringConstraints(pattern=f"^{CHANNEL_RE.pattern}$")]
Ident = Annotated[str, StringConstraints(pattern=f"^{IDENT_RE.pattern}$")]
Region = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,31}$")]
Units = Annotated[int, Field(ge=0, le=MAX_QTY)]
Locations = Annotated[list[Ident], Field(max_length=64)]


def _closed_maps(schema: dict[str, Any]) -> None:
    # a map's keys are checked (channel, SKU, location, region names): say so in the JSON
    # Schema too, which otherwise lets through keys that match no patternProperties
    for prop in schema.get("properties", {}).values():
        if "patternProperties" in prop:
            prop.setdefault("additionalProperties", False)


class _Strict(BaseModel):
    model_config = ConfigDict(
        extra="forbid", strict=True, frozen=True, json_schema_extra=_closed_maps
    )


class ChannelRule(_Strict):
    """One channel: its priority and where its orders ship from."""

    priority: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    locations: Locations = []
    regions: Annotated[dict[Region, Locations], Field(max_length=256)] = {}
    allow_split: bool = False


class LocationRule(_Strict):
    """Overrides for one location of a SKU."""

    protect: dict[Channel, Units] = {}


class SkuRule(_Strict):
    """Protection, caps and buyer limit of one SKU (or the default for every SKU)."""

    protect: dict[Channel, Units] = {}
    cap: dict[Channel, Units] = {}
    buyer_limit: Annotated[int, Field(ge=1, le=MAX_QTY)] | None = None
    locations: Annotated[dict[Ident, LocationRule], Field(max_length=10_000)] = {}


class RulesDocument(_Strict):
    """The whole rules document, as ``atp rules apply`` and ``PUT /v1/rules`` take it."""

    description: Annotated[str, Field(max_length=2000)] = ""
    channels: Annotated[dict[Channel, ChannelRule], Field(max_length=256)] = {}
    default: SkuRule = SkuRule()
    skus: Annotated[dict[Ident, SkuRule], Field(max_length=200_000)] = {}

    def model_post_init(self, _context: Any) -> None:
        known = set(self.channels)
        problems: list[dict[str, Any]] = []

        def check(where: tuple[str | int, ...], names: dict[str, int]) -> None:
            for ch in names:
                if ch not in known:
                    problems.append(
                        {
                            "loc": [*where, ch],
                            "msg": f"channel {ch!r} is not declared under channels",
                        }
                    )

        for name, ch in self.channels.items():
            lists: list[tuple[tuple[str, ...], list[str]]] = [(("locations",), ch.locations)]
            lists += [(("regions", region), locs) for region, locs in ch.regions.items()]
            for what, locs in lists:
                if len(set(locs)) != len(locs):
                    problems.append(
                        {"loc": ["channels", name, *what], "msg": "a location is listed twice"}
                    )
        for where, rule in [(("default",), self.default)] + [
            (("skus", sku), r) for sku, r in self.skus.items()
        ]:
            check((*where, "protect"), rule.protect)
            check((*where, "cap"), rule.cap)
            for loc, lr in rule.locations.items():
                check((*where, "locations", loc, "protect"), lr.protect)
        if problems:
            raise InvalidRules("the rules document is not valid", errors=problems)


def parse_rules(data: Any) -> RulesDocument:
    """Validate a rules document (a mapping, or JSON text).

    :raises InvalidRules: with every problem found (``errors``: ``loc`` and ``msg``).
    """
    if isinstance(data, RulesDocument):
        return data
    try:
        if isinstance(data, str | bytes):
            return RulesDocument.model_validate_json(data)
        return RulesDocument.model_validate(data)
    except ValidationError as e:
        raise InvalidRules(
            "the rules document is not valid",
            errors=[{"loc": list(err["loc"]), "msg": err["msg"]} for err in e.errors()],
        ) from None


@dataclass(frozen=True, eq=False)
class Rules:
    """One version of the rules, resolved for the reserving script.

    ``version`` 0 means no rules have been applied: no protection, cap, limit or routing.
    """

    version: int
    document: RulesDocument = field(default_factory=RulesDocument)
    applied_at: datetime | None = None
    applied_by: str = ""

    def __post_init__(self) -> None:
        # resolved figures, cached per version (a Rules object never changes)
        object.__setattr__(self, "_memo", {})
        object.__setattr__(
            self, "_prio", {n: c.priority for n, c in self.document.channels.items()}
        )

    @property
    def empty(self) -> bool:
        return self.version == 0

    def priority(self, channel: str) -> int:
        return int(self._prio.get(channel, 0))  # type: ignore[attr-defined]

    def priorities(self) -> dict[str, int]:
        """Channel -> priority, for the shortage rule."""
        return dict(self._prio)  # type: ignore[attr-defined]

    def route(self, channel: str, region: str | None = None) -> tuple[str, ...]:
        """The locations a line without one is routed over, in order (may be empty)."""
        ch = self.document.channels.get(channel)
        if ch is None:
            return ()
        if region is not None and region in ch.regions:
            return tuple(ch.regions[region])
        return tuple(ch.locations)

    def allow_split(self, channel: str) -> bool:
        ch = self.document.channels.get(channel)
        return bool(ch and ch.allow_split)

    def _cached(self, key: tuple[str, ...], make: Any) -> Any:
        memo: dict[tuple[str, ...], Any] = self._memo  # type: ignore[attr-defined]
        try:
            return memo[key]
        except KeyError:
            if len(memo) > 100_000:
                memo.clear()
            v = memo[key] = make()
            return v

    def protections(self, sku: str, location: str) -> tuple[tuple[str, int], ...]:
        """[(channel, protected units)] at one position, zeros left out: the default, the
        default for the location, the SKU's, the SKU's at the location, later ones winning
        channel by channel."""
        return self._cached(("p", sku, location), lambda: self._protections(sku, location))  # type: ignore[no-any-return]

    def _protections(self, sku: str, location: str) -> tuple[tuple[str, int], ...]:
        d = self.document
        rule = d.skus.get(sku)
        layers = [d.default.protect, *_at(d.default, location)]
        if rule is not None:
            layers += [rule.protect, *_at(rule, location)]
        merged: dict[str, int] = {}
        for protect in layers:
            merged.update(protect)
        return tuple(sorted((g, q) for g, q in merged.items() if q > 0))

    def cap(self, sku: str, channel: str) -> int | None:
        """The most ``channel`` may have committed of ``sku`` (all locations), or None."""
        rule = self.document.skus.get(sku)
        if rule is not None and channel in rule.cap:
            return rule.cap[channel]
        return self.document.default.cap.get(channel)

    def buyer_limit(self, sku: str) -> int | None:
        """The most units one customer may hold of ``sku``, or None."""
        rule = self.document.skus.get(sku)
        if rule is not None and "buyer_limit" in rule.model_fields_set:
            return rule.buyer_limit
        return self.document.default.buyer_limit

    def to_dict(self) -> dict[str, Any]:
        """The version, when and by whom it was applied, and the document as applied."""
        return {
            "version": self.version,
            "applied_at": self.applied_at.isoformat() if self.applied_at else None,
            "applied_by": self.applied_by,
            "rules": dump_document(self.document),
        }


EMPTY_RULES = Rules(0)


def _at(rule: SkuRule, location: str) -> list[dict[str, int]]:
    """The protections a SKU rule (or the default) sets for one location, if any."""
    lr = rule.locations.get(location)
    return [] if lr is None else [lr.protect]


def dump_document(doc: RulesDocument) -> dict[str, Any]:
    """The document as stored: what was set, so ``buyer_limit: null`` (no limit) and an
    absent ``buyer_limit`` (the default's) stay apart."""
    out: dict[str, Any] = doc.model_dump(mode="json", exclude_unset=True)
    return out


def document_json(doc: RulesDocument) -> str:
    return json.dumps(dump_document(doc), separators=(",", ":"))  # the author's order kept


def rules_from_stored(
    version: int, doc_json: str | bytes | None, at_ms: int | None, actor: str
) -> Rules:
    """A stored version back as Rules (the document was validated when applied)."""
    if not version or doc_json is None:
        return EMPTY_RULES
    return Rules(
        version,
        parse_rules(json.loads(doc_json)),
        ms_to_dt(at_ms) if at_ms else None,
        actor,
    )
