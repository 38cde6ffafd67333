"""Read sensor CSV files into numeric series (numpy only, no torch).

A file has a ``timestamp`` column (seconds since the epoch, or ISO 8601 / RFC 3339 text such as
NAB's ``2014-07-01 00:00:00``; text without a zone is taken as UTC) and one or more value
columns. Without ``columns`` every other column whose cells are all numbers is a feature.
Every problem is a :class:`DataError` with a one-line message naming the file and the problem.

>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "pump-1.csv")
>>> _ = open(path, "w").write("timestamp,value,site\\n2014-07-01 00:00:00,1.5,a\\n2014-07-01 00:05:00,2.5,a\\n")
>>> s = read_csv(path)
>>> (s.name, s.features, s.ts.tolist(), s.values.ravel().tolist())
('pump-1', ['value'], [1404172800.0, 1404173100.0], [1.5, 2.5])
>>> _ = open(path, "w").write("timestamp,value\\n1,2\\n2,nan\\n")
>>> read_csv(path)
Traceback (most recent call last):
...
series.csvdata.DataError: ...pump-1.csv: row 3, column 'value': expected a finite number, got 'nan'
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

TIME_COLUMNS = ("timestamp", "ts", "time", "datetime", "date")


class DataError(ValueError):
    """Input data that cannot be used; the message is one line naming the file."""


@dataclass
class Series:
    """One stream's readings: ``values[i]`` was read at ``ts[i]`` (epoch seconds)."""

    name: str
    ts: np.ndarray  # float64 (T,)
    values: np.ndarray  # float64 (T, F)
    features: list[str]
    ts_text: list[str] | None = field(default=None, repr=False)  # timestamps as written in the file
    source: str = field(default="", repr=False)  # the file it came from

    def __len__(self) -> int:
        return int(self.values.shape[0])


def stream_name(path: str | os.PathLike[str]) -> str:
    """The stream id of a file: its name without ``.csv``.

    >>> stream_name("data/machine_temp.csv")
    'machine_temp'
    """
    base = os.path.basename(os.fspath(path))
    return base[:-4] if base.lower().endswith(".csv") else base


def parse_time(text: str) -> float:
    """Epoch seconds from a number or an ISO 8601 string (naive means UTC).

    >>> parse_time("1700000000.5"), parse_time("2014-07-01T00:00:00Z"), parse_time("2014-07-01 02:00:00+02:00")
    (1700000000.5, 1404172800.0, 1404172800.0)
    """
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if math.isfinite(value):
            return value
        raise ValueError(text)
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    stamp = datetime.fromisoformat(text)
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp()


def _read_table(path: str) -> tuple[list[str], list[list[str]]]:
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a CSV file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = [row for row in csv.reader(fh) if row and any(cell.strip() for cell in row)]
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file") from None
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable CSV file: {exc}") from None
    if not rows:
        raise DataError(f"{path}: empty file, expected a header row and data rows")
    header = [cell.strip() for cell in rows[0]]
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"{path}: row {i}: expected {len(header)} cells, got {len(row)}")
    return header, rows[1:]


def _time_column(path: str, header: list[str], time_column: str | None = None) -> int:
    if time_column is not None:
        if time_column not in header:
            raise DataError(f"{path}: no time column {time_column!r} (--time-column), got columns {header}")
        return header.index(time_column)
    lower = [name.lower() for name in header]
    for name in TIME_COLUMNS:
        if name in lower:
            return lower.index(name)
    accepted = ", ".join(repr(n) for n in TIME_COLUMNS)
    raise DataError(f"{path}: no timestamp column (expected one named {accepted}, any case, or name it with "
                    f"--time-column), got columns {header}")


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _value_columns(path: str, header: list[str], rows: list[list[str]], skip: set[int],
                   columns: Sequence[str] | None) -> list[int]:
    if columns:
        picked = []
        for name in columns:
            if name not in header:
                raise DataError(f"{path}: no column {name!r}, got columns {header}")
            picked.append(header.index(name))
        return picked
    # A column counts as numeric if its cells parse as numbers (NaN cells are caught later).
    picked = [j for j in range(len(header)) if j not in skip
              and all(_is_number(row[j]) or row[j].strip() == "" for row in rows)
              and any(_is_number(row[j]) for row in rows)]
    if not picked:
        others = [header[j] for j in range(len(header)) if j not in skip]
        raise DataError(f"{path}: no numeric value column (columns besides the timestamp: {others})")
    return picked


