"""The storage writer, the device actor and the router, against an in-memory store.

:class:`FakeStore` implements :class:`storage.interfaces.IngestStore` the way SQLite does it
(one transaction per commit, the latest state per device wins) and records every attempt, so
tests can see what was committed when. It can be told to fail the next commits with
:class:`StorageError`, to crash, or to hold commits until an event is set.

Everything runs on trio's autojump clock: restart backoff, commit retries and idle timeouts
take virtual time only.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import cbor2
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from actors.alerts import AlertRule, AlertSignal, AlertSink
from actors.device import DeviceActorConfig
from actors.messages import Completion, DeviceMessage, Link, LinkEvent, Outcome, Publish
from actors.router import Router, RouterConfig
from actors.sequence import SequenceTracker
from actors.stats import IngestStats
from actors.supervisor import RestartPolicy, supervise
from actors.writer import StorageWriter, WriteRequest
from storage.contract import Measurements, QuarantineReason, TopicKind, format_ts, topic_for
from storage.errors import StorageError
from storage.records import DeviceBatch, DeviceStateRecord, RawMessage, TelemetryRow
from storage.validation import DeviceContext, DeviceProfile, RegisterMark, SupplySystem

#: A test that has not finished after this much virtual time is stuck (a completion that never
#: resolves, a close that never returns); fail it instead of letting the clock jump forever.
STUCK_AFTER = 24 * 3600.0

BASE_TS = datetime(2026, 11, 23, 16, 5, tzinfo=UTC)
#: Wall-clock receive times a day after BASE_TS (plus virtual time): the readings of these
#: tests are in the device's past, as real ones are, and pass the future-timestamp rule.
RECEIVED_BASE = (BASE_TS + timedelta(days=1)).timestamp()


# -- payloads ---------------------------------------------------------------------------------


def telemetry(device_id: str, boot: int, seq: int, /, **overrides: Any) -> bytes:
    """A valid protocol v2 telemetry payload (the single-reading form), one reading a second."""
    doc: dict[str, Any] = {
        "v": 2,
        "device_id": device_id,
        "boot": boot,
        "seq": seq,
        "ts": format_ts(BASE_TS + timedelta(seconds=seq)),
        "m": {
            "voltage_v": 1512.3,
            "current_a": 230.4,
            "power_kw": 348.4,
            "energy_import_kwh": 123456.789 + seq / 10,
            "energy_export_kwh": 2345.6,
        },
        "loc": {"lat": 52.0907, "lon": 5.1214},
    }
    doc.update(overrides)
    return json.dumps(doc).encode()


def publish(
    device_id: str,
    boot: int = 1,
    seq: int = 0,
    *,
    payload: bytes | None = None,
    kind: TopicKind = TopicKind.TELEMETRY,
) -> Publish:
    return Publish(
        device_id=device_id,
        kind=kind,
        topic=topic_for(device_id, kind),
        payload=telemetry(device_id, boot, seq) if payload is None else payload,
        received_at=RECEIVED_BASE + trio.current_time(),
        done=Completion(),
    )


def done_of(msg: Publish) -> Completion:
    assert msg.done is not None
    return msg.done


# -- the in-memory store ----------------------------------------------------------------------


class StoreBugError(Exception):
    """Not a StorageError: a bug, which the writer does not retry but its supervisor does."""


@dataclass
class FakeStore:
    states: dict[str, DeviceStateRecord] = field(default_factory=dict)
    rows: dict[tuple[str, int, int], TelemetryRow] = field(default_factory=dict)
    #: Rows the actors tried to store although they were stored already (must stay empty).
    rows_twice: list[tuple[str, int, int]] = field(default_factory=list)
    quarantined: list[tuple[str, QuarantineReason]] = field(default_factory=list)
    archived: list[tuple[str, RawMessage]] = field(default_factory=list)
    #: The batches of every successful commit, one list per transaction.
    commits: list[list[DeviceBatch]] = field(default_factory=list)
    #: When each commit was attempted (virtual time), failed or not.
    attempts: list[float] = field(default_factory=list)
    loads: list[str] = field(default_factory=list)
    fail_next: int = 0
    crash_next: int = 0
    #: While set to an unset event, commits wait for it.
    hold: trio.Event | None = None
    #: How long a commit takes (virtual time): SQLite with fsync takes milliseconds.
    commit_seconds: float = 0.0
    #: Registered devices (type, supply system); a device missing here is validated without.
    profiles: dict[str, DeviceProfile] = field(default_factory=dict)

    async def load_device_state(self, device_id: str) -> DeviceStateRecord | None:
        await trio.lowlevel.checkpoint()
        self.loads.append(device_id)
        return self.states.get(device_id)

    async def load_device_context(self, device_id: str, boot: int | None) -> DeviceContext:
        """Like SQLite: the registered profile, and the registers of the highest stored seq of *boot*."""
        await trio.lowlevel.checkpoint()
        mine = [(seq, row) for (dev, b, seq), row in self.rows.items() if dev == device_id and b == boot]
        mark = None
        if boot is not None and mine:
            seq, row = max(mine, key=lambda item: item[0])
            mark = RegisterMark(boot, seq, Measurements.model_validate_json(row.m_json))
        return DeviceContext(self.profiles.get(device_id), mark)

    async def commit(self, batches: Sequence[DeviceBatch]) -> None:
        self.attempts.append(trio.current_time())
        if self.hold is not None:
            await self.hold.wait()
        await trio.sleep(self.commit_seconds)
        if self.crash_next > 0:
            self.crash_next -= 1
            raise StoreBugError
        if self.fail_next > 0:
            self.fail_next -= 1
            raise StorageError("database is locked (injected)")
        for batch in batches:
            self.states[batch.device_id] = batch.state
            for raw in batch.messages:
                self.archived.append((batch.device_id, raw))
                self.quarantined += [(batch.device_id, q.reason) for q in raw.quarantine]
                for row in raw.telemetry:
                    key = (batch.device_id, row.boot, row.seq)
                    if key in self.rows:
                        self.rows_twice.append(key)
                    self.rows[key] = row
        self.commits.append(list(batches))

    def stored(self, device_id: str) -> set[tuple[int, int]]:
        return {(boot, seq) for dev, boot, seq in self.rows if dev == device_id}

    def counters(self, device_id: str) -> dict[str, int]:
        return self.states[device_id].counters

    def batches_of(self, device_id: str) -> list[DeviceBatch]:
        return [b for group in self.commits for b in group if b.device_id == device_id]


def counters(**values: int) -> dict[str, int]:
    """A full counters dict: unnamed counters are 0."""
    names = ("received", "stored", "duplicates", "missing", "late", "resets", "quarantined")
    assert set(values) <= set(names)
    return {name: values.get(name, 0) for name in names}


# -- the node around the actors -----------------------------------------------------------------


@dataclass
class Node:
    store: FakeStore
    stats: IngestStats
    writer: StorageWriter
    router: Router

    async def send(self, *msgs: DeviceMessage) -> list[Outcome]:
        """Deliver all of *msgs* (so that they can share a batch), then wait for their outcomes."""
        for msg in msgs:
            await self.router.deliver(msg)
        return [await done_of(m).wait() for m in msgs if isinstance(m, Publish)]


@asynccontextmanager
async def running_node(
    store: FakeStore | None = None,
    *,
    config: RouterConfig | None = None,
    fault_hook: FaultHook | None = None,
    alerts: AlertSink | None = None,
) -> AsyncIterator[Node]:
    """A writer and a router in a nursery, closed in shutdown order (router, then writer)."""
    store = store if store is not None else FakeStore()
    stats = IngestStats()
    writer = StorageWriter(store, stats)
    router = Router(store, writer, stats, config, fault_hook=fault_hook, alerts=alerts)
    try:
        with trio.fail_after(STUCK_AFTER):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.run, name="writer")
                await nursery.start(router.run)
                yield Node(store, stats, writer, router)
                await router.close()
                writer.mailbox.close_sending()
    finally:
        writer.mailbox.close()


class DeviceFaultError(Exception):
    pass


@dataclass
class FaultHook:
    """The router's ``fault_hook``: makes a device actor raise while handling chosen messages."""

    #: (device, boot, seq) to crash on, once each.
    once: set[tuple[str, int, int]] = field(default_factory=set)
    #: Devices whose every PUBLISH crashes their actor.
    always: set[str] = field(default_factory=set)
    crashes: list[tuple[str, int]] = field(default_factory=list)

    def __call__(self, device_id: str, msg: DeviceMessage) -> None:
        if not isinstance(msg, Publish):
            return
        doc = json.loads(msg.payload)
        key = (device_id, doc["boot"], doc["seq"])
        if key in self.once or device_id in self.always:
            self.once.discard(key)
            self.crashes.append((device_id, doc["seq"]))
            raise DeviceFaultError(f"injected fault on {key}")


