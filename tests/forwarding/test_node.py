"""The forwarders inside a real node: MQTT in, InfluxDB test server and moto S3 out, the status
API and metrics, an outage across a node restart that loses nothing, and the settings' errors."""

from __future__ import annotations

import gzip
import json
import re
import uuid
from pathlib import Path
from typing import Any

import aioboto3
import anyio
import httpx
import pytest
from pydantic import SecretStr

from node.app import run_node
from node.config import Settings
from storage.errors import ConfigError
from tests.integration.conftest import Device, RunningNode, devices, make_admin_key, node, start_node, stop_node
from tests.payloads import BASE_TS, telemetry

from .influx_fake import BUCKET, ORG, TOKEN, FakeInflux

pytestmark = pytest.mark.anyio

__all__ = ["devices", "node"]  # the integration fixtures, used here as they are

S3_KEY_ID, S3_SECRET = "node-test-key", "node-test-secret-never-logged"


def influx_settings(fake: FakeInflux) -> dict[str, Any]:
    return {
        "influxdb_enabled": True,
        "influxdb_url": fake.url,
        "influxdb_org": ORG,
        "influxdb_bucket": BUCKET,
        "influxdb_token": SecretStr(TOKEN),
        "influxdb_timeout_s": 2.0,
        "forward_poll_interval_s": 0.05,
        "forward_retry_initial_s": 0.05,
        "forward_retry_max_s": 0.5,
        "forward_monitor_interval_s": 0.1,
    }


def s3_settings(endpoint: str, bucket: str) -> dict[str, Any]:
    return {
        "s3_enabled": True,
        "s3_bucket": bucket,
        "s3_endpoint_url": endpoint,
        "s3_path_style": True,
        "s3_access_key_id": S3_KEY_ID,
        "s3_secret_access_key": SecretStr(S3_SECRET),
        "s3_window_s": 1.0,
        "s3_grace_s": 0.2,
    }


#: device id → secret, per test data directory (a restarted node keeps its registrations).
_secrets: dict[tuple[Path, str], str] = {}


async def publish_readings(node: RunningNode, device_id: str, seqs: range, devices: list[Device]) -> None:
    """Register (once per node data) and connect (once per node run), then publish *seqs*, one
    reading per PUBLISH."""
    key = (node.data_dir, device_id)
    if key not in _secrets:
        _secrets[key] = await node.register(device_id)
    dev = next((d for d in devices if d.device_id == device_id), None)
    if dev is None:
        dev = Device(node.mqtt_port, device_id, _secrets[key])
        devices.append(dev)
        assert (await dev.aconnect()).value == 0
    for seq in seqs:
        await dev.apublish(f"iot/{device_id}/telemetry", telemetry(device_id, 1, seq))


async def forwarders(node: RunningNode) -> dict[str, dict[str, Any]]:
    body = await node.get("/api/v1/forwarders")
    return {item["name"]: item for item in body["items"]}


def telemetry_points(fake: FakeInflux) -> dict[Any, dict[str, Any]]:
    """The readings' points (the energy stream's ``energy`` points left out)."""
    return {key: fields for key, fields in fake.points.items() if key[0] != "energy"}


def energy_points(fake: FakeInflux) -> dict[tuple[str, int], float]:
    """(device id, period start ms) → consumed kWh of the ``energy`` points."""
    return {
        (dict(tags)["device_id"], ts): float(fields["consumed_kwh"])
        for (measurement, tags, ts), fields in fake.points.items()
        if measurement == "energy"
    }


async def eventually(check: Any, seconds: float = 60.0) -> None:
    with anyio.fail_after(seconds):
        while not await check():
            await anyio.sleep(0.05)


async def test_a_default_node_forwards_nothing(node: RunningNode) -> None:
    items = await forwarders(node)
    assert sorted(items) == ["influxdb", "influxdb-energy", "s3"]
    for item in items.values():
        assert item["enabled"] is False
        assert item["rows_behind"] is None
        assert item["rows_forwarded"] == 0


