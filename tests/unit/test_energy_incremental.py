"""The energy aggregator's incremental path (``actors.energy_state``): readings in order are
extended in memory, and whatever they arrive like, the stored periods are exactly those of
:func:`actors.energy.compute_window` over all readings.

The property drives the real aggregator against :class:`FakeEnergyStore` (rowids as SQLite
gives them). Its meters do what real ones do now and then: up to three boots (a new boot's
clock may start before the old one's last reading), sequence gaps, readings at the same
millisecond, a clock that goes back, pauses longer than ``max_interval``, a register that
decreases, and AC readings that lack their reactive registers. Arrival is what the node sees:
each meter in order, meters interleaved at random, and a few readings held back to arrive
later. The aggregator runs at random points, in random batch sizes, is restarted (its memory
lost) and has saves fail. Register values are multiples of 1/1024 kWh as in
``tests/unit/test_energy.py``.

The comparison is exact, float for float: the incremental path adds each interval after every
interval before it in ``(boot, seq)`` order, as the computation from scratch does, so no
tolerance is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from actors.energy import PERIOD_MS, period_of
from actors.energy_aggregator import EnergyAggregator, EnergyConfig
from actors.energy_state import DeviceEnergy
from actors.stats import EnergyStats
from storage.errors import StorageError
from storage.records import EnergyPeriod, EnergyReading
from tests.energy_scenario import T0_MS
from tests.unit.test_energy import register_steps, time_steps
from tests.unit.test_energy_aggregator import FakeEnergyStore, expected, stored

HOUR = 3_600_000

#: What happens between two readings of a boot, most often nothing special.
QUIRKS = ["ok"] * 12 + ["gap", "same_ms", "clock_back", "long_pause", "decrease", "no_reactive"]


@st.composite
def meter_history(draw: st.DrawFn) -> list[EnergyReading]:
    """One meter's readings in ``(boot, seq)`` order (see the module docstring)."""
    out: list[EnergyReading] = []
    ts = T0_MS + draw(st.integers(0, PERIOD_MS))
    for boot in range(1, draw(st.integers(1, 3)) + 1):
        ac = draw(st.booleans())
        imp, exp, ri, re_ = draw(register_steps), draw(register_steps), 0.0, 0.0
        seq = draw(st.integers(0, 3))
        if boot > 1:
            ts += draw(st.integers(-2 * PERIOD_MS, 2 * PERIOD_MS))
        for _ in range(draw(st.integers(1, 20))):
            quirk = draw(st.sampled_from(QUIRKS))
            extra = {"reactive_import_kvarh": ri, "reactive_export_kvarh": re_} if ac and quirk != "no_reactive" else {}
            out.append(EnergyReading(boot, seq, ts, imp, exp, **extra))
            seq += 1 + (draw(st.integers(1, 5)) if quirk == "gap" else 0)
            if quirk == "same_ms":
                pass
            elif quirk == "long_pause":
                ts += 2 * HOUR
            else:
                ts += -draw(time_steps) if quirk == "clock_back" else draw(time_steps)
            imp += -1.0 if quirk == "decrease" else draw(register_steps)
            exp += draw(register_steps)
            ri += draw(register_steps)
            re_ += draw(register_steps)
    return out


@st.composite
def arrivals(draw: st.DrawFn, histories: dict[str, list[EnergyReading]]) -> list[tuple[str, EnergyReading]]:
    """Each meter in order, meters interleaved at random, a few readings held back."""
    queues = {device: list(history) for device, history in histories.items()}
    order: list[tuple[str, EnergyReading]] = []
    while any(queues.values()):
        device = draw(st.sampled_from(sorted(d for d, q in queues.items() if q)))
        order.append((device, queues[device].pop(0)))
    for i in sorted(draw(st.lists(st.integers(0, len(order) - 1), max_size=4, unique=True)), reverse=True):
        held = order.pop(i)
        order.insert(draw(st.integers(i, len(order))), held)
    return order


def window_of(readings: Sequence[EnergyReading]) -> tuple[int, int]:
    return period_of(min(r.ts_ms for r in readings)), period_of(max(r.ts_ms for r in readings)) + PERIOD_MS


async def drain(actor: EnergyAggregator) -> None:
    """Run batches until none is left, retrying after a failed save as the actor's loop does."""
    while True:
        try:
            if not await actor.step():
                return
        except StorageError:
            continue


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(meter_history(), min_size=1, max_size=3), st.data())
def test_stored_periods_are_exact_whatever_the_arrival(
    histories: list[list[EnergyReading]], data: st.DataObject
) -> None:
    meters = {f"emu-{i}": h for i, h in enumerate(histories)}
    order = data.draw(arrivals(meters), label="arrival")
    events = data.draw(
        st.lists(st.tuples(st.integers(0, len(order)), st.sampled_from(["run", "run", "restart", "fail_save"]))),
        label="aggregator events after n arrivals",
    )
    batch = data.draw(st.integers(1, 12), label="batch")

    async def main() -> None:
        store = FakeEnergyStore()
        stats = EnergyStats()

        def new_actor() -> EnergyAggregator:
            return EnergyAggregator(store, stats, EnergyConfig(batch=batch, max_interval_ms=HOUR))

        actor = new_actor()
        for i in range(len(order) + 1):
            for _, what in (e for e in events if e[0] == i):
                if what == "restart":
                    actor = new_actor()
                elif what == "fail_save":
                    store.fail_save_next = 1
                else:
                    await drain(actor)
            if i < len(order):
                store.insert(*order[i])
        await drain(actor)
        # How much went the incremental way (pytest --hypothesis-show-statistics).
        event("readings extended in memory", f"{(stats.readings - stats.readings_recomputed) * 10 // stats.readings}0%")
        for device, readings in meters.items():
            lo, hi = window_of(readings)
            assert stored(store, device, lo, hi) == expected(readings, lo, hi, HOUR), device

    trio.run(main)


