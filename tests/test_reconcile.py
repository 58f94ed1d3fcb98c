"""Reconciliation from the system of record (atp.reconcile, atp.sources, ``atp reconcile``)
on the session's real server: count files (CSV, JSON Lines) with their usual defects, the
SQL adapter on SQLite and on PostgreSQL, bad rows refused one by one while the rest
applies, dry runs and re-runs that change nothing, the report's figures worked out by
hand, and a source that is streamed, never read whole.

The CLI runs as a subprocess on the session server with the ``atp`` fixture's key prefix
and buckets, as tests/test_cli.py does. PostgreSQL is found through
``ATP_TEST_POSTGRES_URL`` (``.ci/run`` sets it); without it those tests are skipped.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import pytest
from support import snapshot

from atp import ATP, EmbeddedServer, InvalidRequest
from atp.embedded import free_port
from atp.models import CountResult, ms_to_dt
from atp.reconcile import (
    CountReport,
    default_count_id,
    parse_columns,
    parse_count,
    reconcile,
)
from atp.sources import RowError, open_source
from atp.verify import verify

PG_URL = os.environ.get("ATP_TEST_POSTGRES_URL")
needs_pg = pytest.mark.skipif(
    not PG_URL, reason="ATP_TEST_POSTGRES_URL is not set (.ci/run sets it to a real PostgreSQL)"
)
HEADER = ["sku", "location", "counted_qty", "counted_at"]


# -- helpers ---------------------------------------------------------------------------------


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


async def tick(core: ATP) -> int:
    """Wait until the server clock (the count script's) has left its current
    millisecond; the new one."""
    t = await core._now_ms()
    for _ in range(100_000):
        n = await core._now_ms()
        if n > t:
            return n
        await asyncio.sleep(0.0005)
    raise AssertionError("the server clock does not move")


async def count_time(core: ATP) -> datetime:
    """A time after everything done so far, and before anything done after this call:
    the moment a count is taken."""
    t = await tick(core)
    await tick(core)
    return ms_to_dt(t)


async def on_hand(core: ATP, sku: str, loc: str = "W1") -> int:
    p = await core.position(sku, loc)
    assert p is not None
    return p.on_hand


def write_csv(path: Path, rows: list[list[Any]], *, bom: bool = False) -> Path:
    with path.open("w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        w.writerows(rows)
    return path


class Cli(Protocol):
    async def __call__(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]: ...


@pytest.fixture
def cli(server: EmbeddedServer, tmp_path: Path) -> Cli:
    """``python -m atp ...`` on the session server with the ``atp`` fixture's prefix and
    buckets (what it does is seen through that fixture; its flush cleans up)."""

    async def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ATP_")}
        env.update(
            ATP_REDIS_URL=server.url, ATP_KEY_PREFIX="t:", ATP_BUCKETS="16",
            ATP_DATA_DIR=str(tmp_path / "data"),
        )  # fmt: skip
        env.update(extra)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "atp", *args, env=env, cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())

    return run


async def positions(core: ATP, *specs: tuple[str, int]) -> None:
    for sku, qty in specs:
        await core.set_position(sku, "W1", qty, reason="initial load")


# -- count files -----------------------------------------------------------------------------


async def test_csv_with_bom_blank_lines_and_a_short_row(atp: ATP, tmp_path: Path) -> None:
    await positions(atp, ("A", 10), ("B", 10), ("C", 10))
    at = (await count_time(atp)).isoformat()
    path = tmp_path / "counts.csv"
    # a BOM (Excel's), CRLF line ends, blank lines, spaces around fields, a short row
    path.write_bytes(
        (
            "\ufeffsku,location,counted_qty,counted_at\r\n"
            f"A,W1,12,{at}\r\n"
            "\r\n"
            f" B , W1 , 7 , {at} \r\n"
            "C,W1,5\r\n"
            ",,,\r\n"
            f"C,W1,9,{at}\r\n"
        ).encode()
    )
    rep = await reconcile(atp, open_source(path), count_id="csv-1", source=str(path))
    assert (rep.rows, rep.applied, rep.refused) == (4, 3, 1)
    assert rep.refused_rows == [
        {"row": 4, "sku": "", "location": "", "reason": "bad_row",
         "detail": "3 fields where the header has 4"},
    ]  # fmt: skip
    assert [await on_hand(atp, s) for s in "ABC"] == [12, 7, 9]
    assert rep.total_abs_drift == 2 + 3 + 1 and rep.net_drift == 2 - 3 - 1
    # the movement names the count, its source and the row
    [m] = await atp.movements("B", "W1", count=1)
    assert (m.reason, m.ref, m.source) == ("cycle_count", "csv-1", str(path))
    assert (m.detail["counted"], m.detail["drift"], m.detail["row"]) == ("7", "-3", "3")
    assert (await verify(atp)).ok


async def test_jsonl_with_a_malformed_line(atp: ATP, tmp_path: Path) -> None:
    await positions(atp, ("A", 10), ("B", 10))
    at = (await count_time(atp)).isoformat()
    path = tmp_path / "counts.jsonl"
    path.write_text(
        "\ufeff"
        + json.dumps({"sku": "A", "location": "W1", "counted_qty": 4, "counted_at": at})
        + "\n\n"
        + '{"sku": "B", "location": "W1", "counted_qty": 3,\n'  # cut short
        + '["not", "an", "object"]\n'
        + json.dumps({"sku": "B", "location": "W1", "counted_qty": "6", "counted_at": at})
        + "\n",
        encoding="utf-8",
    )
    rep = await reconcile(atp, open_source(path), count_id="jsonl-1")
    assert (rep.rows, rep.applied, rep.refused) == (4, 2, 2)
    assert rep.refused_by_reason == {"bad_row": 2}
    assert [(r["row"], r["detail"].split(":")[0]) for r in rep.refused_rows] == [
        (2, "not JSON"),
        (3, "each line must be a JSON object"),
    ]
    assert (await on_hand(atp, "A"), await on_hand(atp, "B")) == (4, 6)


async def test_bad_rows_are_refused_one_by_one_and_the_rest_applies(atp: ATP) -> None:
    await positions(atp, ("A", 10), ("B", 10), ("C", 10), ("D", 10))
    at = await count_time(atp)
    iso = at.isoformat()
    naive = at.replace(tzinfo=None).isoformat()
    rows: list[dict[str, Any]] = [
        {"sku": "A", "location": "W1", "counted_qty": "8", "counted_at": iso},
        {"sku": "NOPE", "location": "W1", "counted_qty": "1", "counted_at": iso},
        {"sku": "B", "location": "W1", "counted_qty": "-3", "counted_at": iso},
        {"sku": "B", "location": "W1", "counted_qty": "2.5", "counted_at": iso},
        {"sku": "C", "location": "W1", "counted_qty": "4", "counted_at": "yesterday"},
        {"sku": "C", "location": "W1", "counted_qty": "4", "counted_at": naive},
        {"sku": "D", "location": "W1", "counted_qty": "11", "counted_at": iso},
        {"sku": "A", "location": "W1", "counted_qty": "9", "counted_at": iso},  # again
        {"sku": "bad sku!", "location": "W1", "counted_qty": "1", "counted_at": iso},
        {"sku": "D", "location": "W1", "counted_qty": "1"},
        {"sku": "B", "location": "W1", "counted_qty": "1",
         "counted_at": (at + timedelta(hours=2)).isoformat()},
    ]  # fmt: skip
    before = {s: await atp.position(s, "W1") for s in "BC"}
    rep = await reconcile(atp, enumerate(rows, start=1), count_id="bad-1")
    reasons = {r["row"]: r["reason"] for r in rep.refused_rows}
    assert reasons == {
        2: "unknown_position",
        3: "bad_count",
        4: "bad_count",
        5: "bad_time",
        6: "bad_time",
        8: "duplicate",
        9: "bad_row",
        10: "bad_row",
        11: "future",
    }
    details = {r["row"]: r["detail"] for r in rep.refused_rows}
    assert "negative" in details[3] and "whole number" in details[4]
    assert "ISO 8601" in details[5] and "time zone" in details[6]
    assert "row 1 of this count" in details[8] and "missing counted_at" in details[10]
    assert (rep.rows, rep.applied, rep.refused) == (11, 2, 9)
    assert rep.refused_by_reason == {
        "unknown_position": 1, "bad_count": 2, "bad_time": 2, "duplicate": 1, "bad_row": 2,
        "future": 1,
    }  # fmt: skip
    # the good rows applied, the first of the two rows for A won, B and C are untouched
    assert (await on_hand(atp, "A"), await on_hand(atp, "D")) == (8, 11)
    assert {s: await atp.position(s, "W1") for s in "BC"} == before
    assert await atp.position("NOPE", "W1") is None
    # a naive time is read as UTC only when asked
    again = await reconcile(atp, iter([(6, rows[5])]), count_id="bad-2", assume_utc=True)
    assert again.applied == 1 and await on_hand(atp, "C") == 4


def test_parse_count_accepts_what_sources_give() -> None:
    at = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
    r = parse_count(7, {"sku": "A", "location": "W1", "counted_qty": 3, "counted_at": at})
    assert not isinstance(r, CountResult) and (r.counted, r.counted_at, r.row) == (3, at, 7)
    z = parse_count(1, {"sku": "A", "location": "W1", "counted_qty": "0",
                        "counted_at": "2026-11-01T12:00:00Z"})  # fmt: skip
    assert not isinstance(z, CountResult) and z.counted_at == at
    for bad in (True, 1.5, None, "", " 3x"):
        out = parse_count(1, {"sku": "A", "location": "W1", "counted_qty": bad, "counted_at": at})
        assert isinstance(out, CountResult) and out.status == "refused", bad
    err = parse_count(4, RowError("bad_row", "not JSON"))
    assert isinstance(err, CountResult) and (err.row, err.reason) == (4, "bad_row")


# -- as of, the report by hand ---------------------------------------------------------------


async def test_report_figures_by_hand(atp: ATP) -> None:
    """Five positions, two of them with reservations, counted at one moment; a receipt of
    5 units of E after the count was taken is carried over (as-of)."""
    await positions(atp, ("A", 10), ("B", 10), ("C", 10), ("D", 20), ("E", 10))
    await atp.reserve("o-c1", "web", [("C", "W1", 4)])
    await atp.reserve("o-c2", "web", [("C", "W1", 3)])
    await atp.reserve("o-d", "web", [("D", "W1", 5)])
    at = await count_time(atp)
    await atp.receive("E", "W1", 5, reference="po-1")  # after the count: on_hand 15
    iso = at.isoformat()
    rows = [
        ("A", 10),  # drift 0
        ("B", 11),  # +1: within a tolerance of 1
        ("C", 4),  # -6: 7 committed, 3 units at risk, an exception
        ("D", 17),  # -3: 5 committed, covered
        ("E", 8),  # -2 as of the count: on_hand 8 + 5 received after = 13
        ("ZZ", 1),  # unknown
    ]
    data = [{"sku": s, "location": "W1", "counted_qty": q, "counted_at": iso} for s, q in rows] + [
        {"sku": "A", "location": "W1", "counted_qty": -1, "counted_at": iso}
    ]
    rep = await reconcile(atp, enumerate(data, start=1), count_id="hand-1", tolerance=1)
    d = rep.to_dict()
    assert (d["rows"], d["applied"], d["refused"], d["counted_positions"]) == (7, 5, 2, 5)
    assert d["within_tolerance"] == 2  # A (0) and B (+1)
    assert d["inventory_record_accuracy"] == pytest.approx(2 / 5)
    assert d["total_abs_drift"] == 0 + 1 + 6 + 3 + 2
    assert d["net_drift"] == 0 + 1 - 6 - 3 - 2
    assert d["units_at_risk"] == 3
    assert d["refused_by_reason"] == {"unknown_position": 1, "bad_count": 1}
    [ex] = await atp.exceptions()
    assert d["exceptions"] == [ex.id] and d["exceptions_raised"] == 1
    assert (ex.kind, ex.data["sku"], ex.data["shortfall"]) == ("oversell", "C", 3)
    assert {await on_hand(atp, s) for s in "AB"} == {10, 11}
    assert [await on_hand(atp, s) for s in "CDE"] == [4, 17, 13]
    assert (await verify(atp, allow_uncovered=True)).ok
    assert CountReport("x").accuracy is None  # no counted positions: no figure, not 0 %
    table = rep.table()
    assert "40.0% of 5 positions" in table and "units at risk" in table and ex.id in table


# -- dry run and exactly once ----------------------------------------------------------------


async def test_dry_run_changes_nothing(atp: ATP, cli: Cli, tmp_path: Path) -> None:
    await positions(atp, ("A", 10), ("B", 10))
    await atp.reserve("o-b", "web", [("B", "W1", 6)])
    at = (await count_time(atp)).isoformat()
    path = write_csv(tmp_path / "counts.csv", [["A", "W1", 7, at], ["B", "W1", 2, at],
                                               ["X", "W1", 1, at]])  # fmt: skip
    before = await snapshot(atp)
    out = await cli("reconcile", "counts.csv", "--dry-run", "--json", "--count-id", "dry-1")
    assert out.returncode == 0, out.stderr
    assert await snapshot(atp) == before
    rep = json.loads(out.stdout)
    assert rep["dry_run"] is True
    assert (rep["applied"], rep["would_apply"], rep["refused"]) == (0, 2, 1)
    assert (rep["total_abs_drift"], rep["units_at_risk"], rep["exceptions"]) == (11, 4, [])
    # the same count for real: the figures the dry run showed
    real = await cli("reconcile", str(path), "--json", "--count-id", "dry-1")
    assert real.returncode == 0, real.stderr
    done = json.loads(real.stdout)
    assert (done["applied"], done["total_abs_drift"], done["units_at_risk"]) == (2, 11, 4)
    assert len(done["exceptions"]) == 1
    assert (await on_hand(atp, "A"), await on_hand(atp, "B")) == (7, 2)


async def test_running_a_count_again_applies_nothing_twice(
    atp: ATP, cli: Cli, tmp_path: Path
) -> None:
    await positions(atp, *((f"S{i}", 10) for i in range(30)))
    at = (await count_time(atp)).isoformat()
    rows = [[f"S{i}", "W1", i, at] for i in range(30)]
    write_csv(tmp_path / "c.csv", [*rows, ["S0", "W1", 5, at]])
    first = await cli("reconcile", "c.csv", "--chunk", "7")
    assert first.returncode == 0, first.stderr
    # no --count-id: one was made up from the file name and printed, to resume with
    line = next(ln for ln in first.stderr.splitlines() if "count id" in ln)
    count_id = line.split("--count-id ")[1].rstrip(")")
    assert count_id.startswith("c-") and count_id.endswith("Z")
    assert [await on_hand(atp, f"S{i}") for i in range(30)] == list(range(30))
    before = await snapshot(atp)
    again = await cli("reconcile", "c.csv", "--count-id", count_id, "--json", "--chunk", "4")
    assert again.returncode == 0, again.stderr
    assert "count id" not in again.stderr  # given, so not printed
    rep = json.loads(again.stdout)
    assert (rep["applied"], rep["already_applied"], rep["refused"]) == (0, 30, 1)
    assert rep["refused_by_reason"] == {"duplicate": 1}
    # the original figures come back, and nothing changed
    assert rep["total_abs_drift"] == sum(abs(i - 10) for i in range(30))
    assert await snapshot(atp) == before


async def test_a_count_stopped_midway_resumes_under_its_id(
    atp: ATP, cli: Cli, tmp_path: Path
) -> None:
    """A count cut short (here: only its first 17 rows got applied) is finished by
    running the whole source again under the same id: each row applied exactly once."""
    await positions(atp, *((f"R{i}", 10) for i in range(30)))
    at = (await count_time(atp)).isoformat()
    write_csv(tmp_path / "c.csv", [[f"R{i}", "W1", 20 + i, at] for i in range(30)])
    first = list(open_source(tmp_path / "c.csv"))[:17]
    done = await reconcile(atp, first, count_id="resume-1", chunk=5)
    assert done.applied == 17
    out = await cli("reconcile", "c.csv", "--count-id", "resume-1", "--json")
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert (rep["applied"], rep["already_applied"], rep["refused"]) == (13, 17, 0)
    assert [await on_hand(atp, f"R{i}") for i in range(30)] == [20 + i for i in range(30)]
    for i in (0, 29):  # one count movement per position
        moves = await atp.movements(f"R{i}", "W1")
        assert [m.ref for m in moves if m.reason == "cycle_count"] == ["resume-1"]


async def test_rows_of_one_position_apply_in_order_with_calls_in_flight(atp: ATP) -> None:
    """With one row per call and several calls in flight, a later row of a position
    waits for the call that counts it: the first row always wins, the second is the
    duplicate."""
    await positions(atp, *((f"P{i}", 10) for i in range(12)))
    at = (await count_time(atp)).isoformat()
    skus = [f"P{i}" for i in range(12)] + ["P3", "P0", "P11"]
    data = [
        {"sku": s, "location": "W1", "counted_qty": n, "counted_at": at}
        for n, s in enumerate(skus, start=1)
    ]
    rep = await reconcile(atp, enumerate(data, start=1), count_id="order-1", chunk=1, inflight=8)
    assert (rep.applied, rep.refused) == (12, 3)
    assert sorted(r["row"] for r in rep.refused_rows) == [13, 14, 15]
    assert {r["reason"] for r in rep.refused_rows} == {"duplicate"}
    assert [await on_hand(atp, f"P{i}") for i in range(12)] == list(range(1, 13))


# -- streaming -------------------------------------------------------------------------------


async def test_a_source_is_streamed_chunk_by_chunk(atp: ATP, monkeypatch: Any) -> None:
    n, chunk = 1000, 50
    await positions(atp, *((f"G{i}", 10) for i in range(n)))
    at = (await count_time(atp)).isoformat()
    pulled = 0

    def rows() -> Iterator[tuple[int, dict[str, Any]]]:
        nonlocal pulled
        for i in range(n):
            pulled += 1
            yield i + 1, {"sku": f"G{i}", "location": "W1", "counted_qty": 9, "counted_at": at}

    seen: list[tuple[int, int]] = []  # (rows pulled from the source, rows in the call)
    real = atp.apply_counts

    def spy(count_id: str, batch: Any, **kw: Any) -> Coroutine[Any, Any, list[CountResult]]:
        seen.append((pulled, len(batch)))  # when the call is made, not when it runs
        return real(count_id, batch, **kw)

    monkeypatch.setattr(atp, "apply_counts", spy)
    rep = await reconcile(atp, rows(), count_id="stream-1", chunk=chunk, inflight=2)
    assert rep.applied == n and len(seen) == n // chunk
    # each call was sent when just its own rows had been read: never the whole source
    assert [p for p, _ in seen] == [chunk * (k + 1) for k in range(n // chunk)]
    assert {size for _, size in seen} == {chunk}


async def test_a_source_failing_midway_stops_the_count_and_keeps_what_was_done(
    atp: ATP,
) -> None:
    await positions(atp, *((f"F{i}", 10) for i in range(10)))
    at = (await count_time(atp)).isoformat()

    def rows() -> Iterator[tuple[int, dict[str, Any]]]:
        for i in range(10):
            if i == 6:
                raise OSError("the share went away")
            yield i + 1, {"sku": f"F{i}", "location": "W1", "counted_qty": 1, "counted_at": at}

    with pytest.raises(InvalidRequest) as e:
        await reconcile(atp, rows(), count_id="fail-1", chunk=2)
    assert "the share went away" in e.value.detail and "fail-1" in e.value.detail
    partial = e.value.extra["report"]
    assert isinstance(partial, CountReport) and partial.applied == 6
    assert [await on_hand(atp, f"F{i}") for i in range(10)] == [1] * 6 + [10] * 4


def test_default_count_id_and_column_renaming() -> None:
    now = datetime(2026, 11, 27, 10, 15, 0, tzinfo=UTC)
    assert default_count_id("/data/cycle counts.csv", now) == "cycle-counts-20261127T101500Z"
    assert default_count_id("sqlite:///var/sor.db", now) == "sor.db-20261127T101500Z"
    assert default_count_id("", now) == "count-20261127T101500Z"
    assert parse_columns(["sku=item_no", " counted_qty = qty "]) == {
        "sku": "item_no",
        "counted_qty": "qty",
    }
    for bad in (["sku"], ["=x"], ["sku="], ["sku=a", "sku=b"]):
        with pytest.raises(ValueError):
            parse_columns(bad)


# -- the SQL adapter -------------------------------------------------------------------------


async def test_sqlite_query_and_table(atp: ATP, cli: Cli, tmp_path: Path) -> None:
    await positions(atp, ("A", 10), ("B", 10), ("C", 10))
    at = await count_time(atp)
    db = tmp_path / "sor.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE stock (item_no TEXT, wh TEXT, qty INTEGER, taken_at TEXT)")
        conn.executemany(
            "INSERT INTO stock VALUES (?, ?, ?, ?)",
            [("A", "W1", 3, at.isoformat()), ("B", "W1", 4, at.isoformat()),
             ("C", "W1", -2, at.isoformat())],
        )  # fmt: skip
    url = f"sqlite:///{db}"
    q = await cli(
        "reconcile", url, "--count-id", "sql-q", "--json", "--query",
        "SELECT item_no AS sku, wh AS location, qty AS counted_qty, taken_at AS counted_at "
        "FROM stock WHERE item_no <> 'B'",
    )  # fmt: skip
    assert q.returncode == 0, q.stderr
    rep = json.loads(q.stdout)
    assert (rep["applied"], rep["refused_by_reason"]) == (1, {"bad_count": 1})
    assert rep["source"] == url
    t = await cli(
        "reconcile", url, "--table", "stock", "--count-id", "sql-t", "--json",
        "--column", "sku=item_no", "--column", "location=wh", "--column", "counted_qty=qty",
        "--column", "counted_at=taken_at",
    )  # fmt: skip
    assert t.returncode == 0, t.stderr
    rep = json.loads(t.stdout)
    # A was counted at the same time by sql-q: this count does not apply over it
    assert (rep["applied"], rep["refused_by_reason"]) == (1, {"superseded": 1, "bad_count": 1})
    assert [await on_hand(atp, s) for s in "ABC"] == [3, 4, 10]
    missing = await cli("reconcile", url, "--table", "nope", "--count-id", "sql-x")
    assert missing.returncode == 2 and "nope" in missing.stderr


@needs_pg
async def test_postgresql_query_and_table(atp: ATP, cli: Cli) -> None:
    import sqlalchemy as sa

    assert PG_URL is not None
    await positions(atp, ("PA", 10), ("PB", 10), ("PC", 10))
    await atp.reserve("o-pc", "web", [("PC", "W1", 8)])
    at = await count_time(atp)
    table = f"atp_counts_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(PG_URL)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    f"CREATE TABLE {table} (item_no text, warehouse text, qty integer, "
                    "taken_at timestamptz)"
                )
            )
            conn.execute(
                sa.text(f"INSERT INTO {table} VALUES (:s, 'W1', :q, :t)"),
                [{"s": "PA", "q": 12, "t": at}, {"s": "PB", "q": 9, "t": at},
                 {"s": "PC", "q": 5, "t": at}, {"s": "PX", "q": 1, "t": at}],
            )  # fmt: skip
        q = await cli(
            "reconcile", PG_URL, "--count-id", "pg-q", "--json", "--query",
            "SELECT item_no AS sku, warehouse AS location, qty AS counted_qty, "
            f"taken_at AS counted_at FROM {table} WHERE item_no IN ('PA', 'PX')",
        )  # fmt: skip
        assert q.returncode == 0, q.stderr
        rep = json.loads(q.stdout)
        assert (rep["applied"], rep["refused_by_reason"]) == (1, {"unknown_position": 1})
        password = sa.make_url(PG_URL).password
        assert rep["source"].startswith("postgresql") and (
            not password or password not in rep["source"]
        )
        t = await cli(
            "reconcile", PG_URL, "--table", table, "--count-id", "pg-t", "--json",
            "--column", "sku=item_no", "--column", "location=warehouse",
            "--column", "counted_qty=qty", "--column", "counted_at=taken_at",
        )  # fmt: skip
        assert t.returncode == 0, t.stderr
        rep = json.loads(t.stdout)
        assert (rep["applied"], rep["refused"]) == (2, 2)
        assert rep["refused_by_reason"] == {"superseded": 1, "unknown_position": 1}
        assert (rep["units_at_risk"], len(rep["exceptions"])) == (3, 1)
        assert [await on_hand(atp, s) for s in ("PA", "PB", "PC")] == [12, 9, 5]
        bad = await cli("reconcile", PG_URL, "--query", "SELECT nope FROM nowhere")
        assert bad.returncode == 2 and "nowhere" in bad.stderr
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
        engine.dispose()


# -- the command -----------------------------------------------------------------------------


async def test_report_file_and_table(atp: ATP, cli: Cli, tmp_path: Path) -> None:
    await positions(atp, ("A", 10), ("B", 10))
    at = (await count_time(atp)).isoformat()
    path = tmp_path / "counts.jsonl"
    path.write_text(
        "\n".join(
            json.dumps({"item": s, "location": "W1", "counted_qty": q, "counted_at": at})
            for s, q in (("A", 9), ("B", 10), ("Q", 1))
        )
        + "\n"
    )
    out = await cli(
        "reconcile", "counts.jsonl", "--count-id", "rep-1", "--report", "out/report.json",
        "--column", "sku=item", "--tolerance", "1",
    )  # fmt: skip
    assert out.returncode == 2 and "out/report.json" in out.stderr  # no such directory
    (tmp_path / "out").mkdir()
    out = await cli(
        "reconcile", "counts.jsonl", "--count-id", "rep-2", "--report", "out/report.json",
        "--column", "sku=item", "--tolerance", "1",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    # the first run wrote nothing but applied its rows: the second finds them superseded
    assert rep["count_id"] == "rep-2" and rep["refused_by_reason"] == {
        "superseded": 2,
        "unknown_position": 1,
    }
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["count", "rep-2"]
    assert any(ln.startswith("refused rows:") for ln in lines)
    assert any("row 3 Q at W1: unknown_position" in ln for ln in lines)


async def test_format_option_reads_any_file_name(atp: ATP, cli: Cli, tmp_path: Path) -> None:
    await positions(atp, ("A", 10))
    at = (await count_time(atp)).isoformat()
    write_csv(tmp_path / "export.txt", [["A", "W1", 4, at]])
    out = await cli("reconcile", "export.txt", "--format", "csv", "--count-id", "fmt-1")
    assert out.returncode == 0, out.stderr
    assert await on_hand(atp, "A") == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.csv"], "no such file"),
        (["counts.csv", "--column", "sku"], "ours=theirs"),
        (["counts.csv", "--chunk", "0"], "--chunk"),
        (["counts.csv", "--tolerance", "-1"], "--tolerance"),
        (["counts.csv", "--query", "SELECT 1"], "database sources only"),
        (["counts.csv", "--count-id", "no spaces"], "count id"),
        (["counts.xlsx"], "unknown file format"),
        (["sqlite:///x.db"], "exactly one of query or table"),
    ],
)
async def test_bad_arguments_exit_2(
    cli: Cli, tmp_path: Path, args: list[str], message: str
) -> None:
    write_csv(tmp_path / "counts.csv", [])
    (tmp_path / "counts.xlsx").write_bytes(b"PK")
    out = await cli("reconcile", *args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert message in out.stderr


async def test_an_unreadable_file_exits_2(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "latin1.csv").write_bytes(
        b"sku,location,counted_qty,counted_at\n" + b"caf\xe9,W1,1,2026-01-01T00:00:00Z\n"
    )
    out = await cli("reconcile", "latin1.csv", "--count-id", "enc-1")
    assert out.returncode == 2 and "UnicodeDecodeError" in out.stderr


async def test_a_backend_failure_exits_1(cli: Cli, tmp_path: Path) -> None:
    write_csv(tmp_path / "counts.csv", [["A", "W1", 1, "2026-01-01T00:00:00Z"]])
    out = await cli(
        "reconcile", "counts.csv", "--count-id", "down-1",
        ATP_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
    )  # fmt: skip
    assert out.returncode == 1
    assert "backend" in out.stderr and "--count-id down-1" in out.stderr


def test_a_report_survives_its_dict() -> None:
    """A worker saves the report as to_dict() and carries on from it (atp.worker)."""
    rep = CountReport("c-1", "counts.csv", tolerance=2)
    rep.add(CountResult(row=1, status="applied", sku="A", location="W", drift=-3, units_at_risk=2,
                        exception_id="3-1"))  # fmt: skip
    rep.add(CountResult(row=2, status="already", sku="B", location="W", drift=1))
    rep.add(
        CountResult(row=3, status="refused", sku="C", location="W", reason="future", detail="x")
    )
    again = CountReport.from_dict(rep.to_dict())
    assert again.to_dict() == rep.to_dict()
    assert again.accuracy == rep.accuracy == 0.5
