"""Batched and CBOR telemetry and the validation rules, end to end on the real node."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import anyio
import cbor2
import pytest

from tests import mqtt_raw
from tests.integration.conftest import Device, RunningNode, make_admin_key, start_node, stop_node
from tests.payloads import reading, telemetry

pytestmark = pytest.mark.anyio


def batch(device_id: str, boot: int, seqs: range, **per_seq: dict[str, Any]) -> dict[str, Any]:
    readings = []
    for seq in seqs:
        doc = reading(device_id, boot, seq)
        del doc["v"], doc["device_id"]
        doc.update(per_seq.get(f"s{seq}", {}))
        readings.append(doc)
    return {"v": 2, "device_id": device_id, "readings": readings}


async def register(node: RunningNode, device_id: str, type_: str = "dc_meter", supply: str | None = None) -> str:
    async with node.http() as client:
        resp = await client.post("/api/v1/devices", json={"device_id": device_id, "type": type_, "supply": supply})
    assert resp.status_code == 201, resp.text
    assert resp.json()["supply"] == supply
    secret: str = resp.json()["secret"]
    return secret


def publish_and_wait_for_pubacks(port: int, device_id: str, secret: str, messages: list[tuple[str, bytes]]) -> None:
    """Pipeline every PUBLISH on one connection; return once each has its PUBACK."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(mqtt_raw.connect(device_id, device_id, secret))
        ptype, body = mqtt_raw.read_packet(sock)
        assert (ptype, body[1]) == (2, 0)
        sock.sendall(b"".join(mqtt_raw.publish(t, p, packet_id=i + 1) for i, (t, p) in enumerate(messages)))
        acked = set()
        while len(acked) < len(messages):
            ptype, body = mqtt_raw.read_packet(sock)
            assert ptype == 4  # PUBACK
            acked.add(int.from_bytes(body[:2], "big"))
        sock.sendall(mqtt_raw.DISCONNECT)


async def test_batches_in_json_and_cbor_are_durable_when_acknowledged(node: RunningNode) -> None:
    secret = await register(node, "emu-b1")
    topic = "iot/emu-b1/telemetry"
    messages = [
        (topic, json.dumps(batch("emu-b1", 5, range(400))).encode()),  # ~80 KB: past 16 KiB
        (topic + "/cbor", cbor2.dumps(batch("emu-b1", 5, range(400, 800)))),
        # A bad reading among good ones: quarantined alone, with its index.
        (topic, json.dumps(batch("emu-b1", 5, range(800, 810), s803={"m": {"voltage_v": "1500"}})).encode()),
    ]
    assert len(messages[0][1]) > 16 * 1024
    await anyio.to_thread.run_sync(publish_and_wait_for_pubacks, node.mqtt_port, "emu-b1", secret, messages)

    # No waiting: every PUBACK came after the commit of all of its readings.
    rows = await node.telemetry("emu-b1")
    assert [r["seq"] for r in rows] == [s for s in range(810) if s != 803]
    device = await node.get("/api/v1/devices/emu-b1")
    assert device["counters"] == {
        "received": 810,
        "stored": 809,
        "duplicates": 0,
        # A reading that fails the schema is not sequenced (its seq cannot be trusted): 803
        # stays missing until a valid resend of it arrives.
        "missing": 1,
        "late": 0,
        "resets": 0,
        "quarantined": 1,
    }
    (item,) = (await node.get("/api/v1/quarantine", device_id="emu-b1"))["items"]
    assert item["reason"] == "schema"
    assert item["detail"].startswith("readings[3]: m.voltage_v")

    # The device resends everything (it never saw the PUBACKs): nothing is stored twice.
    await anyio.to_thread.run_sync(publish_and_wait_for_pubacks, node.mqtt_port, "emu-b1", secret, messages)
    device = await node.get("/api/v1/devices/emu-b1")
    assert device["counters"]["stored"] == 809
    assert device["counters"]["duplicates"] == 809
    assert len(await node.telemetry("emu-b1")) == 809


async def test_the_same_reading_in_json_and_cbor_reads_back_the_same(node: RunningNode, devices: list[Device]) -> None:
    for device_id, encode, suffix in (("via-json", json.dumps, ""), ("via-cbor", cbor2.dumps, "/cbor")):
        secret = await register(node, device_id, "ac_meter", "ac_15kv_16.7hz")
        dev = Device(node.mqtt_port, device_id, secret)
        devices.append(dev)
        assert (await dev.aconnect()).value == 0
        doc = reading(device_id, 3, 0, ts="2026-11-23T17:05:00.250+01:00", loc={"lat": 47.3769, "lon": 8.5417})
        doc["m"].update(voltage_v=15420.0, frequency_hz=16.7, power_factor=0.95, reactive_import_kvarh=40211.0)
        payload = encode(doc)
        await dev.apublish(
            f"iot/{device_id}/telemetry{suffix}", payload if isinstance(payload, bytes) else payload.encode()
        )
    (from_json,) = await node.telemetry("via-json")
    (from_cbor,) = await node.telemetry("via-cbor")
    assert from_json == from_cbor
    assert from_json["ts"] == "2026-11-23T16:05:00.250Z"


