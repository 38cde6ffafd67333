"""Consumer-group health: a worker that is in its group but does not work says so, and rejoins.

Issue 12.12: after a SIGTERM hit the group leader while a restarted worker's join was pending,
that worker stayed in the group as a follower that never synced (re-joining about every 60 s
without a partition) while 10,000 events waited, and nothing said so. docs/resilience.md has
the analysis. Whoever is at fault, the worker now watches itself:

- **no_sync**: a rebalance began (partitions revoked, or the first join) and no assignment has
  come for longer than ``sync_bound`` seconds;
- **idle_with_backlog**: the worker holds no input partition, the input topic has records past
  the group's committed offsets, and those offsets have not moved for ``idle_bound`` seconds
  (nobody else is consuming them either). A worker that holds nothing because the group has
  more members than partitions is fine as long as the others make progress.

:func:`assess` is the decision, a pure function of a :class:`GroupSnapshot`. :class:`GroupHealth`
feeds it from Faust's rebalance signals and, only while the worker holds no partition, from a
probe of the broker (committed offsets, and whether a record exists past them). When it says
"stuck", ``/healthz`` answers 503 with ``"group"`` details, ``lstream_group_stuck{reason}`` is 1,
one error line is logged per episode, and the worker leaves its group and joins again (a new
member id), at most once per ``sync_bound``, counted in ``lstream_group_rejoins_total``.

>>> s = GroupSnapshot(now=100.0, assigned=0, rebalancing_since=10.0, synced_at=None, backlog=None,
...                   progress_at=None)
>>> assess(s, sync_bound=60.0, idle_bound=60.0).reason
'no_sync'
>>> assess(GroupSnapshot(100.0, 2, None, 50.0, None, None), sync_bound=60.0, idle_bound=60.0).stuck
False
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

log = logging.getLogger("lstream.worker")

NO_SYNC = "no_sync"
IDLE_WITH_BACKLOG = "idle_with_backlog"
REASONS = (NO_SYNC, IDLE_WITH_BACKLOG)


@dataclass(frozen=True)
class GroupSnapshot:
    """What the worker knows about its place in the group at ``now`` (monotonic seconds)."""

    now: float
    assigned: int  # input partitions this worker holds
    rebalancing_since: float | None  # a rebalance began then and no assignment has come since
    synced_at: float | None  # the last assignment received
    backlog: int | None  # records found past the group's committed offsets (None: not probed)
    progress_at: float | None  # the last time the group's committed offsets moved (or first probe)


@dataclass(frozen=True)
class Verdict:
    stuck: bool
    reason: str | None = None
    detail: str = ""


OK = Verdict(False)


def assess(s: GroupSnapshot, *, sync_bound: float, idle_bound: float) -> Verdict:
    """Is the worker stuck in its group, and why?

    >>> base = GroupSnapshot(now=1000.0, assigned=0, rebalancing_since=None, synced_at=900.0,
    ...                      backlog=5, progress_at=930.0)
    >>> v = assess(base, sync_bound=60, idle_bound=60)
    >>> v.stuck, v.reason, v.detail.endswith("have not moved for 70 s (bound 60 s)")
    (True, 'idle_with_backlog', True)
    >>> assess(replace(base, progress_at=990.0), sync_bound=60, idle_bound=60).stuck  # others progress
    False
    >>> assess(replace(base, backlog=0), sync_bound=60, idle_bound=60).stuck  # nothing to do
    False
    >>> assess(replace(base, assigned=1), sync_bound=60, idle_bound=60).stuck
    False
    >>> assess(replace(base, rebalancing_since=950.0), sync_bound=60, idle_bound=60).stuck  # joining
    False
    """
    if s.rebalancing_since is not None:
        waited = s.now - s.rebalancing_since
        if waited > sync_bound:
            since = "never" if s.synced_at is None else f"{s.now - s.synced_at:.0f} s ago"
            return Verdict(True, NO_SYNC, f"in a rebalance for {waited:.0f} s without an assignment (bound "
                                          f"{sync_bound:.0f} s); last assignment: {since}")
        return OK
    if s.assigned == 0 and s.backlog and s.progress_at is not None:
        still = s.now - s.progress_at
        if still > idle_bound:
            return Verdict(True, IDLE_WITH_BACKLOG,
                           f"holds no partition while {s.backlog}+ input records wait past the group's committed "
                           f"offsets, which have not moved for {still:.0f} s (bound {idle_bound:.0f} s)")
    return OK


# ---------------------------------------------------------------------------- the monitor


class GroupHealth:
    """Tracks the worker's rebalances, probes the broker when idle, decides, reports, rejoins."""

    def __init__(self, *, sync_bound: float, idle_bound: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.sync_bound = sync_bound
        self.idle_bound = idle_bound
        self.clock = clock
        now = clock()
        self.snapshot = GroupSnapshot(now=now, assigned=0, rebalancing_since=now, synced_at=None, backlog=None,
                                      progress_at=None)
        self.verdict = OK
        self.committed: dict[int, int] | None = None
        self.rejoins = 0
        self.episodes = {r: 0 for r in REASONS}
        self.last_rejoin: float | None = None
        self.probe_error: str | None = None
        self.healed = 0  # departed leaders found and taken over (stale_leader, rejoin)

    # Rebalance events (Faust's on_partitions_revoked / on_partitions_assigned).
    def on_revoked(self) -> None:
        if self.snapshot.rebalancing_since is None:
            self.snapshot = replace(self.snapshot, rebalancing_since=self.clock())

    def on_assigned(self, n_input_partitions: int) -> None:
        now = self.clock()
        self.snapshot = replace(self.snapshot, rebalancing_since=None, synced_at=now, assigned=n_input_partitions,
                                backlog=None, progress_at=None)
        self.committed = None

    def observe_probe(self, committed: dict[int, int], backlog: int) -> None:
        """The group's committed offsets and the records found past them (a lower bound)."""
        now = self.clock()
        moved = self.committed is None or committed != self.committed or self.snapshot.progress_at is None
        self.committed = dict(committed)
        self.snapshot = replace(self.snapshot, backlog=backlog,
                                progress_at=now if moved else self.snapshot.progress_at)

    def update(self, assigned: int) -> Verdict:
        """Decide with the current assignment; log the start and the end of a stuck episode."""
        self.snapshot = replace(self.snapshot, now=self.clock(), assigned=assigned)
        if assigned and self.snapshot.rebalancing_since is None:
            self.snapshot = replace(self.snapshot, backlog=None, progress_at=None)
        verdict = assess(self.snapshot, sync_bound=self.sync_bound, idle_bound=self.idle_bound)
        if verdict.stuck and not self.verdict.stuck:
            self.episodes[verdict.reason or NO_SYNC] += 1
            log.error("consumer group stuck (%s): %s; leaving the group and joining again", verdict.reason,
                      verdict.detail)
        elif self.verdict.stuck and not verdict.stuck:
            log.info("consumer group healthy again: %d input partition(s) assigned", assigned)
        self.verdict = verdict
        return verdict

    def should_rejoin(self) -> bool:
        now = self.clock()
        return self.verdict.stuck and (self.last_rejoin is None or now - self.last_rejoin > self.sync_bound)

    def doc(self) -> dict[str, Any]:
        """The ``group`` part of ``/healthz``."""
        s = self.snapshot
        now = self.clock()
        return {"state": "stuck" if self.verdict.stuck else ("rebalancing" if s.rebalancing_since is not None
                                                              else "stable"),
                "reason": self.verdict.reason, "detail": self.verdict.detail or None,
                "seconds_since_sync": None if s.synced_at is None else round(now - s.synced_at, 1),
                "rejoins": self.rejoins, "stale_leaders_cleared": self.healed, "backlog": s.backlog,
                "probe_error": self.probe_error}

    def collect(self) -> Iterator[Any]:
        """Prometheus collector: ``lstream_group_stuck``, ``lstream_group_rejoins_total``,
        ``lstream_group_seconds_since_sync`` (NaN before the first assignment)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stuck = GaugeMetricFamily("lstream_group_stuck", "1 while the worker is stuck in its consumer group, by "
                                  "reason (no_sync, idle_with_backlog; docs/resilience.md).", labels=["reason"])
        for r in REASONS:
            stuck.add_metric([r], 1.0 if self.verdict.reason == r else 0.0)
        yield stuck
        episodes = CounterMetricFamily("lstream_group_stuck_episodes", "Stuck episodes seen, by reason.",
                                       labels=["reason"])
        for r in REASONS:
            episodes.add_metric([r], float(self.episodes[r]))
        yield episodes
        yield CounterMetricFamily("lstream_group_rejoins", "Times the worker left its group and joined again "
                                  "because it was stuck.", value=float(self.rejoins))
        yield CounterMetricFamily("lstream_group_stale_leaders_cleared", "Departed group leaders the broker still "
                                  "named, cleared by the worker (docs/resilience.md).", value=float(self.healed))
        s = self.snapshot
        yield GaugeMetricFamily("lstream_group_seconds_since_sync", "Seconds since the worker last received a "
                                "partition assignment (NaN: never).",
                                value=float("nan") if s.synced_at is None else self.clock() - s.synced_at)


# ---------------------------------------------------------------------------- broker side


async def probe_group(broker_hosts: str, group_id: str, topic: str, timeout: float = 5.0) -> tuple[dict[int, int], int]:
    """The group's committed offset per partition of ``topic`` (0 where none) and how many
    records a fetch from those offsets returned (a lower bound of the backlog).

    Tansu's ``end_offsets()`` is wrong (tests/kafkautil.py), so the backlog is found by fetching,
    not by subtracting offsets."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    # A consumer that names the group but never joins it: OffsetFetch works without a
    # membership (Tansu answers the admin client's ListConsumerGroupOffsets with a body aiokafka
    # 0.14 cannot decode), and a manual assignment reads without disturbing the group.
    consumer = AIOKafkaConsumer(bootstrap_servers=broker_hosts, group_id=group_id, enable_auto_commit=False,
                                fetch_max_wait_ms=100, request_timeout_ms=int(timeout * 1000))
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        committed = {}
        for tp in tps:
            offset = await asyncio.wait_for(consumer.committed(tp), timeout)
            committed[tp.partition] = offset if offset is not None and offset >= 0 else 0
        if not tps:
            return committed, 0
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, committed[tp.partition])
        batch = await consumer.getmany(timeout_ms=int(timeout * 500), max_records=1000)
        return committed, sum(len(v) for v in batch.values())
    finally:
        await consumer.stop()


