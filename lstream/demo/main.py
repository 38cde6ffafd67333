"""What ``lstream demo`` replays and how it scores what comes back (no Kafka here).

:func:`make_scenario` builds the feed: :func:`series.synthetic.generate` streams with
labelled injected anomalies, minus the ones that start while the detector is still warming
up (those readings are restored from the same streams generated without anomalies, so the
labels stay exact). :class:`Tally` folds the worker's predictions, alerts and dead letters in
as they are read back, and :func:`match_alerts` says which labelled episodes an alert caught
and which alerts were false.

>>> sc = make_scenario(4, 200, seed=3, anomaly_rate=0.01, clean_steps=60)
>>> len(sc.streams), sc.events, all(e.start >= 60 for e in sc.episodes)
(4, 800, True)
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from series.synthetic import SyntheticStream, generate


@dataclass(frozen=True)
class Episode:
    """A labelled injected anomaly: rows ``start`` to ``end`` (exclusive) of one stream."""

    stream_id: str
    start: int
    end: int


def runs(labels: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous True runs of ``labels`` as (start, end) with end exclusive.

    >>> runs(np.array([0, 1, 1, 0, 0, 1], bool))
    [(1, 3), (5, 6)]
    """
    padded = np.concatenate([[False], labels.astype(bool), [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


@dataclass
class Scenario:
    """The replayed feed: streams in order, their labelled episodes, row lookup by time."""

    streams: list[SyntheticStream]
    clean_steps: int  # no labelled anomaly starts before this row
    period_s: float
    warmup: int = 0  # rows during which the detector scores nothing (for the plot)
    episodes: list[Episode] = field(init=False)

    def __post_init__(self) -> None:
        self.by_id = {s.stream_id: s for s in self.streams}
        self.episodes = [Episode(s.stream_id, a, b) for s in self.streams for a, b in runs(s.labels)]

    @property
    def events(self) -> int:
        return sum(len(s.ts) for s in self.streams)

    def row(self, stream_id: str, ts: float) -> int | None:
        """The row of ``stream_id`` read at event time ``ts`` (None if it is not one of ours).

        >>> sc = make_scenario(1, 5, anomaly_rate=0.0)
        >>> sc.row("sensor-000", sc.streams[0].ts[3]), sc.row("sensor-000", 1.0), sc.row("x", 0.0)
        (3, None, None)
        """
        s = self.by_id.get(stream_id)
        if s is None:
            return None
        i = round((ts - s.ts[0]) / self.period_s)
        return i if 0 <= i < len(s.ts) and abs(s.ts[i] - ts) < 1e-3 else None


def make_scenario(n_streams: int, n_steps: int, *, seed: int = 0, num_features: int = 1,
                  anomaly_rate: float = 0.005, clean_steps: int = 0, period_s: float = 60.0,
                  prefix: str = "", warmup: int = 0) -> Scenario:
    """``n_streams`` synthetic streams whose labelled anomalies all start at row >= ``clean_steps``;
    ``prefix`` goes in front of every stream id."""
    dirty = generate(n_streams, n_steps, seed=seed, num_features=num_features,
                     anomaly_rate=anomaly_rate, period_s=period_s)
    for s in dirty:
        s.stream_id = prefix + s.stream_id
    if anomaly_rate > 0 and clean_steps > 0:
        clean = generate(n_streams, n_steps, seed=seed, num_features=num_features, anomaly_rate=0.0,
                         period_s=period_s)
        for d, c in zip(dirty, clean):
            for a, b in runs(d.labels):
                if a < clean_steps:  # the detector would not be scoring yet: put the reading back
                    d.values[a:b] = c.values[a:b]
                    d.labels[a:b] = False
    return Scenario(dirty, clean_steps, period_s, warmup)


@dataclass
class Score:
    caught: list[Episode]
    missed: list[Episode]
    false_alerts: list[tuple[str, int]]
    delays: list[int]  # rows from an episode's start to its first alert, for the caught ones


def match_alerts(episodes: list[Episode], alerts: list[tuple[str, int]], tolerance: int) -> Score:
    """An episode is caught when one of its stream's alerts falls in [start, end + tolerance);
    an alert in no such window is false.

    >>> eps = [Episode("a", 10, 11), Episode("a", 50, 80), Episode("b", 5, 6)]
    >>> s = match_alerts(eps, [("a", 12), ("a", 30), ("b", 4), ("a", 60)], tolerance=3)
    >>> [e.start for e in s.caught], [e.start for e in s.missed], s.false_alerts, s.delays
    ([10, 50], [5], [('a', 30), ('b', 4)], [2, 10])
    """
    caught, missed, delays = [], [], []
    used: set[int] = set()
    for ep in episodes:
        hits = [k for k, (sid, row) in enumerate(alerts)
                if sid == ep.stream_id and ep.start <= row < ep.end + tolerance]
        if hits:
            caught.append(ep)
            delays.append(min(alerts[k][1] for k in hits) - ep.start)
            used.update(hits)
        else:
            missed.append(ep)
    false_alerts = [a for k, a in enumerate(alerts) if k not in used]
    return Score(caught, missed, false_alerts, delays)


@dataclass
class AlertSeen:
    stream_id: str
    row: int | None
    ts: float
    expected: list[float]
    actual: list[float]
    score: float
    injected: bool  # inside (or just after) a labelled episode
    reason: str = ""  # which evidence fired (the alert's optional "reason"), "" if none given


class Tally:
    """Counts and series rebuilt from the output topics, record by record."""

    def __init__(self, scenario: Scenario, tolerance: int) -> None:
        self.scenario = scenario
        self.tolerance = tolerance
        self.predictions = 0
        self.dead_letters = 0
        self.dead_codes: dict[str, int] = {}
        self.alerts: list[AlertSeen] = []
        self.streams_seen: set[str] = set()
        self.foreign = 0  # records of streams not in this run's feed
        self.model = ""
        self._times: deque[float] = deque()
        steps = {s.stream_id: len(s.ts) for s in scenario.streams}
        self.expected = {sid: np.full(n, np.nan) for sid, n in steps.items()}
        self.score = {sid: np.full(n, np.nan) for sid, n in steps.items()}
        self._windows: dict[str, list[tuple[int, int]]] = {}
        for ep in scenario.episodes:
            self._windows.setdefault(ep.stream_id, []).append((ep.start, ep.end + tolerance))

    @property
    def handled(self) -> int:
        """Events the worker is done with: applied (a prediction) or rejected (a dead letter)."""
        return self.predictions + self.dead_letters

    def rate(self, now: float | None = None, window: float = 2.0) -> float:
        """Predictions per second over the last ``window`` seconds."""
        now = time.monotonic() if now is None else now
        while self._times and self._times[0] < now - window:
            self._times.popleft()
        return len(self._times) / window

    def on_prediction(self, raw: bytes | None) -> None:
        p: dict[str, Any] = orjson.loads(raw or b"null")
        sid = p["stream_id"]
        row = self.scenario.row(sid, float(p["ts"]))
        if row is None:
            self.foreign += 1
            return
        self.predictions += 1
        self.streams_seen.add(sid)
        self._times.append(time.monotonic())
        self.model = p.get("model", self.model)
        if p.get("expected") is not None:
            self.expected[sid][row] = p["expected"][0]
        self.score[sid][row] = p.get("score", np.nan)

    def on_alert(self, raw: bytes | None) -> AlertSeen | None:
        a: dict[str, Any] = orjson.loads(raw or b"null")
        sid = a["stream_id"]
        row = self.scenario.row(sid, float(a["ts"]))
        if row is None:
            self.foreign += 1
            return None
        injected = any(lo <= row < hi for lo, hi in self._windows.get(sid, []))
        seen = AlertSeen(sid, row, float(a["ts"]), list(a.get("expected") or []), list(a.get("actual") or []),
                         float(a.get("score", np.nan)), injected, str(a.get("reason") or ""))
        self.alerts.append(seen)
        return seen

    def on_dead_letter(self, raw: bytes | None) -> None:
        d: dict[str, Any] = orjson.loads(raw or b"null")
        self.dead_letters += 1
        code = str(d.get("error", "?"))
        self.dead_codes[code] = self.dead_codes.get(code, 0) + 1

    def result(self) -> Score:
        # Sorted: alerts arrive in a different order each run (one partition at a time).
        alerts = sorted((a.stream_id, a.row) for a in self.alerts if a.row is not None)
        return match_alerts(self.scenario.episodes, alerts, self.tolerance)
