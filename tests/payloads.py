"""Valid protocol v2 telemetry for tests (the same shape docs/protocol.md shows)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

BASE_TS = datetime(2026, 11, 23, 16, 5, tzinfo=UTC)


def reading(device_id: str, boot: int, seq: int, /, **overrides: Any) -> dict[str, Any]:
    # One a second from BASE_TS, wrapping after an hour: device time stays in the past (the
    # node quarantines readings from the future) whatever seq hypothesis draws.
    ts = BASE_TS + timedelta(seconds=seq % 3600)
    doc: dict[str, Any] = {
        "v": 2,
        "device_id": device_id,
        "boot": boot,
        "seq": seq,
        "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
        "m": {
            "voltage_v": 1512.3,
            "current_a": 230.4,
            "power_kw": 348.4,
            "energy_import_kwh": 123456.789 + seq,
            "energy_export_kwh": 2345.6,
        },
    }
    doc.update(overrides)
    return doc


def telemetry(device_id: str, boot: int, seq: int, /, **overrides: Any) -> bytes:
    return json.dumps(reading(device_id, boot, seq, **overrides)).encode()
