"""The energy aggregator actor against an in-memory telemetry table, on trio's autojump clock.

:class:`FakeEnergyStore` keeps telemetry rows with rowids the way SQLite does and answers the
:class:`storage.interfaces.EnergyStore` calls from them; its window reads return every reading
of the device (a superset of what SQLite returns, which gives the same periods), so these tests
check the actor's choice of periods to recompute. ``tests/integration/test_energy_store.py``
runs the same property against the SQLite store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.energy import DEFAULT_MAX_INTERVAL_MS, PERIOD_MS, compute_window, period_of
from actors.energy_aggregator import EnergyAggregator, EnergyConfig
from actors.stats import EnergyStats
from actors.supervisor import RestartPolicy, supervise
from storage.errors import StorageError
from storage.records import EnergyHead, EnergyInput, EnergyNeighbours, EnergyPeriod, EnergyReading
from tests.energy_scenario import BOOT7, BOOT8, DEVICE, EXPECTED, EXPECTED_BEFORE_LATE, LATE, MIN, T0_MS
from tests.unit.test_energy import approx, boot_readings


class StoreBugError(Exception):
    """An unexpected failure (not a StorageError): the actor crashes and is restarted."""


@dataclass
class FakeEnergyStore:
    rows: list[tuple[int, str, EnergyReading]] = field(default_factory=list)
    periods: dict[tuple[str, int], EnergyPeriod] = field(default_factory=dict)
    cursor: int = 0
    saves: int = 0
    fail_next: int = 0
    crash_next: int = 0
    #: Fail the next save_energy calls (after the batch was taken in).
    fail_save_next: int = 0
    #: Calls that read more than the new rows (neighbours, windows, heads).
    reads: int = 0
    #: Periods handed to save_energy, changed or not.
    saved_periods: int = 0

    def insert(self, device_id: str, *readings: EnergyReading) -> None:
        for r in readings:
            self.rows.append((len(self.rows) + 1, device_id, r))

    async def _io(self) -> None:
        await trio.lowlevel.checkpoint()
        if self.crash_next > 0:
            self.crash_next -= 1
            raise StoreBugError
        if self.fail_next > 0:
            self.fail_next -= 1
            raise StorageError("database is locked (injected)")

    async def energy_cursor(self) -> int:
        await self._io()
        return self.cursor

    async def new_readings(self, after: int, limit: int) -> list[EnergyInput]:
        await self._io()
        return [EnergyInput(i, d, r) for i, d, r in self.rows if i > after][:limit]

    async def neighbours(
        self, keys: Sequence[tuple[str, int, int]], old_until: int, until: int
    ) -> list[EnergyNeighbours]:
        await self._io()
        self.reads += 1

        def near(device: str, boot: int, seq: int, until: int) -> tuple[EnergyReading | None, EnergyReading | None]:
            same = [r for i, d, r in self.rows if d == device and r.boot == boot and i <= until]
            below = [r for r in same if r.seq < seq]
            above = [r for r in same if r.seq > seq]
            return max(below, key=lambda r: r.seq, default=None), min(above, key=lambda r: r.seq, default=None)

        out = []
        for device, boot, seq in keys:
            pred, succ = near(device, boot, seq, until)
            old_pred, old_succ = near(device, boot, seq, old_until)
            out.append(EnergyNeighbours(pred, succ, old_pred, old_succ))
        return out

    async def window_readings(self, windows: Sequence[tuple[str, int, int]], until: int) -> list[list[EnergyReading]]:
        await self._io()
        self.reads += 1
        return [[r for i, d, r in self.rows if d == device and i <= until] for device, _, _ in windows]

    async def heads(self, devices: Sequence[str], until: int) -> list[EnergyHead | None]:
        await self._io()
        self.reads += 1
        out: list[EnergyHead | None] = []
        for device in devices:
            mine = [r for i, d, r in self.rows if d == device and i <= until]
            if not mine:
                out.append(None)
                continue
            tip = max(mine, key=lambda r: (r.boot, r.seq))
            out.append(EnergyHead(tip, max(r.ts_ms for r in mine if r.ts_ms >= period_of(tip.ts_ms))))
        return out

    async def save_energy(self, periods: Sequence[tuple[str, EnergyPeriod]], position: int) -> int:
        await self._io()
        if self.fail_save_next > 0:
            self.fail_save_next -= 1
            raise StorageError("disk I/O error (injected)")
        self.saved_periods += len(periods)
        changed = 0
        for device, p in periods:
            old = self.periods.get((device, p.start_ms))
            if old != p and (old is not None or p.covered_ms > 0 or p.consumed_kwh or p.regenerated_kwh):
                self.periods[device, p.start_ms] = p
                changed += 1
        self.cursor = position
        self.saves += 1
        return changed


def stored(store: FakeEnergyStore, device: str, start_ms: int, end_ms: int) -> list[EnergyPeriod]:
    """The periods as the API shows them: a missing row is empty and incomplete."""
    empty = lambda s: EnergyPeriod(s, 0.0, 0.0, None, None, 0, complete=False)  # noqa: E731
    return [store.periods.get((device, s)) or empty(s) for s in range(start_ms, end_ms, PERIOD_MS)]


def expected(
    readings: list[EnergyReading], start_ms: int, end_ms: int, max_interval_ms: int = DEFAULT_MAX_INTERVAL_MS
) -> list[EnergyPeriod]:
    """The periods from scratch as the store keeps them: a period without content has no row."""
    return [
        p
        if p.covered_ms or p.consumed_kwh or p.regenerated_kwh
        else EnergyPeriod(p.start_ms, 0.0, 0.0, None, None, 0, complete=False)
        for p in compute_window(readings, start_ms, end_ms, max_interval_ms)
    ]


async def drain(actor: EnergyAggregator) -> None:
    while await actor.step():
        pass


@pytest.mark.trio
async def test_train_scenario_with_a_late_reading() -> None:
    store = FakeEnergyStore()
    actor = EnergyAggregator(store, EnergyStats(), EnergyConfig(batch=3))
    store.insert(DEVICE, *BOOT7, *BOOT8)
    await drain(actor)
    got = stored(store, DEVICE, T0_MS, T0_MS + 20 * MIN)
    assert [
        ((p.start_ms - T0_MS) // MIN, approx(p.consumed_kwh), approx(p.regenerated_kwh), p.complete) for p in got
    ] == [*EXPECTED_BEFORE_LATE]
    store.insert(DEVICE, LATE)
    await drain(actor)
    got = stored(store, DEVICE, T0_MS, T0_MS + 20 * MIN)
    assert [
        ((p.start_ms - T0_MS) // MIN, approx(p.consumed_kwh), approx(p.regenerated_kwh), p.complete) for p in got
    ] == [*EXPECTED]


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(boot_readings(boot=1), boot_readings(boot=2, start_ms=T0_MS + 40 * MIN), st.data())
def test_arrival_order_and_batching_do_not_matter(
    first: list[EnergyReading], second: list[EnergyReading], data: st.DataObject
) -> None:
    readings = [*first, *second]
    order = data.draw(st.permutations(readings), label="arrival order")
    cuts = data.draw(st.lists(st.integers(0, len(order)), max_size=6), label="aggregator runs after")
    batch = data.draw(st.integers(1, 8), label="batch")

    async def main() -> None:
        store = FakeEnergyStore()
        actor = EnergyAggregator(store, EnergyStats(), EnergyConfig(batch=batch))
        for i, r in enumerate(order):
            store.insert("emu-1", r)
            if i in cuts:
                await drain(actor)
        await drain(actor)
        lo = period_of(min(r.ts_ms for r in readings))
        hi = period_of(max(r.ts_ms for r in readings)) + PERIOD_MS
        assert stored(store, "emu-1", lo, hi) == expected(readings, lo, hi)

    trio.run(main)


@pytest.mark.trio
async def test_storage_failures_are_retried_and_lose_nothing(autojump_clock: trio.testing.MockClock) -> None:
    store = FakeEnergyStore()
    stats = EnergyStats()
    actor = EnergyAggregator(store, stats, EnergyConfig(poll_interval=0.5))
    store.insert(DEVICE, *BOOT7, *BOOT8, LATE)
    store.fail_next = 4
    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor.run)
        while store.cursor < len(store.rows):
            await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert stats.failures == 4
    assert stats.position == len(store.rows)
    got = stored(store, DEVICE, T0_MS, T0_MS + 20 * MIN)
    assert [
        ((p.start_ms - T0_MS) // MIN, approx(p.consumed_kwh), approx(p.regenerated_kwh), p.complete) for p in got
    ] == [*EXPECTED]


@pytest.mark.trio
async def test_crash_restarts_from_the_cursor(autojump_clock: trio.testing.MockClock) -> None:
    store = FakeEnergyStore()
    stats = EnergyStats()
    actor = EnergyAggregator(store, stats, EnergyConfig(batch=4, poll_interval=0.5))
    store.insert(DEVICE, *BOOT7)
    restarts: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: supervise(
                "energy", actor.run, RestartPolicy(max_restarts=5), on_restart=lambda n, e: restarts.append(n)
            )
        )
        while store.cursor < len(store.rows):
            await trio.sleep(0.1)
        store.crash_next = 1
        store.insert(DEVICE, *BOOT8, LATE)
        while store.cursor < len(store.rows):
            await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert restarts == ["energy"]
    got = stored(store, DEVICE, T0_MS, T0_MS + 20 * MIN)
    assert [p.complete for p in got] == [e[3] for e in EXPECTED]


@pytest.mark.trio
async def test_nudge_wakes_the_aggregator_before_its_poll(autojump_clock: trio.testing.MockClock) -> None:
    store = FakeEnergyStore()
    actor = EnergyAggregator(store, EnergyStats(), EnergyConfig(poll_interval=3600.0))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor.run)
        await trio.sleep(1)
        store.insert(DEVICE, *BOOT7)
        started = trio.current_time()
        actor.nudge()
        while store.cursor < len(store.rows):
            await trio.sleep(0.01)
        assert trio.current_time() - started < 1
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_late_reading_with_a_wrong_clock_recomputes_the_interval_it_splits() -> None:
    # seq 1 arrives late with a time three hours off: the interval 0 -> 2 that counted 10 kWh
    # over 16:00-16:10 is gone, and neither new interval is counted.
    store = FakeEnergyStore()
    actor = EnergyAggregator(store, EnergyStats())
    p, s = EnergyReading(1, 0, T0_MS, 0.0, 0.0), EnergyReading(1, 2, T0_MS + 10 * MIN, 10.0, 0.0)
    store.insert(DEVICE, p, s)
    await drain(actor)
    assert [x.consumed_kwh for x in stored(store, DEVICE, T0_MS, T0_MS + 10 * MIN)] == [5.0, 5.0]
    store.insert(DEVICE, EnergyReading(1, 1, T0_MS + 180 * MIN, 4.0, 0.0))
    await drain(actor)
    got = stored(store, DEVICE, T0_MS, T0_MS + 10 * MIN)
    assert [(x.consumed_kwh, x.complete) for x in got] == [(0.0, False), (0.0, False)]
