"""Reading rows from the system of record, streamed: count files and order-line files
(CSV or JSON Lines) and SQL queries on its database (SQLAlchemy: PostgreSQL for real,
SQLite as the embedded default).

Every source yields ``(row_number, fields)`` one row at a time, so a file of a million
rows is read in bounded memory. ``fields`` maps column names (after the optional
``columns`` renaming) to values, or is a :class:`RowError` when the row could not be read
at all (malformed JSON, a CSV row with the wrong number of fields); the caller refuses
that row with its reason and carries on.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidRequest

__all__ = ["RowError", "RowSource", "open_source"]

_SQL_SCHEMES = ("postgresql", "postgres", "sqlite", "mysql", "mariadb", "oracle", "mssql")


@dataclass(frozen=True, slots=True)
class RowError:
    """A row that could not be read."""

    reason: str
    detail: str


class RowSource:
    """Rows of one source. Iterate it for ``(row_number, fields | RowError)``.

    :param name: how the source is named in movements and reports (a path, or the
        database URL without its password).
    """

    def __init__(self, name: str, rows: Iterator[tuple[int, dict[str, Any] | RowError]]) -> None:
        self.name = name
        self._rows = rows

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
        return self._rows


def open_source(
    spec: str | Path,
    *,
    query: str | None = None,
    table: str | None = None,
    columns: Mapping[str, str] | None = None,
    fmt: str | None = None,
) -> RowSource:
    """Open a source of rows.

    :param spec: a file path (``.csv``; ``.jsonl``/``.ndjson``/``.json`` for JSON Lines;
        ``fmt`` overrides the extension), or a SQLAlchemy database URL
        (``postgresql://…``, ``sqlite:///counts.db``) with ``query`` or ``table``.
    :param query: SQL returning the columns (after ``columns`` renaming) the caller needs.
    :param table: read every row of this table instead of a query.
    :param columns: renames source columns: ``{"sku": "item_no", …}`` reads ``item_no``
        as ``sku``.
    :raises InvalidRequest: the source cannot be opened or the arguments do not fit.
    """
    text = str(spec)
    rename = {src: ours for ours, src in (columns or {}).items()}
    scheme = text.split(":", 1)[0].split("+", 1)[0].lower() if "://" in text else ""
    if scheme in _SQL_SCHEMES:
        if (query is None) == (table is None):
            raise InvalidRequest("a database source needs exactly one of query or table")
        return RowSource(_safe_url(text), _sql_rows(text, query, table, rename))
    if query is not None or table is not None:
        raise InvalidRequest("query and table are for database sources only")
    path = Path(text)
    if not path.is_file():
        raise InvalidRequest(f"no such file: {text}")
    kind = (fmt or path.suffix.lstrip(".")).lower()
    if kind == "csv":
        return RowSource(str(path), _csv_rows(path, rename))
    if kind in ("jsonl", "ndjson", "json"):
        return RowSource(str(path), _jsonl_rows(path, rename))
    raise InvalidRequest(f"unknown file format {kind!r}: use .csv or .jsonl (or fmt=)")


def _renamed(row: Mapping[str, Any], rename: Mapping[str, str]) -> dict[str, Any]:
    return {rename.get(k, k): v for k, v in row.items()}


def _csv_rows(
    path: Path, rename: Mapping[str, str]
) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        names = [rename.get(h.strip(), h.strip()) for h in header]
        for n, values in enumerate(reader, start=1):
            if not values or all(not v.strip() for v in values):
                continue
            if len(values) != len(names):
                yield (
                    n,
                    RowError("bad_row", f"{len(values)} fields where the header has {len(names)}"),
                )
                continue
            yield n, dict(zip(names, (v.strip() for v in values), strict=True))


def _jsonl_rows(
    path: Path, rename: Mapping[str, str]
) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    with path.open(encoding="utf-8-sig") as f:
        n = 0
        for line in f:
            if not line.strip():
                continue
            n += 1
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield n, RowError("bad_row", f"not JSON: {e.msg} at column {e.colno}")
                continue
            if not isinstance(obj, dict):
                yield n, RowError("bad_row", "each line must be a JSON object")
                continue
            yield n, _renamed(obj, rename)


def _sql_rows(
    url: str, query: str | None, table: str | None, rename: Mapping[str, str]
) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    import sqlalchemy as sa

    try:
        engine = sa.create_engine(url)
    except Exception as e:  # a bad URL or a missing driver: say which
        raise InvalidRequest(f"cannot open {_safe_url(url)}: {e}") from None
    try:
        if table is not None:
            stmt: Any = sa.Table(table, sa.MetaData(), autoload_with=engine).select()
        else:
            stmt = sa.text(query or "")
        with engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=2000).execute(stmt)
            for n, row in enumerate(result.mappings(), start=1):
                yield n, _renamed({str(k): v for k, v in row.items()}, rename)
    except sa.exc.SQLAlchemyError as e:
        raise InvalidRequest(
            f"reading {_safe_url(url)} failed: {e.__class__.__name__}: {e}"
        ) from None
    finally:
        engine.dispose()


def _safe_url(url: str) -> str:
    """The URL without its password (it names the source in logs and movements)."""
    try:
        import sqlalchemy as sa

        return sa.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@", 1)[-1] if "@" in url else url