def request(device_id: str, n: int) -> WriteRequest:
    """A write request of one device batch with *n* archived messages, and one completion."""
    messages = [RawMessage(topic_for(device_id, TopicKind.TELEMETRY), 0.0, b"{}") for _ in range(n)]
    state = DeviceStateRecord(device_id, 1, 0, n - 1, (), counters(stored=n), None, online=True)
    return WriteRequest(DeviceBatch(device_id, messages, state), [Completion()])


def outcomes(requests: Iterable[WriteRequest]) -> list[Outcome | None]:
    return [c.outcome for r in requests for c in r.completions]


# -- the storage writer -----------------------------------------------------------------------


@pytest.mark.trio
async def test_writer_commits_everything_waiting_as_one_group(autojump_clock: trio.testing.MockClock) -> None:
    store = FakeStore()
    stats = IngestStats()
    writer = StorageWriter(store, stats)
    requests = [request("a", 2), request("b", 1), request("a", 3)]
    for r in requests:
        await writer.submit(r)
    writer.mailbox.close_sending()
    await writer.run()
    writer.mailbox.close()

    assert [[b.device_id for b in group] for group in store.commits] == [["a", "b", "a"]]
    assert outcomes(requests) == [Outcome.DURABLE] * 3
    assert (stats.commits, stats.commit_rows, stats.commit_failures) == (1, 6, 0)
    # The latest state of a device wins.
    assert store.states["a"].high == 2


