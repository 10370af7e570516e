"""The audit log: every change with who, when and what; ``GET /api/v1/audit`` (admin)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from quart.typing import TestClientProtocol as Client

from storage.audit import Actor, AuditAction, AuditEntry
from storage.interfaces import AuditSink
from storage.sqlite import SqliteStore

from .conftest import MAX_PAGE, Headers, Register
from .problems import assert_problem
from .test_alerts import key_id, write

pytestmark = pytest.mark.anyio

AUDIT = "/api/v1/audit"


async def entries(client: Client, admin: Headers, **query: Any) -> list[dict[str, Any]]:
    response = await client.get(AUDIT, query_string=query, headers=admin)
    assert response.status_code == 200, await response.get_data(as_text=True)
    items: list[dict[str, Any]] = (await response.get_json())["items"]
    return items


async def test_every_change_is_logged_with_who_and_what(
    client: Client, admin: Headers, keys: dict[str, Headers], register: Register, store: SqliteStore
) -> None:
    created = await register("emu-1", name="car 1")
    rotated = await (await client.post("/api/v1/devices/emu-1/secret", headers=admin)).get_json()
    await client.post("/api/v1/devices/emu-1/disable", headers=admin)
    await client.post("/api/v1/devices/emu-1/disable", headers=admin)  # no change: not logged
    await client.post("/api/v1/devices/emu-1/enable", headers=admin)
    await client.delete("/api/v1/devices/emu-1", headers=admin)
    await client.delete("/api/v1/devices/emu-1", headers=admin)  # no change: not logged
    key = await (await client.post("/api/v1/keys", json={"role": "viewer", "name": "ci"}, headers=admin)).get_json()
    await client.delete(f"/api/v1/keys/{key['key_id']}", headers=admin)
    alert = write("emu-1", "acl_denial", 0)
    await store.write_alerts([alert])
    alert_id = alert.alert_id
    assert (await client.post(f"/api/v1/alerts/{alert_id}/ack", headers=keys["operator"])).status_code == 200
    await client.post(f"/api/v1/alerts/{alert_id}/ack", headers=keys["operator"])  # no change: not logged

    log = await entries(client, admin)
    assert [(e["action"], e["target"]) for e in reversed(log)] == [
        ("device_created", "emu-1"),
        ("device_rotated", "emu-1"),
        ("device_disabled", "emu-1"),
        ("device_enabled", "emu-1"),
        ("device_revoked", "emu-1"),
        ("key_created", key["key_id"]),
        ("key_deleted", key["key_id"]),
        ("alert_acknowledged", alert_id),
    ]
    admin_id, operator_id = key_id(admin), key_id(keys["operator"])
    assert [(e["actor"], e["role"]) for e in log] == [(operator_id, "operator")] + [(admin_id, "admin")] * 7
    assert log[-1]["details"] == {"type": "dc_meter", "name": "car 1"}
    assert log[2]["details"] == {"role": "viewer", "name": "ci"}
    assert log[0]["details"] == {"device_id": "emu-1", "rule": "acl_denial"}
    for entry in log:
        assert datetime.fromisoformat(entry["at"]).tzinfo == UTC
    # No secret of any kind is in the log.
    text = await (await client.get(AUDIT, headers=admin)).get_data(as_text=True)
    for secret in (created["secret"], rotated["secret"], key["key"]):
        assert secret not in text


async def test_filters(client: Client, admin: Headers, register: Register, store: SqliteStore) -> None:
    await register("emu-1")
    await register("emu-2")
    # How other code (the command actor) records what is no database change of its own.
    sink: AuditSink = store
    await sink.record_audit(
        AuditEntry(AuditAction.COMMAND_SENT, "emu-2", Actor("cli"), {"command_id": "c1"}, at=4_000_000_000.0)
    )
    assert [e["target"] for e in await entries(client, admin, action="device_created")] == ["emu-2", "emu-1"]
    assert [e["action"] for e in await entries(client, admin, target="emu-2")] == ["command_sent", "device_created"]
    since = await entries(client, admin, since="2096-01-01T00:00:00Z")
    assert [(e["action"], e["actor"], e["role"], e["details"]) for e in since] == [
        ("command_sent", "cli", None, {"command_id": "c1"})
    ]
    assert await entries(client, admin, action="device_created", target="emu-2", since="2096-01-01T00:00:00Z") == []


@pytest.mark.parametrize(
    "query",
    [
        {"action": "device_exploded"},
        {"since": "yesterday"},
        {"since": "2026-11-23T16:05:00"},  # no offset
        {"target": "t" * 201},
        {"limit": 0},
        {"limit": MAX_PAGE + 1},
        {"unknown": "1"},
    ],
)
async def test_bad_query_is_422(client: Client, admin: Headers, query: dict[str, Any]) -> None:
    await assert_problem(await client.get(AUDIT, query_string=query, headers=admin), 422)


async def test_bad_cursor_is_400(client: Client, admin: Headers) -> None:
    await assert_problem(await client.get(AUDIT, query_string={"cursor": "nope"}, headers=admin), 400)


async def test_pages_newest_first(client: Client, admin: Headers, register: Register) -> None:
    for i in range(5):
        await register(f"emu-{i}")
    seen: list[int] = []
    cursor = None
    while True:
        query: dict[str, Any] = {"limit": 2} if cursor is None else {"limit": 2, "cursor": cursor}
        page = await (await client.get(AUDIT, query_string=query, headers=admin)).get_json()
        seen += [e["id"] for e in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 5
    assert seen == sorted(seen, reverse=True)
