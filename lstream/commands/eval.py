"""``lstream eval``: forecast accuracy of a model over CSV files against persistence and seasonal-naive.

Each file (or each ``--stream-column`` value) is one stream, replayed through the worker's own
pipeline (:mod:`evaluation.replay`). Per stream and overall: MAE, RMSE, and MASE against
persistence ("no change") and against seasonal-naive (the reading one day earlier, when the
sampling is regular and a day holds at least 2 readings), scored after the first
``--probation`` share of each stream (:mod:`evaluation.metrics`)::

    lstream eval models/default data/*.csv
    lstream eval data/*.csv --json
    lstream eval --model models/default data/*.csv --plot eval.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from lstream.cli import CliError


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0].replace("``", ""))
    p.add_argument("paths", nargs="+", metavar="[MODEL] FILE",
                   help="an optional model artifact directory, then CSV files (a timestamp column and values)")
    p.add_argument("--model", default=None,
                   help="model artifact directory (default: the first argument if it is one, else "
                        "LSTREAM_MODEL or the bundled model)")
    p.add_argument("--columns", default=None, help="comma-separated value columns (default: the model's features)")
    p.add_argument("--stream-column", default=None, help="column naming the stream of each row")
    p.add_argument("--probation", type=float, default=0.15,
                   help="share of each stream not scored, the model is still learning it (default: 0.15)")
    p.add_argument("--season", default="auto",
                   help="seasonal-naive lag in readings: 'auto' (one day, from the timestamps) or a number; "
                        "0: no seasonal baseline (default: auto)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--plot", default=None, metavar="PNG", help="draw each stream's MASE against both baselines")
    return p


def _split(paths: Sequence[str], model_flag: str | None) -> tuple[str | None, list[str]]:
    first = paths[0]
    if model_flag is None and os.path.isdir(first) and os.path.isfile(os.path.join(first, "model.json")):
        return first, list(paths[1:])
    return model_flag, list(paths)


def _season(arg: str, ts: Any) -> int:
    from evaluation.metrics import season_length

    if arg == "auto":
        return season_length(ts)
    try:
        m = int(arg)
    except ValueError:
        raise CliError(f"--season: expected 'auto' or a whole number of readings, got {arg!r}") from None
    if m < 0:
        raise CliError(f"--season: expected 0 or more readings, got {m}")
    return m


def evaluate(model_dir: str, files: Sequence[str], *, columns: Sequence[str] | None = None,
             stream_column: str | None = None, probation: float = 0.15, season: str = "auto") -> dict[str, Any]:
    """Replay ``files`` with the model at ``model_dir``; per-stream and overall metrics (a dict)."""
    from evaluation.metrics import forecast_metrics, summarise
    from evaluation.replay import replay_streams
    from kernels import load_model
    from kernels.engine import Engine
    from series.csvdata import DataError, read_streams

    model = load_model(model_dir)
    if columns is None:
        try:  # the model's own feature names, when the files have them
            streams = read_streams(files, stream_column=stream_column, columns=model.features)
        except DataError:
            streams = read_streams(files, stream_column=stream_column)
    else:
        streams = read_streams(files, stream_column=stream_column, columns=list(columns))
    results = replay_streams(Engine(model), streams)
    per = [forecast_metrics(s.values, r.expected, probation=probation, season=_season(season, s.ts))
           for s, r in zip(streams, results)]
    return {"model": model.version, "model_dir": os.path.abspath(model_dir), "probation": probation,
            "streams": {s.name: m.as_dict() for s, m in zip(streams, per)},
            "overall": summarise(per).as_dict()}


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1e6 else f"{v:.3g}"
    return str(v)


def _table(report: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(title=f"forecast accuracy, model {report['model']} (scored after the first "
                    f"{report['probation']:.0%} of each stream)")
    for col in ("stream", "rows", "MAE", "RMSE", "MAE persist.", "MASE", "season", "MASE seasonal"):
        t.add_column(col, justify="left" if col == "stream" else "right", no_wrap=True)
    for name, m in report["streams"].items():
        mase = m["mase"]
        style = "green" if mase is not None and mase < 1 else "red" if mase is not None else None
        t.add_row(name, str(m["rows"]), _fmt(m["mae"], 4), _fmt(m["rmse"], 4), _fmt(m["mae_persistence"], 4),
                  f"[{style}]{_fmt(mase)}[/]" if style else _fmt(mase), str(m["season"] or "-"),
                  _fmt(m["mase_seasonal"]))
    o = report["overall"]
    t.add_section()
    t.add_row(f"overall, {o['streams']} streams (median MASE)", "", _fmt(o["mae"], 4), _fmt(o["rmse"], 4), "",
              _fmt(o["median_mase"]), "", _fmt(o["median_mase_seasonal"]))
    return t


def plot(report: dict[str, Any], path: str) -> None:
    """One bar pair per stream: MASE against persistence and against seasonal-naive (1 = baseline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(report["streams"])
    mase = np.array([report["streams"][n]["mase"] or np.nan for n in names], dtype=float)
    seas = np.array([report["streams"][n]["mase_seasonal"] or np.nan for n in names], dtype=float)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names) + 2), 4.5))
    k = np.arange(len(names))
    ax.bar(k - 0.2, np.minimum(mase, 5), 0.4, label="MASE vs persistence")
    ax.bar(k + 0.2, np.minimum(seas, 5), 0.4, label="MASE vs seasonal-naive")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(k, [os.path.basename(n) for n in names], rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("MASE (below 1: beats the baseline; capped at 5)")
    o = report["overall"]
    ax.set_title(f"model {report['model']}: median MASE {_fmt(o['median_mase'])}, "
                 f"{_fmt(100 * o['below_one'] if o['below_one'] == o['below_one'] else None, 0)}% below 1")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from series.csvdata import DataError
    from worker.settings import DEFAULT_MODEL

    model_flag, files = _split(args.paths, args.model)
    if not files:
        raise CliError("no CSV files: expected [MODEL] FILE...")
    if not 0 <= args.probation < 1:
        raise CliError(f"--probation: expected a share in [0, 1), got {args.probation}")
    if args.season != "auto":
        _season(args.season, None)
    model_dir = model_flag or env.get("LSTREAM_MODEL") or str(DEFAULT_MODEL)
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    try:
        report = evaluate(model_dir, files, columns=columns, stream_column=args.stream_column,
                          probation=args.probation, season=args.season)
    except (DataError, ValueError) as exc:
        raise CliError(str(exc)) from None
    if args.plot:
        plot(report, args.plot)
    if args.json:
        print(json.dumps(report, indent=1, allow_nan=False))
    else:
        from rich.console import Console

        Console(width=None if sys.stdout.isatty() else 160).print(_table(report))
        o = report["overall"]
        below = o["below_one"]
        print(f"median MASE {_fmt(o['median_mase'])} over {o['scored']} streams, "
              f"{_fmt(100 * below if below == below else None, 0)}% below 1 (beat persistence)"
              + (f"; wrote {args.plot}" if args.plot else ""))
    return 0
