"""One simulated rail power meter: readings, faults, batches and command answers, with no I/O.

The fleet simulator (:mod:`node.sim.fleet`) owns the network side; everything a meter *says*
is decided here, from a seeded :class:`random.Random` and the times it is given, so tests run
it without a broker (``tests/unit/test_sim_meter.py``).

What makes the readings realistic enough for demos, tests and benchmarks:

* Supply systems of EN 50163 (:data:`SUPPLIES`): DC 600, 750, 1500 and 3000 V, AC 15 kV
  16.7 Hz and 25 kV 50 Hz, with the node's own limits (``storage.validation.SUPPLY_LIMITS``);
  each meter is registered with its system (``supply``), so the node checks its voltages
  against that range. The voltage stays within ``[Umin1, Umax2]`` of its system: it sags under
  traction and rises while the train feeds energy back, as on a real line.
* A driving cycle of standstill, traction, coasting and regenerative braking phases, with
  power signed like the protocol (+ traction, - regeneration) and current following it.
* Cumulative registers (``energy_import_kwh``, ``energy_export_kwh``, for AC also the reactive
  ones) that integrate the power and never decrease; a reboot keeps them (they are the
  meter's), but starts a new ``boot`` with ``seq`` 0, exactly as the protocol says.
* Faults on request (:class:`Faults`): reboots, duplicates (the same message sent twice), gaps
  (sequence numbers skipped), and commands left unanswered.
"""

from __future__ import annotations

import json
import math
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

from storage.command_contract import AckStatus
from storage.contract import (
    DEFAULT_MAX_BATCH_PAYLOAD_BYTES,
    MAX_BATCH_READINGS,
    PROTOCOL_VERSION,
    format_ts,
    parse_rfc3339,
)
from storage.validation import SUPPLY_LIMITS, SupplyLimits, SupplySystem

#: The node's default limit of a batch's payload; batches are cut to fit under it.
DEFAULT_BATCH_BYTES: Final = DEFAULT_MAX_BATCH_PAYLOAD_BYTES

Phase = Literal["standstill", "traction", "coasting", "braking"]
PHASES: Final[tuple[Phase, ...]] = ("standstill", "traction", "coasting", "braking")

#: How long each phase lasts (seconds), and where the train goes next.
_DWELL: Final[dict[Phase, tuple[float, float]]] = {
    "standstill": (30.0, 300.0),
    "traction": (20.0, 120.0),
    "coasting": (30.0, 240.0),
    "braking": (15.0, 60.0),
}
_NEXT: Final[dict[Phase, tuple[Phase, ...]]] = {
    "standstill": ("traction",),
    "traction": ("coasting", "coasting", "braking"),
    "coasting": ("traction", "braking", "braking"),
    "braking": ("standstill", "coasting", "traction"),
}


@dataclass(frozen=True, slots=True)
class Supply:
    """A supply system as the simulator drives it: the node's EN 50163 limits of its
    :class:`~storage.validation.SupplySystem` and the train power it feeds."""

    #: The simulator's short name (``--supplies``, device ids): ``dc750``, ``ac15k``…
    key: str
    #: What the meter is registered with (``supply``), and whose limits it keeps to.
    system: SupplySystem
    frequency_hz: float | None
    #: Rated traction power of a typical train on this system.
    max_power_kw: float

    @property
    def limits(self) -> SupplyLimits:
        return SUPPLY_LIMITS[self.system]

    @property
    def device_type(self) -> Literal["dc_meter", "ac_meter"]:
        return "ac_meter" if self.limits.device_type == "ac_meter" else "dc_meter"

    @property
    def label(self) -> str:
        if self.frequency_hz is None:
            return f"DC {self.limits.nominal:g} V"
        return f"AC {self.limits.nominal / 1000:g} kV {self.frequency_hz:g} Hz"


