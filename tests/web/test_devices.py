"""Devices through the API: register → show → list (paginated) → revoke, and every refusal."""

from __future__ import annotations

import json
from typing import Any

import pytest
from quart.typing import TestClientProtocol as Client

from storage.reader import Reader
from storage.secrets import verify_device_secret

from .conftest import MAX_PAGE, CommitReadings, Headers, Register
from .problems import assert_problem

pytestmark = pytest.mark.anyio

DEVICES = "/api/v1/devices"


async def test_register_then_show(client: Client, admin: Headers, viewer: Headers, reader: Reader) -> None:
    response = await client.post(
        DEVICES, json={"device_id": "emu-4021-m1", "type": "ac_meter", "name": "EMU 4021 car 1"}, headers=admin
    )
    assert response.status_code == 201
    assert response.headers["Location"] == f"{DEVICES}/emu-4021-m1"
    created = await response.get_json()
    assert set(created) == {"device_id", "type", "name", "created_at", "revoked", "disabled", "supply", "secret"}
    assert created["supply"] is None  # registered without one: checked against any AC range
    assert created["device_id"] == "emu-4021-m1"
    assert created["type"] == "ac_meter"
    assert created["name"] == "EMU 4021 car 1"
    assert created["revoked"] is False
    assert created["disabled"] is False
    assert created["created_at"].endswith("Z")

    # Only a hash is stored, and it is the hash of the secret that was shown.
    credentials = await reader.credentials("emu-4021-m1")
    assert credentials is not None
    assert created["secret"] not in credentials.secret_hash
    assert verify_device_secret(credentials.secret_hash, created["secret"])

    shown = await (await client.get(f"{DEVICES}/emu-4021-m1", headers=viewer)).get_json()
    assert "secret" not in shown
    assert {k: shown[k] for k in ("device_id", "type", "name", "created_at", "revoked", "supply")} == {
        k: created[k] for k in ("device_id", "type", "name", "created_at", "revoked", "supply")
    }
    # Never heard from: no state, every counter 0.
    assert shown["state"] == {
        "online": False,
        "connected_since": None,
        "last_seen": None,
        "boot": None,
        "last_seq": None,
    }
    assert shown["counters"] == dict.fromkeys(
        ("received", "stored", "duplicates", "missing", "late", "resets", "quarantined"), 0
    )


async def test_name_is_optional(register: Register) -> None:
    created = await register("feeder-7")
    assert created["name"] is None


async def test_show_state_and_counters(
    client: Client, viewer: Headers, register: Register, commit_readings: CommitReadings
) -> None:
    await register("emu-1")
    counters = {"received": 12, "stored": 10, "duplicates": 1, "missing": 3, "late": 2, "resets": 1, "quarantined": 1}
    await commit_readings("emu-1", [(4, 17, 1_000), (4, 18, 2_000)], counters=counters, last_seen=1_795_449_900.25)
    shown = await (await client.get(f"{DEVICES}/emu-1", headers=viewer)).get_json()
    assert shown["state"] == {
        "online": True,
        "connected_since": None,
        "last_seen": "2026-11-23T16:05:00.250Z",
        "boot": 4,
        "last_seq": 18,
    }
    assert shown["counters"] == counters


async def test_register_twice_is_409(client: Client, admin: Headers, register: Register) -> None:
    await register("emu-1")
    response = await client.post(DEVICES, json={"device_id": "emu-1", "type": "ac_meter"}, headers=admin)
    body = await assert_problem(response, 409)
    assert "emu-1" in body["detail"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"device_id": "EMU-1", "type": "dc_meter"}, "device_id"),
        ({"device_id": "emu 1", "type": "dc_meter"}, "device_id"),
        ({"device_id": "emu/1", "type": "dc_meter"}, "device_id"),
        ({"device_id": "emu-1\n", "type": "dc_meter"}, "device_id"),
        ({"device_id": "-emu", "type": "dc_meter"}, "device_id"),
        ({"device_id": "e" * 65, "type": "dc_meter"}, "device_id"),
        ({"device_id": "", "type": "dc_meter"}, "device_id"),
        ({"device_id": 17, "type": "dc_meter"}, "device_id"),
        ({"type": "dc_meter"}, "device_id"),
        ({"device_id": "emu-1", "type": "steam_meter"}, "type"),
        ({"device_id": "emu-1"}, "type"),
        ({"device_id": "emu-1", "type": "dc_meter", "name": "x" * 201}, "name"),
        ({"device_id": "emu-1", "type": "dc_meter", "secret": "mine"}, "secret"),
    ],
)
async def test_invalid_registration_is_422(client: Client, admin: Headers, body: dict[str, Any], field: str) -> None:
    response = await client.post(DEVICES, json=body, headers=admin)
    problem = await assert_problem(response, 422)
    assert [e["loc"] for e in problem["errors"]] == [["body", field]]
    assert all(set(e) == {"loc", "msg", "type"} for e in problem["errors"])


