"""API key management through the API: create (the key once), list (never a secret), delete."""

from __future__ import annotations

import pytest
from quart.typing import TestClientProtocol as Client

from .conftest import MAX_PAGE, Headers
from .problems import assert_problem

pytestmark = pytest.mark.anyio

KEYS = "/api/v1/keys"


async def create(client: Client, admin: Headers, role: str, name: str | None = None) -> dict[str, object]:
    body: dict[str, object] = {"role": role} if name is None else {"role": role, "name": name}
    response = await client.post(KEYS, json=body, headers=admin)
    assert response.status_code == 201, await response.get_data(as_text=True)
    created: dict[str, object] = await response.get_json()
    assert response.headers["Location"] == f"{KEYS}/{created['key_id']}"
    return created


@pytest.mark.parametrize("role", ["viewer", "operator", "admin"])
async def test_created_key_works_with_its_role(client: Client, admin: Headers, role: str) -> None:
    created = await create(client, admin, role, name="grafana")
    assert created["role"] == role
    assert created["name"] == "grafana"
    assert created["revoked"] is False
    key = str(created["key"])
    assert key.startswith(f"dnk_{created['key_id']}_")
    headers = {"Authorization": f"Bearer {key}"}
    assert (await client.get("/api/v1/devices", headers=headers)).status_code == 200
    # An admin route answers as the role says.
    expected = 200 if role == "admin" else 403
    assert (await client.get(KEYS, headers=headers)).status_code == expected


async def test_list_never_shows_a_key_or_its_hash(client: Client, admin: Headers) -> None:
    created = await create(client, admin, "viewer")
    response = await client.get(KEYS, headers=admin)
    assert response.status_code == 200
    text = await response.get_data(as_text=True)
    assert str(created["key"]) not in text
    page = await response.get_json()
    listed = {item["key_id"]: item for item in page["items"]}
    # The fixture's three keys (one per role) plus this one.
    assert len(listed) == 4
    assert set(listed[str(created["key_id"])]) == {"key_id", "role", "name", "created_at", "revoked", "revoked_at"}
    assert [item["key_id"] for item in page["items"]] == sorted(listed)


async def test_deleted_key_stops_working_at_once(client: Client, admin: Headers) -> None:
    created = await create(client, admin, "operator")
    headers = {"Authorization": f"Bearer {created['key']}"}
    assert (await client.get("/api/v1/devices", headers=headers)).status_code == 200
    response = await client.delete(f"{KEYS}/{created['key_id']}", headers=admin)
    assert response.status_code == 204
    await assert_problem(await client.get("/api/v1/devices", headers=headers), 401)
    # Idempotent, and the key stays listed as revoked.
    assert (await client.delete(f"{KEYS}/{created['key_id']}", headers=admin)).status_code == 204
    page = await (await client.get(KEYS, headers=admin)).get_json()
    (item,) = [i for i in page["items"] if i["key_id"] == created["key_id"]]
    assert item["revoked"] is True
    assert item["revoked_at"].endswith("Z")


async def test_an_admin_may_delete_its_own_key(client: Client, admin: Headers) -> None:
    key_id = admin["Authorization"].split("_")[1]
    assert (await client.delete(f"{KEYS}/{key_id}", headers=admin)).status_code == 204
    await assert_problem(await client.get(KEYS, headers=admin), 401)


@pytest.mark.parametrize("key_id", ["000000000000", "nothex", "x" * 300, "ABCDEF012345"])
async def test_delete_unknown_key_is_404(client: Client, admin: Headers, key_id: str) -> None:
    await assert_problem(await client.delete(f"{KEYS}/{key_id}", headers=admin), 404)


@pytest.mark.parametrize(
    "body",
    [{}, {"role": "root"}, {"role": "admin", "extra": 1}, {"role": "admin", "name": "n" * 201}, {"role": None}],
)
async def test_bad_create_is_422(client: Client, admin: Headers, body: dict[str, object]) -> None:
    body_json = await assert_problem(await client.post(KEYS, json=body, headers=admin), 422)
    assert body_json["errors"]


async def test_list_pages(client: Client, admin: Headers) -> None:
    for _ in range(5):
        await create(client, admin, "viewer")
    seen: list[str] = []
    cursor = None
    while True:
        query = {"limit": 2} if cursor is None else {"limit": 2, "cursor": cursor}
        page = await (await client.get(KEYS, query_string=query, headers=admin)).get_json()
        seen += [item["key_id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 8
    assert seen == sorted(set(seen))
    await assert_problem(await client.get(KEYS, query_string={"limit": MAX_PAGE + 1}, headers=admin), 422)
