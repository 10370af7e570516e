"""The energy-per-period algorithm (``actors.energy``): hand-computed figures and properties.

The property tests draw meters the way the protocol allows them: within a boot ``seq`` grows
by one per reading and device time grows with it (0 to 10 minutes between readings, so both
intervals inside one period and intervals across several occur), registers never decrease
within a boot (0 to 50 kWh per interval), and a reboot starts the registers again anywhere
(usually at 0). Values are multiples of 1/1024 kWh so that sums are exact in binary floating
point except for the linear split at period boundaries, which the comparisons allow for.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.energy import PERIOD_MS, PERIODS, aggregate, compute_window, merge_runs, period_of
from storage.records import EnergyPeriod, EnergyReading
from tests.energy_scenario import (
    BOOT7,
    BOOT8,
    EXPECTED,
    EXPECTED_BEFORE_LATE,
    EXPECTED_HOUR,
    LATE,
    MIN,
    T0_MS,
)

HOUR = 3_600_000


def approx(value: float) -> object:
    return pytest.approx(value, rel=1e-9, abs=1e-9)


def figures(periods: list[EnergyPeriod]) -> list[tuple[int, float, float, bool]]:
    return [((p.start_ms - T0_MS) // MIN, p.consumed_kwh, p.regenerated_kwh, p.complete) for p in periods]


# -- the simulated train, by hand -------------------------------------------------------------------


def test_train_with_reboot_matches_hand_computed_figures() -> None:
    got = compute_window([*BOOT7, *BOOT8], T0_MS, T0_MS + 20 * MIN)
    assert [(m, approx(c), approx(r), ok) for m, c, r, ok in figures(got)] == [
        (m, c, r, ok) for m, c, r, ok in EXPECTED_BEFORE_LATE
    ]


def test_late_reading_completes_its_period_without_changing_the_totals() -> None:
    got = compute_window([LATE, *BOOT8, *BOOT7], T0_MS, T0_MS + 20 * MIN)
    assert [(m, approx(c), approx(r), ok) for m, c, r, ok in figures(got)] == EXPECTED


def test_hour_is_the_sum_of_its_periods() -> None:
    fives = compute_window([*BOOT7, *BOOT8, LATE], T0_MS, T0_MS + HOUR)
    (hour,) = aggregate(fives, T0_MS, T0_MS + HOUR, PERIODS["1h"])
    assert (approx(hour.consumed_kwh), approx(hour.regenerated_kwh), hour.complete) == EXPECTED_HOUR


def test_boot_seven_energy_is_all_there() -> None:
    got = compute_window(BOOT7, T0_MS, T0_MS + 10 * MIN)
    assert sum(p.consumed_kwh for p in got) == approx(1045 - 1000)
    assert sum(p.regenerated_kwh for p in got) == approx(512 - 500)


# -- single rules ---------------------------------------------------------------------------------


def r(seq: int, at_s: float, imp: float, exp: float = 0.0, *, boot: int = 1, **reactive: float) -> EnergyReading:
    return EnergyReading(boot, seq, T0_MS + int(at_s * 1000), imp, exp, **reactive)


def test_reading_exactly_on_a_boundary_splits_nothing() -> None:
    got = compute_window([r(0, 0, 0), r(1, 300, 5), r(2, 600, 12)], T0_MS, T0_MS + 2 * PERIOD_MS)
    assert [(p.consumed_kwh, p.covered_ms, p.complete) for p in got] == [(5, PERIOD_MS, True), (7, PERIOD_MS, True)]


def test_decreasing_register_is_not_counted_and_flags_its_period() -> None:
    got = compute_window([r(0, 0, 10), r(1, 100, 12), r(2, 200, 3), r(3, 300, 4)], T0_MS, T0_MS + PERIOD_MS)
    (p,) = got
    assert p.consumed_kwh == approx(2 + 1)
    assert not p.complete


def test_sequence_gap_counts_the_energy_but_is_incomplete() -> None:
    (p,) = compute_window([r(0, 0, 0), r(2, 300, 7)], T0_MS, T0_MS + PERIOD_MS)
    assert (p.consumed_kwh, p.covered_ms, p.complete) == (7, PERIOD_MS, False)


def test_readings_more_than_a_period_apart_are_incomplete() -> None:
    got = compute_window([r(0, 0, 0), r(1, 600, 10)], T0_MS, T0_MS + 2 * PERIOD_MS)
    assert [(p.consumed_kwh, p.complete) for p in got] == [(5, False), (5, False)]


def test_interval_longer_than_the_maximum_is_not_counted() -> None:
    got = compute_window([r(0, 0, 0), r(1, 7200, 10)], T0_MS, T0_MS + 7200_000, max_interval_ms=HOUR)
    assert all(p.consumed_kwh == 0 and not p.complete for p in got)


def test_clock_going_back_is_not_counted() -> None:
    got = compute_window([r(0, 0, 0), r(1, 200, 5), r(2, 100, 6), r(3, 300, 7)], T0_MS, T0_MS + PERIOD_MS)
    (p,) = got
    assert not p.complete
    assert p.consumed_kwh == approx(5 + 1)


def test_two_readings_in_one_millisecond_keep_their_energy() -> None:
    (p,) = compute_window([r(0, 0, 0), r(1, 100, 5), r(2, 100, 6), r(3, 300, 7)], T0_MS, T0_MS + PERIOD_MS)
    assert (p.consumed_kwh, p.complete) == (approx(7), True)


def test_reactive_energy_of_an_ac_meter() -> None:
    readings = [
        r(0, 0, 0, 0, reactive_import_kvarh=100, reactive_export_kvarh=50),
        r(1, 150, 3, 1, reactive_import_kvarh=104, reactive_export_kvarh=50),
        r(2, 300, 6, 1, reactive_import_kvarh=108, reactive_export_kvarh=52),
    ]
    (p,) = compute_window(readings, T0_MS, T0_MS + PERIOD_MS)
    assert (p.reactive_import_kvarh, p.reactive_export_kvarh, p.complete) == (8, 2, True)


def test_dc_meter_has_no_reactive_energy() -> None:
    (p,) = compute_window([r(0, 0, 0), r(1, 300, 1)], T0_MS, T0_MS + PERIOD_MS)
    assert (p.reactive_import_kvarh, p.reactive_export_kvarh, p.complete) == (None, None, True)


def test_reactive_register_missing_from_one_reading_flags_the_period() -> None:
    readings = [r(0, 0, 0, reactive_import_kvarh=1, reactive_export_kvarh=1), r(1, 300, 4)]
    (p,) = compute_window(readings, T0_MS, T0_MS + PERIOD_MS)
    assert (p.consumed_kwh, p.reactive_import_kvarh, p.complete) == (4, None, False)


def test_boots_overlapping_in_time_are_incomplete() -> None:
    # A meter whose clock went back at a reboot: both boots claim 16:00-16:05.
    first = [r(0, 0, 0), r(1, 300, 5)]
    second = [r(0, 0, 100, boot=2), r(1, 300, 104, boot=2)]
    (p,) = compute_window([*first, *second], T0_MS, T0_MS + PERIOD_MS)
    assert (p.consumed_kwh, p.covered_ms, p.complete) == (9, PERIOD_MS, False)


def test_merge_runs_joins_touching_ranges() -> None:
    p = PERIOD_MS
    assert merge_runs([(5 * p, 6 * p), (0, 0), (p, 2 * p), (7 * p, 7 * p)]) == [(0, 3 * p), (5 * p, 8 * p)]


# -- properties -----------------------------------------------------------------------------------

#: 1/1024 kWh steps: exact in binary, so only the split at boundaries rounds.
register_steps = st.integers(min_value=0, max_value=50 * 1024).map(lambda n: n / 1024)
#: Readings 1 s to 10 min apart (ms): inside one period, and across several.
time_steps = st.integers(min_value=1_000, max_value=600_000)


@st.composite
def boot_readings(
    draw: st.DrawFn, boot: int = 1, start_ms: int = T0_MS, *, reactive: bool = False
) -> list[EnergyReading]:
    n = draw(st.integers(min_value=2, max_value=40))
    ts, imp, exp = start_ms + draw(st.integers(0, PERIOD_MS)), draw(register_steps), draw(register_steps)
    ri = re_ = 0.0
    out = []
    for seq in range(n):
        extra = {"reactive_import_kvarh": ri, "reactive_export_kvarh": re_} if reactive else {}
        out.append(EnergyReading(boot, seq, ts, imp, exp, **extra))
        ts += draw(time_steps)
        imp += draw(register_steps)
        exp += draw(register_steps)
        ri += draw(register_steps)
        re_ += draw(register_steps)
    return out


def window_of(readings: list[EnergyReading]) -> tuple[int, int]:
    return period_of(min(x.ts_ms for x in readings)), period_of(max(x.ts_ms for x in readings)) + PERIOD_MS


@given(boot_readings())
def test_energy_is_conserved(readings: list[EnergyReading]) -> None:
    got = compute_window(readings, *window_of(readings))
    assert sum(p.consumed_kwh for p in got) == approx(readings[-1].import_kwh - readings[0].import_kwh)
    assert sum(p.regenerated_kwh for p in got) == approx(readings[-1].export_kwh - readings[0].export_kwh)
    assert sum(p.covered_ms for p in got) == readings[-1].ts_ms - readings[0].ts_ms


@given(st.integers(min_value=1, max_value=300), st.lists(register_steps, min_size=1, max_size=20))
def test_all_complete_when_readings_cover_whole_periods(step_s: int, steps: list[float]) -> None:
    # Consecutive readings at most one period apart, from one boundary to another.
    end = T0_MS + 3 * PERIOD_MS
    times = [*range(T0_MS, end, step_s * 1000), end]
    imports = [sum(steps[j % len(steps)] for j in range(i)) for i in range(len(times))]
    readings = [EnergyReading(1, i, t, imports[i], 0.0) for i, t in enumerate(times)]
    got = compute_window(readings, T0_MS, end)
    assert all(p.complete for p in got)
    assert sum(p.consumed_kwh for p in got) == approx(imports[-1] - imports[0])


@given(boot_readings())
def test_periods_are_aligned_and_hold_their_readings(readings: list[EnergyReading]) -> None:
    lo, hi = window_of(readings)
    got = compute_window(readings, lo, hi)
    assert [p.start_ms for p in got] == list(range(lo, hi, PERIOD_MS))
    assert all(p.start_ms % PERIOD_MS == 0 and 0 <= p.covered_ms <= PERIOD_MS for p in got)
    assert all(p.consumed_kwh >= 0 and p.regenerated_kwh >= 0 for p in got)


@given(boot_readings(boot=3), st.data())
def test_reboot_starts_a_new_register_series(first: list[EnergyReading], data: st.DataObject) -> None:
    pause = data.draw(st.integers(min_value=0, max_value=2 * PERIOD_MS), label="pause")
    second = data.draw(boot_readings(boot=4, start_ms=first[-1].ts_ms + pause), label="second boot")
    # The new boot's registers start anywhere, usually far below the old ones: never negative.
    got = compute_window([*second, *first], *window_of([*first, *second]))
    span = lambda rs: rs[-1].import_kwh - rs[0].import_kwh  # noqa: E731
    assert sum(p.consumed_kwh for p in got) == approx(span(first) + span(second))
    assert all(p.consumed_kwh >= 0 for p in got)
    unknown_from, unknown_to = first[-1].ts_ms, second[0].ts_ms
    for p in got:
        if p.start_ms < unknown_to and unknown_from < p.start_ms + PERIOD_MS and unknown_to > unknown_from:
            assert not p.complete, "the period with the reboot's unknown stretch must be incomplete"


@given(boot_readings(), st.randoms(use_true_random=False))
def test_order_of_readings_does_not_matter(readings: list[EnergyReading], rnd: object) -> None:
    shuffled = list(readings)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    window = window_of(readings)
    assert compute_window(shuffled, *window) == compute_window(readings, *window)


@given(boot_readings(), st.data())
def test_a_window_gives_the_same_periods_as_the_whole(readings: list[EnergyReading], data: st.DataObject) -> None:
    lo, hi = window_of(readings)
    cut_lo = data.draw(st.sampled_from(range(lo, hi, PERIOD_MS)))
    cut_hi = data.draw(st.sampled_from(range(cut_lo + PERIOD_MS, hi + PERIOD_MS, PERIOD_MS)))
    whole = {p.start_ms: p for p in compute_window(readings, lo, hi)}
    part = compute_window(readings, cut_lo, cut_hi)
    assert part == [whole[p.start_ms] for p in part]


@given(boot_readings(reactive=True), st.sampled_from(["1h", "1d"]))
def test_aggregation_is_the_sum_of_five_minute_periods(readings: list[EnergyReading], name: str) -> None:
    size = PERIODS[name]
    lo, hi = window_of(readings)
    fives = compute_window(readings, lo, hi)
    start, end = period_of(lo, size), period_of(hi - 1, size) + size
    for big in aggregate(fives, start, end, size):
        inside = [p for p in fives if big.start_ms <= p.start_ms < big.start_ms + size]
        assert big.consumed_kwh == approx(sum(p.consumed_kwh for p in inside))
        assert big.regenerated_kwh == approx(sum(p.regenerated_kwh for p in inside))
        assert big.reactive_import_kvarh == approx(sum(p.reactive_import_kvarh or 0 for p in inside))
        assert big.complete == (len(inside) == size // PERIOD_MS and all(p.complete for p in inside))
    assert math.isclose(
        sum(p.consumed_kwh for p in aggregate(fives, start, end, size)),
        readings[-1].import_kwh - readings[0].import_kwh,
        rel_tol=1e-9,
        abs_tol=1e-9,
    )
