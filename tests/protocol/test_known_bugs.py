"""Regression tests for session-table bugs the state machine found (now fixed).

The embedded amqtt 0.12.1 handles a clean-session CONNECT by first removing any session with
the same client id from its session table, without closing that session's connection, and
only then authenticates; the new session (refused or not) takes the table entry. The node
relied on that table for revocation and on one connection per device for ``online``:

* a refused CONNECT that merely named a connected device's client id detached the device's
  live connection, so revoking the device left it open, still acknowledged and stored;
* a second accepted CONNECT did not close the first (MQTT 3.1.1 [MQTT-3.1.4-2]).

``NodeBroker`` now keeps its own registry of authenticated live connections
(``NodeBroker.live``): it takes over from an older connection once a new one is accepted,
never lets a refused CONNECT delete a live session, restores amqtt's table entry, and
revocation closes every live connection of the device.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.payloads import telemetry
from tests.protocol.target import NodeTarget
from tests.protocol.wire import ACCEPTED, NOT_AUTHORIZED, DeviceConnection

SETTLE_S = 1.5

SESSION_TABLE = (
    "node bug: a CONNECT naming a connected client id detaches its live session (amqtt 0.12.1 session"
    " table), which revocation and online tracking rely on; see this module's docstring"
)


class Node:
    """The node under test, seen from a test: registration, connections, readings."""

    def __init__(self, target: NodeTarget, http: httpx.Client) -> None:
        self.target = target
        self.http = http
        self.conns: list[DeviceConnection] = []

    def register(self) -> tuple[str, str]:
        device_id = f"kb-{uuid.uuid4().hex[:16]}"
        resp = self.http.post("/api/v1/devices", json={"device_id": device_id, "type": "dc_meter"})
        assert resp.status_code == 201, resp.text
        return device_id, resp.json()["secret"]

    def open(self) -> DeviceConnection:
        conn = DeviceConnection(self.target.mqtt_host, self.target.mqtt_port)
        self.conns.append(conn)
        return conn

    def connect(self, device_id: str, secret: str) -> DeviceConnection:
        conn = self.open()
        assert conn.connect(device_id, device_id, secret) == ACCEPTED
        return conn

    def device(self, device_id: str) -> dict[str, Any]:
        resp = self.http.get(f"/api/v1/devices/{device_id}")
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    def readings(self, device_id: str) -> list[tuple[int, int]]:
        resp = self.http.get(f"/api/v1/devices/{device_id}/telemetry", params={"limit": 1000})
        assert resp.status_code == 200, resp.text
        return [(item["boot"], item["seq"]) for item in resp.json()["items"]]

    def revoke(self, device_id: str) -> None:
        resp = self.http.delete(f"/api/v1/devices/{device_id}")
        assert resp.status_code == 204, resp.text

    def online_within(self, device_id: str, expected: bool, timeout: float = SETTLE_S) -> bool:
        deadline = time.monotonic() + timeout
        while self.device(device_id)["state"]["online"] != expected:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def still_ingests(self, conn: DeviceConnection, device_id: str, seq: int) -> str:
        """Publish on a connection that should be gone; describe what the node did with it."""
        conn.publish(f"iot/{device_id}/telemetry", telemetry(device_id, 1, seq), packet_id=conn.next_packet_id())
        return f"a PUBLISH on it was acknowledged; stored readings now {self.readings(device_id)}"


@pytest.fixture
def node(node_target: NodeTarget, node_http: httpx.Client) -> Iterator[Node]:
    n = Node(node_target, node_http)
    yield n
    for conn in n.conns:
        conn.close()


def test_revoking_a_device_closes_its_connection(node: Node) -> None:
    """The baseline the bugs below break: revocation closes the live connection."""
    device_id, secret = node.register()
    conn = node.connect(device_id, secret)
    conn.publish(f"iot/{device_id}/telemetry", telemetry(device_id, 1, 0), packet_id=1)
    node.revoke(device_id)
    assert conn.closed_by_peer(SETTLE_S)
    with node.open() as again:
        assert again.connect(device_id, device_id, secret) == NOT_AUTHORIZED
    assert node.readings(device_id) == [(1, 0)]


@pytest.mark.parametrize("refusal", ["bad_secret", "no_password", "client_id_mismatch"])
def test_a_refused_connect_does_not_shield_a_connection_from_revocation(node: Node, refusal: str) -> None:
    """Steps: connect device D; from another socket send a CONNECT with client id D that the node
    refuses (return code 5); revoke D. Expected: D's connection is closed, as after any
    revocation. Actual: it stays open, and D's readings on it are acknowledged and stored."""
    device_id, secret = node.register()
    conn = node.connect(device_id, secret)
    conn.publish(f"iot/{device_id}/telemetry", telemetry(device_id, 1, 0), packet_id=1)

    with node.open() as intruder:
        if refusal == "client_id_mismatch":
            # Another registered device with its own valid secret, but D's client id.
            other_id, other_secret = node.register()
            rc = intruder.connect(device_id, other_id, other_secret)
        else:
            rc = intruder.connect(device_id, device_id, "" if refusal == "no_password" else "wrong")
        assert rc == NOT_AUTHORIZED
        assert intruder.closed_by_peer(SETTLE_S)

    node.revoke(device_id)
    closed = conn.closed_by_peer(SETTLE_S)
    what = "" if closed else node.still_ingests(conn, device_id, 1)
    assert closed, f"the revoked device's connection is still open: {what}"


def test_a_second_connect_with_the_same_client_id_closes_the_first(node: Node) -> None:
    """MQTT 3.1.1 [MQTT-3.1.4-2]: the server disconnects the existing client with that client id.
    Actual: both connections stay open and both are served."""
    device_id, secret = node.register()
    first = node.connect(device_id, secret)
    node.connect(device_id, secret)
    closed = first.closed_by_peer(SETTLE_S)
    what = "" if closed else node.still_ingests(first, device_id, 0)
    assert closed, f"the first connection is still open: {what}"


def test_revoking_a_device_closes_every_connection_it_has(node: Node) -> None:
    """Steps: connect D twice (both accepted, see above); revoke D. Expected: no connection of D
    is left. Actual: only the newest is closed; the first keeps publishing into storage."""
    device_id, secret = node.register()
    first = node.connect(device_id, secret)
    second = node.connect(device_id, secret)
    node.revoke(device_id)
    assert second.closed_by_peer(SETTLE_S)
    closed = first.closed_by_peer(SETTLE_S)
    what = "" if closed else node.still_ingests(first, device_id, 0)
    assert closed, f"the revoked device's first connection is still open: {what}"


def test_a_device_with_an_open_connection_is_online(node: Node) -> None:
    """Steps: connect D; connect D again; the first connection ends (here: DISCONNECT); D keeps
    publishing on the second. Expected: D is online. Actual: online=false for good, because
    the end of the first connection is recorded as the device going offline."""
    device_id, secret = node.register()
    first = node.connect(device_id, secret)
    second = node.connect(device_id, secret)
    first.disconnect_clean()
    second.publish(f"iot/{device_id}/telemetry", telemetry(device_id, 1, 0), packet_id=1)
    state = node.device(device_id)["state"]
    assert node.online_within(device_id, expected=True), (
        f"{device_id} has an open connection that was just served, but the node shows {json.dumps(state)}"
    )
