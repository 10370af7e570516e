"""History retention on real SQLite files: the audit log, connection events, cleared alerts,
finished commands (with their history) and energy periods go by age, a bounded batch per step;
nothing younger than its cutoff, no open alert, no unfinished command and no energy period the
InfluxDB forwarder has not sent ever goes. The last test runs it inside a real node."""

from __future__ import annotations

import contextlib
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.retention import DAY_S, RetentionActor, RetentionConfig
from node.app import database_path
from node.config import load_settings
from storage.errors import ConfigError
from storage.history_retention import FINISHED_COMMANDS, history_step
from storage.records import HistoryCutoffs, RetentionPolicy
from storage.retention import RetentionStore
from storage.schema import migrate
from tests.integration.conftest import RunningNode, make_admin_key, start_node, stop_node

pytestmark = pytest.mark.anyio

NOW = 1_795_449_900.0
CUTOFF = NOW - 10 * DAY_S
NO_FORWARDER = RetentionPolicy(forwarders={})
ENERGY_FORWARDED = RetentionPolicy(forwarders={}, energy_forwarders=frozenset({"influxdb-energy"}))
COMMAND_STATES = ("queued", "sent", *FINISHED_COMMANDS)


@contextlib.contextmanager
def database() -> Iterator[sqlite3.Connection]:
    """A migrated SQLite file of its own (hypothesis runs many examples per test function)."""
    with tempfile.TemporaryDirectory() as tmp:
        conn = sqlite3.connect(Path(tmp) / "node.sqlite3", isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = OFF")  # a throwaway file: no fsync per example
            migrate(conn)
            yield conn
        finally:
            conn.close()


@dataclass(frozen=True)
class Command:
    state: str
    #: Entries in its history; the last one at ``at``, the earlier ones a second apart before it.
    history: int
    at: float


def add_audit(c: sqlite3.Connection, at: float) -> None:
    c.execute(
        "INSERT INTO audit_log (at, action, target, actor, details) VALUES (?, 'key_created', 't', 'cli', '{}')", (at,)
    )


def add_event(c: sqlite3.Connection, at: float) -> None:
    c.execute("INSERT INTO device_events (device_id, at, event, detail) VALUES ('d', ?, 'connected', 'x')", (at,))


def add_alert(c: sqlite3.Connection, n: int, state: str, at: float) -> None:
    c.execute(
        "INSERT INTO alerts (alert_id, device_id, rule, state, severity, detail, count, raised_at, last_seen_at,"
        " acked_at, cleared_at) VALUES (?, ?, 'device_offline', ?, 'warning', '', 1, ?, ?, ?, ?)",
        (f"a{n}", f"d{n}", state, at - DAY_S, at, at if state != "open" else None, at if state == "cleared" else None),
    )


def add_command(c: sqlite3.Connection, n: int, cmd: Command) -> None:
    c.execute(
        "INSERT INTO commands (command_id, device_id, name, args, state, created_at, expires_at, request)"
        " VALUES (?, 'd', 'reset', '{}', ?, ?, ?, '{}')",
        (f"c{n}", cmd.state, cmd.at - cmd.history, cmd.at + 60),
    )
    c.executemany(
        "INSERT INTO command_history (command_id, state, at) VALUES (?, 'sent', ?)",
        [(f"c{n}", cmd.at - k) for k in range(cmd.history)],
    )


def add_period(c: sqlite3.Connection, n: int, start_s: float, rev: int) -> None:
    c.execute(
        "INSERT INTO energy_periods (device_id, start_ms, consumed_kwh, regenerated_kwh, covered_ms, complete, rev)"
        " VALUES (?, ?, 1.0, 0.0, 300000, 1, ?)",
        (f"d{n}", int(start_s * 1000), rev),
    )


def ids(c: sqlite3.Connection, sql: str) -> set[object]:
    return {r[0] for r in c.execute(sql)}


def column(c: sqlite3.Connection, sql: str) -> list[float]:
    return sorted(r[0] for r in c.execute(sql))


def check_commands_whole(c: sqlite3.Connection, commands: list[Command]) -> None:
    """Every command left has all its history; no history is left without its command."""
    history = dict(c.execute("SELECT command_id, count(*) FROM command_history GROUP BY command_id").fetchall())
    left = ids(c, "SELECT command_id FROM commands")
    assert set(history) == left
    for command_id in left:
        assert history[command_id] == commands[int(str(command_id)[1:])].history


# Strategies: times a little and a lot either side of the cutoff, and exactly on it (which stays:
# only rows strictly older go); every alert and command state; energy periods with distinct revs
# (a permutation, as the aggregator numbers them) and a forwarder cursor that may be missing,
# anywhere among them, or the forwarder switched off; cutoffs that may each be "keep forever";
# batches of 1-6 rows so that a round takes several steps.
OFFSETS = st.sampled_from([-30 * DAY_S, -DAY_S, -1.0, 0.0, 1.0, DAY_S])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    audit=st.lists(OFFSETS, max_size=8),
    events=st.lists(OFFSETS, max_size=8),
    alerts=st.lists(st.tuples(st.sampled_from(["open", "acknowledged", "cleared"]), OFFSETS), max_size=6),
    commands=st.lists(
        st.builds(Command, st.sampled_from(COMMAND_STATES), st.integers(1, 4), OFFSETS.map(lambda o: CUTOFF + o)),
        max_size=6,
    ),
    periods=st.lists(OFFSETS, max_size=8).flatmap(
        lambda offsets: st.tuples(st.just(offsets), st.permutations(range(1, len(offsets) + 1)))
    ),
    cursor=st.one_of(st.none(), st.integers(0, 9)),
    energy_forwarder=st.booleans(),
    keep=st.sets(st.sampled_from(["audit", "history", "energy"])),
    limit=st.integers(1, 6),
)
def test_exactly_what_is_old_enough_goes_in_bounded_steps(  # noqa: PLR0917 - one per table
    audit: list[float],
    events: list[float],
    alerts: list[tuple[str, float]],
    commands: list[Command],
    periods: tuple[list[float], list[int]],
    cursor: int | None,
    energy_forwarder: bool,
    keep: set[str],
    limit: int,
) -> None:
    starts, revs = periods
    cutoffs = HistoryCutoffs(
        audit_before=None if "audit" in keep else CUTOFF,
        history_before=None if "history" in keep else CUTOFF,
        energy_before_ms=None if "energy" in keep else int(CUTOFF * 1000),
    )
    policy = ENERGY_FORWARDED if energy_forwarder else NO_FORWARDER
    with database() as c:
        for at in audit:
            add_audit(c, CUTOFF + at)
        for at in events:
            add_event(c, CUTOFF + at)
        for n, (state, at) in enumerate(alerts):
            add_alert(c, n, state, CUTOFF + at)
        for n, cmd in enumerate(commands):
            add_command(c, n, cmd)
        for n, (start, rev) in enumerate(zip(starts, revs, strict=True)):
            add_period(c, n, CUTOFF + start, rev)
        if cursor is not None:
            c.execute("INSERT INTO cursors VALUES ('influxdb-energy', 'energy_periods', ?, 'x')", (cursor,))

        largest_command = max((1 + cmd.history for cmd in commands), default=0)
        for _ in range(200):
            result = history_step(c, policy, cutoffs, limit)
            if not result.total:
                break
            # One table per step (a command with its history), at most `limit` rows, except a
            # single command whose history alone is more than that.
            tables = set(result.changed) - {"command_history"}
            assert len(tables) == 1
            if "commands" in tables:
                assert result.total <= max(limit, largest_command)
            else:
                assert result.total <= limit
            check_commands_whole(c, commands)
        else:
            pytest.fail("retention never finished")

        def kept(before: float | None, at: float) -> bool:
            return before is None or at >= before

        assert column(c, "SELECT at FROM audit_log") == sorted(
            CUTOFF + a for a in audit if kept(cutoffs.audit_before, CUTOFF + a)
        )
        assert column(c, "SELECT at FROM device_events") == sorted(
            CUTOFF + a for a in events if kept(cutoffs.history_before, CUTOFF + a)
        )
        assert ids(c, "SELECT alert_id FROM alerts") == {
            f"a{n}"
            for n, (state, at) in enumerate(alerts)
            if state != "cleared" or kept(cutoffs.history_before, CUTOFF + at)
        }
        assert ids(c, "SELECT command_id FROM commands") == {
            f"c{n}"
            for n, cmd in enumerate(commands)
            if cmd.state not in FINISHED_COMMANDS or kept(cutoffs.history_before, cmd.at)
        }
        newest = max(revs, default=0)
        guard = (cursor or 0) if energy_forwarder else newest
        assert ids(c, "SELECT rev FROM energy_periods") == {
            rev
            for start, rev in zip(starts, revs, strict=True)
            if kept(cutoffs.energy_before_ms, (CUTOFF + start) * 1000) or rev > guard or rev == newest
        }