MEMBER_ID_REQUIRED = 79
HEALER_SESSION_MS = 6000  # the probe's join: Kafka's smallest default session; Tansu answers a join in about half
HEALER_PROTOCOLS = ("faust", "range", "roundrobin", "sticky")  # the group's protocol must be among these


async def stale_leader(broker_hosts: str, group_id: str, topic: str, timeout: float = 15.0) -> str | None:
    """The member id the broker names as the group's leader if that member has left the group
    (Tansu's defect, docs/resilience.md), else None.

    Tansu (0.6) keeps naming a member that left with LeaveGroup while the group was forming as
    its leader: every JoinGroup answers with it, every follower's SyncGroup with
    REBALANCE_IN_PROGRESS, for ever. A short-lived member joins (the answer names the leader),
    leaves, and DescribeGroups says whether that leader is still a member."""
    from aiokafka.client import AIOKafkaClient
    from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata
    from aiokafka.protocol.admin import DescribeGroupsRequest
    from aiokafka.protocol.group import JoinGroupRequest, LeaveGroupRequest

    metadata = ConsumerProtocolMemberMetadata(0, [topic], b"").encode()
    protocols = [(name, metadata) for name in HEALER_PROTOCOLS]
    client = AIOKafkaClient(bootstrap_servers=broker_hosts, request_timeout_ms=int(timeout * 1000))
    await client.bootstrap()
    try:
        node = await asyncio.wait_for(client.coordinator_lookup(0, group_id), timeout)
        member = ""
        while True:
            probe = await client.send(node, JoinGroupRequest(group_id, HEALER_SESSION_MS, HEALER_SESSION_MS,
                                                             member, None, "consumer", protocols))
            if probe.error_code != MEMBER_ID_REQUIRED:
                break
            member = probe.member_id
        if member:
            await client.send(node, LeaveGroupRequest(group_id, member))
        if probe.error_code:
            return None
        leader = probe.leader_id
        described = await client.send(node, DescribeGroupsRequest([group_id]))
        members = {m[0] for g in described.groups for m in g[5]} if described.groups else set()
        if not leader or leader == member or leader in members:
            return None  # no leader, or a live one
        return str(leader)
    finally:
        await client.close()


