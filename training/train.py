"""Train the LSTM forecaster on streams of readings and write a model artifact (PyTorch).

Each stream is scaled exactly as the worker will scale it online (:func:`kernels.norm.normalize_series`
for both ``norm`` modes), then cut into training windows: window k has its loss on targets
``[k*window, (k+1)*window)`` and starts ``burn_in`` steps earlier, so the hidden state is warm
when the loss begins (a stream's first window starts from the zero state, like a new stream
online). In ``stream`` mode the first ``warmup`` targets of each stream are left out of the loss:
with little spread seen yet they are mostly clipping noise. The last ``val_split`` of every
stream is held out for validation and early stopping.

>>> from series.synthetic import generate
>>> streams = [Series(s.stream_id, s.ts, s.values, ["value"]) for s in generate(2, 400, seed=3)]
>>> cfg = TrainConfig(epochs=2, hidden=8, layers=1, window=64, burn_in=16, progress=False)
>>> result = train(streams, cfg)
>>> len(result.history["train"]), result.val_loss is not None
(2, True)
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

from kernels.norm import STREAM_DEFAULTS, normalize_series
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
        positive = ("hidden", "layers", "head_hidden", "epochs", "batch_size", "window", "threads")
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
        for name in ("burn_in", "warmup", "patience", "weight_decay"):
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
        if cfg.head == "mlp":
            self.head = nn.ModuleList([nn.Linear(cfg.hidden, cfg.head_hidden), nn.Linear(cfg.head_hidden, input_size)])
            self.activations: list[str | None] = ["relu", None]
        else:
            self.head = nn.ModuleList([nn.Linear(cfg.hidden, input_size)])
            self.activations = [None]

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
    """Training windows as padded arrays: inputs (N, S, F), targets (N, S, F), loss mask (N, S)."""

    x: np.ndarray
    y: np.ndarray
    mask: np.ndarray
    val: np.ndarray  # bool (N,): held out for validation


def make_windows(streams: Sequence[Series], norm: dict[str, Any], cfg: TrainConfig) -> Windows:
    """Cut every normalised stream into windows (see the module docstring)."""
    length = cfg.window + cfg.burn_in
    xs, ys, masks, vals = [], [], [], []
    warmup = cfg.warmup if norm["mode"] == "stream" else 0
    for s in streams:
        z, target, _ = normalize_series(s.values, norm)
        n = target.shape[0]  # input z[i] forecasts target[i], i < n
        split = n if cfg.val_split == 0 else cfg.window * math.ceil((1 - cfg.val_split) * n / cfg.window)
        for start in range(0, n, cfg.window):
            begin = max(0, start - cfg.burn_in)
            end = min(n, start + cfg.window)
            idx = np.arange(begin, end)
            scored = (idx >= start) & (idx >= warmup)
            if not scored.any():
                continue
            x = np.zeros((length, z.shape[1]), np.float32)
            y = np.zeros((length, z.shape[1]), np.float32)
            m = np.zeros(length, np.float32)
            x[: len(idx)] = z[idx]
            y[: len(idx)] = target[idx]
            m[: len(idx)] = scored
            xs.append(x)
            ys.append(y)
            masks.append(m)
            vals.append(start >= split)
    if not xs:
        raise DataError("no training windows: every stream is shorter than one window")
    return Windows(np.stack(xs), np.stack(ys), np.stack(masks), np.array(vals, dtype=bool))


@dataclass
class TrainResult:
    model: Forecaster
    norm: dict[str, Any]
    history: dict[str, list[float]]  # "train", "val" per epoch (val empty without validation)
    best_epoch: int
    train_loss: float
    val_loss: float | None
    epochs_run: int
    seconds: float
    config: TrainConfig = field(repr=False, default_factory=TrainConfig)


def _masked_mse(pred: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    se = ((pred - y) ** 2).mean(dim=2) * m
    return se.sum(), m.sum()


def _evaluate(model: Forecaster, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor, batch: int) -> float:
    model.eval()
    total, count = 0.0, 0.0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            pred, _ = model(x[i:i + batch])
            s, c = _masked_mse(pred, y[i:i + batch], m[i:i + batch])
            total += float(s)
            count += float(c)
    return total / max(count, 1.0)


class _Progress:
    """A rich progress bar on a terminal; one line per epoch otherwise."""

    def __init__(self, enabled: bool, epochs: int, batches: int) -> None:
        self.rich = None
        self.enabled = enabled
        self.epochs = epochs
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.rich = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=Console(stderr=True), transient=False)
            self.rich.start()
            self.task = self.rich.add_task("epoch 1", total=epochs * batches)

    def batch(self, epoch: int, train_loss: float, val_loss: float | None) -> None:
        if self.rich is not None:
            val = "-" if val_loss is None else f"{val_loss:.4f}"
            self.rich.update(self.task, advance=1,
                             description=f"epoch {epoch}/{self.epochs} train {train_loss:.4f} val {val}")

    def epoch(self, epoch: int, train_loss: float, val_loss: float | None, best: bool) -> None:
        if self.enabled and self.rich is None:
            val = "-" if val_loss is None else f"{val_loss:.5f}"
            print(f"epoch {epoch}/{self.epochs}  train {train_loss:.5f}  val {val}{'  *' if best else ''}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.rich is not None:
            self.rich.stop()


def train(streams: Sequence[Series], cfg: TrainConfig,
          on_epoch: Callable[[int, float, float | None], None] | None = None) -> TrainResult:
    """Train a :class:`Forecaster` on ``streams`` (all with the same features)."""
    cfg.check()
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    for s in streams:
        check_length(s, cfg)
    norm = norm_config(cfg, streams)
    win = make_windows(streams, norm, cfg)
    tensors = [torch.from_numpy(a) for a in (win.x, win.y, win.mask)]
    train_idx = np.flatnonzero(~win.val)
    val_idx = np.flatnonzero(win.val)
    if len(train_idx) == 0:
        raise DataError("no training windows left after the validation split; lower --val-split")
    xt, yt, mt = (t[torch.from_numpy(train_idx)] for t in tensors)
    xv, yv, mv = (t[torch.from_numpy(val_idx)] for t in tensors)

    model = Forecaster(win.x.shape[2], cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = math.ceil(len(train_idx) / cfg.batch_size)
    history: dict[str, list[float]] = {"train": [], "val": []}
    best = (math.inf, 0, None, math.nan)  # val loss, epoch, state, train loss
    bar = _Progress(cfg.progress, cfg.epochs, batches)
    epoch = 0
    try:
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            order = torch.randperm(len(train_idx), generator=gen)
            total, count = 0.0, 0.0
            last_val = history["val"][-1] if history["val"] else None
            for b in range(batches):
                idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                pred, _ = model(xt[idx])
                s, c = _masked_mse(pred, yt[idx], mt[idx])
                loss = s / c.clamp(min=1.0)
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                opt.step()
                total += float(s.detach())
                count += float(c)
                bar.batch(epoch, total / max(count, 1.0), last_val)
            train_loss = total / max(count, 1.0)
            val_loss = _evaluate(model, xv, yv, mv, 256) if len(val_idx) else None
            history["train"].append(train_loss)
            if val_loss is not None:
                history["val"].append(val_loss)
            watched = train_loss if val_loss is None else val_loss
            improved = watched < best[0]
            if improved:
                best = (watched, epoch, copy.deepcopy(model.state_dict()), train_loss)
            bar.epoch(epoch, train_loss, val_loss, improved)
            if on_epoch is not None:
                on_epoch(epoch, train_loss, val_loss)
            if val_loss is not None and epoch - best[1] >= cfg.patience > 0:
                break
            if not math.isfinite(train_loss):
                raise DataError(f"training diverged at epoch {epoch} (loss {train_loss}); lower --lr")
    finally:
        bar.close()
    if best[2] is not None:
        model.load_state_dict(best[2])
    model.eval()
    return TrainResult(model=model, norm=norm, history=history, best_epoch=best[1], train_loss=float(best[3]),
                       val_loss=float(best[0]) if len(val_idx) else None, epochs_run=epoch,
                       seconds=time.perf_counter() - started, config=cfg)


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
        "history": {k: [round(v, 6) for v in vals] for k, vals in result.history.items()},
        "seed": result.config.seed,
        "seconds": round(result.seconds, 1),
        "config": cfg,
        "torch": torch.__version__,
    }


def save(result: TrainResult, out_dir: str, features: list[str], data: list[dict[str, Any]],
         detector: dict[str, Any] | None = None) -> str:
    """Write the artifact (via :func:`training.export.export_model`) and ``loss.png``; return the version."""
    from kernels import detector as det
    from training.export import export_model

    model = result.model
    version = export_model(model.lstm, list(model.head), out_dir, activations=model.activations,
                           features=features, norm=result.norm,
                           detector=det.config(None) if detector is None else detector,
                           meta=training_meta(result, data))
    from training.plot import plot_losses

    plot_losses(result.history, f"{out_dir}/loss.png", best_epoch=result.best_epoch)
    return version
