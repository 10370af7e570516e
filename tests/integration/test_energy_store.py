"""The energy aggregator on real SQLite files: ``storage.energy`` reads, writes and series.

Telemetry is committed the way the storage writer commits it (``SqliteStore.commit``), the
aggregator runs its batches against :class:`storage.energy.SqliteEnergyStore`, and the result
is compared with the algorithm applied to all readings at once.
"""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import AsyncIterator, Iterable
from contextlib import closing
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.energy import PERIOD_MS, PERIODS, aggregate, compute_window, period_of
from actors.energy_aggregator import EnergyAggregator, EnergyConfig
from actors.stats import EnergyStats
from storage.energy import CURSOR_NAME, SqliteEnergyStore, energy_changes, energy_series
from storage.energy_influx import energy_line
from storage.reader import Reader
from storage.records import EnergyPeriod, EnergyReading
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
from tests.unit.test_energy import approx, boot_readings
from tests.unit.test_energy_aggregator import expected
from tests.unit.test_energy_incremental import HOUR, arrivals, meter_history


@dataclass
class Energy:
    path: Path
    store: SqliteStore
    energy: SqliteEnergyStore
    actor: EnergyAggregator
    actor_stats: EnergyStats
    batch: int

    async def insert(self, device_id: str, readings: Iterable[EnergyReading]) -> None:
        await self.store.commit([telemetry_batch(device_id, list(readings))])

    async def drain(self) -> None:
        while await self.actor.step():
            pass

    def query(self, sql: str, *args: object) -> list[tuple[object, ...]]:
        with closing(sqlite3.connect(self.path)) as conn:
            return conn.execute(sql, args).fetchall()


async def open_energy(directory: Path, batch_size: int = 2000) -> Energy:
    path = directory / "node.sqlite3"
    store = SqliteStore(path, synchronous="NORMAL")
    energy = SqliteEnergyStore(path, store)
    stats = EnergyStats()
    actor = EnergyAggregator(energy, stats, EnergyConfig(batch=batch_size))
    return Energy(path, store, energy, actor, stats, batch_size)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def energy(tmp_path: Path) -> AsyncIterator[Energy]:
    e = await open_energy(tmp_path, batch_size=5)
    yield e
    e.energy.close()
    e.store.close()