@pytest.mark.trio
async def test_writer_resolves_completions_only_after_the_commit() -> None:
    store = FakeStore(hold=trio.Event())
    writer = StorageWriter(store, IngestStats())
    first, second, third = request("a", 1), request("b", 1), request("c", 1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        await writer.submit(first)
        await trio.testing.wait_all_tasks_blocked()
        assert len(store.attempts) == 1  # the writer is inside commit([first])
        await writer.submit(second)
        await writer.submit(third)
        await trio.testing.wait_all_tasks_blocked()
        assert outcomes([first, second, third]) == [None] * 3
        assert store.commits == []

        assert store.hold is not None
        store.hold.set()
        for r in (first, second, third):
            assert await r.completions[0].wait() is Outcome.DURABLE
        writer.mailbox.close_sending()
    writer.mailbox.close()
    # What queued up during the first commit went in together, as the second group.
    assert [[b.device_id for b in group] for group in store.commits] == [["a"], ["b", "c"]]


@pytest.mark.trio
async def test_writer_groups_at_most_max_group_requests() -> None:
    store = FakeStore()
    writer = StorageWriter(store, IngestStats(), max_group=2)
    requests = [request(f"d{i}", 1) for i in range(5)]
    for r in requests:
        writer.mailbox.send_nowait(r)
    writer.mailbox.close_sending()
    await writer.run()
    writer.mailbox.close()
    assert [len(group) for group in store.commits] == [2, 2, 1]
    assert outcomes(requests) == [Outcome.DURABLE] * 5


@pytest.mark.trio
async def test_barrier_returns_once_earlier_requests_are_committed() -> None:
    store = FakeStore(hold=trio.Event())
    writer = StorageWriter(store, IngestStats())
    earlier = request("a", 1)
    passed = trio.Event()

    async def barrier() -> None:
        await writer.barrier()
        passed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        await writer.submit(earlier)
        nursery.start_soon(barrier)
        await trio.testing.wait_all_tasks_blocked()
        assert not passed.is_set()
        assert store.hold is not None
        store.hold.set()
        await passed.wait()
        assert earlier.completions[0].outcome is Outcome.DURABLE
        writer.mailbox.close_sending()
    writer.mailbox.close()


@pytest.mark.trio
async def test_a_failing_store_is_retried_with_backoff_and_nothing_is_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FakeStore(fail_next=4)
    stats = IngestStats()
    writer = StorageWriter(store, stats, retry_initial=0.05, retry_max=5.0)
    first = request("a", 1)
    later = [request("b", 2), request("a", 1)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        await writer.submit(first)
        await trio.sleep(0.5)  # inside the outage: attempts at 0, 0.05, 0.15 and 0.35 failed
        assert outcomes([first]) == [None]
        assert store.commits == []
        for r in later:
            await writer.submit(r)
        assert await first.completions[0].wait() is Outcome.DURABLE
        for r in later:
            assert await r.completions[0].wait() is Outcome.DURABLE
        writer.mailbox.close_sending()
    writer.mailbox.close()

    # The delay doubles from retry_initial: 0.05, 0.1, 0.2, 0.4; then the same group succeeds.
    assert store.attempts[:5] == pytest.approx([0.0, 0.05, 0.15, 0.35, 0.75])
    assert [[b.device_id for b in group] for group in store.commits] == [["a"], ["b", "a"]]
    assert (stats.commit_failures, stats.commits) == (4, 2)


@pytest.mark.trio
async def test_retry_delay_is_capped(autojump_clock: trio.testing.MockClock) -> None:
    store = FakeStore(fail_next=5)
    writer = StorageWriter(store, IngestStats(), retry_initial=0.05, retry_max=0.1)
    only = request("a", 1)
    await writer.submit(only)
    writer.mailbox.close_sending()
    await writer.run()
    writer.mailbox.close()
    gaps = [b - a for a, b in zip(store.attempts, store.attempts[1:], strict=False)]
    assert gaps == pytest.approx([0.05, 0.1, 0.1, 0.1, 0.1])
    assert outcomes([only]) == [Outcome.DURABLE]


@pytest.mark.trio
async def test_a_restarted_writer_retries_the_group_it_held(autojump_clock: trio.testing.MockClock) -> None:
    store = FakeStore(crash_next=1)
    writer = StorageWriter(store, IngestStats())
    held = request("a", 1)
    await writer.submit(held)
    writer.mailbox.close_sending()
    restarts: list[BaseException] = []
    await supervise("writer", writer.run, RestartPolicy(), on_restart=lambda _, e: restarts.append(e))
    writer.mailbox.close()
    assert [type(e) for e in restarts] == [StoreBugError]
    assert len(store.commits) == 1
    assert outcomes([held]) == [Outcome.DURABLE]


@pytest.mark.trio
async def test_fail_pending_fails_the_held_group_and_the_queue() -> None:
    store = FakeStore(hold=trio.Event())
    writer = StorageWriter(store, IngestStats())
    held, queued = request("a", 1), request("b", 1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        await writer.submit(held)
        await trio.testing.wait_all_tasks_blocked()
        await writer.submit(queued)
        assert len(writer.mailbox) == 1
        nursery.cancel_scope.cancel()  # the node stops while the commit hangs
    writer.fail_pending()
    writer.mailbox.close()
    assert outcomes([held, queued]) == [Outcome.FAILED, Outcome.FAILED]
    assert store.commits == []


# -- device actors behind the router ------------------------------------------------------------


@pytest.mark.trio
async def test_publishes_become_rows_and_counters(autojump_clock: trio.testing.MockClock) -> None:
    async with running_node() as node:
        dev = "emu-4021-m1"
        for boot, seq in [(1, 0), (1, 1), (1, 2), (1, 2), (1, 5), (1, 3), (2, 0), (1, 4)]:
            assert await node.send(publish(dev, boot, seq)) == [Outcome.DURABLE]
        bad = [
            publish(dev, payload=telemetry(dev, 2, 1, seq="one")),
            publish(dev, payload=telemetry("someone-else", 2, 1)),
            publish(dev, payload=b"\xff not json"),
            publish(dev, payload=b"\xa1", kind=TopicKind.TELEMETRY_CBOR),
        ]
        status = publish(dev, payload=b"online", kind=TopicKind.STATUS)
        # Quarantined and status messages are durable too: they are acknowledged.
        assert await node.send(*bad, status) == [Outcome.DURABLE] * 5

        store = node.store
        assert store.stored(dev) == {(1, 0), (1, 1), (1, 2), (1, 3), (1, 5), (2, 0)}
        assert store.rows_twice == []
        # Boot 1 never got seq 4 before the reset; the late (1, 4) is stale, not a fill.
        assert store.counters(dev) == counters(
            received=12, stored=6, duplicates=1, missing=1, late=1, resets=1, quarantined=5
        )
        assert sorted(reason for _, reason in store.quarantined) == sorted(
            [
                QuarantineReason.STALE_BOOT,
                QuarantineReason.SCHEMA,
                QuarantineReason.DEVICE_MISMATCH,
                QuarantineReason.NOT_UTF8_JSON,
                QuarantineReason.NOT_CBOR,
            ]
        )
        # Everything but the duplicate and the status message is archived raw.
        assert len(store.archived) == 11
        state = store.states[dev]
        assert (state.boot, state.low, state.high, state.gaps) == (2, 0, 0, ())
        row = store.rows[(dev, 1, 5)]
        assert row.ts_ms == int((BASE_TS + timedelta(seconds=5)).timestamp() * 1000)
        assert json.loads(row.m_json)["voltage_v"] == 1512.3
        assert row.loc_json is not None
        assert json.loads(row.loc_json) == {"lat": 52.0907, "lon": 5.1214}

        stats = node.stats
        assert (stats.publishes, stats.readings_stored, stats.readings_duplicate, stats.readings_late) == (
            13,
            6,
            1,
            1,
        )
        assert sum(stats.quarantined.values()) == 5


@pytest.mark.trio
async def test_messages_waiting_together_are_one_batch(autojump_clock: trio.testing.MockClock) -> None:
    async with running_node() as node:
        # The actor starts on the first message and drains the rest with it in one batch.
        assert await node.send(*(publish("emu-1", 3, seq) for seq in range(10, 15))) == [Outcome.DURABLE] * 5
        (batch,) = node.store.batches_of("emu-1")
        assert [r.telemetry[0].seq for r in batch.messages] == [10, 11, 12, 13, 14]
        assert node.store.counters("emu-1") == counters(received=5, stored=5)


@pytest.mark.trio
async def test_links_update_liveness(autojump_clock: trio.testing.MockClock) -> None:
    async with running_node() as node:
        await node.router.deliver(Link("emu-1", LinkEvent.CONNECTED, 100.0))
        await trio.testing.wait_all_tasks_blocked()
        assert (node.store.states["emu-1"].online, node.store.states["emu-1"].last_seen) == (True, 100.0)
        await node.router.deliver(Link("emu-1", LinkEvent.DISCONNECTED, 160.0))
        await trio.testing.wait_all_tasks_blocked()
        assert (node.store.states["emu-1"].online, node.store.states["emu-1"].last_seen) == (False, 160.0)


@pytest.mark.trio
async def test_a_crash_fails_only_its_batch_and_the_restart_reloads_state(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hook = FaultHook(once={("emu-1", 1, 4)})
    async with running_node(fault_hook=hook) as node:
        assert await node.send(*(publish("emu-1", 1, seq) for seq in range(3))) == [Outcome.DURABLE] * 3
        assert await node.send(publish("emu-2", 7, 0)) == [Outcome.DURABLE]

        # 3, 4 and 5 arrive together: the crash on 4 fails the whole batch, before and after it.
        crashed = [publish("emu-1", 1, seq) for seq in (3, 4, 5)]
        meanwhile = publish("emu-2", 7, 1)
        assert await node.send(*crashed, meanwhile) == [Outcome.FAILED] * 3 + [Outcome.DURABLE]
        assert hook.crashes == [("emu-1", 4)]
        assert node.stats.actor_restarts == 1
        assert node.store.stored("emu-1") == {(1, 0), (1, 1), (1, 2)}

        # Not acknowledged, so the meter resends them; the restarted actor stores each once.
        assert await node.send(*(publish("emu-1", 1, seq) for seq in (3, 4, 5))) == [Outcome.DURABLE] * 3
        assert node.store.loads.count("emu-1") == 2
        assert node.store.stored("emu-1") == {(1, seq) for seq in range(6)}
        # The failed batch left no trace in the counters: they come from the committed state.
        assert node.store.counters("emu-1") == counters(received=6, stored=6)

        assert node.store.loads.count("emu-2") == 1
        assert node.store.stored("emu-2") == {(7, 0), (7, 1)}
        assert node.stats.actors_started == 2
        assert node.store.rows_twice == []


@pytest.mark.trio
async def test_a_crash_in_the_first_batch_of_a_new_device_loses_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Nothing of the device is committed yet, so there is no state to reload: the restarted
    # actor must still forget what the failed batch did to its tracker.
    hook = FaultHook(once={("emu-1", 1, 2)})
    async with running_node(fault_hook=hook) as node:
        first_try = [publish("emu-1", 1, seq) for seq in range(3)]
        assert await node.send(*first_try) == [Outcome.FAILED] * 3
        assert await node.send(*(publish("emu-1", 1, seq) for seq in range(3))) == [Outcome.DURABLE] * 3
        assert node.store.stored("emu-1") == {(1, 0), (1, 1), (1, 2)}
        assert node.store.counters("emu-1") == counters(received=3, stored=3)


@pytest.mark.trio
async def test_past_the_restart_intensity_the_device_is_parked(autojump_clock: trio.testing.MockClock) -> None:
    hook = FaultHook(always={"bad-1"})
    config = RouterConfig(restart=RestartPolicy(max_restarts=2, period=60.0, backoff_initial=0.1))
    async with running_node(config=config, fault_hook=hook) as node:
        for seq in range(3):
            assert await node.send(publish("bad-1", 1, seq)) == [Outcome.FAILED]
            assert await node.send(publish("good-1", 1, seq)) == [Outcome.DURABLE]
        await trio.testing.wait_all_tasks_blocked()
        # max_restarts = 2: two restarts, and the third crash parks the device.
        assert node.router.parked == {"bad-1"}
        assert "bad-1" not in node.router
        assert (node.stats.actor_restarts, node.stats.devices_parked) == (2, 1)

        later = [publish("bad-1", 1, seq) for seq in range(3, 6)]
        assert await node.send(*later) == [Outcome.FAILED] * 3
        assert len(hook.crashes) == 3  # refused at the router: no actor saw them
        assert await node.send(*(publish("good-1", 1, seq) for seq in range(3, 6))) == [Outcome.DURABLE] * 3
        assert node.store.stored("good-1") == {(1, seq) for seq in range(6)}
        assert node.store.stored("bad-1") == set()


@pytest.mark.trio
async def test_parking_fails_the_messages_still_queued(autojump_clock: trio.testing.MockClock) -> None:
    hook = FaultHook(always={"bad-1"})
    config = RouterConfig(
        actor=DeviceActorConfig(max_batch=1),  # one message per batch, so the others stay queued
        restart=RestartPolicy(max_restarts=2, period=60.0, backoff_initial=0.1),
    )
    async with running_node(config=config, fault_hook=hook) as node:
        assert await node.send(*(publish("bad-1", 1, seq) for seq in range(5))) == [Outcome.FAILED] * 5
        assert hook.crashes == [("bad-1", 0), ("bad-1", 1), ("bad-1", 2)]
        assert node.router.parked == {"bad-1"}


@pytest.mark.trio
async def test_an_idle_actor_retires_and_a_new_one_reloads_its_state(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = RouterConfig(actor=DeviceActorConfig(idle_timeout=300.0))
    async with running_node(config=config) as node:
        assert await node.send(publish("emu-1", 1, 0), publish("emu-1", 1, 1)) == [Outcome.DURABLE] * 2
        await trio.sleep(200)
        assert await node.send(publish("emu-1", 1, 2)) == [Outcome.DURABLE]
        await trio.sleep(200)  # 400 s since the first message, but only 200 s idle
        assert "emu-1" in node.router
        assert node.stats.actors_retired == 0

        await trio.sleep(150)
        assert "emu-1" not in node.router
        assert (node.stats.actors_retired, node.stats.active_actors) == (1, 0)

        # Only the reloaded state knows that seq 1 was stored and that 3 is missing.
        assert await node.send(publish("emu-1", 1, 1), publish("emu-1", 1, 4)) == [Outcome.DURABLE] * 2
        assert "emu-1" in node.router
        assert node.stats.actors_started == 2
        assert node.store.loads == ["emu-1", "emu-1"]
        assert node.store.stored("emu-1") == {(1, 0), (1, 1), (1, 2), (1, 4)}
        assert node.store.counters("emu-1") == counters(received=5, stored=4, duplicates=1, missing=1)
        assert node.store.rows_twice == []


@pytest.mark.trio
async def test_close_drains_the_mailboxes_and_commits_before_returning(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A commit takes a while (fsync): returning from close() must not depend on it being quick.
    async with running_node(FakeStore(commit_seconds=0.5)) as node:
        queued = [publish(f"emu-{d}", 1, seq) for seq in range(20) for d in range(3)]
        for msg in queued:
            await node.router.deliver(msg)
        await node.router.close()
        # No waiting here: everything delivered before close() is durable when it returns.
        assert [done_of(m).outcome for m in queued] == [Outcome.DURABLE] * len(queued)
        for d in range(3):
            assert node.store.stored(f"emu-{d}") == {(1, seq) for seq in range(20)}
        assert node.stats.active_actors == 0

        after = publish("emu-0", 1, 20)
        assert await node.send(after) == [Outcome.FAILED]
        assert "emu-0" not in node.router


# -- the node path against the tracker ------------------------------------------------------------

# Two devices, boots 0..2 and seqs 0..12: small ranges so duplicates, gaps, late fills and stale
# boots all occur; a chunk of 1..4 messages is delivered before waiting, so batch boundaries vary.
deliveries = st.lists(
    st.lists(
        st.tuples(st.sampled_from(["emu-1", "emu-2"]), st.integers(0, 2), st.integers(0, 12)), min_size=1, max_size=4
    ),
    max_size=10,
)


@given(chunks=deliveries)
def test_the_node_stores_what_the_tracker_decides(chunks: list[list[tuple[str, int, int]]]) -> None:
    trackers = {dev: SequenceTracker() for dev in ("emu-1", "emu-2")}
    expected: dict[str, set[tuple[int, int]]] = {dev: set() for dev in trackers}
    for chunk in chunks:
        for dev, boot, seq in chunk:
            trackers[dev].count_received()
            if trackers[dev].observe(boot, seq).stores:
                expected[dev].add((boot, seq))

    async def scenario() -> FakeStore:
        async with running_node() as node:
            for chunk in chunks:
                sent = [publish(dev, boot, seq) for dev, boot, seq in chunk]
                assert await node.send(*sent) == [Outcome.DURABLE] * len(sent)
            return node.store

    # trio.run with its own clock: hypothesis runs many examples per function-scoped fixture.
    store = trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    assert store.rows_twice == []
    for dev, tracker in trackers.items():
        assert store.stored(dev) == expected[dev]
        if tracker.state.boot is not None:
            assert store.counters(dev) == tracker.counters.as_dict()


# -- batches, CBOR and the validation rules in the actor ------------------------------------------


def batch_payload(device_id: str, boot: int, seqs: Iterable[int], **per_seq: dict[str, Any]) -> bytes:
    """A batched message of the readings *seqs*; ``per_seq["s3"]`` overrides fields of seq 3."""
    readings = []
    for seq in seqs:
        doc = json.loads(telemetry(device_id, boot, seq))
        del doc["v"], doc["device_id"]
        doc.update(per_seq.get(f"s{seq}", {}))
        readings.append(doc)
    return json.dumps({"v": 2, "device_id": device_id, "readings": readings}).encode()


@pytest.mark.trio
async def test_a_batch_is_one_group_and_a_bad_reading_is_quarantined_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FakeStore(hold=trio.Event())
    async with running_node(store) as node:
        payload = batch_payload("emu-1", 1, range(5), s2={"seq": "two"})
        msg = publish("emu-1", payload=payload)
        await node.router.deliver(msg)
        await trio.testing.wait_all_tasks_blocked()
        # Acknowledged only once every reading is committed: the commit is held.
        assert done_of(msg).outcome is None
        assert store.attempts
        store.hold.set()
        assert await done_of(msg).wait() is Outcome.DURABLE
        assert store.stored("emu-1") == {(1, 0), (1, 1), (1, 3), (1, 4)}
        assert store.counters("emu-1") == counters(received=5, stored=4, quarantined=1, missing=1)
        # One raw payload archived for the whole batch, holding four rows and one quarantine.
        ((_dev, raw),) = store.archived
        assert [r.seq for r in raw.telemetry] == [0, 1, 3, 4]
        assert [(q.reason, q.detail.split(":")[0]) for q in raw.quarantine] == [
            (QuarantineReason.SCHEMA, "readings[2]")
        ]
        # The resend of the whole batch: every good reading is a duplicate now.
        assert await node.send(publish("emu-1", payload=payload)) == [Outcome.DURABLE]
        assert store.counters("emu-1")["duplicates"] == 4
        assert len(store.archived) == 2  # the bad reading was quarantined again


@pytest.mark.trio
async def test_cbor_single_and_batch_give_the_rows_of_json(autojump_clock: trio.testing.MockClock) -> None:
    async with running_node() as node:
        single = json.loads(telemetry("j-1", 1, 0))
        batch = json.loads(batch_payload("j-1", 1, range(1, 4)))
        await node.send(
            publish("j-1", payload=telemetry("j-1", 1, 0)), publish("j-1", payload=json.dumps(batch).encode())
        )
        single["device_id"] = batch["device_id"] = "c-1"
        cbor = TopicKind.TELEMETRY_CBOR
        await node.send(
            publish("c-1", payload=cbor2.dumps(single), kind=cbor),
            publish("c-1", payload=cbor2.dumps(batch), kind=cbor),
        )
        rows = node.store.rows
        assert {k[1:]: v for k, v in rows.items() if k[0] == "c-1"} == {
            k[1:]: v for k, v in rows.items() if k[0] == "j-1"
        }
        assert len(rows) == 8


@pytest.mark.trio
async def test_validation_rules_quarantine_and_raise_implausible_value(autojump_clock: trio.testing.MockClock) -> None:
    signals: list[AlertSignal] = []
    store = FakeStore(profiles={"ac-1": DeviceProfile("ac_meter", SupplySystem.AC_25K)})
    ac = {
        "voltage_v": 25100.0,
        "current_a": 50.0,
        "power_kw": 1200.0,
        "energy_import_kwh": 10.0,
        "energy_export_kwh": 1.0,
        "frequency_hz": 50.0,
        "power_factor": 0.97,
    }
    async with running_node(store, alerts=signals.append) as node:
        payload = batch_payload(
            "ac-1",
            1,
            range(6),
            s0={"m": ac},
            s1={"m": {**ac, "frequency_hz": None}},  # null is absent: an AC meter must send it
            s2={"m": {**ac, "voltage_v": 5000.0}},  # neither a 25 kV line nor a dead one
            s3={"m": {**ac, "energy_import_kwh": 9.5}},  # the register went down
            s4={"m": ac, "ts": "2027-01-01T00:00:00Z"},  # from the future
            s5={"m": {**ac, "energy_import_kwh": 10.5}},
        )
        assert await node.send(publish("ac-1", payload=payload)) == [Outcome.DURABLE]
    assert store.stored("ac-1") == {(1, 0), (1, 5)}
    reasons = [(r, q) for r, q in store.quarantined]
    assert reasons == [
        ("ac-1", QuarantineReason.MISSING_TYPE_FIELD),
        ("ac-1", QuarantineReason.IMPLAUSIBLE_VOLTAGE),
        ("ac-1", QuarantineReason.REGISTER_DECREASED),
        ("ac-1", QuarantineReason.FUTURE_TIMESTAMP),
    ]
    # Quarantined readings were received: no gap, and they count as quarantined.
    assert store.counters("ac-1") == counters(received=6, stored=2, quarantined=4)
    implausible = [s for s in signals if s.rule is AlertRule.IMPLAUSIBLE_VALUE]
    assert [(s.count, s.detail.split(":")[0]) for s in implausible] == [(2, "readings[3]")]
    (burst,) = [s for s in signals if s.rule is AlertRule.QUARANTINE_BURST]
    assert burst.count == 4


@pytest.mark.trio
async def test_registers_survive_a_restart_of_the_actor(autojump_clock: trio.testing.MockClock) -> None:
    store = FakeStore()
    async with running_node(store) as node:
        await node.send(publish("emu-1", 3, 10), publish("emu-1", 3, 11))
    # A new node on the same store: the actor reloads the registers of (3, 11) from the rows.
    low = json.loads(telemetry("emu-1", 3, 12))
    low["m"]["energy_import_kwh"] = 1.0
    async with running_node(store) as node:
        await node.send(publish("emu-1", payload=json.dumps(low).encode()))
        assert store.quarantined == [("emu-1", QuarantineReason.REGISTER_DECREASED)]
        # A redelivery of the quarantined reading is a duplicate: its seq was seen.
        await node.send(publish("emu-1", payload=json.dumps(low).encode()))
        assert store.counters("emu-1") == counters(received=4, stored=2, quarantined=1, duplicates=1)
        # A reboot starts the registers afresh.
        low["boot"] = 4
        low["seq"] = 0
        await node.send(publish("emu-1", payload=json.dumps(low).encode()))
        assert (4, 0) in store.stored("emu-1")


# Readings of one device: boots 0..2 and seqs 0..12 (so duplicates, gaps, late fills and stale
# boots occur), each good or broken in one of the ways a rule catches; batches of 1..6.
BROKEN = {
    "good": {},
    "schema": {"seq": "seven"},
    "voltage": {"m": {"voltage_v": 5000.0, "current_a": 1.0, "power_kw": 1.0, "energy_import_kwh": 1e6,
                      "energy_export_kwh": 1e6}},
    "register": {"m": {"voltage_v": 1500.0, "current_a": 1.0, "power_kw": 1.0, "energy_import_kwh": 0.5,
                       "energy_export_kwh": 0.0}},
    "future": {"ts": "2099-01-01T00:00:00Z"},
}  # fmt: skip
batched_readings = st.lists(
    st.lists(st.tuples(st.integers(0, 2), st.integers(0, 12), st.sampled_from(sorted(BROKEN))), min_size=1, max_size=6),
    min_size=1,
    max_size=6,
)


@given(batches=batched_readings)
def test_a_batch_is_judged_exactly_as_its_readings_sent_one_by_one(
    batches: list[list[tuple[int, int, str]]],
) -> None:
    """PROTOCOL.md: each reading of a batch follows every rule of a single message."""

    def doc(boot: int, seq: int, kind: str) -> dict[str, Any]:
        d = json.loads(telemetry("emu-1", boot, seq))
        d.update(BROKEN[kind])
        return d

    async def scenario(form: str) -> FakeStore:
        store = FakeStore(profiles={"emu-1": DeviceProfile("dc_meter", SupplySystem.DC_1500)})
        async with running_node(store) as node:
            for readings in batches:
                docs = [doc(*r) for r in readings]
                if form == "batches":
                    body = {"v": 2, "device_id": "emu-1", "readings": [{**d, "v": None} for d in docs]}
                    sent = [publish("emu-1", payload=json.dumps(body).encode())]
                else:
                    sent = [publish("emu-1", payload=json.dumps(d).encode()) for d in docs]
                assert await node.send(*sent) == [Outcome.DURABLE] * len(sent)
        return store

    batched = trio.run(scenario, "batches", clock=trio.testing.MockClock(autojump_threshold=0))
    single = trio.run(scenario, "singles", clock=trio.testing.MockClock(autojump_threshold=0))
    assert batched.rows == single.rows
    assert batched.counters("emu-1") == single.counters("emu-1")
    assert batched.quarantined == single.quarantined
    assert batched.rows_twice == single.rows_twice == []
    # One raw payload per batch that stored or quarantined anything, one per such single message.
    assert len(batched.archived) <= len(batches)


# Payloads a device could send: arbitrary bytes, and documents with arbitrary values in the
# fields of a single message or of a batch's reading, in JSON or CBOR.
junk_values = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30), st.lists(st.integers(), max_size=3)
)


@st.composite
def device_payloads(draw: st.DrawFn) -> tuple[TopicKind, bytes]:
    kind = draw(st.sampled_from([TopicKind.TELEMETRY, TopicKind.TELEMETRY_CBOR]))
    if draw(st.booleans()):
        return kind, draw(st.binary(max_size=300))
    doc = json.loads(telemetry("emu-1", draw(st.integers(0, 3)), draw(st.integers(0, 20))))
    target = doc
    if draw(st.booleans()):
        reading = {k: v for k, v in doc.items() if k not in ("v", "device_id")}
        doc = {"v": 2, "device_id": "emu-1", "readings": [reading]}
        target = reading
    target[draw(st.sampled_from(["v", "device_id", "boot", "seq", "ts", "m", "loc", "readings"]))] = draw(junk_values)
    if kind is TopicKind.TELEMETRY_CBOR:
        return kind, cbor2.dumps(doc)
    try:
        return kind, json.dumps(doc).encode()
    except ValueError:  # NaN is fine for json.dumps; only exotic values land here
        return kind, b"{}"


@given(st.lists(device_payloads(), min_size=1, max_size=8))
def test_no_payload_crashes_the_device_actor(payloads: list[tuple[TopicKind, bytes]]) -> None:
    """Bad input is quarantined and acknowledged; it never costs the device its actor."""

    async def scenario() -> IngestStats:
        async with running_node() as node:
            sent = [publish("emu-1", payload=payload, kind=kind) for kind, payload in payloads]
            assert await node.send(*sent) == [Outcome.DURABLE] * len(sent)
            return node.stats

    stats = trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    assert stats.actor_restarts == 0
