"""The InfluxDB forwarder's energy stream: energy periods, followed by ``rev``, to the InfluxDB test
server as the ``energy`` measurement (every line passes its contract checks), with a period that
a late reading changes written again over its own point, outages retried, and a restart that
resumes from the stream's own cursor."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from actors.energy_aggregator import EnergyAggregator, EnergyConfig
from actors.forwarder import Forwarder, ForwarderConfig
from actors.stats import EnergyStats, ForwarderStats
from node.forwarding import INFLUXDB_ENERGY
from storage.energy import EnergyChange, SqliteEnergyStore
from storage.influx_sink import InfluxSink, energy_change_line
from storage.outbox import EnergySource, Outbox
from storage.records import EnergyReading
from storage.sqlite import SqliteStore
from tests.energy_scenario import (
    BOOT7,
    BOOT8,
    DEVICE,
    EXPECTED,
    EXPECTED_BEFORE_LATE,
    LATE,
    MIN,
    T0_MS,
    telemetry_batch,
)

from .conftest import register
from .influx_fake import BUCKET, ORG, TOKEN, FakeInflux

pytestmark = pytest.mark.anyio


def sink(fake: FakeInflux, *, timeout_s: float = 2.0) -> InfluxSink[EnergyChange]:
    return InfluxSink(fake.url, ORG, BUCKET, TOKEN, timeout_s=timeout_s, gzip=True, line=energy_change_line)


def config() -> ForwarderConfig:
    return ForwarderConfig(
        name=INFLUXDB_ENERGY, batch_rows=2, poll_interval=0.02, retry_initial=0.02, retry_max=0.2, monitor_interval=0.1
    )


@pytest.fixture
async def aggregator(store: SqliteStore, db_path: Path) -> AsyncIterator[EnergyAggregator]:
    await register(store, DEVICE)
    energy = SqliteEnergyStore(db_path, store)
    yield EnergyAggregator(energy, EnergyStats(), EnergyConfig(batch=5))
    energy.close()


async def aggregate(
    store: SqliteStore, db_path: Path, aggregator: EnergyAggregator, readings: list[EnergyReading]
) -> int:
    """Commit *readings* as the writer does, aggregate them all; returns the newest ``rev``."""
    await store.commit([telemetry_batch(DEVICE, readings)])
    while await aggregator.step():
        pass
    with contextlib.closing(sqlite3.connect(db_path)) as c:
        return int(c.execute("SELECT max(rev) FROM energy_periods").fetchone()[0])


def energy_points(fake: FakeInflux) -> list[tuple[int, float, float, bool]]:
    """The ``energy`` points as (minutes after 16:00, consumed, regenerated, complete), oldest first."""
    out = []
    for (measurement, tags, ts), fields in sorted(fake.points.items(), key=lambda item: item[0][2]):
        if measurement != "energy":
            continue
        assert dict(tags) == {"device_id": DEVICE, "period": "5m", "type": "dc_meter"}
        consumed, regenerated, complete = fields["consumed_kwh"], fields["regenerated_kwh"], fields["complete"]
        assert isinstance(consumed, float)
        assert isinstance(regenerated, float)
        assert isinstance(complete, bool)
        out.append(((ts - T0_MS) // MIN, round(consumed, 6), round(regenerated, 6), complete))
    return out


async def wait_for(predicate: object, within: float = 60.0) -> None:
    with anyio.fail_after(within):
        while not predicate():  # type: ignore[operator]
            await anyio.sleep(0.02)


async def test_periods_are_forwarded_and_a_late_reading_rewrites_its_point(
    store: SqliteStore, db_path: Path, influx: FakeInflux, aggregator: EnergyAggregator
) -> None:
    rev = await aggregate(store, db_path, aggregator, [*BOOT7, *BOOT8])
    outbox = Outbox(db_path)
    stats = ForwarderStats()
    try:
        assert (await outbox.backlog("energy_periods", 0)).rows == len(EXPECTED_BEFORE_LATE)
        async with sink(influx) as s, anyio.create_task_group() as tg:
            influx.retry_after = "0.05"
            influx.fail("500", "429")  # an outage first: retried, nothing skipped
            tg.start_soon(Forwarder(EnergySource(outbox, INFLUXDB_ENERGY), s, config(), stats).run)
            await wait_for(lambda: stats.position == rev)
            assert energy_points(influx) == list(EXPECTED_BEFORE_LATE)
            assert stats.failures == 2
            lines = influx.lines_received

            # The late reading completes 16:15-16:20: that period alone is sent again, over its point.
            rev = await aggregate(store, db_path, aggregator, [LATE])
            await wait_for(lambda: stats.position == rev)
            tg.cancel_scope.cancel()
        assert energy_points(influx) == list(EXPECTED)
        assert influx.lines_received == lines + 1
        assert (await outbox.backlog("energy_periods", rev)).rows == 0
        with contextlib.closing(sqlite3.connect(db_path)) as c:
            cursor = c.execute("SELECT source, position FROM cursors WHERE name = ?", (INFLUXDB_ENERGY,)).fetchone()
        assert cursor == ("energy_periods", rev)
    finally:
        outbox.close()


async def test_a_restart_resumes_from_its_cursor_and_replays_are_idempotent(
    store: SqliteStore, db_path: Path, influx: FakeInflux, aggregator: EnergyAggregator
) -> None:
    rev = await aggregate(store, db_path, aggregator, [*BOOT7, *BOOT8, LATE])
    outbox = Outbox(db_path)
    try:
        async with sink(influx) as s:
            first = ForwarderStats()
            async with anyio.create_task_group() as tg:
                tg.start_soon(Forwarder(EnergySource(outbox, INFLUXDB_ENERGY), s, config(), first).run)
                await wait_for(lambda: first.position == rev)
                tg.cancel_scope.cancel()
            points = dict(influx.points)
            lines = influx.lines_received
            # A replay of everything (a crash after the sink's answer, before the cursor moved).
            await s.send(await outbox.energy_after(0, 100))
            assert influx.points == points
            second = ForwarderStats()
            async with anyio.create_task_group() as tg:
                tg.start_soon(Forwarder(EnergySource(outbox, INFLUXDB_ENERGY), s, config(), second).run)
                await wait_for(lambda: second.checked_at is not None)
                tg.cancel_scope.cancel()
        # The second run started at the cursor: nothing more to send.
        assert (second.position, second.rows, second.rows_behind) == (rev, 0, 0)
        assert influx.lines_received == lines + len(EXPECTED)
        assert energy_points(influx) == list(EXPECTED)
    finally:
        outbox.close()


async def test_the_drop_policy_skips_energy_changes_by_rev(
    store: SqliteStore, db_path: Path, aggregator: EnergyAggregator
) -> None:
    rev = await aggregate(store, db_path, aggregator, [*BOOT7, *BOOT8])
    outbox = Outbox(db_path)
    try:
        source = EnergySource(outbox, INFLUXDB_ENERGY)
        changes = await outbox.energy_after(0, 100)
        assert [c.id for c in changes] == sorted(c.rev for c in changes)
        assert await source.drop_oldest(0, 2) == changes[1].rev
        assert await source.position() == changes[1].rev
        assert (await source.backlog(changes[1].rev)).rows == len(changes) - 2
        assert await source.drop_oldest(changes[1].rev, 100) == rev
    finally:
        outbox.close()
