"""``lstream state explain ID``: load a stream's stored state and show the step its cells would take
on the next reading (:func:`kernels.explain.explain_step`) as a table, JSON or a plot.

The worker's ``GET /streams/{id}/explain`` returns the same document (worker/web.py builds it
with the same two calls: :meth:`state.store.StateStore.load`, then ``explain_step``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def parse_next(values: Sequence[str] | None) -> list[float] | None:
    """``--next 1.5 2`` or ``--next 1.5,2`` (and ``?next=1.5,2``) -> [1.5, 2.0]; None when absent.

    >>> parse_next(["1.5,2", "3"]), parse_next(None)
    ([1.5, 2.0, 3.0], None)
    """
    if not values:
        return None
    out: list[float] = []
    for v in values:
        for part in str(v).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                out.append(float(part))
            except ValueError:
                raise ValueError(f"next reading: expected numbers, got {part!r}") from None
    return out or None


async def explain_stored(store: Any, engine: Any, stream_id: str, next_value: Any = None) -> dict[str, Any]:
    """Explain ``stream_id``'s next step from its state in ``store`` (a connected
    :class:`state.store.StateStore`). Raises ``StateNotFound`` (no state), ``StateError`` (a
    state of another model version, or unreadable) and ``ValueError`` (a bad next reading)."""
    from kernels.explain import explain_step
    from state.errors import StateError

    rec = await store.get(stream_id)
    model = engine.model
    if rec.get("model") != model.version:
        raise StateError(f"stream {stream_id!r}: its state belongs to model {rec.get('model')}, the loaded model is "
                         f"{model.version}: explain it with that model (--model DIR)")
    loaded = await store.load([stream_id])
    if loaded.fresh[0]:
        why = (getattr(loaded, "unreadable", None) or [None])[0] or "it changed while it was read; try again"
        raise StateError(f"stream {stream_id!r}: its state cannot be explained: {why}")
    # No event time for the hypothetical reading: the gates do not depend on it (the LSTM reads
    # no time features); a per-stream adaptation then mixes without its time-of-day experts.
    doc = explain_step(engine, loaded.states, next_value)
    return {"stream_id": stream_id, **doc, "updated_at": rec.get("updated_at"), "ts": rec.get("ts")}


async def explain(url: str, model_dir: str, stream_id: str, next_value: Any = None) -> dict[str, Any]:
    """Connect to Redis at ``url``, load the model at ``model_dir`` and explain one stream."""
    from kernels import load_model
    from kernels.engine import Engine
    from lstream.commands.state import TIMEOUT
    from state.store import StateStore

    model = load_model(model_dir)
    store = await StateStore.connect(url, model_version=model.version, num_layers=model.num_layers,
                                     hidden_size=model.hidden_size, input_size=model.input_size, policy="refuse",
                                     timeout=TIMEOUT)
    try:
        return await explain_stored(store, Engine(model), stream_id, next_value)
    finally:
        await store.close()


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "inf"
    if isinstance(v, list):
        return ", ".join(_f(x, digits) for x in v)
    return f"{v:.{digits}g}"


def print_table(doc: dict[str, Any], *, units: int = 0) -> None:
    """The summary, then per layer a table of units (``units`` > 0: only the top units by share
    and horizon; 0: every unit)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    console.width = max(console.width, 120)
    console.print(f"[bold]stream {doc['stream_id']}[/bold]  model {doc['model']}, {doc['layers']} x {doc['hidden']} "
                  f"LSTM, {doc['steps']} steps applied")
    for line in doc["summary"]["lines"]:
        console.print("  " + line, markup=False)
    g = doc["gates"]
    drivers = {(d["layer"], d["unit"]) for d in doc["summary"]["drivers"]}
    for layer in range(doc["layers"]):
        keep = range(doc["hidden"])
        if units:
            by_share = sorted(keep, key=lambda j: -sum(abs(s) for s in doc["share"][layer][j]))[:units]
            by_hz = sorted(keep, key=lambda j: -(doc["horizon"][layer][j] or float("inf")))[:units]
            keep = sorted(set(by_share) | set(by_hz))  # type: ignore[assignment]
        table = Table(title=f"layer {layer}", title_justify="left")
        for col in ("unit", "i", "f", "g", "o", "c old", "c new", "h new", "horizon", "written", "dropped", "share"):
            table.add_column(col, justify="right", no_wrap=True)
        for j in keep:
            mark = " *" if (layer, j) in drivers else ""
            table.add_row(f"{j}{mark}", *(_f(g[k][layer][j]) for k in ("i", "f", "g", "o")),
                          _f(doc["c_old"][layer][j]), _f(doc["c"][layer][j]), _f(doc["h"][layer][j]),
                          _f(doc["horizon"][layer][j]), _f(doc["written"][layer][j]), _f(doc["dropped"][layer][j]),
                          _f(doc["share"][layer][j]))
        console.print(table)
    console.print("gates in torch order (i input, f forget, g candidate, o output); horizon = -1/ln f steps; "
                  "written = |i*g|; dropped = (1-f)*|c old|; share = forecast change (sensor units) when the "
                  "unit's new h is zeroed; * drives the forecast", markup=False)


