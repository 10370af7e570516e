"""Energy periods as InfluxDB line protocol: the ``energy`` measurement.

One point per device and period: measurement ``energy``; tags ``device_id``, ``period``
(``5m``) and, when known, ``type``; fields ``consumed_kwh``, ``regenerated_kwh``,
``covered_s`` (floats), ``complete`` (boolean) and, for AC meters, ``reactive_import_kvarh`` and
``reactive_export_kvarh``; the timestamp is the start of the period. A period that changes (a
late reading) is written again with the same measurement, tags and timestamp, so InfluxDB
replaces the point: replays are idempotent.

The InfluxDB forwarder sends these lines for the rows that ``storage.energy.energy_changes``
returns after its cursor (source ``energy_periods``, position = ``rev``). This module does
no I/O.
"""

from __future__ import annotations

import math
from typing import Final, Literal

from storage.records import EnergyPeriod

MEASUREMENT: Final = "energy"
Precision = Literal["s", "ms", "us", "ns"]
_PER_MS: Final[dict[str, tuple[int, int]]] = {"s": (1, 1000), "ms": (1, 1), "us": (1000, 1), "ns": (1_000_000, 1)}
_TAG_ESCAPES: Final = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\\": "\\\\"})


def _tag(value: str) -> str:
    return value.translate(_TAG_ESCAPES)


def _float(value: float) -> str:
    if not math.isfinite(value):
        msg = f"line protocol has no representation for {value!r}"
        raise ValueError(msg)
    return repr(float(value))


def energy_line(
    device_id: str,
    period: EnergyPeriod,
    *,
    period_name: str = "5m",
    device_type: str | None = None,
    precision: Precision = "ns",
) -> str:
    """One line of line protocol for *period* of *device_id*, its timestamp in *precision*."""
    tags = f"device_id={_tag(device_id)},period={_tag(period_name)}"
    if device_type is not None:
        tags += f",type={_tag(device_type)}"
    fields = [
        f"consumed_kwh={_float(period.consumed_kwh)}",
        f"regenerated_kwh={_float(period.regenerated_kwh)}",
        f"covered_s={_float(period.covered_ms / 1000)}",
        f"complete={'true' if period.complete else 'false'}",
    ]
    if period.reactive_import_kvarh is not None and period.reactive_export_kvarh is not None:
        fields.append(f"reactive_import_kvarh={_float(period.reactive_import_kvarh)}")
        fields.append(f"reactive_export_kvarh={_float(period.reactive_export_kvarh)}")
    mul, div = _PER_MS[precision]
    return f"{MEASUREMENT},{tags} {','.join(fields)} {period.start_ms * mul // div}"
