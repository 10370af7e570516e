"""Opt-in: the InfluxDB sink against a real InfluxDB 2 (``pytest -m influxdb``).

Skipped unless ``DEPOT_NODE_TEST_INFLUXDB_URL``, ``…_ORG``, ``…_BUCKET`` and ``…_TOKEN`` are set
(the token only from the environment, never on a command line). It writes readings of a
device id unique to the run, writes them again (a replay), and reads them back with Flux:
every reading once, with its fields and types as sent.
"""

from __future__ import annotations

import os
import uuid

import pytest
from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync

from storage.influx_sink import InfluxSink
from storage.records import TelemetryOut

from .conftest import BASE_MS, measurements

ENV = "DEPOT_NODE_TEST_INFLUXDB_"
_missing = [name for name in ("URL", "ORG", "BUCKET", "TOKEN") if not os.environ.get(ENV + name)]

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.influxdb,
    pytest.mark.skipif(bool(_missing), reason=f"set {', '.join(ENV + n for n in _missing)} to test a real InfluxDB"),
]


async def test_real_influxdb_stores_each_reading_once() -> None:
    url, org, bucket, token = (os.environ[ENV + n] for n in ("URL", "ORG", "BUCKET", "TOKEN"))
    device_id = f"test-{uuid.uuid4().hex[:12]}"
    rows = [TelemetryOut(i + 1, device_id, "dc_meter", 3, i, BASE_MS + i * 1000, measurements(i)) for i in range(20)]
    async with InfluxSink(url, org, bucket, token, timeout_s=10.0, gzip=True) as sink:
        await sink.send(rows)
        await sink.send(rows[:10])  # a replay of the first half
    query = (
        f'from(bucket: "{bucket}") |> range(start: 2026-11-23T00:00:00Z, stop: 2026-11-24T00:00:00Z)'
        f' |> filter(fn: (r) => r._measurement == "dc_meter" and r.device_id == "{device_id}")'
        ' |> pivot(rowKey: ["_time"], columnKey: ["_field"], valueColumn: "_value")'
    )
    async with InfluxDBClientAsync(url=url, token=token, org=org) as client:
        tables = await client.query_api().query(query)
    records = [record.values for table in tables for record in table.records]
    assert sorted(r["seq"] for r in records) == list(range(20))
    first = next(r for r in records if r["seq"] == 1)
    assert first["boot"] == 3
    assert first["type"] == "dc_meter"
    assert first["voltage_v"] == measurements(1)["voltage_v"]
