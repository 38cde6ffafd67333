"""Train the LSTM forecaster on streams of readings and write a model artifact (PyTorch).

Each stream is scaled exactly as the worker will scale it online (:func:`kernels.norm.series_stats`
for both ``norm`` modes), then cut into overlapping training windows: a window starts every
``stride`` steps, has its loss on the next ``window`` targets and begins ``burn_in`` steps
earlier, so the hidden state is warm when the loss begins (a stream's first window starts from
the zero state, like a new stream online). In ``stream`` mode the first ``warmup`` targets of
each stream are left out of the loss: with little spread seen yet they are mostly clipping
noise. The last ``val_split`` of every stream is held out (no training window reaches into it)
for validation, early stopping and the validation MASE: the forecast's mean absolute error
over that of persistence (the last reading) and of seasonal-naive (the reading one period
back), in model units. With ``residual`` the network predicts the change from the last reading.

>>> from series.synthetic import generate
>>> streams = [Series(s.stream_id, s.ts, s.values, ["value"]) for s in generate(2, 400, seed=3)]
>>> cfg = TrainConfig(epochs=2, hidden=8, layers=1, window=64, burn_in=16, progress=False)
>>> result = train(streams, cfg)
>>> len(result.history["train"]), result.val_loss is not None, result.val_mase is not None
(2, True, True)
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from kernels.norm import STREAM_DEFAULTS, Normalizer, series_stats
from series.csvdata import DataError, Series, stream_name


@dataclass
class TrainConfig:
    hidden: int = 64
    layers: int = 2
    head: str = "mlp"  # "linear": LSTM -> Linear; "mlp": LSTM -> Linear(relu) -> Linear
    head_hidden: int = 32
    dropout: float = 0.1  # between LSTM layers and before the head (training only)
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-5
    clip_grad: float = 1.0  # max gradient norm
    window: int = 128  # steps with loss per training window
    stride: int = 16  # steps between the starts of consecutive windows (they overlap)
    steps: int = 0  # optimiser steps in all; 0: ``epochs`` passes over every window
    eval_every: int = 0  # steps mode: optimiser steps between validations (0: about 20 per run)
    residual: bool = True  # the network predicts the change from the last reading (model units)
    season: int = 0  # seasonal-naive period in steps for the validation MASE; 0: one day by the timestamps
    burn_in: int = 64  # steps fed before the loss starts, to warm the hidden state
    warmup: int = 50  # stream mode: first targets of each stream left out of the loss
    val_split: float = 0.2  # last fraction of each stream held out; 0: no validation
    patience: int = 5  # epochs without a better validation loss before stopping
    seed: int = 0
    norm: str = "stream"  # "stream" | "global"
    norm_window: float = STREAM_DEFAULTS["window"]
    min_std: float = STREAM_DEFAULTS["min_std"]
    clip: float = STREAM_DEFAULTS["clip"]
    threads: int = 2
    progress: bool = True

    def check(self) -> None:
        """Raise ValueError naming the first bad setting."""
        positive = ("hidden", "layers", "head_hidden", "epochs", "batch_size", "window", "stride", "threads")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)}: expected a positive integer, got {getattr(self, name)}")
        if self.head not in ("linear", "mlp"):
            raise ValueError(f"--head: expected 'linear' or 'mlp', got {self.head!r}")
        if self.norm not in ("stream", "global"):
            raise ValueError(f"--norm: expected 'stream' or 'global', got {self.norm!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout: expected a number in [0, 1), got {self.dropout}")
        if not 0 <= self.val_split < 0.9:
            raise ValueError(f"--val-split: expected a number in [0, 0.9), got {self.val_split}")
        for name in ("lr", "clip_grad", "norm_window", "min_std", "clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{_flag(name)}: expected a positive number, got {getattr(self, name)}")
        for name in ("burn_in", "warmup", "patience", "weight_decay", "steps", "eval_every", "season"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{_flag(name)}: expected a number >= 0, got {getattr(self, name)}")

    def min_rows(self) -> int:
        """Rows a stream needs for one training window with at least one scored target."""
        return self.window + 1 + (self.warmup if self.norm == "stream" else 0)


def _flag(name: str) -> str:
    return name.replace("_", "-")


class Forecaster(nn.Module):
    """``nn.LSTM`` + a head of linear layers, named as the artifact names them."""

    def __init__(self, input_size: int, cfg: TrainConfig) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, cfg.hidden, cfg.layers, batch_first=True,
                            dropout=cfg.dropout if cfg.layers > 1 else 0.0)
        self.drop = nn.Dropout(cfg.dropout)
        self.residual = cfg.residual
        if cfg.head == "mlp":
            self.head = nn.ModuleList([nn.Linear(cfg.hidden, cfg.head_hidden), nn.Linear(cfg.head_hidden, input_size)])
            self.activations: list[str | None] = ["relu", None]
        else:
            self.head = nn.ModuleList([nn.Linear(cfg.hidden, input_size)])
            self.activations = [None]

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The forecast of the next reading (model units): the head's output, plus the last
        reading when the network is residual (as :class:`kernels.engine.Engine` adds it)."""
        y, _ = self(x)
        return y + x[..., : y.shape[-1]] if self.residual else y

    def forward(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        out, state = self.lstm(x, state)
        y = self.drop(out)
        for layer, act in zip(self.head, self.activations):
            y = layer(y)
            if act == "relu":
                y = torch.relu(y)
            elif act == "tanh":
                y = torch.tanh(y)
        return y, state


def check_length(s: Series, cfg: TrainConfig) -> None:
    """Raise DataError naming the file (and stream) when ``s`` is too short for one window."""
    if len(s) >= cfg.min_rows():
        return
    where = s.source or s.name
    if s.source and s.name != stream_name(s.source):
        where = f"{s.source}: stream {s.name!r}"
    need = f"window {cfg.window} + 1" + (f" + warmup {cfg.warmup}" if cfg.norm == "stream" else "")
    raise DataError(f"{where}: expected at least {cfg.min_rows()} rows for one training window ({need}), "
                    f"got {len(s)}")


def norm_config(cfg: TrainConfig, streams: Sequence[Series]) -> dict[str, Any]:
    """The artifact's ``norm``: global statistics of the training data, or the stream settings."""
    if cfg.norm == "stream":
        return {"mode": "stream", "window": float(cfg.norm_window), "min_std": float(cfg.min_std),
                "clip": float(cfg.clip)}
    values = np.concatenate([s.values for s in streams])
    mean = values.mean(axis=0)
    std = np.maximum(values.std(axis=0), cfg.min_std * (1.0 + np.abs(mean)))
    return {"mode": "global", "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "clip": float(cfg.clip)}


@dataclass
class Windows:
    """Training windows as padded arrays: inputs (N, S, F), targets (N, S, F), loss mask (N, S),
    the seasonal-naive forecast of each target (N, S, F; NaN where there is none)."""

    x: np.ndarray
    y: np.ndarray
    mask: np.ndarray
    val: np.ndarray  # bool (N,): held out for validation
    seasonal: np.ndarray
    season: int  # the seasonal-naive period in steps (0: none)


def season_steps(ts: np.ndarray, cfg: TrainConfig, n: int) -> int:
    """The seasonal-naive period: ``cfg.season``, else one day in steps when the readings are
    regular (the median interval divides a day), else 0."""
    if cfg.season:
        return cfg.season if cfg.season < n else 0
    if len(ts) < 3:
        return 0
    dt = float(np.median(np.diff(ts)))
    if not dt > 0:
        return 0
    period = round(86400.0 / dt)
    if period < 2 or abs(86400.0 / dt - period) > 0.01 * period or period >= n // 2:
        return 0
    return int(period)


def make_windows(streams: Sequence[Series], norm: dict[str, Any], cfg: TrainConfig) -> Windows:
    """Cut every normalised stream into windows (see the module docstring): training windows
    start every ``stride`` steps and stop at the validation split; validation windows tile the
    held-out tail once."""
    length = cfg.window + cfg.burn_in
    xs, ys, sns, masks, vals = [], [], [], [], []
    warmup = cfg.warmup if norm["mode"] == "stream" else 0
    seasons = set()
    for s in streams:
        means, stds, _ = series_stats(s.values, norm)
        scaler = Normalizer(norm, s.values.shape[1])
        z = scaler.scale(s.values, means, stds)
        target = scaler.scale(s.values[1:], means[:-1], stds[:-1])
        n = target.shape[0]  # input z[i] forecasts target[i], i < n
        period = season_steps(s.ts, cfg, n)
        seasons.add(period)
        sn = np.full_like(target, np.nan)
        if period:  # x[i + 1 - period] forecasts x[i + 1], scaled like target[i]
            sn[period - 1:] = scaler.scale(s.values[:n + 1 - period], means[period - 1:n], stds[period - 1:n])
        split = n if cfg.val_split == 0 else math.ceil((1 - cfg.val_split) * n)
        starts = [(st, min(split, st + cfg.window), False) for st in range(0, max(split - 1, 0), cfg.stride)]
        starts += [(st, min(n, st + cfg.window), True) for st in range(split, n, cfg.window)]
        for start, end, is_val in starts:
            begin = max(0, start - cfg.burn_in)
            idx = np.arange(begin, end)
            scored = (idx >= start) & (idx >= warmup)
            if not scored.any():
                continue
            x = np.zeros((length, z.shape[1]), np.float32)
            y = np.zeros((length, z.shape[1]), np.float32)
            q = np.full((length, z.shape[1]), np.nan, np.float32)
            m = np.zeros(length, np.float32)
            x[: len(idx)] = z[idx]
            y[: len(idx)] = target[idx]
            q[: len(idx)] = sn[idx]
            m[: len(idx)] = scored
            xs.append(x)
            ys.append(y)
            sns.append(q)
            masks.append(m)
            vals.append(is_val)
    if not xs:
        raise DataError("no training windows: every stream is shorter than one window")
    season = seasons.pop() if len(seasons) == 1 else 0
    return Windows(np.stack(xs), np.stack(ys), np.stack(masks), np.array(vals, dtype=bool), np.stack(sns), season)


@dataclass
class TrainResult:
    model: Forecaster
    norm: dict[str, Any]
    history: dict[str, list[float]]  # per validation round: "train", "val" (loss), "mase" (vs
    # persistence), "mase_seasonal" (vs seasonal-naive), "step" (optimiser steps so far)
    best_epoch: int  # the kept validation round
    train_loss: float
    val_loss: float | None
    epochs_run: int  # validation rounds run
    seconds: float
    config: TrainConfig = field(repr=False, default_factory=TrainConfig)
    val_mase: float | None = None  # kept model: MAE / MAE of persistence on the validation targets
    val_mase_seasonal: float | None = None  # ... / MAE of seasonal-naive (None without a season)
    season: int = 0
    optimiser_steps: int = 0

    @property
    def worse_than_persistence(self) -> bool:
        return self.val_mase is not None and self.val_mase >= 1.0


def _masked_mse(pred: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    se = ((pred - y) ** 2).mean(dim=2) * m
    return se.sum(), m.sum()


def _evaluate(model: Forecaster, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor, sn: torch.Tensor,
              batch: int) -> tuple[float, float, float]:
    """(MSE, MASE vs persistence, MASE vs seasonal-naive) over the masked targets, model units."""
    model.eval()
    total, count, ae, ae_naive, ae_s, ae_sn = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            xb, yb, mb, sb = x[i:i + batch], y[i:i + batch], m[i:i + batch], sn[i:i + batch]
            pred = model.predict(xb)
            s, c = _masked_mse(pred, yb, mb)
            total += float(s)
            count += float(c)
            mm = mb[..., None].expand_as(yb)
            err = (pred - yb).abs() * mm
            ae += float(err.sum())
            ae_naive += float(((xb - yb).abs() * mm).sum())
            has = torch.isfinite(sb) & (mm > 0)
            ae_s += float(err[has].sum())
            ae_sn += float((sb[has] - yb[has]).abs().sum())
    mase = ae / ae_naive if ae_naive > 0 else math.nan
    mase_s = ae_s / ae_sn if ae_sn > 0 else math.nan
    return total / max(count, 1.0), mase, mase_s


class _Progress:
    """A rich progress bar on a terminal; one line per validation round otherwise."""

    def __init__(self, enabled: bool, rounds: int, total_steps: int) -> None:
        self.rich = None
        self.enabled = enabled
        self.rounds = rounds
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.rich = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=Console(stderr=True), transient=False)
            self.rich.start()
            self.task = self.rich.add_task("round 1", total=total_steps)

    def batch(self, rnd: int, train_loss: float, val: str) -> None:
        if self.rich is not None:
            self.rich.update(self.task, advance=1,
                             description=f"round {rnd}/{self.rounds} train {train_loss:.4f} {val}")

    def epoch(self, rnd: int, step: int, line: str, best: bool) -> None:
        if self.enabled:
            text = f"round {rnd}/{self.rounds} step {step}  {line}{'  *' if best else ''}"
            if self.rich is not None:
                self.rich.console.print(text)
            else:
                print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.rich is not None:
            self.rich.stop()


def _fmt(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.3f}"


def train(streams: Sequence[Series], cfg: TrainConfig,
          on_epoch: Callable[[int, float, float | None], None] | None = None) -> TrainResult:
    """Train a :class:`Forecaster` on ``streams`` (all with the same features).

    ``cfg.steps`` optimiser steps in all (or ``cfg.epochs`` passes over every training window),
    Adam under a one-cycle learning-rate schedule (warm-up over the first 10 %, cosine decay
    to ``lr / 1000``); validation every ``eval_every`` steps (steps mode) or every pass, the
    best validation loss kept, ``patience`` rounds without a better one stop the run."""
    cfg.check()
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    for s in streams:
        check_length(s, cfg)
    norm = norm_config(cfg, streams)
    win = make_windows(streams, norm, cfg)
    tensors = [torch.from_numpy(a) for a in (win.x, win.y, win.mask, win.seasonal)]
    train_idx = np.flatnonzero(~win.val)
    val_idx = np.flatnonzero(win.val)
    if len(train_idx) == 0:
        raise DataError("no training windows left after the validation split; lower --val-split")
    xt, yt, mt, _ = (t[torch.from_numpy(train_idx)] for t in tensors)
    xv, yv, mv, sv = (t[torch.from_numpy(val_idx)] for t in tensors)

    model = Forecaster(win.x.shape[2], cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_pass = math.ceil(len(train_idx) / cfg.batch_size)
    total_steps = cfg.steps or cfg.epochs * per_pass
    every = cfg.eval_every or (max(1, total_steps // 20) if cfg.steps else per_pass)
    rounds = math.ceil(total_steps / every)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=0.1,
                                                anneal_strategy="cos", div_factor=10.0, final_div_factor=100.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: dict[str, list[float]] = {"train": [], "val": [], "mase": [], "mase_seasonal": [], "step": []}
    best: tuple[float, int, Any, float, float, float] = (math.inf, 0, None, math.nan, math.nan, math.nan)
    bar = _Progress(cfg.progress, rounds, total_steps)
    rnd = 0
    step = 0
    order = torch.randperm(len(train_idx), generator=gen)
    pos = 0
    try:
        while step < total_steps:
            rnd += 1
            model.train()
            total, count = 0.0, 0.0
            last = f"val {_fmt(history['val'][-1])} MASE {_fmt(history['mase'][-1])}" if history["val"] else ""
            for _ in range(min(every, total_steps - step)):
                if pos >= len(order):
                    order = torch.randperm(len(train_idx), generator=gen)
                    pos = 0
                idx = order[pos:pos + cfg.batch_size]
                pos += cfg.batch_size
                pred = model.predict(xt[idx])
                sq, cnt = _masked_mse(pred, yt[idx], mt[idx])
                loss = sq / cnt.clamp(min=1.0)
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                opt.step()
                sched.step()
                step += 1
                total += float(sq.detach())
                count += float(cnt)
                bar.batch(rnd, total / max(count, 1.0), last)
            train_loss = total / max(count, 1.0)
            if not math.isfinite(train_loss):
                raise DataError(f"training diverged at step {step} (loss {train_loss}); lower --lr")
            history["train"].append(train_loss)
            history["step"].append(step)
            val_loss, mase, mase_s = _evaluate(model, xv, yv, mv, sv, 256) if len(val_idx) else (None, None, None)
            if val_loss is not None:
                history["val"].append(val_loss)
                history["mase"].append(mase if math.isfinite(mase) else None)  # type: ignore[arg-type]
                history["mase_seasonal"].append(mase_s if math.isfinite(mase_s) else None)  # type: ignore[arg-type]
            watched = train_loss if val_loss is None else val_loss
            improved = watched < best[0]
            if improved:
                best = (watched, rnd, copy.deepcopy(model.state_dict()), train_loss,
                        mase if mase is not None else math.nan, mase_s if mase_s is not None else math.nan)
            line = f"train {train_loss:.5f}"
            if val_loss is not None:
                line += (f"  val {val_loss:.5f}  MASE vs persistence {_fmt(mase)}"
                         f"  vs seasonal-naive {_fmt(mase_s)}")
            bar.epoch(rnd, step, line, improved)
            if on_epoch is not None:
                on_epoch(rnd, train_loss, val_loss)
            if val_loss is not None and rnd - best[1] >= cfg.patience > 0:
                break
    finally:
        bar.close()
    if best[2] is not None:
        model.load_state_dict(best[2])
    model.eval()
    has_val = len(val_idx) > 0
    return TrainResult(model=model, norm=norm, history=history, best_epoch=best[1], train_loss=float(best[3]),
                       val_loss=float(best[0]) if has_val else None, epochs_run=rnd,
                       seconds=time.perf_counter() - started, config=cfg,
                       val_mase=float(best[4]) if has_val and math.isfinite(best[4]) else None,
                       val_mase_seasonal=float(best[5]) if has_val and math.isfinite(best[5]) else None,
                       season=win.season, optimiser_steps=step)


def _round(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), 6)


def warning(result: TrainResult) -> str | None:
    """The loud line for a run that ends no better than persistence on its validation split."""
    if not result.worse_than_persistence:
        return None
    return (f"WARNING: the trained model is WORSE than persistence on the validation split "
            f"(MASE {result.val_mase:.3f} >= 1: repeating the last reading forecasts better); "
            f"train longer (--steps), on more data, or keep the per-stream adaptation on")


def training_meta(result: TrainResult, data: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``training`` block of model.json."""
    cfg = asdict(result.config)
    cfg.pop("progress", None)
    return {
        "data": data,
        "epochs": result.epochs_run,
        "best_epoch": result.best_epoch,
        "train_loss": round(result.train_loss, 6),
        "val_loss": None if result.val_loss is None else round(result.val_loss, 6),
        "optimiser_steps": result.optimiser_steps,
        "val_mase": _round(result.val_mase),
        "val_mase_seasonal": _round(result.val_mase_seasonal),
        "season_steps": result.season,
        "worse_than_persistence": result.worse_than_persistence,
        "history": {k: [_round(v) for v in vals] for k, vals in result.history.items()},
        "seed": result.config.seed,
        "seconds": round(result.seconds, 1),
        "config": cfg,
        "torch": torch.__version__,
    }


def save(result: TrainResult, out_dir: str, features: list[str], data: list[dict[str, Any]],
         detector: dict[str, Any] | None = None, adapt: dict[str, Any] | None = None) -> str:
    """Write the artifact (via :func:`training.export.export_model`) and ``loss.png``; return the version."""
    from kernels import detector as det
    from training.export import export_model

    model = result.model
    version = export_model(model.lstm, list(model.head), out_dir, activations=model.activations,
                           features=features, norm=result.norm,
                           detector=det.config(None) if detector is None else detector,
                           meta=training_meta(result, data),
                           extra={"residual": bool(result.config.residual),
                                  **({"adapt": adapt} if adapt is not None else {})})
    from training.plot import plot_losses

    plot_losses(result.history, f"{out_dir}/loss.png", best_epoch=result.best_epoch)
    return version
