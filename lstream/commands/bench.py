"""``lstream bench [NAME|all] [--quick]``: run the benchmarks and print their tables.

Each benchmark is a module ``benchmarks.<name>`` of the source checkout with ``main(argv: list[str]) -> int``; ``all``
(the default) runs every one, in order (docs/benchmarks.md says what each measures).

>>> build_parser("lstream bench").parse_args(["kernels", "--quick"])
Namespace(which='kernels', quick=True)
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Mapping
from pathlib import Path

from lstream.cli import CliError, Parser, description

BENCHES = ("kernels", "state", "e2e", "scale", "latency", "scaleout", "river_peers", "forecast_nab", "adapt_cost",
           "exact_cost", "fuzz", "chaos", "fsync_cost")
# Benchmarks without a --quick flag (short already, or one fixed protocol such as the NAB half).
NO_QUICK = frozenset({"forecast_nab", "adapt_cost", "exact_cost"})


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=description(__doc__))
    parser.add_argument("which", nargs="?", default="all", choices=(*BENCHES, "all"), help="which benchmark")
    parser.add_argument("--quick", action="store_true", help="short smoke runs instead of full timings")
    return parser


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    checkout = Path(__file__).resolve().parents[2]
    if not (checkout / "benchmarks" / "__init__.py").is_file():
        raise CliError("the benchmarks live in the source checkout (benchmarks/), which this install "
                       "does not have: run `lstream bench` from a clone of the repository")
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    names = BENCHES if args.which == "all" else (args.which,)
    status = 0
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        print(f"== bench {name} ==", flush=True)
        status = max(status, int(module.main(["--quick"] if args.quick and name not in NO_QUICK else []) or 0))
    return status
