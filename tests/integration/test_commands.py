"""Commands end to end: the real node, simulated meters and paho clients over MQTT, the API.

* A command for an offline simulated meter waits, is delivered when the meter connects and
  subscribes, and ends ``acked``; one for a meter that never answers is resent and ends
  ``expired``. Both histories are the same after the node restarts.
* A command that was ``sent`` when the node stopped is sent again to the device after the
  restart, with the same ``command_id``.
* Acks that are bad, for another device's command, or for an unknown one change nothing
  else; the bad one is quarantined with its raw payload.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from node.sim.fleet import Fleet, FleetConfig
from node.sim.meter import Faults
from tests import mqtt_raw

from .conftest import Device, RunningNode, make_admin_key, start_node, stop_node

pytestmark = pytest.mark.anyio

WAIT_S = 60.0


async def send(node: RunningNode, device_id: str, **body: Any) -> dict[str, Any]:
    async with node.http() as client:
        resp = await client.post(f"/api/v1/devices/{device_id}/commands", json=body)
    assert resp.status_code == 202, resp.text
    result: dict[str, Any] = resp.json()
    return result


async def command(node: RunningNode, device_id: str, command_id: str) -> dict[str, Any]:
    result: dict[str, Any] = await node.get(f"/api/v1/devices/{device_id}/commands/{command_id}")
    return result


async def wait_for_state(node: RunningNode, device_id: str, command_id: str, state: str) -> dict[str, Any]:
    with anyio.fail_after(WAIT_S):
        while (found := await command(node, device_id, command_id))["state"] != state:
            assert found["state"] in ("queued", "sent"), found
            await anyio.sleep(0.1)
    return found


@asynccontextmanager
async def running_fleet(fleet: Fleet) -> AsyncIterator[None]:
    """Connect the fleet and publish in a worker thread until the block ends."""
    stop = threading.Event()
    await anyio.to_thread.run_sync(fleet.start)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, fleet.run_until, stop)
            try:
                yield
            finally:
                stop.set()
    finally:
        await anyio.to_thread.run_sync(fleet.stop)


@pytest.mark.slow
async def test_commands_to_simulated_meters_end_acked_or_expired_and_survive_a_restart(tmp_path: Path) -> None:
    key = make_admin_key(tmp_path)
    async with anyio.create_task_group() as tg:
        node = await start_node(tg, tmp_path, key, command_ack_timeout_s=1.0, command_max_attempts=3)

        def fleet(prefix: str, supply: str, faults: Faults) -> Fleet:
            return Fleet(
                FleetConfig(
                    devices=1,
                    rate=5.0,
                    mqtt_port=node.mqtt_port,
                    api_url=node.base_url,
                    admin_key=key,
                    secrets_file=tmp_path / f"{prefix}.json",
                    prefix=prefix,
                    supplies=(supply,),
                    faults=faults,
                )
            )

        answering, silent = fleet("live", "dc1500", Faults()), fleet("mute", "ac15k", Faults(noack=1.0))
        # Registered through the API, but not connected yet.
        await anyio.to_thread.run_sync(answering.secrets)
        await anyio.to_thread.run_sync(silent.secrets)
        live_id, mute_id = answering.config.device_id(0), silent.config.device_id(0)
        assert (live_id, mute_id) == ("live-dc1500-0000", "mute-ac15k-0000")

        ping = await send(node, live_id, name="ping", ttl_s=600, idempotency_key="demo-1")
        doomed = await send(node, mute_id, name="ping", ttl_s=8)
        await anyio.sleep(0.5)
        for device_id, cmd in ((live_id, ping), (mute_id, doomed)):
            assert (await command(node, device_id, cmd["command_id"]))["state"] == "queued"

        async with running_fleet(answering), running_fleet(silent):
            acked = await wait_for_state(node, live_id, ping["command_id"], "acked")
            expired = await wait_for_state(node, mute_id, doomed["command_id"], "expired")
            readings = await node.telemetry(live_id)

        assert [(h["state"], h.get("detail")) for h in acked["history"]] == [
            ("queued", None),
            ("sent", "attempt 1"),
            ("acked", "ok: pong"),
        ]
        assert acked["attempts"] == 1
        # No ack: resent with the same id up to the limit, then expired at expires_at.
        states = [h["state"] for h in expired["history"]]
        assert states == ["queued", "sent", "sent", "sent", "expired"]
        assert expired["history"][-1]["detail"] == "no ack before it expired (3 attempts)"
        assert expired["history"][-1]["at"] >= expired["expires_at"]
        assert readings  # the meters published telemetry meanwhile

        metrics = await _metrics(node)
        assert metrics['depot_node_command_transitions_total{state="acked"}'] == 1
        assert metrics['depot_node_command_transitions_total{state="expired"}'] == 1
        assert metrics["depot_node_command_resends_total"] == 2
        assert metrics["depot_node_command_expirations_total"] == 1

        await stop_node(node)
        node = await start_node(tg, tmp_path, key)
        assert await command(node, live_id, ping["command_id"]) == acked
        assert await command(node, mute_id, doomed["command_id"]) == expired
        # The idempotency key still finds the same command after the restart.
        again = await send(node, live_id, name="ping", ttl_s=600, idempotency_key="demo-1")
        assert again == acked
        await stop_node(node)


async def _metrics(node: RunningNode) -> dict[str, float]:
    async with node.http() as client:
        text = (await client.get("/metrics")).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


class Listener(Device):
    """A paho device that subscribes to its commands and keeps what it receives."""

    def __init__(self, port: int, device_id: str, secret: str) -> None:
        super().__init__(port, device_id, secret)
        self.received: list[dict[str, Any]] = []
        self.subscribed = threading.Event()
        self.client.on_message = lambda c, u, m: self.received.append(json.loads(m.payload))
        self.client.on_subscribe = lambda *args: self.subscribed.set()

    async def listen(self) -> None:
        assert await self.aconnect() == 0
        self.client.subscribe(f"iot/{self.device_id}/commands", qos=1)
        with anyio.fail_after(WAIT_S):
            await anyio.to_thread.run_sync(self.subscribed.wait)

    async def received_count(self, n: int) -> None:
        with anyio.fail_after(WAIT_S):
            while len(self.received) < n:
                await anyio.sleep(0.05)

    async def ack(self, command_id: str, status: str = "ok", detail: str = "") -> None:
        body = json.dumps({"command_id": command_id, "status": status, "detail": detail}).encode()
        await self.apublish(f"iot/{self.device_id}/commands/ack", body)


async def test_a_sent_command_is_sent_again_after_a_restart(tmp_path: Path, devices: list[Device]) -> None:
    key = make_admin_key(tmp_path)
    async with anyio.create_task_group() as tg:
        node = await start_node(tg, tmp_path, key, command_ack_timeout_s=600.0)
        secret = await node.register("emu-1")
        first = Listener(node.mqtt_port, "emu-1", secret)
        devices.append(first)
        await first.listen()
        sent = await send(node, "emu-1", name="set_interval", args={"seconds": 10}, ttl_s=3600)
        await first.received_count(1)
        assert first.received[0] == {
            "command_id": sent["command_id"],
            "name": "set_interval",
            "args": {"seconds": 10},
            "expires_at": sent["expires_at"],
        }
        await wait_for_state(node, "emu-1", sent["command_id"], "sent")
        await first.aclose()  # it never answered
        await stop_node(node)

        node = await start_node(tg, tmp_path, key, command_ack_timeout_s=600.0)
        second = Listener(node.mqtt_port, "emu-1", secret)
        devices.append(second)
        await second.listen()
        await second.received_count(1)
        assert second.received[0]["command_id"] == sent["command_id"]
        await second.ack(sent["command_id"], detail="interval 10 s")
        done = await wait_for_state(node, "emu-1", sent["command_id"], "acked")
        assert [(h["state"], h.get("detail")) for h in done["history"]] == [
            ("queued", None),
            ("sent", "attempt 1"),
            ("sent", "attempt 2 (resent, no ack yet)"),
            ("acked", "ok: interval 10 s"),
        ]
        await stop_node(node)


async def test_stray_and_bad_acks_change_nothing_else(node: RunningNode, devices: list[Device]) -> None:
    one = Listener(node.mqtt_port, "emu-1", await node.register("emu-1"))
    two = Listener(node.mqtt_port, "emu-2", await node.register("emu-2"))
    devices += [one, two]
    await one.listen()
    await two.listen()
    mine = await send(node, "emu-1", name="ping", ttl_s=600)
    theirs = await send(node, "emu-2", name="ping", ttl_s=600)
    await one.received_count(1)
    await two.received_count(1)

    await one.ack(theirs["command_id"])  # emu-2's command, acked on emu-1's own topic
    await one.ack("01JD0000000000000000000000")  # no such command
    await one.apublish("iot/emu-1/commands/ack", b"\xffnot json")  # PUBACKed once quarantined
    await one.ack(mine["command_id"], status="rejected", detail="unknown command")
    failed = await wait_for_state(node, "emu-1", mine["command_id"], "failed")
    assert failed["history"][-1]["detail"] == "rejected: unknown command"
    await one.ack(mine["command_id"])  # too late: it is final

    assert (await command(node, "emu-2", theirs["command_id"]))["state"] == "sent"
    quarantined = (await node.get("/api/v1/quarantine", device_id="emu-1"))["items"]
    assert [(q["topic"], q["reason"]) for q in quarantined] == [("iot/emu-1/commands/ack", "not_utf8_json")]
    metrics = await _metrics(node)
    assert metrics['depot_node_command_acks_ignored_total{reason="other_device"}'] == 1
    assert metrics['depot_node_command_acks_ignored_total{reason="unknown"}'] == 1
    assert metrics['depot_node_command_acks_ignored_total{reason="finished"}'] == 1
    assert metrics['depot_node_command_acks_quarantined_total{reason="not_utf8_json"}'] == 1
    # The acks were a sign of life for the device, nothing more.
    device = await node.get("/api/v1/devices/emu-1")
    assert device["counters"]["received"] == 0
    assert device["state"]["last_seen"] is not None


async def test_a_simulated_meter_carries_out_its_commands(node: RunningNode, tmp_path: Path) -> None:
    """``reboot`` starts a new boot at seq 0 (the node counts a reset), ``set_interval`` changes
    the rate, anything unknown is rejected: what the README promises of the simulator."""
    fleet = Fleet(
        FleetConfig(
            devices=1,
            rate=2.0,
            mqtt_port=node.mqtt_port,
            api_url=node.base_url,
            admin_key=node.admin_key,
            secrets_file=tmp_path / "s.json",
            supplies=("ac25k",),
        )
    )
    device_id = fleet.config.device_id(0)
    async with running_fleet(fleet):
        with anyio.fail_after(WAIT_S):
            while not (await node.get(f"/api/v1/devices/{device_id}"))["counters"]["stored"]:
                await anyio.sleep(0.1)
        boot = (await node.get(f"/api/v1/devices/{device_id}"))["state"]["boot"]
        reboot = await send(node, device_id, name="reboot", ttl_s=60)
        done = await wait_for_state(node, device_id, reboot["command_id"], "acked")
        assert done["history"][-1]["detail"] == f"ok: rebooted into boot {boot + 1}"
        with anyio.fail_after(WAIT_S):
            while (device := await node.get(f"/api/v1/devices/{device_id}"))["state"]["boot"] != boot + 1:
                await anyio.sleep(0.1)
        assert device["counters"]["resets"] == 1

        faster = await send(node, device_id, name="set_interval", args={"seconds": 0.05}, ttl_s=60)
        await wait_for_state(node, device_id, faster["command_id"], "acked")
        before = (await node.get(f"/api/v1/devices/{device_id}"))["counters"]["stored"]
        await anyio.sleep(1.0)
        after = (await node.get(f"/api/v1/devices/{device_id}"))["counters"]["stored"]
        assert after - before >= 6  # 20/s now, 2/s before (generous: a loaded machine)

        unknown = await send(node, device_id, name="self_destruct", ttl_s=60)
        failed = await wait_for_state(node, device_id, unknown["command_id"], "failed")
        assert failed["history"][-1]["detail"] == "rejected: unknown command 'self_destruct'"


class PersistentListener(Listener):
    """A device with a persistent session (clean session off): its subscription outlives a
    disconnect, so after a reconnect it receives commands without subscribing again."""

    def __init__(self, port: int, device_id: str, secret: str, *, qos: int = 1) -> None:
        super().__init__(port, device_id, secret)
        self.qos = qos
        self.client._clean_session = False  # paho keeps it private; set before connect()
        self.qos_seen: list[int] = []

        def on_message(client: Any, userdata: Any, message: Any) -> None:
            self.received.append(json.loads(message.payload))
            self.qos_seen.append(message.qos)

        self.client.on_message = on_message

    async def listen(self) -> None:
        assert await self.aconnect() == 0
        self.client.subscribe(f"iot/{self.device_id}/commands", qos=self.qos)
        with anyio.fail_after(WAIT_S):
            await anyio.to_thread.run_sync(self.subscribed.wait)


async def test_a_persistent_session_gets_its_commands_after_a_reconnect(
    node: RunningNode, devices: list[Device]
) -> None:
    secret = await node.register("emu-1")
    first = PersistentListener(node.mqtt_port, "emu-1", secret, qos=0)
    devices.append(first)
    await first.listen()
    await first.aclose()
    queued = await send(node, "emu-1", name="ping", ttl_s=600)
    again = PersistentListener(node.mqtt_port, "emu-1", secret, qos=0)
    devices.append(again)
    assert await again.aconnect() == 0  # no SUBSCRIBE this time
    with anyio.fail_after(10):  # the connect delivers it, not the sweep (30 s here)
        await again.received_count(1)
    assert again.received[0]["command_id"] == queued["command_id"]
    assert again.qos_seen == [0]  # delivered at the QoS the device subscribed with
    await again.ack(queued["command_id"], detail="pong")
    await wait_for_state(node, "emu-1", queued["command_id"], "acked")


def _answer_one_command(port: int, device_id: str, secret: str) -> str:
    """A bare MQTT client: subscribe to the commands topic, take one command (PUBACKing it),
    acknowledge it on commands/ack with QoS 1 and return once that PUBLISH is PUBACKed."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.sendall(mqtt_raw.connect(device_id, device_id, secret))
        ptype, body = mqtt_raw.read_packet(sock)
        assert (ptype, body[1]) == (2, 0), "CONNACK refused"
        sock.sendall(mqtt_raw.subscribe([(f"iot/{device_id}/commands", 1)], packet_id=1))
        while True:
            ptype, body = mqtt_raw.read_packet(sock)
            if ptype == 3:  # PUBLISH (QoS 1: the granted QoS)
                break
            assert ptype == 9, ptype  # SUBACK
        topic_len = int.from_bytes(body[:2], "big")
        assert body[2 : 2 + topic_len] == f"iot/{device_id}/commands".encode()
        packet_id = int.from_bytes(body[2 + topic_len : 4 + topic_len], "big")
        doc = json.loads(body[4 + topic_len :])
        sock.sendall(mqtt_raw.puback(packet_id))
        ack = json.dumps({"command_id": doc["command_id"], "status": "ok", "detail": "done"}).encode()
        sock.sendall(mqtt_raw.publish(f"iot/{device_id}/commands/ack", ack, qos=1, packet_id=7))
        ptype, body = mqtt_raw.read_packet(sock)
        assert (ptype, int.from_bytes(body[:2], "big")) == (4, 7)  # PUBACK of the ack
        sock.sendall(mqtt_raw.DISCONNECT)
    command_id: str = doc["command_id"]
    return command_id


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast_path", "amqtt_reader"])
async def test_an_ack_is_pubacked_after_its_command_is_acked(tmp_path: Path, fast_path: bool) -> None:
    """Through the broker's fast path (SUBSCRIBE handled there, the ack PUBLISH parsed inline
    and handed to Bridge.admit) and through amqtt's reader: the subscription lets the queued
    command go, and the ack's PUBACK comes only once the command's new state is committed."""
    key = make_admin_key(tmp_path)
    async with anyio.create_task_group() as tg:
        node = await start_node(tg, tmp_path, key, broker_fast_path=fast_path)
        secret = await node.register("raw-1")
        queued = await send(node, "raw-1", name="ping", args={}, ttl_s=60)
        assert queued["state"] == "queued"
        command_id = await anyio.to_thread.run_sync(_answer_one_command, node.mqtt_port, "raw-1", secret)
        assert command_id == queued["command_id"]
        # No waiting: the PUBACK of the ack was sent after the state change was committed.
        found = await command(node, "raw-1", command_id)
        assert found["state"] == "acked"
        assert [h["state"] for h in found["history"]] == ["queued", "sent", "acked"]
        # The ack also counts as a sign of life of the device (not as telemetry).
        device = await node.get("/api/v1/devices/raw-1")
        assert device["counters"]["received"] == 0
        await stop_node(node)
