"""``lstream replay --explain DIR``: the gates of every step over a whole file, offline.

Each stream is replayed through the worker's engine (:func:`evaluation.replay.replay_series`)
with a recording model (:class:`kernels.explain.Recorder`), so the inputs and states explained
are exactly those the engine stepped with; the gates of all T steps are then recomputed at once
(:func:`kernels.explain.gates`). Writes per stream ``DIR/<stream>.explain.csv`` (one row per
reading: the replay's columns, then per layer the median forget gate and memory horizon, the
units remembering at least ``LONG_MEMORY`` steps, mean written and dropped amounts, mean |c|
and the unit dropping most) and ``DIR/<stream>.explain.png`` (readings, forecast, score and
anomalies on top; below, aligned, per layer a units x time heatmap of the forget gate and one
of the cell values).

>>> import tempfile
>>> from kernels import load_model
>>> from kernels.artifact import write_artifact
>>> from kernels.engine import Engine
>>> rng = np.random.default_rng(0)
>>> arrays = {"lstm.weight_ih_l0": rng.normal(size=(16, 1)), "lstm.weight_hh_l0": rng.normal(size=(16, 4)),
...           "lstm.bias_ih_l0": np.zeros(16), "lstm.bias_hh_l0": np.zeros(16),
...           "head.0.weight": rng.normal(size=(1, 4)), "head.0.bias": np.zeros(1)}
>>> meta = {"input_size": 1, "hidden_size": 4, "num_layers": 1, "output_size": 1,
...         "head": [{"in": 4, "out": 1, "activation": None}], "features": ["value"], "norm": {"mode": "stream"}}
>>> d = tempfile.mkdtemp(); _ = write_artifact(d, meta, arrays)
>>> s = Series("a", 60.0 * np.arange(50), np.sin(np.arange(50.0))[:, None], ["value"])
>>> tr = explain_series(Engine(load_model(d)), s)
>>> tr.step.f.shape, tr.result.forecast.shape, float(tr.engine_diff) < 1e-5
((50, 1, 4), (50, 1), True)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from evaluation.replay import ReplayResult, replay_series
from kernels.explain import LONG_MEMORY, Step, gates, horizon, recording
from series.csvdata import Series


@dataclass
class Trace:
    """One stream's replay and the explained step at each of its T readings."""

    series: Series
    result: ReplayResult
    step: Step  # arrays (T, L, H)
    engine_diff: float  # max |explained (h, c) - the engine's|, over all steps


def explain_series(engine: Any, series: Series) -> Trace:
    """Replay ``series`` from a fresh state and explain every step."""
    eng, rec = recording(engine)
    result = replay_series(eng, series)
    if len(rec.calls) != len(series):
        raise RuntimeError(f"explain: expected one model step per reading ({len(series)}), got {len(rec.calls)}")
    if not rec.calls:
        raise ValueError(f"{series.name}: no readings to explain")
    x = np.concatenate([c[0] for c in rec.calls])
    h = np.concatenate([c[1] for c in rec.calls])
    c = np.concatenate([c[2] for c in rec.calls])
    step = gates(engine.model.packed, x, h, c)
    # the state each step left is the next step's starting state; the last one is the result's
    h_after = np.concatenate([h[1:], result.state.h])
    c_after = np.concatenate([c[1:], result.state.c])
    diff = max(float(np.abs(step.h - h_after).max()), float(np.abs(step.c - c_after).max()))
    return Trace(series, result, step, diff)


def summary_columns(step: Step, long: float = LONG_MEMORY) -> dict[str, np.ndarray]:
    """Per-step, per-layer summaries (name -> (T,) array)."""
    out: dict[str, np.ndarray] = {}
    hz = horizon(step.f)
    for layer in range(step.f.shape[1]):
        out[f"f_median_l{layer}"] = np.median(step.f[:, layer], axis=1)
        out[f"horizon_median_l{layer}"] = np.median(hz[:, layer], axis=1)
        out[f"long_memory_l{layer}"] = np.sum(hz[:, layer] >= long, axis=1).astype(np.float64)
        out[f"written_l{layer}"] = step.written[:, layer].mean(axis=1)
        out[f"dropped_l{layer}"] = step.dropped[:, layer].mean(axis=1)
        out[f"c_abs_l{layer}"] = np.abs(step.c[:, layer]).mean(axis=1)
        out[f"most_dropped_unit_l{layer}"] = np.argmax(step.dropped[:, layer], axis=1).astype(np.float64)
    return out


def _cell(v: float) -> str:
    if not np.isfinite(v):
        return "inf" if v > 0 else ""
    return str(int(v)) if float(v).is_integer() and abs(v) < 2**53 else repr(float(v))