def plot(doc: dict[str, Any], path: str) -> None:
    """Per layer: the gates and cells of every unit as a heatmap, and each unit's share of the
    forecast as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n_layers, hid = doc["layers"], doc["hidden"]
    fig, axes = plt.subplots(2 * n_layers, 1, figsize=(max(8.0, 0.28 * hid + 3), 3.6 * n_layers),
                             gridspec_kw={"height_ratios": [3, 1.4] * n_layers}, squeeze=False)
    rows = ["i", "f", "g", "o", "c_old", "c", "h"]
    for layer in range(n_layers):
        ax, bar = axes[2 * layer, 0], axes[2 * layer + 1, 0]
        mat = np.array([doc["gates"][k][layer] if k in doc["gates"] else doc[k][layer] for k in rows], np.float64)
        im = ax.imshow(mat, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_yticks(range(len(rows)), ["i", "f", "g", "o", "c old", "c new", "h new"])
        ax.set_xticks([])
        ax.set_title(f"layer {layer}: gates and cells per unit (colour clipped to [-1, 1])", fontsize=9, loc="left")
        fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
        share = np.array(doc["share"][layer], np.float64).sum(axis=-1)
        bar.bar(range(hid), share, color=np.where(share >= 0, "tab:red", "tab:blue"))
        bar.set_xlim(-0.5, hid - 0.5)
        bar.axhline(0, color="k", lw=0.5)
        bar.set_ylabel("share", fontsize=8)
        bar.set_xticks(range(hid), [str(j) for j in range(hid)], fontsize=6)
    fig.suptitle(f"stream {doc['stream_id']}: next reading {_f(doc['next'], 4)} -> forecast {_f(doc['forecast'], 4)}"
                 f", score {doc['score']:.3f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_explain(args: Any, url: str, model_dir: str) -> int:
    """``lstream state explain`` (parsed ``args``)."""
    import asyncio
    import sys

    from lstream.cli import CliError
    from lstream.commands.state import _dump

    try:
        nxt = parse_next(args.next)
    except ValueError as exc:
        raise CliError(f"--next: {exc}") from None
    try:
        doc = asyncio.run(explain(url, model_dir, args.stream_id, nxt))
    except ValueError as exc:
        if type(exc) is not ValueError:  # StateError and the like: their own message and exit code
            raise
        raise CliError(str(exc)) from None
    if args.json:
        _dump(doc)
    else:
        print_table(doc, units=args.units)
    if args.plot:
        try:
            plot(doc, args.plot)
        except ImportError as exc:
            raise CliError(f"--plot needs matplotlib ({exc}): pip install 'lstream[train]'") from None
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
