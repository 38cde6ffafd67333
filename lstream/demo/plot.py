"""The PNG ``lstream demo`` writes: a few streams with the worker's forecasts and alerts.

Each panel shows one stream's readings, the forecast the worker had made for each reading
(``expected`` in the predictions), the labelled injected anomalies (shaded), the detector's
warm-up, and every alert the worker raised (a marker on the reading that opened it).
matplotlib is imported only here, with the Agg backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lstream.demo.main import Scenario, Score, Tally


def pick_streams(scenario: Scenario, tally: Tally, score: Score, k: int = 4) -> list[str]:
    """Up to ``k`` streams worth looking at: caught anomalies of different kinds first, then a
    missed one or a false alert, then any stream.

    >>> from lstream.demo.main import make_scenario
    >>> sc = make_scenario(5, 150, seed=2, anomaly_rate=0.01, clean_steps=50)
    >>> t = Tally(sc, 5)
    >>> len(pick_streams(sc, t, t.result(), k=3))
    3
    """
    chosen: list[str] = []
    flat = {s.stream_id for s in scenario.streams if _flat(s.values[:, 0])}

    def add(sid: str, limit: int = k) -> None:
        if sid not in chosen and sid not in flat and len(chosen) < limit:
            chosen.append(sid)

    caught = sorted(score.caught, key=lambda e: -(e.end - e.start))  # long episodes first
    long_ones = [e for e in caught if e.end - e.start > 1]
    spikes = [e for e in caught if e.end - e.start == 1]
    mixed = [e for pair in zip(long_ones, spikes) for e in pair] + long_ones + spikes
    for e in mixed:  # leave room for one miss and one false alert
        add(e.stream_id, max(1, k - 2))
    for e in score.missed[:1]:
        add(e.stream_id)
    for sid, _ in score.false_alerts[:1]:
        add(sid)
    for e in mixed:
        add(e.stream_id)
    for s in scenario.streams:
        add(s.stream_id)
    flat.clear()  # only if nothing else is left
    for s in scenario.streams:
        add(s.stream_id)
    return chosen


def _flat(x: np.ndarray) -> bool:
    """A (nearly) constant series: its anomalies are invisible at any sensible scale.

    >>> _flat(np.array([5.0, 5.0 + 1e-9, 5.0])), _flat(np.array([5.0, 5.1, 4.9]))
    (True, False)
    """
    return bool(np.nanstd(x) <= 1e-6 * max(1.0, float(np.nanmean(np.abs(x)))))


def plot_streams(scenario: Scenario, tally: Tally, score: Score, path: str | Path,
                 stream_ids: list[str], title: str = "") -> Path:
    """Write the figure to ``path`` and return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    caught = {(e.stream_id, e.start) for e in score.caught}
    fig, axes = plt.subplots(len(stream_ids), 1, figsize=(12, 2.6 * len(stream_ids) + 1.0), squeeze=False)
    for ax, sid in zip(axes[:, 0], stream_ids):
        s = scenario.by_id[sid]
        rows = np.arange(len(s.ts))
        actual = s.values[:, 0]
        if scenario.warmup:  # errors start at row 1; the detector scores after `warmup` of them
            ax.axvspan(-0.5, scenario.warmup + 0.5, color="0.85", alpha=0.5, lw=0,
                       label="detector warm-up (no scores)")
        for e in scenario.episodes:
            if e.stream_id != sid:
                continue
            hit = (sid, e.start) in caught
            ax.axvspan(e.start - 0.5, e.end - 0.5, color="tab:red" if hit else "tab:purple", alpha=0.18, lw=0,
                       label="injected anomaly (caught)" if hit else "injected anomaly (missed)")
        ax.plot(rows, actual, color="0.15", lw=1.1, label="reading")
        ax.plot(rows, tally.expected[sid], color="tab:orange", lw=1.1, ls="--", label="forecast (expected)")
        alerts = [a for a in tally.alerts if a.stream_id == sid and a.row is not None]
        for a in alerts:
            ax.axvline(a.row, color="tab:red" if a.injected else "tab:blue", lw=0.8, alpha=0.7)
        for injected, colour, label in ((True, "tab:red", "alert on an injected anomaly"),
                                        (False, "tab:blue", "false alert (no label)")):
            rows_hit = [int(a.row) for a in alerts if a.injected == injected and a.row is not None]
            if rows_hit:
                ax.scatter(rows_hit, actual[rows_hit], marker="v", s=70, color=colour, zorder=5, label=label)
        n_eps = sum(1 for e in scenario.episodes if e.stream_id == sid)
        n_caught = sum(1 for e in score.caught if e.stream_id == sid)
        n_false = sum(1 for a in score.false_alerts if a[0] == sid)
        ax.set_title(f"{sid}: {n_caught} of {n_eps} injected anomalies caught, {n_false} false alerts",
                     loc="left", fontsize=10)
        lo, hi = float(np.nanmin(actual)), float(np.nanmax(actual))
        span = max(hi - lo, 1e-3 * max(abs(lo), abs(hi)), 1e-9)  # a flat stream stays a flat line
        ax.set_ylim(lo - 0.08 * span, hi + 0.08 * span)  # a wild early forecast must not squash the readings
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_xlim(-0.5, len(rows) - 0.5)
        ax.grid(alpha=0.25)
        ax.tick_params(labelsize=8)
    axes[-1, 0].set_xlabel(f"reading (one every {scenario.period_s:g} s of event time)")
    handles: dict[str, Any] = {}
    for ax in axes[:, 0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles.keys()), loc="upper center", ncol=min(4, len(handles)),
               fontsize=8, frameon=False, bbox_to_anchor=(0.5, 1.0 - 0.25 / fig.get_figheight()))
    if title:
        fig.suptitle(title, fontsize=11, y=1.0 - 0.02 / fig.get_figheight())
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.7 / fig.get_figheight()))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