async def test_the_actor_counts_each_table_and_keeps_forever_at_zero(tmp_path: Path) -> None:
    db = tmp_path / "node.sqlite3"
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as c:
        migrate(c)
        for n in range(5):
            add_audit(c, NOW - 400 * DAY_S + n)
            add_event(c, NOW - 100 * DAY_S + n)
            add_command(c, n, Command("acked", 3, NOW - 100 * DAY_S))
            add_period(c, n, NOW - 1100 * DAY_S, n + 1)
        add_alert(c, 0, "cleared", NOW - 100 * DAY_S)
        add_alert(c, 1, "acknowledged", NOW - 100 * DAY_S)
    store = RetentionStore(db)
    deleted: dict[str, int] = {}
    try:
        forever = RetentionActor(store, NO_FORWARDER, RetentionConfig(pause=0), deleted, clock=lambda: NOW)
        assert await forever.prune() == 0
        config = RetentionConfig(batch_rows=2, pause=0, audit_days=365, history_days=90, energy_days=1096)
        actor = RetentionActor(store, NO_FORWARDER, config, deleted, clock=lambda: NOW)
        assert await actor.prune() == 5 + 5 + 1 + 5 + 15 + 4
    finally:
        store.close()
    assert deleted == {
        "audit_log": 5,
        "device_events": 5,
        "alerts": 1,
        "commands": 5,
        "command_history": 15,
        "energy_periods": 4,  # the one with the highest rev stays, so revs are never reused
    }


