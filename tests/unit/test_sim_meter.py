"""The simulated meter, without a network: what it publishes must pass the node's own contract.

Every reading must also meet the node's validation rules (``storage.validation``) for the
supply system the simulator registers the meter with. Strategies: any of the six supply
systems, any seed (the meter's whole randomness), reading intervals from 50 ms (a fast
``set_interval``) to an hour (a meter on a slow schedule), and up to 300 readings, enough
to pass through every driving phase several times at the slow end.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.sim.meter import MAX_BATCH_READINGS, SUPPLIES, Faults, Meter, Supply, encode_batches
from storage.contract import Batch, Reading, decode_telemetry, format_ts, parse_rfc3339
from storage.validation import DEFAULT_MAX_FUTURE_SKEW_S, DeviceProfile, RegisterMark, advance, check_reading

T0 = 1_795_449_600.0  # 2026-11-23T16:00:00Z

supplies = st.sampled_from(sorted(SUPPLIES))
seeds = st.integers(min_value=0, max_value=2**32)
intervals = st.floats(min_value=0.05, max_value=3600.0)
REGISTERS = ("energy_import_kwh", "energy_export_kwh", "reactive_import_kvarh", "reactive_export_kvarh")


def decode(payload: bytes, device_id: str) -> Reading:
    result = decode_telemetry(payload, device_id=device_id)
    assert isinstance(result, Reading), result
    return result


class NodeRules:
    """The node's validation rules for one simulated meter, registered with its supply system,
    applied as its device actor applies them (the register mark follows the stored readings)."""

    def __init__(self, supply: Supply) -> None:
        self.profile = DeviceProfile(supply.device_type, supply.system)
        self.mark: RegisterMark | None = None

    def check(self, reading: Reading, received_at: float) -> None:
        rejection = check_reading(
            reading,
            profile=self.profile,
            voltages=self.profile.voltages,
            received_at=received_at,
            max_future_skew=DEFAULT_MAX_FUTURE_SKEW_S,
            registers=self.mark,
        )
        assert rejection is None, rejection
        self.mark = advance(self.mark, reading)


@settings(max_examples=60, deadline=None)
@given(supply=supplies, seed=seeds, interval=intervals, n=st.integers(min_value=1, max_value=300))
def test_readings_are_valid_in_range_and_monotonic(supply: str, seed: int, interval: float, n: int) -> None:
    s = SUPPLIES[supply]
    meter = Meter.new("sim-1", s, seed, interval_s=interval)
    rules = NodeRules(s)
    boot0 = meter.boot
    last: dict[str, float] = {}
    for i in range(n):
        (payload,) = meter.messages(T0 + i * interval)
        doc = json.loads(payload)
        reading = decode(payload, "sim-1")
        rules.check(reading, received_at=T0 + i * interval)
        m = doc["m"]
        assert (reading.boot, reading.seq) == (boot0, i)
        # EN 50163: never below the lowest permanent or above the highest short-term voltage.
        assert s.limits.umin1 <= m["voltage_v"] <= s.limits.umax2
        # Power is signed (+ traction, - regeneration) and the current follows it.
        assert m["current_a"] * m["power_kw"] >= 0
        assert abs(m["power_kw"]) <= s.max_power_kw * 1.03
        if s.frequency_hz is None:
            assert not {"frequency_hz", "power_factor"} & m.keys()
        else:
            assert abs(m["frequency_hz"] - s.frequency_hz) <= s.frequency_hz * 0.005
            assert 0.85 <= abs(m["power_factor"]) <= 1.0
            assert m["power_factor"] * m["power_kw"] >= 0
        for name in REGISTERS:
            if name in m:
                assert m[name] >= last.get(name, 0.0), name
                last[name] = m[name]


@settings(max_examples=40, deadline=None)
@given(
    seed=seeds,
    reboot=st.floats(0.0, 0.3),
    gap=st.floats(0.0, 0.3),
    duplicate=st.floats(0.0, 0.3),
    n=st.integers(1, 200),
    supply=supplies,
)
def test_faults_keep_the_sequence_rules(
    *, seed: int, reboot: float, gap: float, duplicate: float, n: int, supply: str
) -> None:
    """Within a boot seq only grows (by 1, or more across a gap); a reboot starts a higher boot
    at seq 0; a duplicate is the same payload again; registers never decrease, boots or not;
    the node's validation rules pass throughout."""
    s = SUPPLIES[supply]
    meter = Meter.new("sim-1", s, seed, faults=Faults(reboot=reboot, duplicate=duplicate, gap=gap))
    rules = NodeRules(s)
    prev: tuple[int, int] | None = None
    energy = 0.0
    for i in range(n):
        payloads = meter.messages(T0 + i)
        assert len(payloads) in (1, 2)
        assert len(set(payloads)) == 1
        r = decode(payloads[0], "sim-1")
        rules.check(r, received_at=T0 + i)
        if prev is not None:
            if r.boot == prev[0]:
                assert r.seq > prev[1]
                assert gap > 0 or r.seq == prev[1] + 1
            else:
                assert (r.boot, r.seq) == (prev[0] + 1, 0)
        prev = (r.boot, r.seq)
        assert r.measurements.energy_import_kwh >= energy
        energy = r.measurements.energy_import_kwh


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(0, 400),
    max_readings=st.integers(1, MAX_BATCH_READINGS),
    max_bytes=st.integers(512, 64 * 1024),
    supply=supplies,
)
def test_batches_follow_the_batched_telemetry_spec(count: int, max_readings: int, max_bytes: int, supply: str) -> None:
    """PROTOCOL.md "Batched telemetry": ``{"v": 2, "device_id", "readings": [...]}`` with at most
    1,000 readings, oldest first; each reading with the envelope is a valid single message."""
    meter = Meter.new("emu-4021-m1", SUPPLIES[supply], 7, interval_s=10.0)
    readings = meter.backlog(count, T0)
    batches = encode_batches("emu-4021-m1", readings, max_readings=max_readings, max_bytes=max_bytes)
    rules = NodeRules(SUPPLIES[supply])
    seen: list[dict[str, Any]] = []
    for batch in batches:
        decoded = decode_telemetry(batch, device_id="emu-4021-m1")
        assert isinstance(decoded, Batch), decoded
        for item in decoded.items:
            assert isinstance(item, Reading), item
            rules.check(item, received_at=T0)  # sent right after the last one was taken
        doc = json.loads(batch)
        assert list(doc) == ["v", "device_id", "readings"]
        assert (doc["v"], doc["device_id"]) == (2, "emu-4021-m1")
        assert 1 <= len(doc["readings"]) <= max_readings
        assert len(batch) <= max_bytes or len(doc["readings"]) == 1
        for reading in doc["readings"]:
            single = json.dumps({"v": 2, "device_id": "emu-4021-m1", **reading}).encode()
            decode(single, "emu-4021-m1")
        seen += doc["readings"]
    assert seen == readings
    assert [r["seq"] for r in seen] == list(range(count))
    if readings:
        assert readings[-1]["ts"] == format_ts(parse_rfc3339("2026-11-23T16:00:00Z"))
        assert [parse_rfc3339(r["ts"]) for r in seen] == sorted(parse_rfc3339(r["ts"]) for r in seen)


