"""Shared test helpers: a small model artifact, event JSON, series, random stream states, an emit."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from kernels.artifact import write_artifact
from kernels.states import StreamStates

ROOT = Path(__file__).resolve().parent.parent


def small_model(out_dir: str | os.PathLike[str], *, hidden: int = 8, layers: int = 2, features: int = 1,
                seed: int = 0, warmup: int = 50, norm: dict[str, Any] | None = None,
                detector: dict[str, Any] | None = None) -> str:
    """Write a random-weights artifact (numpy only), stream normalisation unless ``norm`` is
    given; return its dir.

    The detector keeps its defaults (kernels/detector.py) except a short warm-up and any of
    ``detector``."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for layer in range(layers):
        fan_in = features if layer == 0 else hidden
        arrays[f"lstm.weight_ih_l{layer}"] = rng.normal(0, 0.4, (4 * hidden, fan_in))
        arrays[f"lstm.weight_hh_l{layer}"] = rng.normal(0, 0.4, (4 * hidden, hidden))
        arrays[f"lstm.bias_ih_l{layer}"] = rng.normal(0, 0.1, 4 * hidden)
        arrays[f"lstm.bias_hh_l{layer}"] = rng.normal(0, 0.1, 4 * hidden)
    arrays["head.0.weight"] = rng.normal(0, 0.3, (hidden, hidden))
    arrays["head.0.bias"] = np.zeros(hidden)
    arrays["head.1.weight"] = rng.normal(0, 0.3, (features, hidden))
    arrays["head.1.bias"] = np.zeros(features)
    meta = {"input_size": features, "hidden_size": hidden, "num_layers": layers, "output_size": features,
            "head": [{"in": hidden, "out": hidden, "activation": "tanh"},
                     {"in": hidden, "out": features, "activation": None}],
            "features": [f"f{j}" for j in range(features)], "norm": norm or {"mode": "stream"},
            "detector": {"warmup": warmup, **(detector or {})}}
    write_artifact(out_dir, meta, arrays)
    return os.fspath(out_dir)


def event(stream_id: str, ts: float, values: Any, **extra: Any) -> bytes:
    return orjson.dumps({"stream_id": stream_id, "ts": float(ts), "values": [float(v) for v in values], **extra})


def spike_series(n_steps: int, at: int, seed: int = 0) -> np.ndarray:
    """A calm cycle of exactly 25 steps (it repeats, so nothing after the first cycles is new)
    with one spike at ``at``: one anomalous episode. (T, 1)."""
    t = np.arange(n_steps, dtype=np.float64)
    vals = 20.0 + 5.0 * np.sin(2 * np.pi * t / 25.0)
    vals[at] += 60.0
    return vals[:, None]


def series_data(n_streams: int, n_steps: int, seed: int = 0,
                features: int = 1) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(stream_id, ts (T,), values (T, F)) per stream: seasonal, noisy, different scales."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_streams):
        t = np.arange(n_steps, dtype=np.float64)
        scale, offset = 10 ** rng.uniform(-1, 3), rng.uniform(-100, 100)
        base = np.sin(2 * np.pi * t[:, None] / rng.uniform(20, 60) + rng.uniform(0, 6, features))
        vals = offset + scale * (base + 0.1 * rng.normal(size=(n_steps, features)))
        out.append((f"s-{i:03d}", 1_700_000_000.0 + 60.0 * t, vals))
    return out


def random_states(n: int, layers: int, hidden: int, features: int, seed: int = 0, *,
                  max_steps: int = 10**12, max_episode: int = 30) -> StreamStates:
    """n stream states with every array random (steps from 1 to ``max_steps``, episode from -1
    to ``max_episode``): a round trip that drops or mixes up a field shows."""
    rng = np.random.default_rng(seed)
    st = StreamStates.zeros(n, layers, hidden, features)
    st.h[:] = rng.standard_normal(st.h.shape)
    st.c[:] = rng.standard_normal(st.c.shape)
    st.pred[:] = rng.standard_normal(st.pred.shape)
    st.norm[:] = rng.standard_normal(st.norm.shape)
    st.anomaly[:] = rng.standard_normal(st.anomaly.shape)
    st.steps[:] = rng.integers(1, max_steps, n)
    st.episode[:] = rng.integers(-1, max_episode, n)
    return st


def assert_same_states(a: StreamStates, b: StreamStates) -> None:
    """Every field of ``a`` equals ``b``'s, dtype and bits."""
    for name in ("h", "c", "pred", "norm", "anomaly", "steps", "episode"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)


class Collect:
    """An ``emit`` for pipeline tests: keeps the records; ``delay`` stands in for the wait on a
    real broker, so that other work can interleave."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.records: list[tuple[str, bytes | None, bytes]] = []

    async def __call__(self, records: list[tuple[str, bytes | None, bytes]]) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        self.records.extend(records)

    def on(self, topic: str) -> list[dict[str, Any]]:
        return [orjson.loads(v) for t, _, v in self.records if t == topic]
