"""``lstream demo``: embedded broker + Redis + worker + a replayed sensor feed with anomalies.

Shows events per second, streams and each alert live (plain lines when not on a terminal
or with ``--no-live``), then a summary, a plot and what to try next. Stops everything it
started, also on Ctrl-C. ``LSTREAM_BROKER`` / ``LSTREAM_REDIS_URL`` use existing services
instead of starting them (topics and stream ids then get a per-run suffix / prefix).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from lstream.cli import Parser, description, setting


def build_parser(prog: str) -> argparse.ArgumentParser:
    from lstream.demo.run import DemoOptions

    d = DemoOptions()
    p = Parser(prog=prog, description=description(__doc__))
    p.add_argument("--streams", type=int, default=d.streams, help="sensor streams")
    setting(p, "--steps", type=int, default=None, default_text="the model's detector warm-up + 110",
            help="readings per stream")
    p.add_argument("--seconds", type=float, default=d.seconds,
                   help="replay the feed over this many seconds once the worker is up")
    p.add_argument("--anomaly-rate", type=float, default=d.anomaly_rate, help="injected anomalies per reading")
    p.add_argument("--tolerance", type=int, default=d.tolerance,
                   help="readings after an injected anomaly in which an alert counts as caught")
    p.add_argument("--seed", type=int, default=d.seed, help="feed seed")
    p.add_argument("--out", default=d.out, help="directory for demo.png, summary.json, worker.log")
    p.add_argument("--no-live", dest="live", action="store_false", help="plain progress lines instead of the live view")
    p.add_argument("--keep", action="store_true",
                   help="after the summary keep broker, Redis and worker running until Ctrl-C")
    return p


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from lstream.cli import CliError
    from lstream.demo.run import DemoOptions, run_demo

    for name, low in (("streams", 1), ("steps", 1), ("tolerance", 0)):
        if getattr(args, name) is not None and getattr(args, name) < low:
            raise CliError(f"--{name}: expected at least {low}, got {getattr(args, name)}")
    if not 0 <= args.anomaly_rate <= 0.1:
        raise CliError(f"--anomaly-rate: expected a number in [0, 0.1], got {args.anomaly_rate}")
    if not 0 <= args.seconds <= 3600:
        raise CliError(f"--seconds: expected 0 to 3600, got {args.seconds}")
    opts = DemoOptions(streams=args.streams, steps=args.steps, seconds=args.seconds, seed=args.seed,
                       anomaly_rate=args.anomaly_rate, tolerance=args.tolerance, out=args.out,
                       live=args.live, keep=args.keep)
    return run_demo(opts, env)