SUPPLIES: Final[dict[str, Supply]] = {
    s.key: s
    for s in (
        Supply("dc600", SupplySystem.DC_600, None, 500.0),
        Supply("dc750", SupplySystem.DC_750, None, 800.0),
        Supply("dc1500", SupplySystem.DC_1500, None, 2500.0),
        Supply("dc3000", SupplySystem.DC_3000, None, 4000.0),
        Supply("ac15k", SupplySystem.AC_15K, 16.7, 6000.0),
        Supply("ac25k", SupplySystem.AC_25K, 50.0, 6400.0),
    )
}


@dataclass(frozen=True, slots=True)
class Faults:
    """Probabilities per reading (``reboot``, ``duplicate``, ``gap``) and per command (``noack``)."""

    reboot: float = 0.0
    duplicate: float = 0.0
    gap: float = 0.0
    noack: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Faults:
        """``"reboot=0.01,duplicate=0.02,gap=0.01,noack=1"`` → :class:`Faults`; ValueError
        naming the bad part otherwise."""
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, number = part.partition("=")
            name = name.strip()
            if not sep or name not in cls.__dataclass_fields__:
                known = ", ".join(cls.__dataclass_fields__)
                msg = f"{part!r}: expected NAME=PROBABILITY with NAME one of {known}"
                raise ValueError(msg)
            try:
                p = float(number)
            except ValueError:
                p = math.nan
            if not 0.0 <= p <= 1.0:
                msg = f"{part!r}: the probability must be a number from 0 to 1"
                raise ValueError(msg)
            values[name] = p
        return cls(**values)


@dataclass(slots=True)
class Answer:
    """What a meter does with a command: the ack to publish (None: stay silent)."""

    ack: dict[str, str] | None
    rebooted: bool = False