async def test_a_step_holds_the_write_lock_briefly_however_large_the_table(tmp_path: Path) -> None:
    """60,000 old connection events and 60,000 recent audit rows: each step deletes its batch
    through the index, without scanning what stays."""
    db = tmp_path / "node.sqlite3"
    rows = 60_000
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as c:
        migrate(c)
        c.execute("BEGIN")
        c.executemany(
            "INSERT INTO device_events (device_id, at, event, detail) VALUES ('d', ?, 'connected', 'x')",
            [(NOW - 200 * DAY_S + i,) for i in range(rows)],
        )
        c.executemany(
            "INSERT INTO audit_log (at, action, target, actor, details) VALUES (?, 'key_created', 't', 'cli', '{}')",
            [(NOW - i,) for i in range(rows)],
        )
        c.execute("COMMIT")
    store = RetentionStore(db)
    durations: list[float] = []
    cutoffs = RetentionConfig(audit_days=365, history_days=90).cutoffs(NOW)
    try:
        while True:
            started = time.perf_counter()
            result = await store.prune_history_step(NO_FORWARDER, cutoffs, 1000)
            durations.append(time.perf_counter() - started)
            if not result.total:
                break
            assert result.changed == {"device_events": 1000}
    finally:
        store.close()
    durations.sort()
    p50, worst = durations[len(durations) // 2] * 1000, durations[-1] * 1000
    print(f"steps={len(durations)} p50={p50:.1f} ms max={worst:.1f} ms")  # noqa: T201
    assert len(durations) == rows // 1000 + 1
    # Generous for a busy shared machine; a table scan per step would show as a growing tail.
    assert p50 < 250


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("audit_retention_days", "-1"),
        ("history_retention_days", "ninety"),
        ("energy_retention_days", "40000"),  # past a century: surely a unit mistake
    ],
)
def test_a_bad_retention_age_names_its_setting(setting: str, value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(f"DEPOT_NODE_{setting.upper()}", value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert caught.value.setting == setting


def test_the_defaults_keep_a_year_of_audit_90_days_of_history_and_3_years_of_energy() -> None:
    settings = load_settings()
    assert (settings.audit_retention_days, settings.history_retention_days, settings.energy_retention_days) == (
        365,
        90,
        1096,
    )


async def test_the_node_deletes_old_history_and_keeps_recent(tmp_path: Path) -> None:
    """A real node with the default ages (and a short interval): rows older than them go, recent
    ones, an open alert and an unsent energy period's newer neighbour stay; the metric counts."""
    key = make_admin_key(tmp_path)
    now = time.time()
    with contextlib.closing(sqlite3.connect(database_path(tmp_path), isolation_level=None)) as c:
        add_audit(c, now - 400 * DAY_S)
        add_audit(c, now - 300 * DAY_S)
        add_event(c, now - 100 * DAY_S)
        add_event(c, now - 80 * DAY_S)
        add_alert(c, 0, "cleared", now - 100 * DAY_S)
        add_alert(c, 1, "cleared", now - 10 * DAY_S)
        add_alert(c, 2, "open", now - 100 * DAY_S)
        add_command(c, 0, Command("failed", 3, now - 100 * DAY_S))
        add_command(c, 1, Command("acked", 2, now - 10 * DAY_S))
        add_period(c, 0, now - 1200 * DAY_S, 1)
        add_period(c, 1, now - 1100 * DAY_S, 2)
        add_period(c, 2, now - 30 * DAY_S, 3)
    async with anyio.create_task_group() as tg:
        node = await start_node(tg, tmp_path, key, retention_interval_s=0.1)
        try:
            with anyio.fail_after(60):
                while "energy_periods" not in (deleted := await retention_metric(node)):
                    await anyio.sleep(0.05)
        finally:
            await stop_node(node)
    assert deleted == {
        "audit_log": 1,
        "device_events": 1,
        "alerts": 1,
        "commands": 1,
        "command_history": 3,
        "energy_periods": 2,
    }
    with contextlib.closing(sqlite3.connect(database_path(tmp_path))) as c:
        assert ids(c, "SELECT count(*) FROM audit_log WHERE target = 't'") == {1}
        assert len(ids(c, "SELECT at FROM device_events WHERE device_id = 'd'")) == 1
        assert ids(c, "SELECT alert_id FROM alerts") == {"a1", "a2"}
        assert ids(c, "SELECT command_id FROM commands") == {"c1"}
        assert ids(c, "SELECT DISTINCT command_id FROM command_history") == {"c1"}
        assert ids(c, "SELECT rev FROM energy_periods") == {3}


async def retention_metric(node: RunningNode) -> dict[str, float]:
    async with node.http() as client:
        text = (await client.get("/metrics")).text
    prefix = 'depot_node_retention_deleted_rows_total{table="'
    return {
        line.removeprefix(prefix).split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix)
    }
