"""Commands through the API: creating (roles, validation, idempotency), reading and listing.

The command actor runs for real on the test's SQLite file; only the broker is replaced, by a
deliverer that records what it was given. Whether a device gets and acknowledges its commands
over MQTT is shown in ``tests/integration/test_commands.py``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from quart.typing import TestClientProtocol as Client

from actors.commands import CommandActor, Delivery
from storage.secrets import parse_api_key
from storage.sqlite import SqliteStore
from web.services import WebServices

from .conftest import Headers, Register
from .problems import assert_problem
from .test_health import scrape

pytestmark = pytest.mark.anyio

MAX_TTL = 3600


@dataclass
class RecordingDeliverer:
    reachable: set[str] = field(default_factory=set)
    sent: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def deliver(self, device_id: str, payload: bytes) -> Delivery:
        if device_id not in self.reachable:
            return Delivery.NOT_CONNECTED
        self.sent.append((device_id, json.loads(payload)))
        return Delivery.SENT


@pytest.fixture
async def deliverer(store: SqliteStore, services: WebServices) -> AsyncIterator[RecordingDeliverer]:
    """Runs a command actor on the test's database, wired into the app's services."""
    deliverer = RecordingDeliverer()
    actor = CommandActor(store, deliverer, services.stats.commands)
    services.commands = actor
    services.command_max_ttl_s = MAX_TTL
    async with anyio.create_task_group() as tg:
        tg.start_soon(actor.run)
        yield deliverer
        actor.mailbox.close_sending()
    actor.mailbox.close()


@pytest.fixture
def operator(keys: dict[str, Headers]) -> Headers:
    return keys["operator"]


def url(device_id: str = "emu-1") -> str:
    return f"/api/v1/devices/{device_id}/commands"


async def post(client: Client, headers: Headers, body: dict[str, Any], device_id: str = "emu-1") -> Any:
    return await client.post(url(device_id), json=body, headers=headers)


PING = {"name": "ping", "ttl_s": 600}


async def test_an_operator_sends_a_command_and_follows_it(
    client: Client,
    *,
    register: Register,
    operator: Headers,
    viewer: Headers,
    deliverer: RecordingDeliverer,
    services: WebServices,
) -> None:
    await register("emu-1")
    response = await post(client, operator, {"name": "set_interval", "args": {"seconds": 10}, "ttl_s": 600})
    assert response.status_code == 202, await response.get_data(as_text=True)
    body = await response.get_json()
    command_id = body["command_id"]
    assert response.headers["Location"] == f"{url()}/{command_id}"
    assert len(command_id) == 26
    assert body["name"] == "set_interval"
    assert body["args"] == {"seconds": 10}
    assert (body["state"], body["attempts"], body["idempotency_key"]) == ("queued", 0, None)
    assert body["created_by"] == parse_api_key(operator["Authorization"].removeprefix("Bearer "))
    assert [h["state"] for h in body["history"]] == ["queued"]
    assert "detail" not in body["history"][0]  # no detail to give: left out, not null
    assert deliverer.sent == []  # emu-1 is not connected

    # The device connects: the actor delivers, and the API shows the history.
    deliverer.reachable.add("emu-1")
    assert services.commands is not None
    services.commands.hint("emu-1")
    with anyio.fail_after(10):
        while not deliverer.sent:
            await anyio.sleep(0.01)
    ((device_id, doc),) = deliverer.sent
    assert device_id == "emu-1"
    assert doc == {
        "command_id": command_id,
        "name": "set_interval",
        "args": {"seconds": 10},
        "expires_at": body["expires_at"],
    }
    with anyio.fail_after(10):
        while (shown := await (await client.get(f"{url()}/{command_id}", headers=viewer)).get_json())[
            "state"
        ] != "sent":
            await anyio.sleep(0.01)
    assert [(h["state"], h.get("detail")) for h in shown["history"]] == [("queued", None), ("sent", "attempt 1")]
    assert shown["attempts"] == 1


async def test_an_idempotency_key_gives_the_same_command_or_a_conflict(
    client: Client, register: Register, operator: Headers, deliverer: RecordingDeliverer
) -> None:
    await register("emu-1")
    await register("emu-2")
    body = {**PING, "idempotency_key": "op-42"}
    first = await (await post(client, operator, body)).get_json()
    again = await post(client, operator, body)
    assert again.status_code == 202
    assert (await again.get_json())["command_id"] == first["command_id"]
    elsewhere = await (await post(client, operator, body, "emu-2")).get_json()
    assert elsewhere["command_id"] != first["command_id"]  # keys are per device
    problem = await assert_problem(await post(client, operator, {**body, "ttl_s": 601}), 409)
    assert problem["type"] == "tag:depot-node,2026:problem/idempotency-conflict"
    assert problem["command_id"] == first["command_id"]
    page = await (await client.get(url(), headers=operator)).get_json()
    assert [c["command_id"] for c in page["items"]] == [first["command_id"]]


@pytest.mark.parametrize(
    ("body", "field_"),
    [
        ({"name": "Ping", "ttl_s": 60}, "name"),
        ({"name": "ping/1", "ttl_s": 60}, "name"),
        ({"name": "ping", "ttl_s": 0}, "ttl_s"),
        ({"name": "ping", "ttl_s": "60"}, "ttl_s"),
        ({"name": "ping", "ttl_s": 60.5}, "ttl_s"),
        ({"name": "ping", "ttl_s": MAX_TTL + 1}, "ttl_s"),
        ({"name": "ping"}, "ttl_s"),
        ({"name": "ping", "ttl_s": 60, "args": [1]}, "args"),
        ({"name": "ping", "ttl_s": 60, "args": {"blob": "x" * 5000}}, "args"),
        ({"name": "ping", "ttl_s": 60, "idempotency_key": ""}, "idempotency_key"),
        ({"name": "ping", "ttl_s": 60, "priority": 1}, "priority"),
    ],
)
async def test_a_bad_command_is_a_422_naming_the_field(
    client: Client,
    *,
    register: Register,
    operator: Headers,
    deliverer: RecordingDeliverer,
    body: dict[str, Any],
    field_: str,
) -> None:
    await register("emu-1")
    problem = await assert_problem(await post(client, operator, body), 422)
    assert [e["loc"][:2] for e in problem["errors"]] == [["body", field_]]
    assert (await (await client.get(url(), headers=operator)).get_json())["items"] == []


async def test_who_may_send_and_to_whom(
    client: Client, register: Register, keys: dict[str, Headers], admin: Headers, deliverer: RecordingDeliverer
) -> None:
    await register("emu-1")
    await assert_problem(await post(client, keys["viewer"], PING), 403)
    await assert_problem(await client.post(url(), json=PING), 401)
    assert (await post(client, admin, PING)).status_code == 202  # admin includes operator
    await assert_problem(await post(client, admin, PING, "emu-404"), 404)
    assert (await client.delete("/api/v1/devices/emu-1", headers=admin)).status_code == 204
    problem = await assert_problem(await post(client, admin, PING), 409)
    assert problem["type"] == "tag:depot-node,2026:problem/device-revoked"


async def test_without_a_command_actor_the_api_answers_503(
    client: Client, register: Register, operator: Headers
) -> None:
    await register("emu-1")
    await assert_problem(await post(client, operator, PING), 503)


async def test_list_pages_newest_first_and_filters_by_state(
    client: Client, register: Register, operator: Headers, deliverer: RecordingDeliverer
) -> None:
    await register("emu-1")
    await register("emu-2")
    ids = [
        (await (await post(client, operator, {**PING, "args": {"n": i}})).get_json())["command_id"] for i in range(5)
    ]
    await post(client, operator, PING, "emu-2")
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "2"} | ({"cursor": cursor} if cursor else {})
        page = await (await client.get(url(), headers=operator, query_string=params)).get_json()
        seen += [c["command_id"] for c in page["items"]]
        assert all(c["history"][0]["state"] == "queued" for c in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    queued = await (await client.get(url(), headers=operator, query_string={"state": "queued"})).get_json()
    assert len(queued["items"]) == 5
    acked = await (await client.get(url(), headers=operator, query_string={"state": "acked"})).get_json()
    assert acked == {"items": [], "next_cursor": None}
    await assert_problem(await client.get(url(), headers=operator, query_string={"state": "lost"}), 422)
    await assert_problem(await client.get(url(), headers=operator, query_string={"cursor": "nope"}), 400)
    await assert_problem(await client.get(url("emu-404"), headers=operator), 404)


async def test_a_command_is_found_only_under_its_own_device(
    client: Client, register: Register, operator: Headers, deliverer: RecordingDeliverer
) -> None:
    await register("emu-1")
    await register("emu-2")
    command_id = (await (await post(client, operator, PING)).get_json())["command_id"]
    assert (await client.get(f"{url()}/{command_id}", headers=operator)).status_code == 200
    await assert_problem(await client.get(f"{url('emu-2')}/{command_id}", headers=operator), 404)
    await assert_problem(await client.get(f"{url()}/01JD0000000000000000000000", headers=operator), 404)
    await assert_problem(await client.get(f"{url()}/not-a-ulid", headers=operator), 404)


async def test_command_metrics(
    client: Client, register: Register, operator: Headers, deliverer: RecordingDeliverer
) -> None:
    await register("emu-1")
    await post(client, operator, PING)
    samples = await scrape(client)
    assert samples["depot_node_commands_pending"][(("state", "queued"),)] == 1
    assert samples["depot_node_commands_pending"][(("state", "sent"),)] == 0
    assert samples["depot_node_command_transitions_total"][(("state", "queued"),)] == 1
    assert samples["depot_node_command_transitions_total"][(("state", "expired"),)] == 0
    assert samples["depot_node_command_resends_total"][()] == 0
    assert samples["depot_node_command_expirations_total"][()] == 0
    assert samples["depot_node_command_acks_ignored_total"][(("reason", "unknown"),)] == 0


async def test_a_command_sent_is_in_the_audit_log_once(
    client: Client, register: Register, operator: Headers, admin: Headers, deliverer: RecordingDeliverer
) -> None:
    await register("emu-1")
    body = {**PING, "idempotency_key": "audit-1"}
    first = await (await post(client, operator, body)).get_json()
    assert (await post(client, operator, body)).status_code == 202  # an idempotent repeat
    page = await (await client.get("/api/v1/audit", query_string={"action": "command_sent"}, headers=admin)).get_json()
    ((entry,),) = [page["items"]]
    assert entry["target"] == "emu-1"
    assert entry["actor"] == parse_api_key(operator["Authorization"].removeprefix("Bearer "))
    assert entry["role"] == "operator"
    assert entry["details"] == {"command_id": first["command_id"], "name": "ping"}
