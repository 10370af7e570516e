"""Property tests of the validation rules that need the device's context (storage/validation.py).

Each rule is tested on its own: the other rules are kept satisfied by the strategies (a
plausible voltage, a time in the past, no register mark), so a rejection can only come from
the rule under test, and every reading on the right side of its boundary is accepted.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

from hypothesis import assume, given
from hypothesis import strategies as st

from storage.contract import Measurements, QuarantineReason, Reading
from storage.validation import (
    SUPPLY_LIMITS,
    DeviceProfile,
    RegisterMark,
    SupplySystem,
    advance,
    check_reading,
    supplies_of,
    voltage_range,
)

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
RECEIVED = NOW.timestamp()

# Register values and instantaneous values in a wide finite range; plausibility of the voltage
# is what the voltage rule is about, the other values have no range rule of their own.
registers = st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False)
finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
supplies = st.sampled_from(list(SupplySystem))
types = st.sampled_from(["dc_meter", "ac_meter"])


def measurements(voltage: float = 1500.0, **values: float | None) -> Measurements:
    base: dict[str, float | None] = {
        "voltage_v": voltage,
        "current_a": 100.0,
        "power_kw": 150.0,
        "energy_import_kwh": 1000.0,
        "energy_export_kwh": 10.0,
        "frequency_hz": 50.0,
        "power_factor": 0.95,
    }
    base.update(values)
    return Measurements(**{k: v for k, v in base.items() if v is not None})


def reading(m: Measurements, *, boot: int = 1, seq: int = 10, ts: datetime = NOW - timedelta(hours=1)) -> Reading:
    return Reading(boot=boot, seq=seq, ts=ts, m=m)


def check(r: Reading, profile: DeviceProfile | None, *, skew: float = 300.0, mark: RegisterMark | None = None):  # type: ignore[no-untyped-def]
    return check_reading(
        r,
        profile=profile,
        voltages=None if profile is None else profile.voltages,
        received_at=RECEIVED,
        max_future_skew=skew,
        registers=mark,
    )


def plausible_voltage(profile: DeviceProfile) -> float:
    return profile.voltages.low


# -- the EN 50163 table ----------------------------------------------------------------------------


def test_the_table_is_en_50163() -> None:
    """The values the brief and the standard give (Umin2, Umin1, Un, Umax1, Umax2), in volts."""
    expected = {
        SupplySystem.DC_600: (400, 400, 600, 720, 800),
        SupplySystem.DC_750: (500, 500, 750, 900, 1000),
        SupplySystem.DC_1500: (1000, 1000, 1500, 1800, 1950),
        SupplySystem.DC_3000: (2000, 2000, 3000, 3600, 3900),
        SupplySystem.AC_15K: (11000, 12000, 15000, 17250, 18000),
        SupplySystem.AC_25K: (17500, 19000, 25000, 27500, 29000),
    }
    for supply, (umin2, umin1, un, umax1, umax2) in expected.items():
        lim = SUPPLY_LIMITS[supply]
        assert (lim.umin2, lim.umin1, lim.nominal, lim.umax1, lim.umax2) == (umin2, umin1, un, umax1, umax2)
        assert umin2 <= umin1 < un < umax1 <= umax2


def test_without_a_supply_the_widest_range_of_the_type() -> None:
    assert (voltage_range("dc_meter", None).low, voltage_range("dc_meter", None).high) == (400, 3900)
    assert (voltage_range("ac_meter", None).low, voltage_range("ac_meter", None).high) == (11000, 29000)
    assert set(supplies_of("dc_meter")) | set(supplies_of("ac_meter")) == set(SupplySystem)


# -- rule 1: fields by device type -----------------------------------------------------------------


@given(st.booleans(), st.booleans(), st.sampled_from([None, *SupplySystem.__members__.values()]))
def test_ac_meters_carry_frequency_and_power_factor(has_f: bool, has_pf: bool, supply: SupplySystem | None) -> None:
    for type_ in ("dc_meter", "ac_meter"):
        if supply is not None and SUPPLY_LIMITS[supply].device_type != type_:
            continue
        profile = DeviceProfile(type_, supply)
        m = measurements(
            plausible_voltage(profile), frequency_hz=50.0 if has_f else None, power_factor=0.9 if has_pf else None
        )
        result = check(reading(m), profile)
        if type_ == "ac_meter" and not (has_f and has_pf):
            assert result is not None
            assert result.reason is QuarantineReason.MISSING_TYPE_FIELD
            assert ("frequency_hz" in result.detail) == (not has_f)
            assert ("power_factor" in result.detail) == (not has_pf)
        else:
            assert result is None, result


# -- rule 2: voltage within the supply system's range ----------------------------------------------


@given(types, st.one_of(st.none(), supplies), st.floats(min_value=-5e4, max_value=5e4, allow_nan=False))
def test_voltage_is_checked_against_the_supply_range(type_: str, supply: SupplySystem | None, volts: float) -> None:
    assume(supply is None or SUPPLY_LIMITS[supply].device_type == type_)
    profile = DeviceProfile(type_, supply)
    rng = profile.voltages
    result = check(reading(measurements(volts)), profile)
    plausible = rng.low <= volts <= rng.high or 0 <= volts < rng.no_supply_below
    if plausible:
        assert result is None, result
    else:
        assert result is not None
        assert result.reason is QuarantineReason.IMPLAUSIBLE_VOLTAGE
        assert f"{rng.low:g}-{rng.high:g} V" in result.detail


@given(supplies)
def test_voltage_boundaries_are_inclusive_and_a_dead_line_is_fine(supply: SupplySystem) -> None:
    lim = SUPPLY_LIMITS[supply]
    profile = DeviceProfile(lim.device_type, supply)
    for ok in (lim.umin2, lim.umax2, lim.nominal, 0.0, lim.nominal * 0.1 - 0.001):
        assert check(reading(measurements(ok)), profile) is None, ok
    for bad in (lim.umax2 + 0.1, lim.umin2 - 0.1, lim.nominal * 0.1, -1.0):
        result = check(reading(measurements(bad)), profile)
        assert result is not None, bad
        assert result.reason is QuarantineReason.IMPLAUSIBLE_VOLTAGE


# -- rule 3: device time not too far ahead ---------------------------------------------------------


@given(
    st.floats(min_value=0, max_value=3600, allow_nan=False),
    st.integers(min_value=-(10**9), max_value=10**9).map(lambda ms: timedelta(milliseconds=ms)),
)
def test_future_device_time_beyond_the_skew_is_refused(skew: float, ahead: timedelta) -> None:
    profile = DeviceProfile("dc_meter", SupplySystem.DC_1500)
    result = check(reading(measurements(), ts=NOW + ahead), profile, skew=skew)
    if ahead.total_seconds() > skew:
        assert result is not None
        assert result.reason is QuarantineReason.FUTURE_TIMESTAMP
    else:
        assert result is None, result


# -- rule 4: registers never decrease within a boot ------------------------------------------------


@given(st.lists(st.tuples(registers, registers), min_size=1, max_size=30))
def test_registers_in_order_are_accepted_exactly_when_they_never_decrease(values: list[tuple[float, float]]) -> None:
    """Readings seq 0, 1, 2... of one boot: each is checked against the newest accepted one."""
    profile = DeviceProfile("dc_meter", None)
    mark: RegisterMark | None = None
    accepted: list[tuple[float, float]] = []
    for seq, (imp, exp) in enumerate(values):
        r = reading(measurements(energy_import_kwh=imp, energy_export_kwh=exp), seq=seq)
        result = check(r, profile, mark=mark)
        last = accepted[-1] if accepted else None
        should_pass = last is None or (imp >= last[0] and exp >= last[1])
        assert (result is None) == should_pass, (seq, imp, exp, last, result)
        if result is None:
            mark = advance(mark, r)
            accepted.append((imp, exp))
        else:
            assert result.reason is QuarantineReason.REGISTER_DECREASED
    # Whatever was accepted is non-decreasing: what the protocol promises to readers.
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in itertools.pairwise(accepted))


@given(registers, registers, st.integers(0, 100), st.integers(0, 100))
def test_a_late_reading_must_not_exceed_the_newest(newest: float, late: float, seq_new: int, seq_late: int) -> None:
    assume(seq_late < seq_new)
    profile = DeviceProfile("dc_meter", None)
    mark = RegisterMark(1, seq_new, measurements(energy_import_kwh=newest))
    result = check(reading(measurements(energy_import_kwh=late), seq=seq_late), profile, mark=mark)
    if late <= newest:
        assert result is None, result
    else:
        assert result is not None
        assert result.reason is QuarantineReason.REGISTER_DECREASED
    # A late reading never moves the mark back.
    assert advance(mark, reading(measurements(), seq=seq_late)) is mark


@given(registers, registers, st.integers(1, 10))
def test_a_new_boot_starts_its_registers_afresh(before: float, after: float, by: int) -> None:
    """A meter may be replaced or reset on reboot: the rule holds within a boot only."""
    profile = DeviceProfile("dc_meter", None)
    mark = RegisterMark(1, 500, measurements(energy_import_kwh=before))
    r = reading(measurements(energy_import_kwh=after), boot=1 + by, seq=0)
    assert check(r, profile, mark=mark) is None
    moved = advance(mark, r)
    assert moved is not None
    assert (moved.boot, moved.seq) == (1 + by, 0)


@given(registers, registers, registers, registers)
def test_reactive_registers_are_checked_when_both_carry_them(a: float, b: float, c: float, d: float) -> None:
    profile = DeviceProfile("ac_meter", SupplySystem.AC_25K)
    mark = RegisterMark(1, 1, measurements(25000.0, reactive_import_kvarh=a, reactive_export_kvarh=b))
    r = reading(measurements(25000.0, reactive_import_kvarh=c, reactive_export_kvarh=d), seq=2)
    result = check(r, profile, mark=mark)
    assert (result is None) == (c >= a and d >= b)
    without = reading(measurements(25000.0), seq=2)  # no reactive registers: nothing to compare
    assert check(without, profile, mark=mark) is None


def test_the_first_failure_decides_the_reason() -> None:
    """Order: fields by type, voltage, device time, registers."""
    profile = DeviceProfile("ac_meter", SupplySystem.AC_15K)
    mark = RegisterMark(1, 1, measurements(15000.0, energy_import_kwh=2000.0))
    everything_wrong = reading(
        measurements(5000.0, frequency_hz=None, energy_import_kwh=1.0), seq=2, ts=NOW + timedelta(days=1)
    )
    reasons = []
    r = everything_wrong
    for fix in ("fields", "voltage", "time", "registers"):
        result = check(r, profile, mark=mark)
        reasons.append(None if result is None else result.reason)
        m = r.measurements
        if fix == "fields":
            m = m.model_copy(update={"frequency_hz": 16.7})
        elif fix == "voltage":
            m = m.model_copy(update={"voltage_v": 15000.0})
        elif fix == "registers":
            m = m.model_copy(update={"energy_import_kwh": 2000.0})
        r = Reading(boot=r.boot, seq=r.seq, ts=NOW if fix == "time" else r.ts, m=m)
    assert check(r, profile, mark=mark) is None
    assert reasons == [
        QuarantineReason.MISSING_TYPE_FIELD,
        QuarantineReason.IMPLAUSIBLE_VOLTAGE,
        QuarantineReason.FUTURE_TIMESTAMP,
        QuarantineReason.REGISTER_DECREASED,
    ]


@given(finite)
def test_an_unregistered_device_is_checked_for_time_and_registers_only(volts: float) -> None:
    assert check(reading(measurements(volts, frequency_hz=None)), None) is None