async def test_node_forwards_to_influxdb_and_s3(
    tmp_path: Path, devices: list[Device], moto_endpoint: str, influx: FakeInflux
) -> None:
    bucket = f"node-{uuid.uuid4().hex[:12]}"
    session = aioboto3.Session(aws_access_key_id=S3_KEY_ID, aws_secret_access_key=S3_SECRET, region_name="us-east-1")
    async with session.client("s3", endpoint_url=moto_endpoint) as s3:
        await s3.create_bucket(Bucket=bucket)
    key = make_admin_key(tmp_path)
    async with anyio.create_task_group() as tg:
        node = await start_node(tg, tmp_path, key, **influx_settings(influx), **s3_settings(moto_endpoint, bucket))
        await publish_readings(node, "emu-1", range(120), devices)
        await publish_readings(node, "emu-2", range(30), devices)

        async def all_forwarded() -> bool:
            items = await forwarders(node)
            return items["influxdb"]["rows_forwarded"] == 150 and items["s3"]["rows_forwarded"] == 150

        await eventually(all_forwarded)
        # The energy stream: readings at 16:05:00 + seq s, energy_import_kwh rising 1 kWh a reading,
        # so one 5-minute period per device; a period rewritten as readings came in overwrites its point.
        start_ms = int(BASE_TS.timestamp() * 1000)

        async def energy_forwarded() -> bool:
            return energy_points(influx) == {
                ("emu-1", start_ms): pytest.approx(119.0),
                ("emu-2", start_ms): pytest.approx(29.0),
            }

        await eventually(energy_forwarded)
        items = await forwarders(node)
        async with node.http() as client:
            metrics = (await client.get("/metrics")).text
        await stop_node(node)
    assert len(telemetry_points(influx)) == 150
    energy = items["influxdb-energy"]
    assert (energy["enabled"], energy["failures"], energy["last_error"]) == (True, 0, None)
    assert energy["rows_forwarded"] >= 2
    assert re.search(r'depot_node_forward_rows_total\{forwarder="influxdb-energy"\} [1-9]', metrics)
    assert items["influxdb"] | {"last_success_at": None, "checked_at": None} == {
        "name": "influxdb",
        "enabled": True,
        "position": 150,
        "rows_behind": 0,
        "backlog_bytes": 0,
        "oldest_unforwarded_age_s": None,
        "batches_forwarded": items["influxdb"]["batches_forwarded"],
        "rows_forwarded": 150,
        "failures": 0,
        "rows_dropped": 0,
        "last_success_at": None,
        "last_error": None,
        "last_error_at": None,
        "checked_at": None,
    }
    assert 'depot_node_forward_rows_total{forwarder="influxdb"} 150.0' in metrics
    assert 'depot_node_forward_rows_total{forwarder="s3"} 150.0' in metrics
    assert re.search(r'depot_node_forward_rows_behind\{forwarder="s3"\} 0\.0', metrics)
    async with session.client("s3", endpoint_url=moto_endpoint) as s3:
        listing = await s3.list_objects_v2(Bucket=bucket)
        lines = []
        for obj in listing["Contents"]:
            body = await (await s3.get_object(Bucket=bucket, Key=obj["Key"]))["Body"].read()
            lines += [json.loads(line) for line in gzip.decompress(body).splitlines()]
    assert sorted(line["id"] for line in lines) == list(range(1, 151))
    assert sorted((p["device_id"], p["seq"]) for p in (json.loads(line["payload"]) for line in lines)) == sorted(
        [("emu-1", s) for s in range(120)] + [("emu-2", s) for s in range(30)]
    )