@dataclass(slots=True)
class Meter:
    """One meter's state. Not thread-safe: the fleet serialises calls per meter."""

    device_id: str
    supply: Supply
    rng: random.Random
    boot: int = 1
    seq: int = 0
    #: Seconds between readings (``set_interval`` changes it).
    interval_s: float = 1.0
    faults: Faults = field(default_factory=Faults)
    energy_import_kwh: float = 0.0
    energy_export_kwh: float = 0.0
    reactive_import_kvarh: float = 0.0
    reactive_export_kvarh: float = 0.0
    phase: Phase = "standstill"
    phase_left_s: float = 0.0
    #: Power of the current phase (kW), drawn when it starts.
    phase_power_kw: float = 0.0
    #: Commands answered already: a resend gets the same answer and is not carried out again.
    answered: OrderedDict[str, dict[str, str]] = field(default_factory=OrderedDict)

    @classmethod
    def new(
        cls, device_id: str, supply: Supply, seed: int, *, interval_s: float = 1.0, faults: Faults | None = None
    ) -> Meter:
        rng = random.Random(seed)  # noqa: S311 - a simulation, not cryptography
        meter = cls(device_id, supply, rng, boot=rng.randint(1, 500), interval_s=interval_s, faults=faults or Faults())
        # A meter in service has run for a while: registers that are not zero.
        meter.energy_import_kwh = round(rng.uniform(1_000.0, 900_000.0), 3)
        meter.energy_export_kwh = round(meter.energy_import_kwh * rng.uniform(0.05, 0.3), 3)
        if supply.frequency_hz is not None:
            meter.reactive_import_kvarh = round(meter.energy_import_kwh * 0.2, 3)
            meter.reactive_export_kvarh = round(meter.energy_export_kwh * 0.1, 3)
        meter._enter(rng.choice(PHASES))
        return meter

    # -- readings ------------------------------------------------------------------------------

    def reading(self, ts: float) -> dict[str, Any]:
        """The next reading (``boot``, ``seq``, ``ts``, ``m``), one interval after the last."""
        self._advance(self.interval_s)
        doc = {"boot": self.boot, "seq": self.seq, "ts": _ts(ts), "m": self._measure()}
        self.seq += 1
        return doc

    def messages(self, ts: float) -> list[bytes]:
        """The PUBLISH payloads for the next reading, faults applied: a reboot before it, a
        gap of skipped sequence numbers before it, the same payload twice."""
        rng, f = self.rng, self.faults
        if f.reboot and rng.random() < f.reboot:
            self.reboot()
        if f.gap and self.seq > 0 and rng.random() < f.gap:
            self.seq += rng.randint(1, 5)
        payload = encode_reading(self.device_id, self.reading(ts))
        if f.duplicate and rng.random() < f.duplicate:
            return [payload, payload]
        return [payload]

    def backlog(self, count: int, end: float) -> list[dict[str, Any]]:
        """*count* buffered readings, one interval apart, the last at *end*, oldest first."""
        start = end - (count - 1) * self.interval_s
        return [self.reading(start + i * self.interval_s) for i in range(count)]

    def reboot(self) -> None:
        self.boot += 1
        self.seq = 0

    def _enter(self, phase: Phase) -> None:
        low, high = _DWELL[phase]
        self.phase = phase
        self.phase_left_s = self.rng.uniform(low, high)
        rated = self.supply.max_power_kw
        self.phase_power_kw = {
            "standstill": self.rng.uniform(0.005, 0.02) * rated,  # hotel load: heating, lights
            "traction": self.rng.uniform(0.3, 1.0) * rated,
            "coasting": self.rng.uniform(0.01, 0.04) * rated,
            "braking": -self.rng.uniform(0.2, 0.8) * rated,
        }[phase]

    def _advance(self, dt: float) -> None:
        """Integrate *dt* seconds of the current power into the registers, moving through phases."""
        left = dt
        while left > 0:
            step = min(left, self.phase_left_s)
            power = self.phase_power_kw
            hours = step / 3600.0
            if power >= 0:
                self.energy_import_kwh += power * hours
            else:
                self.energy_export_kwh += -power * hours
            if self.supply.frequency_hz is not None:
                reactive = abs(power) * math.tan(math.acos(self._pf_magnitude())) * hours
                if power >= 0:
                    self.reactive_import_kvarh += reactive
                else:
                    self.reactive_export_kvarh += reactive
            left -= step
            self.phase_left_s -= step
            if self.phase_left_s <= 0:
                self._enter(self.rng.choice(_NEXT[self.phase]))

    def _pf_magnitude(self) -> float:
        return 0.98 if self.phase in ("traction", "braking") else 0.9

    def _measure(self) -> dict[str, float]:
        s, rng = self.supply, self.rng
        power = self.phase_power_kw * rng.uniform(0.97, 1.03)
        load = power / s.max_power_kw  # -0.8 to 1.0
        # Substations run a little above nominal; traction pulls the line down, regeneration
        # pushes it up. Clamped to the system's EN 50163 range [Umin1, Umax2].
        lim = s.limits
        v = lim.nominal * (1.04 - 0.12 * max(load, 0.0) + 0.12 * max(-load, 0.0) + rng.uniform(-0.02, 0.02))
        voltage = round(min(max(v, lim.umin1), lim.umax2), 1)
        m: dict[str, float] = {"voltage_v": voltage}
        if s.frequency_hz is None:
            m["current_a"] = round(power * 1000.0 / voltage, 1)
        else:
            pf = math.copysign(self._pf_magnitude() * rng.uniform(0.995, 1.0), power)
            m["current_a"] = round(power * 1000.0 / (voltage * abs(pf)), 1)
            m["frequency_hz"] = round(s.frequency_hz * (1 + rng.uniform(-0.004, 0.004)), 3)
            m["power_factor"] = round(pf, 3)
        m["power_kw"] = round(power, 1)
        # Registers are floored to the written precision, so what is sent never decreases.
        m["energy_import_kwh"] = _floor3(self.energy_import_kwh)
        m["energy_export_kwh"] = _floor3(self.energy_export_kwh)
        if s.frequency_hz is not None:
            m["reactive_import_kvarh"] = _floor3(self.reactive_import_kvarh)
            m["reactive_export_kvarh"] = _floor3(self.reactive_export_kvarh)
        return m

    # -- commands ------------------------------------------------------------------------------

    def answer(self, payload: bytes, now: float) -> Answer:
        """Carry out a command from the node and say what to acknowledge.

        ``ping`` → ok; ``set_interval {"seconds": s}`` → ok, readings every *s* seconds (0.05 to
        3600), else error; ``reboot`` → ok, then a new boot with ``seq`` 0; an expired command
        → rejected; anything else → rejected. A payload without a ``command_id`` cannot be
        answered. A command seen before gets its first answer again and is not carried out
        twice (the node resends until it hears back).
        """
        try:
            doc = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return Answer(None)
        command_id = doc.get("command_id") if isinstance(doc, dict) else None
        if not isinstance(command_id, str):
            return Answer(None)
        if command_id in self.answered:
            return Answer(self.answered[command_id])
        if self.faults.noack and self.rng.random() < self.faults.noack:
            return Answer(None)
        status, detail, rebooted = self._carry_out(doc, now)
        ack = {"command_id": command_id, "status": status.value, "detail": detail}
        self.answered[command_id] = ack
        while len(self.answered) > 256:  # noqa: PLR2004 - a few minutes of resends
            self.answered.popitem(last=False)
        return Answer(ack, rebooted)

    def _carry_out(self, doc: dict[str, Any], now: float) -> tuple[AckStatus, str, bool]:
        try:
            expired = parse_rfc3339(doc.get("expires_at")).timestamp() <= now
        except ValueError:
            return AckStatus.REJECTED, "expires_at is not an RFC 3339 time", False
        if expired:
            return AckStatus.REJECTED, "expired before it arrived", False
        name, args = doc.get("name"), doc.get("args")
        args = args if isinstance(args, dict) else {}
        if name == "ping":
            return AckStatus.OK, "pong", False
        if name == "set_interval":
            seconds = args.get("seconds")
            if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0.05 <= seconds <= 3600:  # noqa: PLR2004
                return AckStatus.ERROR, "args.seconds must be a number from 0.05 to 3600", False
            self.interval_s = float(seconds)
            return AckStatus.OK, f"interval {seconds:g} s", False
        if name == "reboot":
            self.reboot()
            return AckStatus.OK, f"rebooted into boot {self.boot}", True
        return AckStatus.REJECTED, f"unknown command {str(name)[:64]!r}", False