def steady(device: str, seqs: range, boot: int = 1) -> list[EnergyReading]:
    """A meter reading every 10 s, 0.5 kWh each time."""
    return [EnergyReading(boot, s, T0_MS + s * 10_000, 0.5 * s, 0.125 * s) for s in seqs]


@pytest.mark.trio
async def test_readings_in_order_are_extended_without_reading_the_table() -> None:
    store = FakeEnergyStore()
    stats = EnergyStats()
    actor = EnergyAggregator(store, stats, EnergyConfig(batch=1000))
    for d in range(3):
        store.insert(f"emu-{d}", *steady(f"emu-{d}", range(10)))
    await drain(actor)
    assert stats.readings_recomputed == 30  # nothing in memory yet: the first rows are recomputed
    reads, saved = store.reads, store.saved_periods
    for chunk in range(10, 100, 15):
        for d in range(3):
            store.insert(f"emu-{d}", *steady(f"emu-{d}", range(chunk, chunk + 15)))
        await drain(actor)
    assert (stats.readings, stats.readings_recomputed) == (300, 30)
    assert store.reads == reads  # only new_readings since: no neighbours, no windows
    whole = steady("", range(100))
    lo, hi = window_of(whole)
    for d in range(3):
        assert stored(store, f"emu-{d}", lo, hi) == expected(whole, lo, hi)
    # Each batch wrote each period it changed once (15 readings, 150 s: at most 2 periods).
    assert store.saved_periods - saved <= 6 * 3 * 2


@pytest.mark.trio
async def test_a_late_reading_is_recomputed_and_the_device_goes_on_incrementally() -> None:
    store = FakeEnergyStore()
    stats = EnergyStats()
    actor = EnergyAggregator(store, stats)
    whole = steady("emu-1", range(100))
    store.insert("emu-1", *[r for r in whole[:60] if r.seq != 20])
    await drain(actor)
    store.insert("emu-1", whole[20], *whole[60:70])  # only the late one is recomputed
    await drain(actor)
    assert stats.readings_recomputed == 59 + 1
    store.insert("emu-1", *whole[70:])
    await drain(actor)
    assert stats.readings_recomputed == 59 + 1
    lo, hi = window_of(whole)
    assert stored(store, "emu-1", lo, hi) == expected(whole, lo, hi)


@pytest.mark.trio
async def test_a_failed_save_forgets_the_memory_and_counts_nothing_twice() -> None:
    store = FakeEnergyStore()
    stats = EnergyStats()
    actor = EnergyAggregator(store, stats)
    whole = steady("emu-1", range(90))
    store.insert("emu-1", *whole[:30])
    await drain(actor)
    store.insert("emu-1", *whole[30:60])
    store.fail_save_next = 1
    with pytest.raises(StorageError):
        await actor.step()  # the batch was taken into memory, then not saved
    await drain(actor)
    store.insert("emu-1", *whole[60:])
    await drain(actor)
    lo, hi = window_of(whole)
    assert stored(store, "emu-1", lo, hi) == expected(whole, lo, hi)
    assert stats.readings_recomputed == 30 + 30  # after the failure it started from the store


def test_state_refuses_what_needs_the_table() -> None:
    rs = steady("emu-1", range(40))
    fresh = lambda: DeviceEnergy.build(rs[29], rs[:30], period_of(rs[29].ts_ms) + PERIOD_MS, HOUR)  # noqa: E731
    assert fresh().extend([rs[30], rs[31]], HOUR) is not None
    assert fresh().extend([rs[31], rs[30]], HOUR) == fresh().extend([rs[30], rs[31]], HOUR)  # taken in seq order
    assert fresh().extend([rs[31], rs[28]], HOUR) is None  # below the tip: late
    assert fresh().extend([rs[29]], HOUR) is None  # not newer than the tip
    back = rs[30]._replace(ts_ms=rs[29].ts_ms - 2 * PERIOD_MS)
    assert fresh().extend([back], HOUR) is None  # the clock went back before the open periods
    assert fresh().extend([EnergyReading(0, 99, rs[35].ts_ms, 0.0, 0.0)], HOUR) is None  # an older boot
    # A newer boot whose clock starts inside the open period, then overlaps the old boot's time:
    # the spans are not kept, so the state cannot union them.
    reboot = [EnergyReading(2, 0, rs[29].ts_ms - 5_000, 0.0, 0.0), EnergyReading(2, 1, rs[29].ts_ms + 5_000, 1.0, 0.0)]
    assert period_of(reboot[0].ts_ms) == period_of(rs[29].ts_ms)
    assert fresh().extend(reboot, HOUR) is None


def test_state_changes_exactly_the_periods_it_returns() -> None:
    rs = steady("emu-1", range(100))
    state = DeviceEnergy.build(rs[0], rs[:1], period_of(rs[0].ts_ms) + PERIOD_MS, HOUR)
    changed: dict[int, EnergyPeriod] = {}
    for i in range(1, 100, 7):
        got = state.extend(rs[i : i + 7], HOUR)
        assert got is not None
        changed |= {p.start_ms: p for p in got}
    lo, hi = window_of(rs)
    assert list(changed.values()) == expected(rs, lo, hi)