def figures(periods: list[EnergyPeriod]) -> list[tuple[int, object, object, bool]]:
    return [
        ((p.start_ms - T0_MS) // MIN, approx(p.consumed_kwh), approx(p.regenerated_kwh), p.complete) for p in periods
    ]


async def series(e: Energy, start_ms: int, end_ms: int, size_ms: int = PERIOD_MS) -> list[EnergyPeriod]:
    reader = Reader(e.path)
    try:
        return await reader.energy(DEVICE, start_ms, end_ms, size_ms)
    finally:
        reader.close()


@pytest.mark.anyio
async def test_train_scenario_on_sqlite(energy: Energy) -> None:
    await energy.insert(DEVICE, [*BOOT7, *BOOT8])
    await energy.drain()
    assert figures(await series(energy, T0_MS, T0_MS + 20 * MIN)) == list(EXPECTED_BEFORE_LATE)
    assert energy.query("SELECT name, source, position FROM cursors") == [
        (CURSOR_NAME, "telemetry", len(BOOT7) + len(BOOT8))
    ]
    revs_before = dict(energy.query("SELECT start_ms, rev FROM energy_periods"))

    await energy.insert(DEVICE, [LATE])
    await energy.drain()
    assert figures(await series(energy, T0_MS, T0_MS + 20 * MIN)) == list(EXPECTED)
    (hour,) = await series(energy, T0_MS, T0_MS + 60 * MIN, PERIODS["1h"])
    assert (hour.consumed_kwh, hour.regenerated_kwh, hour.complete) == (approx(101), approx(32), False)
    # Only the period the late reading completed changed: a forwarder sends just that one again.
    revs_after = dict(energy.query("SELECT start_ms, rev FROM energy_periods"))
    changed = {start for start, rev in revs_after.items() if revs_before.get(start) != rev}
    assert changed == {T0_MS + 15 * MIN}
    (last,) = energy.query("SELECT max(rev) FROM energy_periods")
    with closing(sqlite3.connect(energy.path)) as conn:
        (change, *more) = energy_changes(conn, last[0] - 1, 10)  # type: ignore[operator]
    assert (change.rev, change.device_id, change.device_type, more) == (last[0], DEVICE, None, [])
    assert (change.period.start_ms, change.period.complete) == (T0_MS + 15 * MIN, True)
    line = energy_line(change.device_id, change.period, device_type=change.device_type, precision="ms")
    assert line.startswith(f"energy,device_id={DEVICE},period=5m consumed_kwh=24.0,")
    assert line.endswith(f"complete=true {T0_MS + 15 * MIN}")


@pytest.mark.anyio
async def test_a_restart_resumes_from_the_cursor(tmp_path: Path) -> None:
    e = await open_energy(tmp_path)
    await e.insert(DEVICE, BOOT7)
    await e.drain()
    e.energy.close()
    e.store.close()
    e = await open_energy(tmp_path)
    try:
        await e.insert(DEVICE, [*BOOT8, LATE])
        assert await e.actor.step() == len(BOOT8) + 1  # only the new rows
        assert figures(await series(e, T0_MS, T0_MS + 20 * MIN)) == list(EXPECTED)
    finally:
        e.energy.close()
        e.store.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(boot_readings(boot=1, reactive=True), boot_readings(boot=2, reactive=True), st.data())
def test_late_and_out_of_order_readings_on_sqlite(
    first: list[EnergyReading], second: list[EnergyReading], data: st.DataObject
) -> None:
    # The second boot may overlap the first in time (a meter whose clock was reset).
    readings = [*first, *second]
    order = data.draw(st.permutations(readings), label="arrival order")
    groups = data.draw(st.integers(1, 5), label="commits")
    lo = period_of(min(r.ts_ms for r in readings))
    hi = period_of(max(r.ts_ms for r in readings)) + PERIOD_MS

    async def main(directory: Path) -> None:
        e = await open_energy(directory, batch_size=data.draw(st.integers(1, 10), label="batch"))
        try:
            for i in range(groups):
                await e.insert(DEVICE, order[i::groups])
                await e.drain()
            got = await series(e, lo, hi)
            want = [
                p
                if p.covered_ms or p.consumed_kwh or p.regenerated_kwh
                else EnergyPeriod(p.start_ms, 0, 0, None, None, 0, complete=False)
                for p in compute_window(readings, lo, hi)
            ]
            assert got == want
            for name in ("1h", "1d"):
                size = PERIODS[name]
                start, end = period_of(lo, size), period_of(hi - 1, size) + size
                big = await series(e, start, end, size)
                ref = aggregate(got, start, end, size)
                assert [(b.start_ms, b.complete, b.covered_ms) for b in big] == [
                    (b.start_ms, b.complete, b.covered_ms) for b in ref
                ]
                assert [approx(b.consumed_kwh) for b in big] == [b.consumed_kwh for b in ref]
                assert [approx(b.reactive_import_kvarh or 0) for b in big] == [
                    b.reactive_import_kvarh or 0 for b in ref
                ]
        finally:
            e.energy.close()
            e.store.close()

    with tempfile.TemporaryDirectory() as tmp:
        anyio.run(main, Path(tmp))


def test_energy_series_fills_every_period(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite3"
    SqliteStore(path).close()
    with closing(sqlite3.connect(path)) as conn:
        got = energy_series(conn, "nobody", T0_MS, T0_MS + 3 * PERIOD_MS, PERIOD_MS)
    assert got == [EnergyPeriod(T0_MS + i * PERIOD_MS, 0.0, 0.0, None, None, 0, complete=False) for i in range(3)]


@pytest.mark.anyio
async def test_scattered_late_readings(energy: Energy) -> None:
    # Two late readings far apart in seq: answered by index seeks, not by reading the range.
    readings = [EnergyReading(1, s, T0_MS + s * 10_000, 0.5 * s, 0.1 * s) for s in range(200)]
    await energy.insert(DEVICE, [r for r in readings if r.seq not in {10, 150}])
    await energy.drain()
    await energy.insert(DEVICE, [readings[150], readings[10]])
    await energy.drain()
    lo, hi = T0_MS, period_of(readings[-1].ts_ms) + PERIOD_MS
    got = await series(energy, lo, hi)
    assert got == compute_window(readings, lo, hi)
    assert all(p.complete for p in got[:-1])


@pytest.mark.anyio
async def test_late_reading_with_a_wrong_clock_on_sqlite(energy: Energy) -> None:
    # seq 1 arrives late, three hours off: the interval 0 -> 2 it splits no longer counts.
    await energy.insert(
        DEVICE, [EnergyReading(1, 0, T0_MS, 0.0, 0.0), EnergyReading(1, 2, T0_MS + 10 * MIN, 10.0, 0.0)]
    )
    await energy.drain()
    assert [p.consumed_kwh for p in await series(energy, T0_MS, T0_MS + 10 * MIN)] == [5.0, 5.0]
    await energy.insert(DEVICE, [EnergyReading(1, 1, T0_MS + 180 * MIN, 4.0, 0.0)])
    await energy.drain()
    got = await series(energy, T0_MS, T0_MS + 10 * MIN)
    assert [(p.consumed_kwh, p.complete) for p in got] == [(0.0, False), (0.0, False)]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(meter_history(), min_size=1, max_size=3), st.data())
def test_incremental_path_on_sqlite(histories: list[list[EnergyReading]], data: st.DataObject) -> None:
    # Meters in order with a few late readings (tests/unit/test_energy_incremental.py), committed
    # in groups; the aggregator runs between some of them and is restarted (memory lost) at others.
    meters = {f"emu-{i}": h for i, h in enumerate(histories)}
    order = data.draw(arrivals(meters), label="arrival")
    cuts = data.draw(st.lists(st.tuples(st.integers(1, len(order)), st.booleans()), max_size=5), label="runs")

    async def main(directory: Path) -> None:
        e = await open_energy(directory, batch_size=data.draw(st.integers(1, 10), label="batch"))
        try:
            done = 0
            for cut, restart in sorted(cuts):
                await insert_all(e, order[done:cut])
                done = max(done, cut)
                if restart:
                    e.actor = EnergyAggregator(e.energy, e.actor_stats, EnergyConfig(batch=e.batch))
                await e.drain()
            await insert_all(e, order[done:])
            await e.drain()
            assert e.actor_stats.readings == len(order)
            reader = Reader(e.path)
            try:
                for device, readings in meters.items():
                    lo, hi = period_of(min(r.ts_ms for r in readings)), period_of(max(r.ts_ms for r in readings))
                    assert await reader.energy(device, lo, hi + PERIOD_MS, PERIOD_MS) == expected(
                        readings, lo, hi + PERIOD_MS, HOUR
                    ), device
            finally:
                reader.close()
        finally:
            e.energy.close()
            e.store.close()

    with tempfile.TemporaryDirectory() as tmp:
        anyio.run(main, Path(tmp))


async def insert_all(e: Energy, items: list[tuple[str, EnergyReading]]) -> None:
    """Commit *items* in arrival order, consecutive readings of one device in one batch."""
    for device, group in groupby(items, key=lambda item: item[0]):
        await e.insert(device, [r for _, r in group])
