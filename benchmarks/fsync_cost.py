"""What Redis's `appendfsync always` costs against `everysec`, with the store's write pattern
(one script call per batch, an 800-byte field per stream). Prints one line per setting.

    python -m benchmarks.fsync_cost      # or lstream bench fsync_cost; needs redis-server; about 15 s
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time

import redis

from lstream.devservices import free_port

SCRIPT = "for i = 1, #KEYS do redis.call('HSET', KEYS[i], 'h', ARGV[i]) end return #KEYS"


def rates(mode: str, seconds: float = 3.0) -> dict[int, float]:
    """Script calls per second for batches of 1 and 256 streams under ``appendfsync mode``."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--dir", tempfile.mkdtemp(),
                             "--appendonly", "yes", "--appendfsync", mode, "--save", ""],
                            stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.7)
        script = redis.Redis(port=port).register_script(SCRIPT)
        out = {}
        for n in (1, 256):
            keys = [f"lstream:state:{{s{i}}}" for i in range(n)]
            args = [os.urandom(800) for _ in range(n)]
            script(keys=keys, args=args)
            t0, calls = time.perf_counter(), 0
            while time.perf_counter() - t0 < seconds:
                script(keys=keys, args=args)
                calls += 1
            out[n] = calls / (time.perf_counter() - t0)
        return out
    finally:
        proc.terminate()
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    seconds = 1.0 if argv and "--quick" in argv else 3.0
    for mode in ("always", "everysec"):
        r = rates(mode, seconds)
        print(f"appendfsync {mode:8}: batches of 1: {r[1]:8.0f} saves/s; batches of 256: {r[256]:6.0f} "
              f"batches/s = {r[256] * 256:9.0f} stream saves/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
