"""Fixtures that run the real node in-process on free loopback ports, with a real SQLite
file in a temporary directory, and talk to it over real TCP (MQTT and HTTP)."""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import paho.mqtt.client as mqtt
import pytest
from anyio.abc import TaskGroup

from node.app import NodeAddresses, database_path, run_node
from node.config import Settings
from node.faults import FaultHooks
from storage.secrets import new_api_key
from storage.sqlite import connect, insert_api_key


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, bool]]:
    """asyncio, on uvloop when DEPOT_NODE_EVENT_LOOP=uvloop (the suite passes on both)."""
    return "asyncio", {"use_uvloop": os.environ.get("DEPOT_NODE_EVENT_LOOP") == "uvloop"}


@dataclass
class RunningNode:
    data_dir: Path
    admin_key: str
    addresses: NodeAddresses | None = None
    shutdown: anyio.Event = field(default_factory=anyio.Event)
    stopped: anyio.Event = field(default_factory=anyio.Event)

    @property
    def mqtt_port(self) -> int:
        assert self.addresses is not None
        assert self.addresses.mqtt is not None
        return self.addresses.mqtt[1]

    @property
    def base_url(self) -> str:
        assert self.addresses is not None
        host, port = self.addresses.http
        return f"http://{host}:{port}"

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base_url, headers={"Authorization": f"Bearer {self.admin_key}"}, timeout=10.0
        )

    async def register(self, device_id: str, type_: str = "dc_meter") -> str:
        async with self.http() as client:
            resp = await client.post("/api/v1/devices", json={"device_id": device_id, "type": type_})
        assert resp.status_code == 201, resp.text
        secret: str = resp.json()["secret"]
        return secret

    async def get(self, path: str, **params: Any) -> Any:
        async with self.http() as client:
            resp = await client.get(path, params=params)
        assert resp.status_code == 200, resp.text
        return resp.json()

    async def telemetry(self, device_id: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 1000}
            if cursor:
                params["cursor"] = cursor
            page = await self.get(f"/api/v1/devices/{device_id}/telemetry", **params)
            items.extend(page["items"])
            cursor = page["next_cursor"]
            if not cursor:
                return items


def make_admin_key(data_dir: Path) -> str:
    key_id, key, key_hash = new_api_key()
    conn = connect(database_path(data_dir))
    try:
        insert_api_key(conn, key_id, "admin", key_hash)
    finally:
        conn.close()
    return key


async def start_node(
    tg: TaskGroup, data_dir: Path, admin_key: str, faults: FaultHooks | None = None, **settings: Any
) -> RunningNode:
    node = RunningNode(data_dir=data_dir, admin_key=admin_key)
    config = Settings(data_dir=data_dir, mqtt_bind="127.0.0.1:0", http_bind="127.0.0.1:0", **settings)

    async def run(*, task_status: anyio.abc.TaskStatus[NodeAddresses]) -> None:
        try:
            await run_node(config, shutdown=node.shutdown, faults=faults, task_status=task_status)
        finally:
            node.stopped.set()

    node.addresses = await tg.start(run)
    return node


async def stop_node(node: RunningNode) -> None:
    node.shutdown.set()
    with anyio.fail_after(30):
        await node.stopped.wait()


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[RunningNode]:
    key = make_admin_key(tmp_path)
    async with anyio.create_task_group() as tg:
        running = await start_node(tg, tmp_path, key)
        yield running
        await stop_node(running)


class Device:
    """A paho-mqtt client for one registered device (paho runs its own network thread)."""

    def __init__(self, port: int, device_id: str, secret: str, *, client_id: str | None = None) -> None:
        self.device_id = device_id
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or device_id, protocol=mqtt.MQTTv311
        )
        self.client.username_pw_set(device_id, secret)
        self.client.max_inflight_messages_set(100)
        self.port = port

    def connect(self, timeout: float = 10.0) -> mqtt.ReasonCode:
        """Connect and return the CONNACK reason (success or the refusal)."""
        result: list[mqtt.ReasonCode] = []
        done = threading.Event()

        def on_connect(client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            result.append(reason)
            done.set()

        def on_disconnect(client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            done.set()

        self.client.on_connect = on_connect
        self.client.on_connect_fail = lambda client, userdata: done.set()
        self.client.on_disconnect = on_disconnect
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        if not done.wait(timeout):
            raise TimeoutError("no CONNACK")
        if not result:
            raise ConnectionError("connection closed before CONNACK")
        return result[0]

    def publish(self, topic: str, payload: bytes, qos: int = 1, timeout: float = 10.0) -> None:
        info = self.client.publish(topic, payload, qos=qos)
        info.wait_for_publish(timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    # The node runs on the test's event loop: blocking paho calls go to a worker thread.
    async def aconnect(self) -> mqtt.ReasonCode:
        return await anyio.to_thread.run_sync(self.connect)

    async def apublish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        await anyio.to_thread.run_sync(lambda: self.publish(topic, payload, qos))

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self.close)


@pytest.fixture
def devices() -> Iterator[list[Device]]:
    made: list[Device] = []
    yield made
    for d in made:
        d.close()
