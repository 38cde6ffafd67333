"""Child processes for ``lstream demo`` and ``lstream dev``: start them, stop them, leave nothing.

:class:`Interrupts` turns Ctrl-C and SIGTERM into one clean stop. While services start it
only records the request (so a half-started child is not lost between ``Popen`` and the
``Service`` that would stop it); afterwards it raises :class:`KeyboardInterrupt`.

:func:`spawn` starts a child in its own process group (a terminal's Ctrl-C reaches only us,
and we stop the whole group) that Linux terminates if we die without cleaning up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO

from lstream.devservices import child_setup


class Interrupts:
    """Handle SIGINT and SIGTERM inside a ``with`` block; restore the old handlers after it.

    >>> with Interrupts() as stop:
    ...     stop.requested
    False
    """

    def __init__(self) -> None:
        self.requested = False
        self.deferred = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        if not self.deferred:
            raise KeyboardInterrupt

    def defer(self) -> Interrupts:
        """Only record signals until :meth:`resume` (use around starting children)."""
        self.deferred = True
        return self

    def resume(self) -> None:
        """Raise now if a signal came while deferred; raise on the next one from now on."""
        self.deferred = False
        if self.requested:
            raise KeyboardInterrupt

    def ignore(self) -> None:
        """Only record further signals (while stopping, so a second Ctrl-C cannot leave children
        behind); reinstalls the handlers in case someone replaced them meanwhile."""
        self.deferred = True
        self.install()

    def install(self) -> None:
        """(Re)install the handlers, e.g. after ``asyncio.run`` restored the default ones."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)

    def __enter__(self) -> Interrupts:
        self.install()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


def spawn(argv: Sequence[str], env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` with ``env``, output to ``log``, in its own process group.

    Call it from the main thread: Linux sends the death signal when the *thread* that
    started the child ends.
    """
    out: IO[bytes] = open(log, "wb")
    try:
        return subprocess.Popen(list(argv), env=dict(env), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=child_setup())
    finally:
        out.close()


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """SIGTERM the child's process group, SIGKILL it after ``timeout``; return its exit code."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = None
    deadline = time.monotonic() + timeout
    if proc.poll() is None and pgid is not None:
        os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    if pgid is not None:
        # Also whatever the child started in its group, even if the child itself has exited.
        deadline = max(deadline, time.monotonic() + 0.5)
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if group_alive(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.wait()
    return proc.returncode


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` still exists (zombies excluded where /proc exists)."""
    if not os.path.isdir("/proc"):
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    return bool(pids_alive_in(lambda stat: stat[4] == str(pgid)))


def pids_alive_in(match: Callable[[list[str]], bool]) -> list[int]:
    """Pids whose /proc/<pid>/stat fields (split after the command) satisfy ``match``; no zombies."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = [entry, "cmd"] + raw.rsplit(")", 1)[1].split()
        if fields[2] != "Z" and match(fields):
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie.

    >>> alive(os.getpid())
    True
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return raw.rsplit(")", 1)[1].split()[0] != "Z"
