"""How durable a fenced save is before the store reports it (setting ``durability``).

- ``none``: the save is acknowledged once Redis applied it in memory. What a Redis crash loses
  then depends on the server's persistence (docs/state.md).
- ``aof-local``: after the write, ``WAITAOF 1 0 <timeout>``: the reply waits until the local AOF
  has fsynced it (Redis >= 7.2, ``appendonly yes``). A crash of Redis then loses nothing
  acknowledged.
- ``replicas=N``: after the write, ``WAIT N <timeout>``: the reply waits until N replicas have
  received it. Losing the primary then loses nothing acknowledged if a replica that had it is
  promoted.

If the wait times out with too few acknowledgements the save raises :class:`StateUnavailable`
(the state is written; the caller's retry finds it there and the fence reports ``already``).

>>> Durability.parse("replicas=2").replicas, Durability.parse("none").kind
(2, 'none')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from state.errors import StateError, StateUnavailable


@dataclass(frozen=True)
class Durability:
    kind: str  # "none" | "aof-local" | "replicas"
    replicas: int = 0
    timeout_ms: int = 1000

    @classmethod
    def parse(cls, text: str, timeout_ms: int = 1000) -> Durability:
        t = text.strip().lower()
        if t in ("", "none"):
            return cls("none")
        if t == "aof-local":
            return cls("aof-local", 0, timeout_ms)
        if t.startswith("replicas="):
            try:
                n = int(t.split("=", 1)[1])
            except ValueError:
                n = -1
            if n >= 1:
                return cls("replicas", n, timeout_ms)
        raise StateError(f"durability: expected none, aof-local or replicas=N (N >= 1), got {text!r}")

    async def check(self, conn: Any) -> None:
        """Refuse a setting the server cannot honour (WAITAOF needs Redis >= 7.2; not in a cluster)."""
        if conn.cluster:
            raise StateError("durability: WAIT/WAITAOF apply to one connection's writes; with Redis Cluster "
                             "use durability none and the servers' appendfsync setting")
        if self.kind == "aof-local":
            info = await conn.call(conn.client.info("server"), "INFO")
            version = tuple(int(x) for x in str(info.get("redis_version", "0")).split(".")[:2])
            if version < (7, 2):
                raise StateError(f"durability aof-local: needs WAITAOF (Redis >= 7.2), this server is "
                                 f"{info.get('redis_version')}; use 'appendfsync always' on the server instead")
            persistence = await conn.call(conn.client.info("persistence"), "INFO")
            if str(persistence.get("aof_enabled", "0")) != "1":
                raise StateError("durability aof-local: the server runs without an AOF (appendonly no)")

    def queue(self, pipe: Any) -> None:
        """Add the wait to the save's pipeline (same connection: it waits for these writes)."""
        if self.kind == "aof-local":
            pipe.execute_command("WAITAOF", 1, 0, self.timeout_ms)
        else:
            pipe.execute_command("WAIT", self.replicas, self.timeout_ms)

    def verify(self, reply: Any, url: str) -> None:
        if self.kind == "aof-local":
            local = int(reply[0]) if isinstance(reply, (list, tuple)) else int(reply)
            if local < 1:
                raise StateUnavailable(f"Redis at {url}: the save was not fsynced to the AOF within "
                                       f"{self.timeout_ms} ms (durability aof-local)")
        elif int(reply) < self.replicas:
            raise StateUnavailable(f"Redis at {url}: {int(reply)} of {self.replicas} replica(s) acknowledged the "
                                   f"save within {self.timeout_ms} ms (durability replicas={self.replicas})")