async def test_longest_valid_id_is_accepted(register: Register) -> None:
    assert (await register("e" * 64))["device_id"] == "e" * 64


async def test_body_that_is_not_an_object_is_422(client: Client, admin: Headers) -> None:
    await assert_problem(await client.post(DEVICES, json=["emu-1"], headers=admin), 422)
    # No JSON content type: there is no body to validate.
    await assert_problem(await client.post(DEVICES, data="device_id=emu-1", headers=admin), 422)


async def test_malformed_json_is_400(client: Client, admin: Headers) -> None:
    headers = {**admin, "Content-Type": "application/json"}
    await assert_problem(await client.post(DEVICES, data='{"device_id": ', headers=headers), 400)


async def test_show_unknown_is_404(client: Client, viewer: Headers) -> None:
    body = await assert_problem(await client.get(f"{DEVICES}/nope", headers=viewer), 404)
    assert body["detail"] == "no device 'nope'"
    # An id no device can have is just as unknown.
    await assert_problem(await client.get(f"{DEVICES}/NOPE", headers=viewer), 404)


async def test_list_pages_through_all_devices(client: Client, viewer: Headers, register: Register) -> None:
    ids = [f"emu-{n}" for n in (5, 1, 4, 2, 3)]
    for device_id in ids:
        await register(device_id)
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        query: dict[str, str | int] = {"limit": 2} if cursor is None else {"limit": 2, "cursor": cursor}
        page = await (await client.get(DEVICES, query_string=query, headers=viewer)).get_json()
        assert set(page) == {"items", "next_cursor"}
        assert len(page["items"]) <= 2
        seen += [d["device_id"] for d in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(ids)
    assert pages == 3


async def test_list_default_limit(client: Client, viewer: Headers, register: Register) -> None:
    await register("emu-1")
    page = await (await client.get(DEVICES, headers=viewer)).get_json()
    assert [d["device_id"] for d in page["items"]] == ["emu-1"]
    assert page["next_cursor"] is None


@pytest.mark.parametrize("limit", ["0", "-1", str(MAX_PAGE + 1), "ten", "1.5", ""])
async def test_bad_limit_is_422(client: Client, viewer: Headers, limit: str) -> None:
    response = await client.get(DEVICES, query_string={"limit": limit}, headers=viewer)
    problem = await assert_problem(response, 422)
    assert [e["loc"] for e in problem["errors"]] == [["query", "limit"]]


async def test_limit_at_the_maximum_is_accepted(client: Client, viewer: Headers) -> None:
    response = await client.get(DEVICES, query_string={"limit": MAX_PAGE}, headers=viewer)
    assert response.status_code == 200


async def test_unknown_query_parameter_is_422(client: Client, viewer: Headers) -> None:
    response = await client.get(DEVICES, query_string={"limt": 5}, headers=viewer)
    problem = await assert_problem(response, 422)
    assert [e["loc"] for e in problem["errors"]] == [["query", "limt"]]


@pytest.mark.parametrize("cursor", ["garbage!", "WyJhIiwiYiJd", "eyJhIjoxfQ"])
async def test_bad_cursor_is_400(client: Client, viewer: Headers, cursor: str) -> None:
    response = await client.get(DEVICES, query_string={"cursor": cursor}, headers=viewer)
    await assert_problem(response, 400)


async def test_revoke(client: Client, admin: Headers, register: Register, revoked: list[str], reader: Reader) -> None:
    await register("emu-1")
    response = await client.delete(f"{DEVICES}/emu-1", headers=admin)
    assert response.status_code == 204
    assert await response.get_data() == b""
    assert revoked == ["emu-1"]
    credentials = await reader.credentials("emu-1")
    assert credentials is not None
    assert credentials.revoked
    shown = await (await client.get(f"{DEVICES}/emu-1", headers=admin)).get_json()
    assert shown["revoked"] is True
    # Still listed, and its id stays taken.
    page = await (await client.get(DEVICES, headers=admin)).get_json()
    assert [(d["device_id"], d["revoked"]) for d in page["items"]] == [("emu-1", True)]
    await assert_problem(
        await client.post(DEVICES, json={"device_id": "emu-1", "type": "dc_meter"}, headers=admin), 409
    )


async def test_revoke_is_idempotent(client: Client, admin: Headers, register: Register, revoked: list[str]) -> None:
    await register("emu-1")
    assert (await client.delete(f"{DEVICES}/emu-1", headers=admin)).status_code == 204
    assert (await client.delete(f"{DEVICES}/emu-1", headers=admin)).status_code == 204
    # The session is closed again on a repeat, in case the first attempt failed half-way.
    assert revoked == ["emu-1", "emu-1"]


async def test_revoke_unknown_is_404(client: Client, admin: Headers, revoked: list[str]) -> None:
    await assert_problem(await client.delete(f"{DEVICES}/nope", headers=admin), 404)
    assert revoked == []


@pytest.mark.parametrize(
    ("type_", "supply"),
    [("dc_meter", "dc_750v"), ("dc_meter", "dc_3000v"), ("ac_meter", "ac_15kv_16.7hz"), ("ac_meter", "ac_25kv_50hz")],
)
async def test_register_with_a_supply_system(
    client: Client, admin: Headers, viewer: Headers, type_: str, supply: str
) -> None:
    body = {"device_id": "m-1", "type": type_, "supply": supply}
    created = await (await client.post(DEVICES, json=body, headers=admin)).get_json()
    assert created["supply"] == supply
    shown = await (await client.get(f"{DEVICES}/m-1", headers=viewer)).get_json()
    assert shown["supply"] == supply
    listed = await (await client.get(DEVICES, headers=viewer)).get_json()
    assert [d["supply"] for d in listed["items"]] == [supply]


@pytest.mark.parametrize(
    ("type_", "supply"), [("dc_meter", "ac_25kv_50hz"), ("ac_meter", "dc_1500v"), ("dc_meter", "dc_1200v")]
)
async def test_a_supply_of_another_type_or_unknown_is_refused(
    client: Client, admin: Headers, type_: str, supply: str
) -> None:
    response = await client.post(DEVICES, json={"device_id": "m-1", "type": type_, "supply": supply}, headers=admin)
    problem = await assert_problem(response, 422)
    assert "supply" in json.dumps(problem)


async def test_set_the_supply_of_a_registered_device(
    client: Client, admin: Headers, viewer: Headers, register: Register, device_changes: list[str]
) -> None:
    await register("old-1")  # registered without a supply, like every device before migration 8
    response = await client.patch(f"{DEVICES}/old-1", json={"supply": "dc_750v"}, headers=admin)
    assert response.status_code == 200, await response.get_data(as_text=True)
    body = await response.get_json()
    assert body["supply"] == "dc_750v"
    assert body["counters"]["received"] == 0
    assert device_changes == ["old-1"]  # the running actor is told to reload it
    shown = await (await client.get(f"{DEVICES}/old-1", headers=viewer)).get_json()
    assert shown["supply"] == "dc_750v"
    cleared = await client.patch(f"{DEVICES}/old-1", json={"supply": None}, headers=admin)
    assert (await cleared.get_json())["supply"] is None


async def test_setting_the_supply_is_refused_when_wrong(
    client: Client, admin: Headers, viewer: Headers, register: Register, device_changes: list[str]
) -> None:
    await register("dc-1")
    problem = await assert_problem(
        await client.patch(f"{DEVICES}/dc-1", json={"supply": "ac_25kv_50hz"}, headers=admin), 409
    )
    assert "not a supply of a dc_meter" in problem["detail"]
    await assert_problem(await client.patch(f"{DEVICES}/dc-1", json={"supply": "dc_1200v"}, headers=admin), 422)
    await assert_problem(await client.patch(f"{DEVICES}/dc-1", json={}, headers=admin), 422)
    await assert_problem(
        await client.patch(f"{DEVICES}/dc-1", json={"supply": None, "type": "ac_meter"}, headers=admin), 422
    )
    await assert_problem(await client.patch(f"{DEVICES}/nope-1", json={"supply": None}, headers=admin), 404)
    await assert_problem(await client.patch(f"{DEVICES}/dc-1", json={"supply": None}, headers=viewer), 403)
    assert device_changes == []
