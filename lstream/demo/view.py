"""What ``lstream demo`` shows: a rich live table on a terminal, plain lines otherwise, and the
closing summary.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from lstream.demo.main import AlertSeen, Score, Tally


def fmt_values(values: list[float]) -> str:
    """Readings in 4 significant digits.

    >>> fmt_values([1234.5678, 0.000123]), fmt_values([])
    ('1235, 0.000123', '-')
    """
    return ", ".join(f"{v:.4g}" for v in values) if values else "-"


def fmt_ts(ts: float) -> str:
    """Event time as UTC.

    >>> fmt_ts(1700000000.0)
    '2023-11-14 22:13 UTC'
    """
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


def alert_line(a: AlertSeen) -> str:
    verdict = "injected anomaly" if a.injected else "no label: false alert"
    return (f"ALERT {a.stream_id} at {fmt_ts(a.ts)} (reading {a.row}): expected {fmt_values(a.expected)}, "
            f"actual {fmt_values(a.actual)}, score {a.score:.4f}{f', reason {a.reason}' if a.reason else ''} "
            f"[{verdict}]")


class View:
    """The running display. ``phase`` and ``produced`` are set by the demo; the tally is read."""

    def __init__(self, tally: Tally, total: int, header: str, live: bool, console: Console | None = None) -> None:
        self.tally = tally
        self.total = total
        self.header = header
        self.console = console or Console()
        self.live = live
        self.phase = "starting"
        self.produced = 0
        self.t0 = time.monotonic()
        self._live: Live | None = None
        self._last_line = 0.0
        self._shown_alerts = 0

    def __enter__(self) -> View:
        if self.live:
            self._live = Live(get_renderable=self.render, console=self.console, refresh_per_second=4,
                              transient=False)
            self._live.__enter__()
        else:
            print(self.header, flush=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None
        else:
            self.update(force=True)

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        if not self.live:
            print(f"[{time.monotonic() - self.t0:6.1f} s] {phase}", flush=True)

    def update(self, force: bool = False) -> None:
        """Plain mode: print new alerts, and a progress line every 2 s."""
        if self.live:
            return
        for a in self.tally.alerts[self._shown_alerts:]:
            print(alert_line(a), flush=True)
        self._shown_alerts = len(self.tally.alerts)
        now = time.monotonic()
        if force or now - self._last_line >= 2.0:
            self._last_line = now
            t = self.tally
            print(f"[{now - self.t0:6.1f} s] produced {self.produced}/{self.total}  applied {t.predictions}  "
                  f"rejected {t.dead_letters}  alerts {len(t.alerts)}  streams {len(t.streams_seen)}  "
                  f"{t.rate(now):.0f} events/s", flush=True)

    def render(self) -> Group:
        t = self.tally
        stats = Table.grid(padding=(0, 3))
        for _ in range(4):
            stats.add_column(justify="left")
        elapsed = time.monotonic() - self.t0
        stats.add_row(Text("phase", style="dim"), Text(self.phase, style="bold"),
                      Text("elapsed", style="dim"), f"{elapsed:5.1f} s")
        stats.add_row(Text("produced", style="dim"), f"{self.produced:,} / {self.total:,}",
                      Text("events/s", style="dim"), Text(f"{t.rate():,.0f}", style="bold cyan"))
        stats.add_row(Text("applied (predictions)", style="dim"), f"{t.predictions:,}",
                      Text("streams", style="dim"), f"{len(t.streams_seen)} / {len(t.scenario.streams)}")
        stats.add_row(Text("rejected (dead letters)", style="dim"), f"{t.dead_letters:,}",
                      Text("alerts", style="dim"), Text(str(len(t.alerts)), style="bold red"))
        alerts = Table(expand=True, box=None, header_style="bold", pad_edge=False)
        for name, just in (("event time", "left"), ("stream", "left"), ("reading", "right"),
                           ("expected", "right"), ("actual", "right"), ("score", "right"), ("reason", "left"),
                           ("label", "left")):
            alerts.add_column(name, justify=just)  # type: ignore[arg-type]
        for a in t.alerts[-12:]:
            label = Text("injected anomaly", style="red") if a.injected else Text("no label (false)", style="blue")
            alerts.add_row(fmt_ts(a.ts), a.stream_id, str(a.row), fmt_values(a.expected), fmt_values(a.actual),
                           f"{a.score:.4f}", a.reason or "-", label)
        if not t.alerts:
            alerts.add_row("", Text("no alerts yet", style="dim"), "", "", "", "", "", "")
        return Group(Panel(stats, title=self.header, title_align="left"),
                     Panel(alerts, title=f"alerts (latest {min(12, len(t.alerts))} of {len(t.alerts)})",
                           title_align="left"))


def summary_rows(tally: Tally, score: Score, produced: int, seconds: float) -> list[tuple[str, str]]:
    n_eps = len(tally.scenario.episodes)
    pct = f" ({100 * len(score.caught) / n_eps:.0f}%)" if n_eps else ""
    delay = ""
    if score.delays:
        delays = sorted(score.delays)
        delay = f", median delay {delays[len(delays) // 2]} readings"
    codes = ", ".join(f"{k} {v}" for k, v in sorted(tally.dead_codes.items()))
    reasons: dict[str, int] = {}
    for a in tally.alerts:
        reasons[a.reason or "unstated"] = reasons.get(a.reason or "unstated", 0) + 1
    by_reason = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    return [
        ("events produced", f"{produced:,} from {len(tally.scenario.streams)} streams"),
        ("events applied", f"{tally.predictions:,} (one prediction each)"),
        ("events rejected", f"{tally.dead_letters:,}" + (f" ({codes})" if codes else "")),
        ("alerts", f"{len(tally.alerts)}" + (f" ({by_reason})" if by_reason else "")),
        ("injected anomalies caught", f"{len(score.caught)} of {n_eps}{pct}{delay}"),
        ("false alerts", f"{len(score.false_alerts)} (not within {tally.tolerance} readings after an "
                         "injected anomaly)"),
        ("wall time", f"{seconds:.1f} s"),
    ]


def print_summary(console: Console, rows: list[tuple[str, str]], live: bool) -> None:
    if live:
        table = Table(title="lstream demo: summary", show_header=False, title_justify="left", box=None)
        table.add_column(style="dim")
        table.add_column(style="bold")
        for k, v in rows:
            table.add_row(k, v)
        console.print(table)
    else:
        print("summary:")
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"  {k.ljust(width)}  {v}")
