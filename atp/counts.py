"""The queue of count batches: a count handed over (``POST /v1/counts``, or
:meth:`atp.ATP.enqueue_counts`) is stored as received and applied later by a worker
(atp.worker), which reports back here.

A batch lives in the slot ``{<prefix>counts}`` (atp.keys):

* ``:queue``: a stream with one entry ``{batch: <id>}`` per batch, read by the workers'
  consumer group ``workers``: each entry is delivered to one worker, stays pending until
  that worker acknowledges it (when the batch is done), and is claimed by another worker
  when its worker stops making progress (it crashed);
* ``:batch:<id>``: the rows as received, JSON (each row is parsed, and refused with its
  reason, by the worker: ``atp.reconcile.parse_count``);
* ``:result:<id>``: a hash: ``status`` (``queued``, ``running``, ``done``, ``failed``),
  ``rows``, ``done`` (rows finished so far), ``report`` (JSON of the
  :class:`~atp.reconcile.CountReport` so far), ``count_id``, ``source``, ``actor``,
  ``assume_utc``, ``queued_at``, ``started_at``, ``finished_at`` (ms), ``worker``,
  ``attempts``, ``error`` and ``lease`` (which worker's run may write progress).

A finished batch's rows and result expire ``ATP_COUNTS_RETENTION_SECONDS`` after it
finished (7 days by default).
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

from .errors import InvalidRequest
from .models import RESERVATION_ID_RE, check_text, ms_to_dt

if TYPE_CHECKING:
    from .store import ATP

__all__ = ["GROUP", "count_batch", "enqueue_counts", "new_batch_id"]

GROUP = "workers"  # the consumer group every worker reads the queue with
BATCH_ID_RE = re.compile(r"cnt-[0-9]{1,15}-[0-9a-f]{8}")
STATUSES = ("queued", "running", "done", "failed")

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str).encode


def new_batch_id() -> str:
    """``cnt-<ms>-<8 hex>``: unique, and sorts by the time it was queued."""
    return f"cnt-{int(time.time() * 1000)}-{secrets.token_hex(4)}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


async def enqueue_counts(
    core: ATP,
    rows: Iterable[Mapping[str, Any]],
    *,
    count_id: str | None = None,
    source: str = "",
    assume_utc: bool = False,
    actor: str = "",
) -> str:
    """Queue a count for the workers; returns the batch id (``count_batch`` reads it back).

    :param rows: objects with ``sku``, ``location``, ``counted_qty`` and ``counted_at``
        (ISO 8601), stored as received: a row that is not a valid count is refused, with
        its reason, in the batch's report, and the others apply.
    :param count_id: names the count (its movements' reference); the batch id if not
        given. Queuing the same count id again applies no row twice.
    :param source: where the count came from (written to each movement).
    :param assume_utc: read a ``counted_at`` without a time zone as UTC (else refused).
    :param actor: who queued it (written to each movement).
    :raises InvalidRequest: no rows, more than ``ATP_COUNTS_MAX_ROWS``, a row that is not
        an object, or a bad ``count_id``, ``source`` or ``actor``. Nothing is queued.
    """
    if isinstance(rows, str | bytes | Mapping):
        raise InvalidRequest("rows must be a list of objects", field="rows")
    limit = core.settings.counts_max_rows
    batch: list[dict[str, Any]] = []
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping):
            raise InvalidRequest(f"row {i + 1} is not an object", field="rows")
        if len(batch) >= limit:
            raise InvalidRequest(f"at most {limit} rows per count batch", field="rows")
        batch.append({str(k): _jsonable(v) for k, v in r.items()})
    if not batch:
        raise InvalidRequest("a count batch needs at least one row", field="rows")
    batch_id = new_batch_id()
    if count_id is None:
        count_id = batch_id
    elif not isinstance(count_id, str) or not RESERVATION_ID_RE.fullmatch(count_id):
        raise InvalidRequest(
            "count_id must be 1-128 ASCII letters, digits or . _ : - (starting with a letter "
            f"or digit), got {count_id!r:.80}",
            field="count_id",
        )
    check_text(source, "source", 128, required=False)
    check_text(actor, "actor", 128, required=False)
    if not isinstance(assume_utc, bool):
        raise InvalidRequest("assume_utc must be true or false", field="assume_utc")
    keys = core.keys
    pipe = core.redis.pipeline(transaction=True)
    pipe.set(keys.count_batch(batch_id), _dumps(batch))
    pipe.hset(
        keys.count_result(batch_id),
        mapping={
            "batch_id": batch_id,
            "count_id": count_id,
            "source": source,
            "actor": actor,
            "assume_utc": int(assume_utc),
            "status": "queued",
            "rows": len(batch),
            "done": 0,
            "attempts": 0,
            "queued_at": int(time.time() * 1000),
        },
    )
    pipe.xadd(keys.counts_queue(), {"batch": batch_id})
    await pipe.execute()
    return batch_id


async def count_batch(core: ATP, batch_id: str) -> dict[str, Any] | None:
    """A queued count batch's state, or None for an unknown id (or one past retention).

    Returns ``batch_id``, ``count_id``, ``source``, ``status`` (``queued``, ``running``,
    ``done``, ``failed``), ``rows``, ``done`` (rows finished), ``queued_at``,
    ``started_at``, ``finished_at`` (ISO 8601 or None), ``worker``, ``attempts``, ``error``
    and ``report`` (the :class:`~atp.reconcile.CountReport` as a dict, once done; for a
    failed batch, what it did before it failed).
    """
    if not isinstance(batch_id, str) or not BATCH_ID_RE.fullmatch(batch_id):
        return None
    raw = await core.redis.hgetall(core.keys.count_result(batch_id))
    if not raw:
        return None
    h = {_s(k): _s(v) for k, v in raw.items()}
    status = h.get("status", "queued")
    report = json.loads(h["report"]) if h.get("report") and status in ("done", "failed") else None

    def at(field: str) -> str | None:
        v = h.get(field)
        return ms_to_dt(int(v)).isoformat() if v else None

    return {
        "batch_id": batch_id,
        "count_id": h.get("count_id", ""),
        "source": h.get("source", ""),
        "status": status if status in STATUSES else "queued",
        "rows": int(h.get("rows") or 0),
        "done": int(h.get("done") or 0),
        "queued_at": at("queued_at"),
        "started_at": at("started_at"),
        "finished_at": at("finished_at"),
        "worker": h.get("worker") or None,
        "attempts": int(h.get("attempts") or 0),
        "error": h.get("error") or None,
        "report": report,
    }


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
