"""The group commit's multi-row INSERTs, its writer thread and the WAL checkpointer (ADR 0015),
on real SQLite files."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage.checkpoint import WalCheckpointer
from storage.contract import QuarantineReason
from storage.errors import StorageError
from storage.records import DeviceBatch, DeviceEvent, DeviceStateRecord, QuarantineRow, RawMessage, TelemetryRow
from storage.sqlite import INSERT_SIZES, SqliteStore
from storage.writer_thread import WriterThread

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    store = SqliteStore(tmp_path / "node.sqlite3", synchronous="NORMAL")
    yield store
    store.close()


#: Row counts around every padding boundary of the multi-row INSERTs, and past the largest.
SIZES = sorted({0, 1, 2} | {n + d for n in INSERT_SIZES for d in (-1, 0, 1)} | {2 * INSERT_SIZES[-1] + 3})


def message(device_id: str, seq: int, readings: int, *, quarantined: bool = False) -> RawMessage:
    """A raw message carrying *readings* readings from *seq* on (a batch when more than one)."""
    payload = json.dumps({"device_id": device_id, "seq": seq, "n": readings}).encode()
    rows = [
        TelemetryRow(
            boot=1,
            seq=seq + i,
            ts_ms=1_795_449_900_000 + (seq + i) * 1000,
            m_json=f'{{"seq":{seq + i}}}',
            loc_json=None,
        )
        for i in range(readings)
    ]
    quarantine = [QuarantineRow(QuarantineReason.SCHEMA, f"bad {device_id} {seq}")] if quarantined else []
    return RawMessage(f"iot/{device_id}/telemetry", 1_795_449_900.5, payload, rows, quarantine)


def batch(device_id: str, messages: list[RawMessage], high: int, events: int = 0) -> DeviceBatch:
    state = DeviceStateRecord(
        device_id=device_id,
        boot=1,
        low=0,
        high=high,
        gaps=((1, 2),) if high % 2 else (),
        counters={"accepted": high},
        last_seen=1_795_449_901.0 + high,
        online=True,
        connected_since=None,
    )
    evs = [DeviceEvent(at=1_795_449_900.0 + i, event="connected", detail=f"e{i}") for i in range(events)]
    return DeviceBatch(device_id, messages, state, evs)


def check_group(path: Path, batches: list[DeviceBatch], raw_before: int) -> None:
    """Every message of *batches* is stored once, numbered on from *raw_before* in order, and
    each reading and quarantine row points at its own raw message."""
    conn = sqlite3.connect(path)
    try:
        expected = [(b.device_id, m) for b in batches for m in b.messages]
        raws = conn.execute(
            "SELECT id, device_id, topic, received_at, payload FROM raw_messages WHERE id > ? ORDER BY id",
            (raw_before,),
        ).fetchall()
        assert [r[0] for r in raws] == list(range(raw_before + 1, raw_before + 1 + len(expected)))
        for (raw_id, device_id, topic, received_at, payload), (want_device, m) in zip(raws, expected, strict=True):
            assert (device_id, topic, received_at, payload) == (want_device, m.topic, m.received_at, m.payload)
            rows = conn.execute(
                "SELECT device_id, boot, seq, ts_ms, m, loc FROM telemetry WHERE raw_id = ? ORDER BY seq", (raw_id,)
            ).fetchall()
            assert rows == [(want_device, r.boot, r.seq, r.ts_ms, r.m_json, r.loc_json) for r in m.telemetry]
            quarantine = conn.execute(
                "SELECT device_id, topic, reason, detail FROM quarantine WHERE raw_id = ?", (raw_id,)
            ).fetchall()
            assert quarantine == [(want_device, m.topic, q.reason.value, q.detail) for q in m.quarantine]
        for b in batches:
            state = conn.execute(
                "SELECT high, gaps, counters, last_seen, online FROM device_state WHERE device_id = ?", (b.device_id,)
            ).fetchone()
            s = b.state
            assert state == (
                s.high,
                json.dumps([list(g) for g in s.gaps]).replace(" ", ""),
                json.dumps(s.counters).replace(" ", ""),
                s.last_seen,
                1,
            )
    finally:
        conn.close()


def raw_max(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT coalesce(max(id), 0) FROM raw_messages").fetchone()[0])
    finally:
        conn.close()


@pytest.mark.parametrize("size", SIZES)
async def test_a_group_of_any_size_is_stored_whole(store: SqliteStore, size: int) -> None:
    # One reading per message, spread over up to 300 devices (the state upsert pads too).
    devices = [f"dev-{i:03d}" for i in range(min(size, 300))] or ["dev-000"]
    per_device: dict[str, list[RawMessage]] = {d: [] for d in devices}
    for n in range(size):
        device_id = devices[n % len(devices)]
        per_device[device_id].append(message(device_id, n, 1))
    batches = [batch(d, msgs, high=len(msgs)) for d, msgs in per_device.items()]
    await store.commit([batch("earlier", [message("earlier", 0, 1)], high=0)])  # ids go on from it
    before = raw_max(store.path)
    await store.commit(batches)
    check_group(store.path, batches, before)
    conn = sqlite3.connect(store.path)
    try:
        assert conn.execute("SELECT count(*) FROM device_state").fetchone()[0] == len(devices) + 1
    finally:
        conn.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    groups=st.lists(
        st.lists(
            st.tuples(
                st.integers(0, 3),  # readings in a message (0: quarantined only)
                st.booleans(),  # also a quarantine row
            ),
            min_size=0,
            max_size=40,
        ),
        min_size=1,
        max_size=5,
    ),
    events=st.integers(0, 3),
)
async def test_groups_of_batches_quarantine_and_events_are_stored_in_order(
    tmp_path_factory: pytest.TempPathFactory, groups: list[list[tuple[int, bool]]], events: int
) -> None:
    path = tmp_path_factory.mktemp("group") / "node.sqlite3"
    store = SqliteStore(path, synchronous="NORMAL")
    try:
        seq = 0
        batches = []
        for i, specs in enumerate(groups):
            device_id = f"dev-{i}"
            msgs = []
            for readings, quarantined in specs:
                msgs.append(message(device_id, seq, readings, quarantined=quarantined or readings == 0))
                seq += max(readings, 1)
            batches.append(batch(device_id, msgs, high=seq, events=events))
        await store.commit(batches)
        check_group(path, batches, 0)
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("SELECT count(*) FROM device_events").fetchone()[0] == events * len(groups)
        finally:
            conn.close()
    finally:
        store.close()


async def test_a_failed_group_leaves_nothing_and_the_next_goes_on(store: SqliteStore) -> None:
    good = [batch("dev-a", [message("dev-a", 0, 1)], high=0)]
    await store.commit(good)
    # The group's last statement fails (a device state without a device id, which the table
    # refuses: a STRICT table's primary key is NOT NULL), after its raw messages and readings
    # went in: all of it is rolled back.
    bad_state = DeviceStateRecord(
        device_id=None,  # type: ignore[arg-type]
        boot=1,
        low=0,
        high=1,
        gaps=(),
        counters={},
        last_seen=None,
        online=True,
        connected_since=None,
    )
    bad = [batch("dev-b", [message("dev-b", 0, 1)], high=0), DeviceBatch("dev-c", [message("dev-c", 0, 1)], bad_state)]
    with pytest.raises(StorageError):
        await store.commit(bad)
    assert raw_max(store.path) == 1  # nothing of the failed group
    later = [batch("dev-b", [message("dev-b", 0, 2)], high=1)]
    await store.commit(later)
    check_group(store.path, later, 1)


async def test_the_writer_thread_runs_calls_in_order_and_hands_back_errors(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "t.sqlite3", check_same_thread=False, isolation_level=None)
    writer = WriterThread(conn)
    try:
        seen: list[int] = []
        threads: set[str] = set()

        def note(i: int) -> int:
            threads.add(threading.current_thread().name)
            seen.append(i)
            return i * 2

        results: list[int] = []

        async def call(i: int) -> None:
            results.append(await writer.call(lambda _c: note(i)))

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(call, i)
        assert len(seen) == 50
        assert seen == sorted(seen)
        assert sorted(results) == [i * 2 for i in range(50)]
        assert threads == {"sqlite-writer"}

        def boom(c: sqlite3.Connection) -> None:
            c.execute("SELECT * FROM no_such_table")

        with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
            await writer.call(boom)
        assert await writer.call(lambda c: c.execute("SELECT 41 + 1").fetchone()[0]) == 42
    finally:
        writer.close()
        conn.close()
    with pytest.raises(RuntimeError, match="closed"):
        await writer.call(lambda _c: None)


async def test_a_cancelled_caller_waits_for_its_call_to_finish(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "t.sqlite3", check_same_thread=False, isolation_level=None)
    writer = WriterThread(conn)
    finished = threading.Event()

    def slow(_c: sqlite3.Connection) -> None:
        time.sleep(0.3)
        finished.set()

    try:
        with anyio.move_on_after(0.05) as scope:
            await writer.call(slow)
            # The timeout has passed: it takes effect here, at the next checkpoint.
            assert finished.is_set()
            await anyio.lowlevel.checkpoint()
            pytest.fail("not cancelled")
        # The timeout fired, but only after the call had finished: the connection is never left
        # in the middle of something when its caller gives up.
        assert scope.cancelled_caught
    finally:
        writer.close()
        conn.close()


async def test_the_checkpointer_copies_the_log_back_after_commits(store: SqliteStore) -> None:
    for n in range(20):
        msgs = [message(f"dev-{d}", n, 1) for d in range(50)]
        await store.commit([batch(f"dev-{d}", [msgs[d]], high=n) for d in range(50)])
    with anyio.fail_after(10):
        while store.checkpointer.runs == 0:
            await anyio.sleep(0.05)
    # Nothing left to copy: a passive checkpoint now finds every frame of the log already in
    # the database file (busy 0, log frames == checkpointed frames).
    conn = sqlite3.connect(store.path)
    try:
        busy, log_frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    finally:
        conn.close()
    assert busy == 0
    assert log_frames == copied
    assert store.checkpointer.failures == 0


def test_a_failing_checkpoint_is_counted_and_retried(tmp_path: Path) -> None:
    # A directory where the database should be: every checkpoint fails.
    path = tmp_path / "not-a-database"
    path.mkdir()
    checkpointer = WalCheckpointer(path, coalesce_s=0.01)
    try:
        checkpointer.kick()
        deadline = time.monotonic() + 10
        while checkpointer.failures == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert checkpointer.failures >= 1
        assert checkpointer.runs == 0
    finally:
        checkpointer.close()