def test_a_batch_never_holds_more_than_the_protocol_allows() -> None:
    with pytest.raises(ValueError, match="max_readings"):
        encode_batches("emu-1", [], max_readings=MAX_BATCH_READINGS + 1)


def command(name: str, args: dict[str, Any] | None = None, *, command_id: str = "01JD0000000000000000000001") -> bytes:
    doc = {"command_id": command_id, "name": name, "args": args or {}, "expires_at": "2026-11-23T17:00:00.000Z"}
    return json.dumps(doc).encode()


def test_commands_are_answered_as_documented() -> None:
    meter = Meter.new("sim-1", SUPPLIES["dc1500"], 3)
    meter.messages(T0)
    answer = meter.answer(command("ping"), T0)
    assert answer.ack == {"command_id": "01JD0000000000000000000001", "status": "ok", "detail": "pong"}

    assert meter.answer(command("set_interval", {"seconds": 10}, command_id="A2"), T0).ack == {
        "command_id": "A2",
        "status": "ok",
        "detail": "interval 10 s",
    }
    assert meter.interval_s == 10.0
    for bad in ({"seconds": 0}, {"seconds": "10"}, {"seconds": True}, {}):
        ack = meter.answer(command("set_interval", bad, command_id=f"bad{bad}"), T0).ack
        assert ack is not None
        assert ack["status"] == "error"
    assert meter.interval_s == 10.0

    boot = meter.boot
    first = meter.answer(command("reboot", command_id="R1"), T0)
    assert (first.rebooted, meter.boot, meter.seq) == (True, boot + 1, 0)
    again = meter.answer(command("reboot", command_id="R1"), T0)  # the node resent it
    assert again.ack == first.ack
    assert meter.boot == boot + 1  # carried out once

    unknown = meter.answer(command("self_destruct", command_id="U1"), T0).ack
    assert unknown is not None
    assert (unknown["status"], unknown["detail"]) == ("rejected", "unknown command 'self_destruct'")
    expired = meter.answer(command("ping", command_id="E1"), T0 + 7200).ack
    assert expired is not None
    assert expired["status"] == "rejected"
    assert meter.answer(b"not json", T0).ack is None
    assert meter.answer(b'{"name": "ping"}', T0).ack is None  # no command_id: nothing to answer


def test_a_meter_with_noack_never_answers() -> None:
    meter = Meter.new("sim-1", SUPPLIES["dc750"], 3, faults=Faults(noack=1.0))
    assert meter.answer(command("ping"), T0).ack is None
    assert meter.answer(command("ping"), T0).ack is None


def test_faults_parse_and_name_what_is_wrong() -> None:
    assert Faults.parse("reboot=0.01, duplicate=0.02,gap=0.01,noack=1") == Faults(0.01, 0.02, 0.01, 1.0)
    assert Faults.parse("") == Faults()
    for bad, match in (
        ("reboot", "NAME=PROBABILITY"),
        ("crash=0.1", "crash"),
        ("gap=2", "from 0 to 1"),
        ("gap=x", "gap=x"),
    ):
        with pytest.raises(ValueError, match=match):
            Faults.parse(bad)