async def test_validation_rules_quarantine_alert_and_survive_a_restart(tmp_path: Path) -> None:
    key = make_admin_key(tmp_path)
    async with anyio.create_task_group() as tg:
        node = await start_node(tg, tmp_path, key)
        secret = await register(node, "tram-750", "dc_meter", "dc_750v")
        topic = "iot/tram-750/telemetry"
        m = {"voltage_v": 780.0, "current_a": 120.0, "power_kw": 93.6, "energy_import_kwh": 500.0,
             "energy_export_kwh": 20.0}  # fmt: skip
        messages = [
            (topic, telemetry("tram-750", 1, 0, m=m)),
            (topic, telemetry("tram-750", 1, 1, m={**m, "voltage_v": 1512.3})),  # 1500 V on a 750 V line
            (topic, telemetry("tram-750", 1, 2, m={**m, "energy_import_kwh": 501.0})),
            (topic, telemetry("tram-750", 1, 3, ts="2099-01-01T00:00:00Z", m={**m, "energy_import_kwh": 502.0})),
            (
                topic,
                telemetry(
                    "tram-750",
                    1,
                    4,
                    m={**m, "voltage_v": 0.0, "current_a": 0.0, "power_kw": 0.0, "energy_import_kwh": 501.0},
                ),
            ),
        ]
        await anyio.to_thread.run_sync(publish_and_wait_for_pubacks, node.mqtt_port, "tram-750", secret, messages)
        assert [r["seq"] for r in await node.telemetry("tram-750")] == [0, 2, 4]
        reasons = {i["reason"] for i in (await node.get("/api/v1/quarantine", device_id="tram-750"))["items"]}
        assert reasons == {"implausible_voltage", "future_timestamp"}

        async def alerted() -> list[dict[str, Any]]:
            page = await node.get("/api/v1/alerts", device_id="tram-750", rule="implausible_value")
            items: list[dict[str, Any]] = page["items"]
            return items

        with anyio.fail_after(10):
            while not await alerted():
                await anyio.sleep(0.05)
        (alert,) = await alerted()
        assert (alert["state"], alert["severity"]) == ("open", "critical")
        assert "750 V DC" in alert["detail"]
        await stop_node(node)

        # After a restart the actor reloads the registers of seq 4: a lower one is refused.
        node = await start_node(tg, tmp_path, key)
        lower = telemetry("tram-750", 1, 5, m={**m, "energy_import_kwh": 400.0})
        await anyio.to_thread.run_sync(
            publish_and_wait_for_pubacks, node.mqtt_port, "tram-750", secret, [(topic, lower)]
        )
        items = (await node.get("/api/v1/quarantine", device_id="tram-750"))["items"]
        assert items[0]["reason"] == "register_decreased"
        assert "energy_import_kwh 400.0 is less than 501.0 at seq 4" in items[0]["detail"]
        device = await node.get("/api/v1/devices/tram-750")
        assert device["counters"]["quarantined"] == 3
        assert device["counters"]["missing"] == 0  # quarantined readings were received
        await stop_node(node)


async def test_a_supply_set_later_applies_to_the_running_actor(node: RunningNode) -> None:
    secret = await register(node, "legacy-1")  # no supply: any DC voltage from 400 V to 3900 V
    topic = "iot/legacy-1/telemetry"
    first = [(topic, telemetry("legacy-1", 1, 0))]  # 1512.3 V
    await anyio.to_thread.run_sync(publish_and_wait_for_pubacks, node.mqtt_port, "legacy-1", secret, first)
    assert [r["seq"] for r in await node.telemetry("legacy-1")] == [0]
    async with node.http() as client:
        resp = await client.patch("/api/v1/devices/legacy-1", json={"supply": "dc_750v"})
    assert resp.status_code == 200, resp.text
    # The device's actor is still running (it retires only after 300 s idle): it reloads.
    second = [(topic, telemetry("legacy-1", 1, 1))]
    await anyio.to_thread.run_sync(publish_and_wait_for_pubacks, node.mqtt_port, "legacy-1", secret, second)
    assert [r["seq"] for r in await node.telemetry("legacy-1")] == [0]
    (item,) = (await node.get("/api/v1/quarantine", device_id="legacy-1"))["items"]
    assert item["reason"] == "implausible_voltage"


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast_path", "amqtt_reader"])
async def test_a_full_batch_of_1000_readings_gets_through_the_broker(tmp_path: Path, fast_path: bool) -> None:
    """The largest batch the contract allows passes the broker's packet limit (default
    settings, which config.py checks leave room for max_batch_payload_bytes), in JSON and CBOR."""
    key = make_admin_key(tmp_path)
    async with anyio.create_task_group() as tg:
        node = await start_node(tg, tmp_path, key, broker_fast_path=fast_path)
        secret = await register(node, "emu-full")
        topic = "iot/emu-full/telemetry"
        messages = [
            (topic, json.dumps(batch("emu-full", 1, range(1000))).encode()),
            (topic + "/cbor", cbor2.dumps(batch("emu-full", 1, range(1000, 2000)))),
        ]
        assert all(len(p) > 64 * 1024 for _, p in messages)  # more than one read of the fast path
        await anyio.to_thread.run_sync(publish_and_wait_for_pubacks, node.mqtt_port, "emu-full", secret, messages)
        device = await node.get("/api/v1/devices/emu-full")
        assert device["counters"]["stored"] == 2000
        assert device["counters"]["quarantined"] == 0
        await stop_node(node)
