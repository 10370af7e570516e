"""Retention on a real SQLite file: only what every enabled consumer has forwarded (or consumed)
long enough ago goes, never the newest row, and pruning a large table does not hold up ingest."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.retention import DAY_S, RetentionActor, RetentionConfig
from node.config import Settings
from node.forwarding import INFLUXDB_ENERGY, retention_policy
from storage.energy import CURSOR_NAME as ENERGY_CURSOR
from storage.outbox import Outbox
from storage.records import HistoryCutoffs, PruneResult, RetentionPolicy
from storage.retention import RetentionStore, retention_bound
from storage.schema import migrate
from storage.sqlite import SqliteStore

from .conftest import commit_readings

pytestmark = pytest.mark.anyio

NOW = 1_795_449_900.0
INFLUX_ONLY = RetentionPolicy(forwarders={"telemetry": frozenset({"influxdb"})}, disabled=frozenset({"s3"}))
BOTH = RetentionPolicy(forwarders={"telemetry": frozenset({"influxdb"}), "raw_messages": frozenset({"s3"})})


def counts(db: Path) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(db)) as c:
        return {
            "telemetry": c.execute("SELECT count(*) FROM telemetry").fetchone()[0],
            "raw": c.execute("SELECT count(*) FROM raw_messages").fetchone()[0],
            "raw_with_payload": c.execute("SELECT count(*) FROM raw_messages WHERE length(payload) > 0").fetchone()[0],
            "quarantine": c.execute("SELECT count(*) FROM quarantine").fetchone()[0],
            "min_telemetry": c.execute("SELECT coalesce(min(id), 0) FROM telemetry").fetchone()[0],
        }


async def prune(db: Path, policy: RetentionPolicy, *, days: float = 1.0, now: float = NOW) -> dict[str, int]:
    store = RetentionStore(db)
    deleted: dict[str, int] = {}
    try:
        actor = RetentionActor(
            store, policy, RetentionConfig(days=days, batch_rows=7, pause=0), deleted, clock=lambda: now
        )
        await actor.prune()
    finally:
        store.close()
    return deleted


@pytest.fixture
async def outbox(store: SqliteStore, db_path: Path) -> Outbox:
    await commit_readings(store, "emu-1", range(100), quarantined=3)  # raw 1..103, telemetry 1..100
    box = Outbox(db_path)
    yield box  # type: ignore[misc]
    box.close()


async def test_nothing_unforwarded_goes(outbox: Outbox, db_path: Path) -> None:
    assert await prune(db_path, INFLUX_ONLY, days=0) == {}
    await outbox.save_position("influxdb", "telemetry", 40, mark_at=NOW - 2 * DAY_S)
    assert await prune(db_path, INFLUX_ONLY) == {"telemetry": 40}
    assert counts(db_path)["min_telemetry"] == 41
    assert counts(db_path)["raw"] == 103  # S3 is off: raw messages are forwarded nowhere, so kept


async def test_days_count_from_when_a_row_was_forwarded(outbox: Outbox, db_path: Path) -> None:
    await outbox.save_position("influxdb", "telemetry", 30, mark_at=NOW - 3 * DAY_S)
    await outbox.save_position("influxdb", "telemetry", 60, mark_at=NOW - DAY_S / 2)
    assert await prune(db_path, INFLUX_ONLY) == {"telemetry": 30}
    assert await prune(db_path, INFLUX_ONLY, now=NOW + DAY_S) == {"telemetry": 30}


async def test_other_cursors_guard_unless_their_consumer_is_off(outbox: Outbox, db_path: Path) -> None:
    await outbox.save_position("influxdb", "telemetry", 90, mark_at=NOW - 5 * DAY_S)
    await outbox.save_position("energy", "telemetry", 20, mark_at=None)
    assert await prune(db_path, INFLUX_ONLY) == {"telemetry": 20}
    off = RetentionPolicy(forwarders=INFLUX_ONLY.forwarders, disabled=frozenset({"s3", "energy"}))
    assert await prune(db_path, off) == {"telemetry": 70}


async def test_a_required_consumer_guards_before_its_first_cursor(outbox: Outbox, db_path: Path) -> None:
    await outbox.save_position("influxdb", "telemetry", 90, mark_at=NOW - 5 * DAY_S)
    policy = RetentionPolicy(forwarders=INFLUX_ONLY.forwarders, required={"telemetry": frozenset({"energy"})})
    assert await prune(db_path, policy) == {}


async def test_the_newest_row_stays_so_rowids_are_never_reused(outbox: Outbox, db_path: Path) -> None:
    await outbox.save_position("influxdb", "telemetry", 100, mark_at=NOW - 5 * DAY_S)
    await outbox.save_position("s3", "raw_messages", 103, mark_at=NOW - 5 * DAY_S)
    # Telemetry 100 stays (the newest), and with it its raw message 100; raw rows after the first
    # one still referenced stay too (until their readings go), with their payloads emptied,
    # except the newest raw row's.
    assert await prune(db_path, BOTH) == {"telemetry": 99, "raw_messages": 99, "raw_payloads": 3}
    assert counts(db_path) == {
        "telemetry": 1,
        "raw": 4,
        "raw_with_payload": 1,
        "quarantine": 3,
        "min_telemetry": 100,
    }


async def test_archived_payloads_of_kept_readings_are_emptied(outbox: Outbox, db_path: Path) -> None:
    """S3 archived everything, InfluxDB nothing: the readings stay (and so their raw rows, which
    they reference), but the archived payloads no longer take disk space."""
    await outbox.save_position("s3", "raw_messages", 103, mark_at=NOW - 5 * DAY_S)
    s3_only = RetentionPolicy(forwarders={"raw_messages": frozenset({"s3"})}, disabled=frozenset({"influxdb"}))
    assert await prune(db_path, s3_only) == {"raw_payloads": 102}
    after = counts(db_path)
    assert (after["telemetry"], after["raw"], after["raw_with_payload"]) == (100, 103, 1)


async def test_ingest_goes_on_while_a_large_table_is_pruned(store: SqliteStore, db_path: Path) -> None:
    rows = 60_000
    for start in range(0, rows, 5000):
        await commit_readings(store, "emu-1", range(start, start + 5000))
    outbox = Outbox(db_path)
    try:
        await outbox.save_position("influxdb", "telemetry", rows, mark_at=NOW - 5 * DAY_S)
    finally:
        outbox.close()
    retention = RetentionStore(db_path)
    deleted: dict[str, int] = {}
    latencies: list[float] = []
    commits = {"started": 0, "done": 0}
    committed = anyio.Condition()
    steps = 0

    class Interleaved:
        """The store, but each step returns only once a commit that began after it is done: on a
        busy machine the pruning cannot outrun ingest, so every step meets a commit (event-driven,
        not a count of commits within wall time)."""

        async def prune_step(self, policy: RetentionPolicy, forwarded_before: float, limit: int) -> PruneResult:
            nonlocal steps
            result = await retention.prune_step(policy, forwarded_before, limit)
            steps += 1
            wanted = commits["started"] + 1
            async with committed:
                while commits["done"] < wanted:
                    await committed.wait()
            return result

        async def prune_history_step(self, policy: RetentionPolicy, cutoffs: HistoryCutoffs, limit: int) -> PruneResult:
            return await retention.prune_history_step(policy, cutoffs, limit)

    actor = RetentionActor(
        Interleaved(), INFLUX_ONLY, RetentionConfig(days=1, batch_rows=1000, pause=0.001), deleted, clock=lambda: NOW
    )
    try:
        async with anyio.create_task_group() as tg:
            done = anyio.Event()

            async def ingest() -> None:
                seq = rows
                while not done.is_set():
                    commits["started"] += 1
                    started = time.perf_counter()
                    await commit_readings(store, "emu-2", range(seq, seq + 10))
                    latencies.append(time.perf_counter() - started)
                    async with committed:
                        commits["done"] += 1
                        committed.notify_all()
                    seq += 10
                    await anyio.sleep(0.005)

            tg.start_soon(ingest)
            await actor.prune()
            done.set()
    finally:
        retention.close()
    assert deleted["telemetry"] == rows  # all forwarded; the newest row is one of emu-2's
    # Ingest committed all along: a commit after every step, none held up for long.
    latencies.sort()
    p50, worst = latencies[len(latencies) // 2] * 1000, latencies[-1] * 1000
    print(f"steps={steps} commits during pruning={len(latencies)} p50={p50:.1f} ms max={worst:.1f} ms")  # noqa: T201
    assert steps >= rows // 1000
    assert len(latencies) >= 20
    assert latencies[-1] < 2.0


# Strategies: up to 50 rows; marks of the InfluxDB forwarder at positions up to the table's end
# and times either side of the cutoff; an energy cursor that may be absent, on, off or required;
# a stray cursor of another source (which must never matter to telemetry).
@settings(max_examples=200, deadline=None)
@given(
    rows=st.integers(0, 50),
    marks=st.lists(st.tuples(st.integers(0, 50), st.sampled_from([-3.0, -1.5, -0.5, 0.5])), max_size=5),
    energy=st.one_of(st.none(), st.integers(0, 50)),
    energy_state=st.sampled_from(["on", "off", "required"]),
    s3_position=st.integers(0, 50),
)
def test_the_bound_is_the_lowest_guard(
    rows: int, marks: list[tuple[int, float]], energy: int | None, energy_state: str, s3_position: int
) -> None:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        migrate(conn)
        conn.executemany(
            "INSERT INTO telemetry (id, device_id, boot, seq, ts_ms, m, raw_id) VALUES (?, 'd', 1, ?, 0, '{}', ?)",
            [(i, i, i) for i in range(1, rows + 1)],
        )
        for position, days in marks:
            conn.execute("INSERT OR IGNORE INTO cursor_marks VALUES ('influxdb', ?, ?)", (position, NOW + days * DAY_S))
        if energy is not None:
            conn.execute("INSERT INTO cursors VALUES ('energy', 'telemetry', ?, 'x')", (energy,))
        conn.execute("INSERT INTO cursors VALUES ('s3', 'raw_messages', ?, 'x')", (s3_position,))
        policy = RetentionPolicy(
            forwarders={"telemetry": frozenset({"influxdb"})},
            disabled=frozenset({"energy"}) if energy_state == "off" else frozenset(),
            required={"telemetry": frozenset({"energy"})} if energy_state == "required" else {},
        )
        bound = retention_bound(conn, policy, "telemetry", NOW - DAY_S)
    finally:
        conn.close()
    first_marks: dict[int, float] = {}
    for position, days in marks:
        first_marks.setdefault(position, days)  # a position counts from when it was first reached
    forwarded = max((p for p, days in first_marks.items() if days <= -1.0), default=0)
    guards = [rows - 1, forwarded]
    if energy_state != "off":
        guards.append(energy if energy is not None else (0 if energy_state == "required" else rows))
    assert bound == max(0, min(guards))


# -- the energy aggregator's cursor in the node's policy (node.forwarding.retention_policy) ----------


def node_policy(**overrides: object) -> RetentionPolicy:
    base: dict[str, object] = {"influxdb_enabled": True, "influxdb_url": "http://127.0.0.1:1", "energy_enabled": True}
    return retention_policy(Settings.model_validate(base | overrides))


def test_energy_is_required_when_enabled_and_disabled_when_off() -> None:
    on = node_policy()
    assert on.required == {"telemetry": frozenset({ENERGY_CURSOR})}
    assert ENERGY_CURSOR not in on.disabled
    off = node_policy(energy_enabled=False)
    assert off.required == {}
    assert ENERGY_CURSOR in off.disabled
    # The energy stream's cursor follows energy_periods (by rev), not a rowid source: it guards
    # the periods while it runs, and nothing when energy is off.
    assert INFLUXDB_ENERGY not in on.disabled
    assert INFLUXDB_ENERGY in off.disabled
    assert all(INFLUXDB_ENERGY not in names for names in on.forwarders.values())
    assert on.energy_forwarders == frozenset({INFLUXDB_ENERGY})
    assert off.energy_forwarders == frozenset()
    assert node_policy(influxdb_enabled=False).energy_forwarders == frozenset()


async def test_the_node_policy_guards_telemetry_the_energy_aggregator_has_not_read(
    outbox: Outbox, db_path: Path
) -> None:
    """Energy on: before the aggregator's first cursor write nothing goes, then nothing above its
    cursor; energy off: its old cursor holds nothing back."""
    await outbox.save_position("influxdb", "telemetry", 90, mark_at=NOW - 5 * DAY_S)
    assert await prune(db_path, node_policy()) == {}
    await outbox.save_position(ENERGY_CURSOR, "telemetry", 25, mark_at=None)
    assert await prune(db_path, node_policy()) == {"telemetry": 25}
    assert await prune(db_path, node_policy(energy_enabled=False)) == {"telemetry": 65}