def _build(path: str, name: str, header: list[str], rows: list[list[str]], t_col: int,
           v_cols: list[int], first_row: list[int]) -> Series:
    ts = np.empty(len(rows))
    values = np.empty((len(rows), len(v_cols)))
    for i, row in enumerate(rows):
        try:
            ts[i] = parse_time(row[t_col])
        except ValueError:
            raise DataError(f"{path}: row {first_row[i]}, column {header[t_col]!r}: expected epoch seconds "
                            f"or an ISO 8601 time, got {row[t_col]!r}") from None
        for k, j in enumerate(v_cols):
            cell = row[j].strip()
            try:
                value = float(cell)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise DataError(f"{path}: row {first_row[i]}, column {header[j]!r}: expected a finite number, "
                                f"got {cell!r}")
            values[i, k] = value
    return Series(name, ts, values, [header[j] for j in v_cols], [row[t_col] for row in rows], path)


def read_csv(path: str | os.PathLike[str], columns: Sequence[str] | None = None, *, min_rows: int = 1,
             time_column: str | None = None) -> Series:
    """One stream from one CSV file; ``columns`` chooses the value columns (default: all numeric),
    ``time_column`` the time column (default: the first of :data:`TIME_COLUMNS`, any case)."""
    path = os.fspath(path)
    header, rows = _read_table(path)
    t_col = _time_column(path, header, time_column)
    v_cols = _value_columns(path, header, rows, {t_col}, columns)
    series = _build(path, stream_name(path), header, rows, t_col, v_cols, list(range(2, len(rows) + 2)))
    if len(rows) < min_rows:
        raise DataError(f"{path}: expected at least {min_rows} data rows, got {len(rows)}")
    return series


def read_streams(paths: Sequence[str | os.PathLike[str]], stream_column: str | None = None,
                 columns: Sequence[str] | None = None, *, min_rows: int = 1,
                 time_column: str | None = None) -> list[Series]:
    """One stream per file (named after the file), or one per value of ``stream_column``.

    All streams must have the same features, in the same order.
    """
    if not paths:
        raise DataError("no CSV files given")
    out: list[Series] = []
    seen: dict[str, str] = {}
    for raw in paths:
        path = os.fspath(raw)
        if stream_column is None:
            parts = [read_csv(path, columns, min_rows=min_rows, time_column=time_column)]
        else:
            header, rows = _read_table(path)
            if stream_column not in header:
                raise DataError(f"{path}: no stream column {stream_column!r}, got columns {header}")
            s_col = header.index(stream_column)
            t_col = _time_column(path, header, time_column)
            v_cols = _value_columns(path, header, rows, {t_col, s_col}, columns)
            groups: dict[str, list[int]] = {}
            for i, row in enumerate(rows):
                groups.setdefault(row[s_col].strip(), []).append(i)
            parts = []
            for sid, idx in groups.items():
                if not sid:
                    raise DataError(f"{path}: row {idx[0] + 2}: empty stream id in column {stream_column!r}")
                parts.append(_build(path, sid, header, [rows[i] for i in idx], t_col, v_cols,
                                    [i + 2 for i in idx]))
                if len(idx) < min_rows:
                    raise DataError(f"{path}: stream {sid!r}: expected at least {min_rows} rows, got {len(idx)}")
        for s in parts:
            if s.name in seen:
                raise DataError(f"{path}: stream {s.name!r} also comes from {seen[s.name]}; stream ids must be unique")
            seen[s.name] = path
            if out and s.features != out[0].features:
                raise DataError(f"{path}: expected value columns {out[0].features} like {seen[out[0].name]}, "
                                f"got {s.features}")
            out.append(s)
    return out