async def test_outage_across_a_node_restart_loses_nothing(
    tmp_path: Path, devices: list[Device], influx: FakeInflux
) -> None:
    """InfluxDB is down while readings arrive and the node restarts in the middle of the
    backlog; once it is back, every reading is there exactly once."""
    influx.stop()
    key = make_admin_key(tmp_path)
    sent = 0
    async with anyio.create_task_group() as tg:
        node = await start_node(tg, tmp_path, key, **influx_settings(influx))
        await publish_readings(node, "emu-1", range(400), devices)
        sent += 400

        async def behind_and_failing() -> bool:
            item = (await forwarders(node))["influxdb"]
            return item["rows_behind"] == 400 and item["last_error"] is not None

        await eventually(behind_and_failing)
        status = (await forwarders(node))["influxdb"]
        assert status["failures"] >= 1
        assert status["oldest_unforwarded_age_s"] is not None
        assert TOKEN not in json.dumps(status)
        for d in devices:
            await d.aclose()
        devices.clear()
        await stop_node(node)
    influx.start()
    influx.fail("500", "429")
    influx.retry_after = "0.1"
    async with anyio.create_task_group() as tg:
        node = await start_node(tg, tmp_path, key, **influx_settings(influx))
        await publish_readings(node, "emu-1", range(400, 600), devices)
        sent += 200

        async def drained() -> bool:
            return (await forwarders(node))["influxdb"]["position"] == sent

        await eventually(drained)
        await stop_node(node)
    confirmed = len(telemetry_points(influx))
    print(f"rows sent={sent} confirmed by the sink={confirmed} missing={sent - confirmed}")  # noqa: T201 - asked for
    assert confirmed == sent
    seqs = sorted(fields["seq"] for fields in telemetry_points(influx).values())
    assert seqs == list(range(600))


@pytest.mark.parametrize(
    ("settings", "setting"),
    [
        ({"influxdb_enabled": True}, "influxdb_url"),
        ({"influxdb_enabled": True, "influxdb_url": "http://x", "influxdb_org": "o"}, "influxdb_bucket"),
        (
            {"influxdb_enabled": True, "influxdb_url": "ftp://x", "influxdb_org": "o", "influxdb_bucket": "b"},
            "influxdb_url",
        ),
        (
            {"influxdb_enabled": True, "influxdb_url": "http://x", "influxdb_org": "o", "influxdb_bucket": "b"},
            "influxdb_token",
        ),
        ({"s3_enabled": True}, "s3_bucket"),
        ({"s3_enabled": True, "s3_bucket": "b", "s3_access_key_id": "k"}, "s3_secret_access_key"),
    ],
)
async def test_an_incomplete_forwarder_config_names_the_setting(
    tmp_path: Path, settings: dict[str, Any], setting: str
) -> None:
    with pytest.raises(ConfigError) as info:
        await run_node(Settings(data_dir=tmp_path, **settings), shutdown=anyio.Event())
    assert info.value.setting == setting
    assert not (tmp_path / "depot-node.sqlite3").exists()  # checked before anything was opened


async def test_token_file_and_secrets_stay_out_of_reprs(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    base = {"influxdb_enabled": True, "influxdb_url": "http://x", "influxdb_org": "o", "influxdb_bucket": "b"}
    with pytest.raises(ConfigError, match="influxdb_token_file: cannot read"):
        await run_node(Settings(data_dir=tmp_path, influxdb_token_file=token_file, **base), shutdown=anyio.Event())
    token_file.write_text("\n")
    with pytest.raises(ConfigError, match=r"influxdb_token_file: .* is empty"):
        await run_node(Settings(data_dir=tmp_path, influxdb_token_file=token_file, **base), shutdown=anyio.Event())
    settings = Settings(influxdb_token=SecretStr(TOKEN), s3_secret_access_key=SecretStr(S3_SECRET))
    assert TOKEN not in repr(settings)
    assert S3_SECRET not in repr(settings)
    assert TOKEN not in str(settings.model_dump())


async def test_token_file_is_read(tmp_path: Path, influx: FakeInflux, devices: list[Device]) -> None:
    token_file = tmp_path / "influx.token"
    token_file.write_text(TOKEN + "\n")
    settings = influx_settings(influx) | {"influxdb_token": None, "influxdb_token_file": token_file}
    key = make_admin_key(tmp_path)
    async with anyio.create_task_group() as tg:
        node = await start_node(tg, tmp_path, key, **settings)
        await publish_readings(node, "emu-1", range(5), devices)

        async def forwarded() -> bool:
            return (await forwarders(node))["influxdb"]["rows_forwarded"] == 5

        await eventually(forwarded)
        await stop_node(node)
    assert len(telemetry_points(influx)) == 5


async def test_forwarders_route_needs_a_key(node: RunningNode) -> None:
    async with httpx.AsyncClient(base_url=node.base_url) as client:
        response = await client.get("/api/v1/forwarders")
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
