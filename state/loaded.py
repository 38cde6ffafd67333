"""What a batched load found, and how HMGET rows become it (pure: no Redis here).

Row order of the fields asked for: :data:`state.codec.POSITION`, :data:`state.codec.META`,
then every StreamStates field (:func:`kernels.states.field_names`). A row whose fields cannot
be read (a number that does not parse, h of the wrong size, a field of another layout whose
policy is ``bad``) does not fail the batch: the stream gets a fresh state and a reason in
``Loaded.unreadable``, so the pipeline dead-letters that stream's events only (``bad_state``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kernels.states import Positions, StreamStates, field_names, layout_of
from state.codec import META, POSITION, parse_layout

ROW_FIELDS = POSITION + META + field_names()
_COL = {name: i for i, name in enumerate(ROW_FIELDS)}


@dataclass
class Loaded:
    """What :meth:`state.store.StateStore.load` found for n streams (row i is ``ids[i]``)."""

    states: StreamStates  # the stored states; fresh ones where ``fresh`` is True
    positions: Positions  # where each stored state is; -1 / NaN / None where nothing is stored
    found: np.ndarray  # bool: a state hash exists (of any model version, readable or not)
    other_model: np.ndarray  # bool: it belongs to another model version; a fresh state stands in
    unreadable: list[str | None] = field(default_factory=list)  # why the hash cannot be read; None: it can
    layout_resets: dict[str, int] = field(default_factory=dict)  # fields started afresh (other layout), by name

    def __post_init__(self) -> None:
        if not self.unreadable:
            self.unreadable = [None] * len(self.found)

    @property
    def fresh(self) -> np.ndarray:
        """bool: the stream starts from a fresh state (no hash, another model, or unreadable)."""
        return ~self.found | self.other_model | np.array([u is not None for u in self.unreadable], bool)

    # The position columns by name (as the pipeline reads them).
    @property
    def partition(self) -> np.ndarray:
        return self.positions.partition

    @property
    def offset(self) -> np.ndarray:
        return self.positions.offset

    @property
    def index(self) -> np.ndarray:
        return self.positions.index

    @property
    def ts(self) -> np.ndarray:
        return self.positions.ts

    @property
    def event_id(self) -> list[str | None]:
        return self.positions.event_id

    def take(self, idx: Any) -> Loaded:
        rows = np.arange(len(self.found))[idx]
        return Loaded(self.states.take(rows), self.positions.take(rows), self.found[rows], self.other_model[rows],
                      [self.unreadable[i] for i in rows.tolist()], dict(self.layout_resets))

    @classmethod
    def concat(cls, parts: Sequence[Loaded]) -> Loaded:
        resets: dict[str, int] = {}
        for p in parts:
            for k, v in p.layout_resets.items():
                resets[k] = resets.get(k, 0) + v
        return cls(StreamStates.concat([p.states for p in parts]), Positions.concat([p.positions for p in parts]),
                   np.concatenate([p.found for p in parts]), np.concatenate([p.other_model for p in parts]),
                   [u for p in parts for u in p.unreadable], resets)


def _int(v: bytes | None, default: int) -> int:
    return default if v is None else int(v)


def decode_rows(rows: Sequence[Sequence[bytes | None]], fresh: StreamStates, *, model: bytes,
                shape: tuple[int, int]) -> Loaded:
    """HMGET rows (``ROW_FIELDS`` order) of n streams -> :class:`Loaded`; ``fresh``: n fresh
    states of the loaded model, filled in place where a readable state of that model is stored."""
    n = len(rows)
    st = fresh
    pos = Positions.empty(n)
    found = np.zeros(n, bool)
    reset = np.zeros(n, bool)
    unreadable: list[str | None] = [None] * n
    resets: dict[str, int] = {}
    if n == 0:
        return Loaded(st, pos, found, reset, unreadable, resets)
    cols = list(zip(*rows))
    there = [i for i in range(n) if any(v is not None for v in rows[i])]
    if not there:
        return Loaded(st, pos, found, reset, unreadable, resets)
    found[there] = True
    layers_b, hidden_b = b"%d" % shape[0], b"%d" % shape[1]
    model_col, lay_col, hid_col, layout_col = cols[_COL["model"]], cols[_COL["layers"]], cols[_COL["hidden"]], \
        cols[_COL["layout"]]
    ok: list[int] = []
    for i in there:
        try:
            pos.partition[i] = _int(cols[0][i], -1)
            pos.offset[i] = _int(cols[1][i], -1)
            pos.index[i] = _int(cols[2][i], 0)
            ts = cols[3][i]
            pos.ts[i] = np.nan if ts is None else float(ts)
        except ValueError as exc:
            unreadable[i] = f"a position field that is not a decimal number ({exc})"
            continue
        e = cols[4][i]
        if e:
            pos.event_id[i] = e.decode(errors="replace")
        if model_col[i] != model:
            reset[i] = True
            continue
        if (lay_col[i] is not None or hid_col[i] is not None) and (lay_col[i], hid_col[i]) != (layers_b, hidden_b):
            unreadable[i] = (f"h and c of shape {_show(lay_col[i])} x {_show(hid_col[i])} under model "
                             f"{model.decode()}, whose shape is {shape[0]} x {shape[1]}")
            continue
        ok.append(i)
    if ok:
        blank = st.take([ok[0]])  # still fresh: what a row that turns out unreadable goes back to
        _fill(st, cols, ok, layout_col, unreadable, resets)
        bad = [i for i in ok if unreadable[i] is not None]
        if bad:
            st.put(bad, blank.take(np.zeros(len(bad), np.int64)))
    return Loaded(st, pos, found, reset, unreadable, resets)


def _show(v: bytes | None) -> str:
    return "?" if v is None else v.decode(errors="replace")


def _fill(st: StreamStates, cols: list[tuple[Any, ...]], ok: list[int], layout_col: tuple[Any, ...],
          unreadable: list[str | None], resets: dict[str, int]) -> None:
    """Copy the stored fields of rows ``ok`` into ``st`` (one numpy join per field when every
    row is well formed; row by row otherwise, naming what is wrong)."""
    layouts: dict[Any, dict[str, int] | str] = {}
    for tag in set(layout_col[i] for i in ok):
        try:
            layouts[tag] = parse_layout(tag)
        except ValueError:
            layouts[tag] = f"a layout field that does not parse ({_show(tag)!r})"
    for i in ok:
        got = layouts[layout_col[i]]
        if isinstance(got, str):
            unreadable[i] = got
    rows = [i for i in ok if unreadable[i] is None]
    tags = {layout_col[i] for i in rows}  # usually one: every stream saved by this lstream
    for name in field_names():
        dest = getattr(st, name)
        spec = layout_of(name, dest.dtype)
        col = cols[_COL[name]]
        vals = [col[i] for i in rows]
        if spec.text:
            try:
                dest[rows] = [int(v) if v is not None else dest[i] for i, v in zip(rows, vals)]
                continue
            except ValueError:
                pass
        shape = dest.shape[1:]
        width = int(np.prod(shape, dtype=np.int64)) * dest.itemsize
        want = spec.version
        same = all(isinstance(layouts[t], dict) and layouts[t].get(name, 1) == want  # type: ignore[union-attr]
                   for t in tags)
        if not spec.text and same and None not in vals:
            blob = b"".join(vals)
            if len(blob) == width * len(vals):
                dest[rows] = np.frombuffer(blob, np.dtype(spec.dtype)).reshape((len(vals), *shape))
                continue
        for i, v in zip(rows, vals):  # slow path: name what is wrong, row by row
            if unreadable[i] is not None or v is None:
                continue  # a missing field keeps its fresh value (a field added since)
            stored = layouts[layout_col[i]].get(name, 1)  # type: ignore[union-attr]
            problem = None
            if spec.text:
                try:
                    dest[i] = int(v)
                except ValueError:
                    problem = f"field {name}: expected a decimal integer, got {v[:40]!r}"
            elif stored != want:
                problem = f"field {name}: layout version {stored}, this lstream reads version {want}"
            elif len(v) != width:
                problem = f"field {name}: expected {width} bytes (shape {shape}), got {len(v)}"
            else:
                dest[i] = np.frombuffer(v, np.dtype(spec.dtype)).reshape(shape)
            if problem is None:
                continue
            if spec.other_layout == "fresh" and not spec.text:
                # Written under another layout of this field (e.g. an older detector): that
                # field starts afresh, the rest of the state (same model) is kept. Counted.
                resets[name] = resets.get(name, 0) + 1
            else:
                unreadable[i] = problem