def encode_reading(device_id: str, reading: dict[str, Any]) -> bytes:
    """One telemetry v2 message (JSON) for one reading."""
    doc = {"v": PROTOCOL_VERSION, "device_id": device_id, **reading}
    return json.dumps(doc, separators=(",", ":")).encode()


def encode_batches(
    device_id: str,
    readings: list[dict[str, Any]],
    *,
    max_readings: int = 100,
    max_bytes: int = DEFAULT_BATCH_BYTES,
) -> list[bytes]:
    """Batched telemetry (PROTOCOL.md "Batched telemetry"): ``{"v": 2, "device_id", "readings"}``,
    oldest first, each batch at most *max_readings* (≤ 1000) readings and *max_bytes* bytes.

    A single reading larger than *max_bytes* still goes, alone: the node quarantines it with a
    reason, which is what a real meter would see.
    """
    if not 1 <= max_readings <= MAX_BATCH_READINGS:
        msg = f"max_readings must be from 1 to {MAX_BATCH_READINGS}, not {max_readings}"
        raise ValueError(msg)
    head = json.dumps({"v": PROTOCOL_VERSION, "device_id": device_id}, separators=(",", ":"))[:-1]
    prefix = f'{head},"readings":['.encode()
    batches: list[bytes] = []
    parts: list[bytes] = []
    size = len(prefix) + 2
    for reading in readings:
        part = json.dumps(reading, separators=(",", ":")).encode()
        grown = size + len(part) + (1 if parts else 0)
        if parts and (len(parts) == max_readings or grown > max_bytes):
            batches.append(prefix + b",".join(parts) + b"]}")
            parts, size = [], len(prefix) + 2
            grown = size + len(part)
        parts.append(part)
        size = grown
    if parts:
        batches.append(prefix + b",".join(parts) + b"]}")
    return batches


def _ts(epoch: float) -> str:
    return format_ts(datetime.fromtimestamp(epoch, UTC))


def _floor3(value: float) -> float:
    return math.floor(value * 1000.0) / 1000.0
