"""Energy periods as InfluxDB line protocol (``storage.energy_influx``).

The lines are parsed back with a small parser of the line-protocol grammar (escaped tag
values, typed field values, an integer timestamp), so the test checks the syntax, not just a
string the code happens to produce.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage.energy_influx import energy_line
from storage.records import EnergyPeriod

T0_MS = 1_795_449_600_000  # 2026-11-23T16:00:00Z
_TOKEN = re.compile(r"(?:[^\\,= ]|\\.)+")


def parse(line: str) -> tuple[str, dict[str, str], dict[str, float | bool], int]:
    """measurement, tags, fields, timestamp: the InfluxDB line-protocol grammar, for our types."""
    head, fields_text, ts = re.fullmatch(r"((?:[^\\ ]|\\.)+) ((?:[^\\ ]|\\.)+) (-?\d+)", line).groups()  # type: ignore[union-attr]
    measurement, *tag_parts = re.findall(r"(?:[^\\,]|\\.)+", head)
    tags = {}
    for part in tag_parts:
        key, value = re.fullmatch(r"((?:[^\\=]|\\.)+)=(.+)", part).groups()  # type: ignore[union-attr]
        tags[key] = re.sub(r"\\(.)", r"\1", value)
    fields: dict[str, float | bool] = {}
    for part in fields_text.split(","):
        key, value = part.split("=")
        if value in {"true", "false"}:
            fields[key] = value == "true"
        else:
            assert re.fullmatch(r"-?\d+(\.\d+)?(e[+-]?\d+)?", value), f"{value!r} is not a float field"
            fields[key] = float(value)
    return measurement, tags, fields, int(ts)


def test_dc_period() -> None:
    period = EnergyPeriod(T0_MS, 30.0, 9.0, None, None, 270_000, complete=False)
    line = energy_line("emu-4021-m1", period, device_type="dc_meter")
    assert line == (
        "energy,device_id=emu-4021-m1,period=5m,type=dc_meter"
        " consumed_kwh=30.0,regenerated_kwh=9.0,covered_s=270.0,complete=false 1795449600000000000"
    )


def test_ac_period_in_milliseconds() -> None:
    period = EnergyPeriod(T0_MS, 50.0, 0.0, 10.0, 2.5, 300_000, complete=True)
    measurement, tags, fields, ts = parse(energy_line("loc-1216-020", period, precision="ms"))
    assert (measurement, tags, ts) == ("energy", {"device_id": "loc-1216-020", "period": "5m"}, T0_MS)
    assert fields == {
        "consumed_kwh": 50.0,
        "regenerated_kwh": 0.0,
        "covered_s": 300.0,
        "complete": True,
        "reactive_import_kvarh": 10.0,
        "reactive_export_kvarh": 2.5,
    }


@pytest.mark.parametrize(("precision", "ts"), [("s", T0_MS // 1000), ("us", T0_MS * 1000), ("ns", T0_MS * 10**6)])
def test_precisions(precision: str, ts: int) -> None:
    period = EnergyPeriod(T0_MS, 1.0, 0.0, None, None, 0, complete=False)
    assert parse(energy_line("emu-1", period, precision=precision))[3] == ts  # type: ignore[arg-type]


def test_tag_values_are_escaped() -> None:
    period = EnergyPeriod(T0_MS, 1.0, 0.0, None, None, 0, complete=False)
    _, tags, _, _ = parse(energy_line("odd id,x=1", period, device_type="a b"))
    assert tags == {"device_id": "odd id,x=1", "period": "5m", "type": "a b"}


# Energies as the aggregator makes them: finite, non-negative, from tiny shares to big registers.
energies = st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False)


@given(energies, energies, st.integers(0, 300_000), st.booleans(), st.integers(0, 10**10))
def test_fields_round_trip(consumed: float, regenerated: float, covered: int, complete: bool, n: int) -> None:
    period = EnergyPeriod(n * 300_000, consumed, regenerated, None, None, covered, complete=complete)
    _, _, fields, ts = parse(energy_line("emu-1", period, precision="ms"))
    assert fields == {
        "consumed_kwh": consumed,
        "regenerated_kwh": regenerated,
        "covered_s": covered / 1000,
        "complete": complete,
    }
    assert ts == n * 300_000


def test_non_finite_energy_is_refused() -> None:
    with pytest.raises(ValueError, match="no representation"):
        energy_line("emu-1", EnergyPeriod(T0_MS, float("inf"), 0.0, None, None, 0, complete=False))
