"""``lstream replay``: run a model over CSV files offline, with the worker's own pipeline.

One stream per file (its id is the file name without ``.csv``) or one per value of
``--stream-column``. Writes ``OUTDIR/<stream>.csv`` with ``timestamp, actual, expected,
forecast, score, anomaly`` (``anomaly`` is 0 or 1; ``expected`` is empty on a stream's first
row; several features give ``actual_<f>, expected_<f>, forecast_<f>``)::

    lstream replay --model models/default data/*.csv --out replay/ --plot replay.png
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

from lstream.cli import CliError


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0].replace("``", ""))
    p.add_argument("files", nargs="+", help="CSV files: a timestamp column and the model's value columns")
    p.add_argument("--model", default=None,
                   help="model artifact directory (default: LSTREAM_MODEL or the bundled model)")
    p.add_argument("--out", default=None, help="directory for <stream>.csv results (default: write no CSV)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="draw series, forecast, score and anomalies into this PNG")
    p.add_argument("--plot-streams", type=int, default=6, help="at most this many streams in the plot")
    p.add_argument("--columns", default=None, help="comma-separated value columns (default: every numeric column)")
    p.add_argument("--stream-column", default=None, help="column naming the stream of each row")
    p.add_argument("--threshold", type=float, default=None, help="anomaly threshold (default: the model's)")
    p.add_argument("--adapt", action=argparse.BooleanOptionalAction, default=None,
                   help="per-stream online adaptation on/off (default: as model.json says, like the worker)")
    p.add_argument("--calm-steps", type=int, default=None,
                   help="scores under the threshold that end an episode (default: the model's)")
    p.add_argument("--explain", default=None, metavar="DIR",
                   help="per-step gate summaries and a gates plot per stream into DIR (docs/explain.md)")
    return p


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from evaluation.replay import replay_streams, write_csv
    from kernels import load_model
    from kernels.blas import limit_blas_threads
    from kernels.engine import Engine
    from series.csvdata import DataError, read_streams
    from worker.settings import DEFAULT_MODEL, SettingsError, parse

    limit_blas_threads(1)  # small batched matmuls: one BLAS thread is faster (kernels/blas.py)
    if args.out is None and args.plot is None and args.explain is None:
        raise CliError("nothing to write: expected --out DIR, --plot PNG and/or --explain DIR")
    if args.threshold is not None and not 0 < args.threshold <= 1:
        raise CliError(f"--threshold: expected a number in (0, 1], got {args.threshold}")
    # LSTREAM_EXACT_KERNELS as the worker reads it: the same kernel path, the same bits
    try:
        exact = parse("exact_kernels", env.get("LSTREAM_EXACT_KERNELS") or "1")
    except SettingsError as e:
        raise CliError(str(e)) from None
    model = load_model(args.model or env.get("LSTREAM_MODEL") or DEFAULT_MODEL, exact=exact)
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    if columns is None:
        try:  # the model's own feature names, when the files have them
            streams = read_streams(args.files, stream_column=args.stream_column, columns=model.features)
        except DataError:
            streams = read_streams(args.files, stream_column=args.stream_column)
    else:
        streams = read_streams(args.files, stream_column=args.stream_column, columns=columns)
    engine = Engine(model, threshold=args.threshold, calm_steps=args.calm_steps, adapt=args.adapt)
    results = replay_streams(engine, streams)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        for s, r in zip(streams, results):
            write_csv(s, r, os.path.join(args.out, _safe(s.name) + ".csv"))
    if args.plot:
        from training.plot import plot_replay

        plot_replay(list(zip(streams, results)), args.plot, engine.threshold, max_streams=args.plot_streams)
    from evaluation.metrics import forecast_metrics

    for s, r in zip(streams, results):
        acc = forecast_metrics(s.values, r.expected, probation=0.0)
        print(f"{s.name}: {len(s)} readings, {int(r.anomaly.sum())} anomalous, {int(r.alert.sum())} alert(s); "
              f"forecast MAE {acc.mae:.4g} vs {acc.mae_persistence:.4g} for persistence (MASE {acc.mase:.3f})")
        if not acc.mase < 1.0:  # NaN too: no scored forecast, nothing shows the model helps
            print(f"WARNING: {s.name}: the model's forecasts are no better than repeating the last reading "
                  f"(MASE {acc.mase:.3f}); lstream eval compares it with seasonal-naive too")
    if args.explain:
        from evaluation.explain_replay import write_explanations

        write_explanations(engine, streams, args.explain)
    where = [w for w in (args.out, args.plot, args.explain) if w]
    print(f"model {model.version}, threshold {engine.threshold:g}; wrote {' and '.join(where)}")
    return 0


def _safe(name: str) -> str:
    """A stream id as a file name (ids may hold ``/`` and ``:``)."""
    return "".join(ch if ch.isalnum() or ch in "._-@" else "_" for ch in name)
