"""Pictures: the training loss curve and a replay's series, forecast, score and anomalies.

matplotlib is imported inside the functions (Agg backend), so importing this module is cheap.
With a threshold of 0.99 or more, scores near 1 are hard to tell apart on a linear axis,
so the score panel then shows the surprise ``-log10(1 - score)``: 3 is a score of 0.999, 4 of
0.9999. Lower thresholds get the plain score in [0, 1].

>>> surprise(np.array([0.0, 0.9, 0.999]))
array([0., 1., 3.])
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

SURPRISE_CAP = 8.0  # scores of exactly 1.0 are drawn at this height


def surprise(score: np.ndarray) -> np.ndarray:
    """``-log10(1 - score)``, capped at :data:`SURPRISE_CAP`."""
    gap = np.clip(1.0 - np.asarray(score, dtype=np.float64), 10.0**-SURPRISE_CAP, 1.0)
    return np.round(-np.log10(gap), 12) + 0.0


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(history: dict[str, list[float]], path: str | os.PathLike[str], best_epoch: int = 0) -> None:
    """Train and validation loss per validation round (log scale), the kept round marked, and
    on a second axis the validation MASE against persistence and seasonal-naive (1 = as good)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    for key, style in (("train", "-o"), ("val", "-s")):
        vals = history.get(key) or []
        if vals:
            ax.plot(range(1, len(vals) + 1), vals, style, ms=3, label=f"{key} loss")
    if best_epoch:
        ax.axvline(best_epoch, color="grey", ls=":", label=f"kept: round {best_epoch}")
    ax.set_yscale("log")
    ax.set_xlabel("validation round")
    ax.set_ylabel("MSE (model units)")
    ax.set_title("training loss and validation MASE")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    mase = [(k, lab) for k, lab in (("mase", "val MASE vs persistence"),
                                    ("mase_seasonal", "val MASE vs seasonal-naive")) if history.get(k)]
    if mase:
        ax2 = ax.twinx()
        for (key, label), color in zip(mase, ("tab:green", "tab:red")):
            vals = [math.nan if v is None else v for v in history[key]]
            ax2.plot(range(1, len(vals) + 1), vals, "--", color=color, label=label)
        ax2.axhline(1.0, color="black", lw=0.8, ls="--")
        ax2.set_ylabel("MASE (< 1: better)")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _times(ts: np.ndarray) -> Any:
    """Datetimes for the x axis when ``ts`` looks like epoch seconds, else row numbers."""
    if len(ts) and ts.min() > 1e8 and np.all(np.diff(ts) >= 0):
        return ts.astype("datetime64[s]").astype(object) if len(ts) < 200_000 else np.arange(len(ts))
    return np.arange(len(ts))


def plot_replay(items: Sequence[tuple[Any, Any]], path: str | os.PathLike[str], threshold: float,
                labels: Sequence[np.ndarray | None] | None = None, max_streams: int = 6) -> None:
    """For each (series, replay result): readings and the forecast made for them (top, anomalous
    readings in red, labelled anomalies shaded if ``labels``), and the score (bottom) with the
    threshold line. At most ``max_streams`` streams are drawn."""
    plt = _pyplot()
    items = list(items)[:max_streams]
    rows = []
    for k, (series, _) in enumerate(items):
        rows += [("value", k, j) for j in range(series.values.shape[1])] + [("score", k, 0)]
    ratios = [3 if kind == "value" else 1.4 for kind, _, _ in rows]
    fig, axes = plt.subplots(len(rows), 1, figsize=(13, 1.0 + 1.35 * sum(ratios)), squeeze=False,
                             gridspec_kw={"height_ratios": ratios}, layout="constrained")
    log_score = threshold >= 0.99
    line = float(surprise(np.array([threshold]))[0]) if log_score else threshold
    for ax, (kind, k, j) in zip(axes[:, 0], rows):
        series, res = items[k]
        t = _times(series.ts)
        bad = np.asarray(res.anomaly, bool)
        lab = None if labels is None or k >= len(labels) else labels[k]
        if lab is not None and np.any(lab):
            _shade(ax, t, np.asarray(lab, bool))
        if kind == "value":
            name = series.features[j]
            ax.plot(t, series.values[:, j], color="#1f77b4", lw=0.8, label=f"actual {name}")
            ax.plot(t, res.expected[:, j], color="#ff7f0e", lw=0.8, alpha=0.85,
                    label="forecast (made one step earlier)")
            if bad.any():
                ax.scatter(np.asarray(t)[bad], series.values[bad, j], color="red", s=14, zorder=3,
                           label=f"anomalous ({int(bad.sum())})")
            ax.set_title(f"{series.name}: {name}" if series.values.shape[1] > 1 or j == 0 else name,
                         loc="left", fontsize=10)
            ax.legend(loc="upper left", fontsize=8, ncols=4)
        else:
            sv = surprise(res.score) if log_score else np.asarray(res.score)
            ax.plot(t, sv, color="#555555", lw=0.7,
                    label="score as -log10(1 - score)" if log_score else "anomaly score")
            ax.axhline(line, color="red", ls="--", lw=0.9, label=f"threshold {threshold:g}")
            if bad.any():
                ax.scatter(np.asarray(t)[bad], sv[bad], color="red", s=8, zorder=3)
            ax.set_ylim(0, SURPRISE_CAP + 0.3 if log_score else 1.05)
            ax.set_ylabel("score")
            ax.legend(loc="upper left", fontsize=8, ncols=2)
        ax.grid(alpha=0.25)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _shade(ax: Any, t: Any, mask: np.ndarray) -> None:
    """Shade runs of True in ``mask`` (labelled anomaly windows)."""
    t = np.asarray(t)
    edges = np.flatnonzero(np.diff(np.r_[0, mask.astype(np.int8), 0]))
    for a, b in zip(edges[::2], edges[1::2]):
        ax.axvspan(t[a], t[min(b, len(t) - 1)], color="gold", alpha=0.25, lw=0)
