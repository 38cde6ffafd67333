"""``lstream train``: train an LSTM forecaster on CSV files (or synthetic data) into a model artifact.

Example::

    lstream train data/*.csv --out models/mine --epochs 30 --hidden 64 --layers 2

Writes ``model.json`` + ``weights.npz`` (the contract's artifact) and ``loss.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Mapping

from lstream.cli import CliError

_D = {"hidden": 64, "layers": 2, "epochs": 30, "steps": 1000}  # documented in the README usage line


def build_parser(prog: str) -> argparse.ArgumentParser:
    from kernels.norm import STREAM_DEFAULTS

    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0].replace("``", ""),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("files", nargs="*", help="CSV files: a timestamp column and one or more value columns")
    p.add_argument("--out", required=True, help="artifact directory to write")
    data = p.add_argument_group("data")
    data.add_argument("--columns", default=None, help="comma-separated value columns (default: every numeric column)")
    data.add_argument("--stream-column", default=None,
                      help="column naming the stream of each row (default: one stream per file)")
    data.add_argument("--synthetic", type=int, default=0, metavar="N",
                      help="train on N generated streams (series/synthetic.py) instead of / besides files")
    data.add_argument("--synthetic-steps", type=int, default=3000, help="readings per synthetic stream")
    data.add_argument("--synthetic-seed", type=int, default=0, help="seed of the synthetic generator")
    data.add_argument("--synthetic-features", type=int, default=1, help="features per synthetic stream")
    data.add_argument("--synthetic-kind", choices=("mixed", "calendar", "both"), default="mixed",
                      help="synthetic families: cycles in steps, clock-driven daily/weekly patterns, or half each")
    data.add_argument("--synthetic-period", type=float, default=60.0, help="seconds between synthetic readings")
    model = p.add_argument_group("model")
    model.add_argument("--hidden", type=int, default=_D["hidden"], help="LSTM hidden size")
    model.add_argument("--layers", type=int, default=_D["layers"], help="LSTM layers")
    model.add_argument("--head", choices=("linear", "mlp"), default="mlp",
                       help="linear: LSTM -> Linear; mlp: LSTM -> Linear(relu) -> Linear")
    model.add_argument("--head-hidden", type=int, default=32, help="width of the mlp head's hidden layer")
    model.add_argument("--residual", action=argparse.BooleanOptionalAction, default=True,
                       help="the network predicts the change from the last reading (model.json residual)")
    model.add_argument("--adapt", action=argparse.BooleanOptionalAction, default=True,
                       help="per-stream online adaptation at run time (model.json adapt, kernels/adapt.py)")
    model.add_argument("--season", type=int, default=0,
                       help="seasonal-naive period in steps for the validation MASE (0: one day by the timestamps)")
    model.add_argument("--dropout", type=float, default=0.1, help="dropout between layers (training only)")
    model.add_argument("--norm", choices=("stream", "global"), default="stream",
                       help="stream: each stream's own online statistics; global: the training set's mean/std")
    model.add_argument("--norm-window", type=float, default=STREAM_DEFAULTS["window"],
                       help="stream norm: readings the running statistics average over")
    model.add_argument("--min-std", type=float, default=STREAM_DEFAULTS["min_std"],
                       help="floor of the scale, relative to 1 + |mean|")
    model.add_argument("--clip", type=float, default=STREAM_DEFAULTS["clip"],
                       help="scaled readings are clipped to +-clip")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=_D["epochs"],
                     help="maximum passes over every training window (ignored with --steps)")
    opt.add_argument("--steps", type=int, default=_D["steps"],
                     help="optimiser steps in all (0: --epochs passes); validation about 20 times per run")
    opt.add_argument("--eval-every", type=int, default=0, help="with --steps: optimiser steps between validations")
    opt.add_argument("--stride", type=int, default=16, help="steps between the starts of overlapping training windows")
    opt.add_argument("--batch-size", type=int, default=64, help="windows per batch")
    opt.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    opt.add_argument("--weight-decay", type=float, default=1e-5, help="Adam weight decay (L2)")
    opt.add_argument("--clip-grad", type=float, default=1.0, help="maximum gradient norm")
    opt.add_argument("--window", type=int, default=128, help="steps with loss per training window")
    opt.add_argument("--burn-in", type=int, default=64, help="steps fed before a window's loss starts")
    opt.add_argument("--warmup", type=int, default=50,
                     help="stream norm: first targets of each stream left out of the loss")
    opt.add_argument("--val-split", type=float, default=0.2,
                     help="last fraction of each stream held out for validation")
    opt.add_argument("--patience", type=int, default=5, help="epochs without a better validation loss before stopping")
    opt.add_argument("--seed", type=int, default=0, help="random seed (same seed, same data: same model)")
    opt.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from series.csvdata import Series, read_streams

    if not args.files and not args.synthetic:
        raise CliError("expected CSV files or --synthetic N, got neither")
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    from training.train import TrainConfig, check_length

    cfg = TrainConfig(hidden=args.hidden, layers=args.layers, head=args.head, head_hidden=args.head_hidden,
                      dropout=args.dropout, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      weight_decay=args.weight_decay, clip_grad=args.clip_grad, window=args.window,
                      burn_in=args.burn_in, warmup=args.warmup, stride=args.stride, steps=args.steps,
                      eval_every=args.eval_every, residual=args.residual, season=args.season, val_split=args.val_split,
                      patience=args.patience, seed=args.seed, norm=args.norm, norm_window=args.norm_window,
                      min_std=args.min_std, clip=args.clip, threads=args.threads, progress=not args.quiet)
    try:
        cfg.check()
    except ValueError as exc:
        raise CliError(str(exc)) from None
    streams = read_streams(args.files, stream_column=args.stream_column, columns=columns) if args.files else []
    for s in streams:
        check_length(s, cfg)
    data = [{"file": f, "sha256": _sha256(f)} for f in args.files]
    if args.synthetic:
        from series.synthetic import generate

        if args.synthetic_steps < cfg.min_rows():
            raise CliError(f"--synthetic-steps: expected at least {cfg.min_rows()} for one training window, "
                           f"got {args.synthetic_steps}")
        k = args.synthetic_features
        names = streams[0].features if streams else (["value"] if k == 1 else [f"value_{i}" for i in range(k)])
        if len(names) != k:
            raise CliError(f"--synthetic-features: expected {len(names)} like the CSV files, got {k}")
        gen = generate(args.synthetic, args.synthetic_steps, seed=args.synthetic_seed, num_features=k,
                       anomaly_rate=0.0, kind=args.synthetic_kind, period_s=args.synthetic_period)
        streams += [Series(g.stream_id, g.ts, g.values, list(names)) for g in gen]
        data.append({"synthetic": {"streams": args.synthetic, "steps": args.synthetic_steps,
                                   "seed": args.synthetic_seed, "features": k, "anomaly_rate": 0.0,
                                   "generator": "series/synthetic.py",
                                   **({"kind": args.synthetic_kind, "period_s": args.synthetic_period}
                                      if (args.synthetic_kind, args.synthetic_period) != ("mixed", 60.0) else {})}})
    from training.train import save, train, warning

    if not args.quiet:
        rows = sum(len(s) for s in streams)
        print(f"training on {len(streams)} stream(s), {rows} readings, features {streams[0].features}, "
              f"norm {cfg.norm}", file=sys.stderr)
    result = train(streams, cfg)
    from kernels.adapt import DEFAULTS as ADAPT_DEFAULTS

    adapt = dict(ADAPT_DEFAULTS) if args.adapt else {"enabled": False}
    version = save(result, args.out, streams[0].features, data, adapt=adapt)
    val = "-" if result.val_loss is None else f"{result.val_loss:.5f}"

    def ratio(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    print(f"wrote {args.out} version {version}: {result.optimiser_steps} steps, rounds {result.epochs_run} "
          f"(kept {result.best_epoch}), train loss {result.train_loss:.5f}, val loss {val}, "
          f"val MASE vs persistence {ratio(result.val_mase)}, vs seasonal-naive {ratio(result.val_mase_seasonal)}"
          f" (season {result.season or '-'} steps), {result.seconds:.0f}s; loss curve {args.out}/loss.png")
    alarm = warning(result)
    if alarm:
        print(alarm, file=sys.stderr)
    return 0
