"""A simulated train for the energy tests, with every figure computed by hand.

A DC meter reads once a minute at half past the minute, so every period boundary falls in the
middle of an interval and the energy on either side is split linearly. The train alternates
traction (the import register rises by 10 kWh a minute) and regenerative braking (the export
register rises by 6 kWh a minute). At 16:07:00 the meter reboots: boot 8 starts at 16:08:00
with its registers back at 0, and the minute between is unknown. Boot 8 then reads on the
minute (8 kWh traction, 4 kWh braking a minute), loses seq 8 (a gap), and seq 8 arrives late.

Hand computation, per 5-minute period (consumed, regenerated, complete):

* 16:00-16:05: readings begin at 16:00:30, so 30 s are not covered → incomplete.
  Import 10 + 10 + 10 = 30; export 6 (16:02:30-16:03:30) + half of 6 (16:04:30-16:05:30) = 9.
* 16:05-16:10: the other half of that 6 → export 3; import 10 (16:05:30-16:06:30) + 5
  (16:06:30-16:07:00, 30 s); reboot: 16:07-16:08 uncovered → incomplete; boot 8 import 8
  (16:08-16:09), export 4 (16:09-16:10). Consumed 10 + 5 + 8 = 23, regenerated 3 + 4 = 7.
* 16:10-16:15: import 8 + 8 + 8 = 24, export 4 + 4 = 8, covered, consecutive → complete.
* 16:15-16:20: seq 8 (16:16) is missing at first. The 2-minute interval 16:15-16:17 still
  counts its register difference (import 8, export 4), but the period is incomplete. Then
  import 8 (16:17-16:18), export 4 (16:18-16:19), import 8 (16:19-16:20): 24 and 8. Once the
  late seq 8 is stored (import 36, export 14), the totals are the same and it is complete.

Hour 16:00-17:00: consumed 30 + 23 + 24 + 24 = 101, regenerated 9 + 7 + 8 + 8 = 32, incomplete.
Boot 7 alone: 45 kWh consumed (1045 - 1000) and 12 regenerated (512 - 500), all of it found in
the first two periods: 30 + 15 and 9 + 3.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Final

from storage.records import DeviceBatch, DeviceStateRecord, EnergyReading, RawMessage, TelemetryRow

#: 2026-11-23T16:00:00Z in epoch milliseconds.
T0_MS: Final = int(datetime(2026, 11, 23, 16, 0, tzinfo=UTC).timestamp() * 1000)
MIN: Final = 60_000
DEVICE: Final = "emu-4021-m1"


def _r(boot: int, seq: int, at_ms: int, imp: float, exp: float) -> EnergyReading:
    return EnergyReading(boot=boot, seq=seq, ts_ms=T0_MS + at_ms, import_kwh=imp, export_kwh=exp)


#: (boot, seq, time after 16:00, import, export)
BOOT7: Final = [
    _r(7, 0, MIN // 2, 1000, 500),
    _r(7, 1, MIN + MIN // 2, 1010, 500),
    _r(7, 2, 2 * MIN + MIN // 2, 1020, 500),
    _r(7, 3, 3 * MIN + MIN // 2, 1020, 506),
    _r(7, 4, 4 * MIN + MIN // 2, 1030, 506),
    _r(7, 5, 5 * MIN + MIN // 2, 1030, 512),
    _r(7, 6, 6 * MIN + MIN // 2, 1040, 512),
    _r(7, 7, 7 * MIN, 1045, 512),
]
BOOT8: Final = [
    _r(8, 0, 8 * MIN, 0, 0),
    _r(8, 1, 9 * MIN, 8, 0),
    _r(8, 2, 10 * MIN, 8, 4),
    _r(8, 3, 11 * MIN, 16, 4),
    _r(8, 4, 12 * MIN, 16, 8),
    _r(8, 5, 13 * MIN, 24, 8),
    _r(8, 6, 14 * MIN, 24, 12),
    _r(8, 7, 15 * MIN, 32, 12),
    # seq 8 (16:16:00, import 36, export 14) is the late one: LATE below.
    _r(8, 9, 17 * MIN, 40, 16),
    _r(8, 10, 18 * MIN, 48, 16),
    _r(8, 11, 19 * MIN, 48, 20),
    _r(8, 12, 20 * MIN, 56, 20),
]
LATE: Final = _r(8, 8, 16 * MIN, 36, 14)

#: (period start after 16:00 in minutes, consumed, regenerated, complete) before LATE arrives.
EXPECTED_BEFORE_LATE: Final = [
    (0, 30.0, 9.0, False),
    (5, 23.0, 7.0, False),
    (10, 24.0, 8.0, True),
    (15, 24.0, 8.0, False),
]
#: The same after LATE arrived: 16:15-16:20 is complete now, with the same totals.
EXPECTED: Final = [(0, 30.0, 9.0, False), (5, 23.0, 7.0, False), (10, 24.0, 8.0, True), (15, 24.0, 8.0, True)]
#: The hour 16:00-17:00: (consumed, regenerated, complete).
EXPECTED_HOUR: Final = (101.0, 32.0, False)


def telemetry_batch(device_id: str, readings: list[EnergyReading]) -> DeviceBatch:
    """*readings* as the storage writer commits them (``SqliteStore.commit``)."""

    def m(r: EnergyReading) -> str:
        doc = {"voltage_v": 1500.0, "current_a": 1.0, "power_kw": 1.5}
        doc |= {"energy_import_kwh": r.import_kwh, "energy_export_kwh": r.export_kwh}
        if r.reactive_import_kvarh is not None:
            doc |= {"reactive_import_kvarh": r.reactive_import_kvarh, "reactive_export_kvarh": r.reactive_export_kvarh}
        return json.dumps(doc)

    messages = [
        RawMessage(f"iot/{device_id}/telemetry", 0.0, b"{}", [TelemetryRow(r.boot, r.seq, r.ts_ms, m(r), None)])
        for r in readings
    ]
    return DeviceBatch(device_id, messages, DeviceStateRecord(device_id, None, 0, -1, (), {}, None, online=False))