async def rejoin(app: Any, as_member: str | None = None, patience: float = 30.0) -> None:
    """Leave the consumer group and join again (in Faust's consumer thread): with a new member
    id, or under ``as_member``: the departed leader's id, which Tansu accepts and then treats
    this worker as the leader, so the group forms (the work-around for its stale leader)."""
    thread = app.consumer._thread
    consumer = thread._ensure_consumer()

    async def leave_and_join() -> None:
        coordinator = consumer._coordinator
        await coordinator._maybe_leave_group()  # LeaveGroup, then forget generation and member id
        if as_member is None:
            return  # reset_generation() asked for a rejoin
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline:
            # Set without yielding in between, so the next JoinGroup carries it; a join that was
            # already in flight may overwrite it with its answer: set it again.
            if coordinator.member_id != as_member:
                coordinator.member_id = as_member
                coordinator.request_rejoin()
            elif consumer.assignment():
                return
            await asyncio.sleep(0.5)

    await thread.call_thread(leave_and_join)


def attach(app: Any, runtime: Any, *, interval: float = 5.0) -> GroupHealth:
    """Wire a :class:`GroupHealth` into the Faust app: rebalance signals, a periodic check, the
    metrics registry; ``runtime.group_health`` is what ``/healthz`` reads."""
    s = runtime.settings
    bound = float(getattr(s, "group_stall_timeout", 0) or max(30.0, 6.0 * s.session_timeout))
    gh = GroupHealth(sync_bound=bound, idle_bound=bound)
    runtime.group_health = gh
    registry = getattr(getattr(runtime, "metrics", None), "registry", None)
    if registry is not None:
        registry.register(gh)

    def input_partitions(tps: Any) -> int:
        return sum(1 for tp in tps or () if tp.topic == s.input_topic)

    task: list[asyncio.Task[None]] = []

    async def revoked(*args: Any, **kwargs: Any) -> None:
        gh.on_revoked()
        # The checks run as a plain task started at the first rebalance (the worker's first
        # join revokes the empty set): Faust starts its timers only after the first assignment
        # and recovery, which a worker stuck in its group never reaches.
        if not task:
            task.append(asyncio.get_running_loop().create_task(watch()))

    async def assigned(sender: Any = None, assigned: Any = None, **kwargs: Any) -> None:
        gh.on_assigned(input_partitions(assigned))

    app.on_partitions_revoked.connect(revoked)
    app.on_partitions_assigned.connect(assigned)

    from worker.settings import broker_hosts

    hosts = ",".join(broker_hosts(s.broker))

    async def check() -> None:
        if getattr(runtime, "stopping", False):
            return
        try:
            held = input_partitions(app.consumer.assignment())
        except Exception:  # consumer not started yet
            held = 0
        if held == 0 and gh.snapshot.rebalancing_since is None:
            try:
                committed, backlog = await probe_group(hosts, s.app_id, s.input_topic)
                gh.observe_probe(committed, backlog)
                gh.probe_error = None
            except Exception as exc:  # the broker is down: its own outage handling reports that
                gh.probe_error = f"{type(exc).__name__}: {exc}"
        gh.update(held)
        if gh.should_rejoin():
            gh.last_rejoin = gh.clock()
            gh.rejoins += 1
            try:
                stale = await stale_leader(hosts, s.app_id, s.input_topic) if gh.verdict.reason == NO_SYNC else None
                if stale:
                    gh.healed += 1
                    log.error("the broker names departed member %s as the leader of group %r (a Tansu defect, "
                              "docs/resilience.md): joining under that id to lead the group", stale, s.app_id)
                await rejoin(app, as_member=stale)
            except Exception as exc:
                log.error("could not leave and rejoin the consumer group: %s: %s", type(exc).__name__, exc)

    async def watch() -> None:
        while not getattr(runtime, "stopping", False):
            await asyncio.sleep(interval)
            try:
                await check()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let the watch die
                log.error("consumer group check failed: %s: %s", type(exc).__name__, exc)

    return gh
