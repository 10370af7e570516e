"""The validation rules that need to know the device: its type, its supply system, its clock
and its last energy registers. Pure functions of a decoded :class:`~storage.contract.Reading`;
no I/O. The device actor applies them to every reading that the sequence rules would store,
whatever the encoding (JSON, CBOR) or form (single, batch) it came in.

The rules, in the order they are checked (the first failure is the quarantine reason):

1. **Fields by device type.** An ``ac_meter`` reading carries ``m.frequency_hz`` and
   ``m.power_factor`` → else ``missing_type_field``.
2. **Voltage within the supply system's range** (EN 50163:2004+A1:2007, table 1): from the
   lowest non-permanent voltage ``Umin2`` to the highest non-permanent voltage ``Umax2`` of
   the device's nominal voltage → else ``implausible_voltage``. A line without voltage
   (pantograph down, a neutral section, the depot) is not implausible: ``0 <= voltage_v <``
   :data:`NO_SUPPLY_FRACTION` times the nominal voltage is accepted as "no supply". A device
   registered without a supply system is checked against the widest range of its type.
3. **Device time** not later than the node's receive time plus ``max_future_skew`` seconds
   → else ``future_timestamp``.
4. **Cumulative registers never decrease within a boot** (``energy_*_kwh``, and the
   ``reactive_*_kvarh`` ones when both readings carry them) → else ``register_decreased``.
   A reading newer than the newest stored one of its boot must not hold less; a late one
   (inside a gap) must not hold more than the newest one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, NamedTuple

from storage.contract import Measurements, QuarantineReason, Reading, Rejection


class SupplySystem(enum.StrEnum):
    """The electrification systems a meter can be registered on (EN 50163 table 1)."""

    DC_600 = "dc_600v"
    DC_750 = "dc_750v"
    DC_1500 = "dc_1500v"
    DC_3000 = "dc_3000v"
    AC_15K = "ac_15kv_16.7hz"
    AC_25K = "ac_25kv_50hz"


@dataclass(frozen=True, slots=True)
class SupplyLimits:
    """EN 50163 voltages of one system, in volts."""

    device_type: str
    nominal: float
    #: Lowest non-permanent voltage: the lowest a train may see, for up to 2 minutes.
    umin2: float
    #: Lowest permanent voltage.
    umin1: float
    #: Highest permanent voltage.
    umax1: float
    #: Highest non-permanent voltage: the highest a train may see, for up to 5 minutes.
    umax2: float
    label: str


#: EN 50163:2004+A1:2007, table 1 (the nominal voltages of PROTOCOL.md's supply systems).
SUPPLY_LIMITS: Final[dict[SupplySystem, SupplyLimits]] = {
    SupplySystem.DC_600: SupplyLimits("dc_meter", 600, 400, 400, 720, 800, "600 V DC"),
    SupplySystem.DC_750: SupplyLimits("dc_meter", 750, 500, 500, 900, 1000, "750 V DC"),
    SupplySystem.DC_1500: SupplyLimits("dc_meter", 1500, 1000, 1000, 1800, 1950, "1500 V DC"),
    SupplySystem.DC_3000: SupplyLimits("dc_meter", 3000, 2000, 2000, 3600, 3900, "3000 V DC"),
    SupplySystem.AC_15K: SupplyLimits("ac_meter", 15000, 11000, 12000, 17250, 18000, "15 kV 16.7 Hz"),
    SupplySystem.AC_25K: SupplyLimits("ac_meter", 25000, 17500, 19000, 27500, 29000, "25 kV 50 Hz"),
}

#: Below this share of the nominal voltage (and not negative) a reading means "no supply":
#: 10 % is far under any system's Umin2 (two thirds of nominal or more) and far above a
#: meter's noise floor on a dead line.
NO_SUPPLY_FRACTION: Final = 0.1

#: Fields an AC meter must send in every reading.
AC_FIELDS: Final = ("frequency_hz", "power_factor")

#: The cumulative registers, checked for each pair of readings of one boot that both carry them.
REGISTERS: Final = ("energy_import_kwh", "energy_export_kwh", "reactive_import_kvarh", "reactive_export_kvarh")

DEFAULT_MAX_FUTURE_SKEW_S: Final = 300.0


def supplies_of(device_type: str) -> list[SupplySystem]:
    """The supply systems a device of *device_type* may be registered on."""
    return [s for s, lim in SUPPLY_LIMITS.items() if lim.device_type == device_type]


@dataclass(frozen=True, slots=True)
class VoltageRange:
    low: float
    high: float
    no_supply_below: float
    label: str


def voltage_range(device_type: str, supply: SupplySystem | None) -> VoltageRange:
    """The plausible voltages of a device: its system's, or, without one, its type's widest."""
    if supply is not None:
        lim = SUPPLY_LIMITS[supply]
        return VoltageRange(lim.umin2, lim.umax2, NO_SUPPLY_FRACTION * lim.nominal, lim.label)
    systems = [SUPPLY_LIMITS[s] for s in supplies_of(device_type)]
    return VoltageRange(
        min(s.umin2 for s in systems),
        max(s.umax2 for s in systems),
        NO_SUPPLY_FRACTION * min(s.nominal for s in systems),
        f"any {device_type} supply (none registered)",
    )


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    """What the validation rules need to know about a registered device."""

    device_type: str
    supply: SupplySystem | None

    @property
    def voltages(self) -> VoltageRange:
        return voltage_range(self.device_type, self.supply)


class RegisterMark(NamedTuple):
    """The registers of the newest stored reading (highest ``seq``) of a boot.

    A named tuple: one is made for nearly every reading stored, and a frozen dataclass's
    ``__init__`` cost 15 % of the device actor's time on the batch path (py-spy).
    """

    boot: int
    seq: int
    measurements: Measurements


@dataclass(frozen=True, slots=True)
class DeviceContext:
    """What a device actor loads at start, besides its sequence state."""

    #: None for a device that is not registered (it could not have connected; tests only).
    profile: DeviceProfile | None
    #: The newest stored reading's registers in the device's current boot, if any.
    registers: RegisterMark | None


def check_reading(
    reading: Reading,
    *,
    profile: DeviceProfile | None,
    voltages: VoltageRange | None,
    received_at: float,
    max_future_skew: float,
    registers: RegisterMark | None,
) -> Rejection | None:
    """The first rule *reading* breaks, as a :class:`Rejection`; None when it breaks none.

    *voltages* is ``profile.voltages``, passed in so that a batch computes it once. A caller
    that checks many readings of one device keeps a :class:`ReadingRules` instead.
    """
    return ReadingRules(profile, voltages, max_future_skew).check(reading, received_at, registers)


class ReadingRules:
    """The rules of :func:`check_reading`, bound to one device's profile.

    The device actor makes one when it loads (or reloads) the device's registration and then
    passes only the reading for each one (this runs for every reading: keyword arguments, the
    profile's type comparison and the range's attribute lookups were a measurable share of it).
    """

    __slots__ = ("_ac", "_dead_below", "_high", "_low", "_max_future_skew", "_voltages")

    def __init__(self, profile: DeviceProfile | None, voltages: VoltageRange | None, max_future_skew: float) -> None:
        self._ac = profile is not None and profile.device_type == "ac_meter"
        self._voltages = voltages
        self._low = voltages.low if voltages is not None else 0.0
        self._high = voltages.high if voltages is not None else 0.0
        self._dead_below = voltages.no_supply_below if voltages is not None else 0.0
        self._max_future_skew = max_future_skew

    def check(self, reading: Reading, received_at: float, registers: RegisterMark | None) -> Rejection | None:
        """The first rule *reading* (received at *received_at*) breaks, given *registers*."""
        m = reading.m
        if self._ac:
            missing = [f for f in AC_FIELDS if getattr(m, f) is None]
            if missing:
                return Rejection(
                    QuarantineReason.MISSING_TYPE_FIELD, f"an ac_meter reading needs m.{', m.'.join(missing)}"
                )
        voltages = self._voltages
        if voltages is not None:
            v = m.voltage_v
            if not (self._low <= v <= self._high or 0 <= v < self._dead_below):
                return Rejection(
                    QuarantineReason.IMPLAUSIBLE_VOLTAGE,
                    f"voltage_v {v:g} V is outside {voltages.low:g}-{voltages.high:g} V"
                    f" ({voltages.label}, EN 50163 Umin2-Umax2) and is not a dead line"
                    f" (0 to below {voltages.no_supply_below:g} V)",
                )
        ahead = reading.ts.timestamp() - received_at
        if ahead > self._max_future_skew:
            return Rejection(
                QuarantineReason.FUTURE_TIMESTAMP,
                f"ts {reading.ts.astimezone(UTC).isoformat()} is {ahead:.3f} s ahead of the node's clock"
                f" ({datetime.fromtimestamp(received_at, UTC).isoformat()});"
                f" at most {self._max_future_skew:g} s allowed",
            )
        if registers is not None and registers.boot == reading.boot and registers.seq != reading.seq:
            return _check_registers(m, registers, newer=reading.seq > registers.seq)
        return None


def _check_registers(m: Measurements, mark: RegisterMark, *, newer: bool) -> Rejection | None:
    known = mark.measurements
    # The common case first: the two energy registers (always there) are in order and there
    # are no reactive ones (only some AC meters send those).
    if m.reactive_import_kvarh is None and m.reactive_export_kvarh is None:
        imp, exp = m.energy_import_kwh, m.energy_export_kwh
        if newer and imp >= known.energy_import_kwh and exp >= known.energy_export_kwh:
            return None
        if not newer and imp <= known.energy_import_kwh and exp <= known.energy_export_kwh:
            return None
    for name in REGISTERS:
        value, was = getattr(m, name), getattr(known, name)
        if value is None or was is None:
            continue
        if newer and value < was:
            return Rejection(
                QuarantineReason.REGISTER_DECREASED,
                f"{name} {value!r} is less than {was!r} at seq {mark.seq} of the same boot",
            )
        if not newer and value > was:
            return Rejection(
                QuarantineReason.REGISTER_DECREASED,
                f"{name} {value!r} of a late reading is more than {was!r} at the newer seq {mark.seq}",
            )
    return None


def advance(mark: RegisterMark | None, reading: Reading) -> RegisterMark | None:
    """The register mark after *reading* was stored: it moves only to a newer reading."""
    if mark is None or reading.boot > mark.boot or (reading.boot == mark.boot and reading.seq > mark.seq):
        return RegisterMark(reading.boot, reading.seq, reading.measurements)
    return mark