def write_csv(trace: Trace, path: str | os.PathLike[str], long: float = LONG_MEMORY) -> None:
    s, r = trace.series, trace.result
    feats = s.features
    kinds = ("actual", "expected", "forecast")
    cols = list(kinds) if len(feats) == 1 else [f"{k}_{f}" for k in kinds for f in feats]
    summ = summary_columns(trace.step, long)
    stamps = s.ts_text if s.ts_text is not None else [repr(float(t)) for t in s.ts]
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(",".join(["timestamp", *cols, "score", "anomaly", *summ]) + "\n")
        for i in range(len(s)):
            stamp = stamps[i]
            if "," in stamp or '"' in stamp:
                stamp = '"' + stamp.replace('"', '""') + '"'
            cells = [stamp]
            for arr in (s.values, r.expected, r.forecast):  # as evaluation.replay.write_csv writes them
                cells += [repr(float(v)) if np.isfinite(v) else "" for v in arr[i]]
            cells += [repr(float(r.score[i])), "1" if r.anomaly[i] else "0"]
            cells += [_cell(col[i]) for col in summ.values()]
            fh.write(",".join(cells) + "\n")


def plot(trace: Trace, path: str | os.PathLike[str], threshold: float, *,
         window: tuple[int, int] | None = None, labels: np.ndarray | None = None) -> None:
    """Readings, forecast, score and anomalies on top; per layer a units x time heatmap of the
    forget gate and of the cell values below, on the same time axis (steps ``window``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, r, st = trace.series, trace.result, trace.step
    a, b = window if window is not None else (0, len(s))
    t = np.arange(a, b)
    n_layers, hid = st.f.shape[1], st.f.shape[2]
    ratios = [2.2, 1.0] + [max(1.2, hid / 16)] * (2 * n_layers)
    fig, axes = plt.subplots(len(ratios), 1, figsize=(13, 1.2 + 1.3 * sum(ratios)), sharex=True,
                             gridspec_kw={"height_ratios": ratios})
    ax = axes[0]
    bad = r.anomaly[a:b]
    lab = None if labels is None else np.asarray(labels, bool)[a:b]
    for j, name in enumerate(s.features):
        ax.plot(t, s.values[a:b, j], lw=0.9, color="#1f77b4", label=f"reading {name}")
        ax.plot(t, r.expected[a:b, j], lw=0.9, color="#ff7f0e", alpha=0.9, label="forecast (made one step earlier)")
        if bad.any():
            ax.scatter(t[bad], s.values[a:b, j][bad], color="red", s=14, zorder=3,
                       label=f"anomalous ({int(bad.sum())})")
    for k in t[r.alert[a:b]]:
        for axx in axes:
            axx.axvline(k, color="red", lw=0.6, alpha=0.5)
    if lab is not None and lab.any():
        ax.fill_between(t, 0, 1, where=lab, transform=ax.get_xaxis_transform(), color="red", alpha=0.08,
                        label="labelled anomaly")
    ax.legend(loc="upper left", fontsize=7, ncol=4)
    ax.set_title(f"{s.name}: readings, forecast and anomalies; alerts as red lines", fontsize=9, loc="left")
    axes[1].plot(t, r.score[a:b], lw=0.8, color="k")
    axes[1].axhline(threshold, color="red", lw=0.6, ls="--")
    axes[1].set_ylabel("score", fontsize=8)
    axes[1].set_ylim(0, 1.02)
    extent = (a - 0.5, b - 0.5, hid - 0.5, -0.5)
    for layer in range(n_layers):
        for k, (arr, cmap, lo, hi, what) in enumerate(((st.f, "viridis", 0.0, 1.0, "forget gate f"),
                                                       (st.c, "RdBu_r", -2.0, 2.0, "cell c (clipped to [-2, 2])"))):
            axh = axes[2 + 2 * layer + k]
            im = axh.imshow(arr[a:b, layer].T, aspect="auto", cmap=cmap, vmin=lo, vmax=hi, extent=extent,
                            interpolation="nearest")
            axh.set_ylabel(f"L{layer} unit", fontsize=8)
            axh.set_title(f"layer {layer}: {what}", fontsize=8, loc="left")
            cax = axh.inset_axes((1.005, 0.0, 0.008, 1.0))  # keeps the time axes aligned
            fig.colorbar(im, cax=cax)
            cax.tick_params(labelsize=6)
    axes[-1].set_xlabel("step")
    axes[0].set_xlim(a - 0.5, b - 0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-@" else "_" for ch in name)


def write_explanations(engine: Any, streams: Sequence[Series], out_dir: str) -> list[str]:
    """``DIR/<stream>.explain.csv`` and ``.explain.png`` per stream; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for s in streams:
        tr = explain_series(engine, s)
        base = os.path.join(out_dir, safe_name(s.name) + ".explain")
        write_csv(tr, base + ".csv")
        plot(tr, base + ".png", engine.threshold)
        paths += [base + ".csv", base + ".png"]
    return paths
