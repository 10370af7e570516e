"""API-key authentication and roles: 401 for every kind of bad key, 403 for too low a role."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from quart.typing import TestClientProtocol as Client

from storage.secrets import ROLES, new_api_key
from storage.sqlite import SqliteStore
from web.auth import has_role

from .conftest import Headers
from .problems import assert_problem

pytestmark = pytest.mark.anyio

DEVICES = "/api/v1/devices"


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Bearer not-a-key",
        "Bearer dnk_short_secret",
        "Bearer dnk_000000000000_unknown-key-id",
    ],
)
async def test_missing_or_malformed_key_is_401(client: Client, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = await client.get(DEVICES, headers=headers)
    await assert_problem(response, 401)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_right_id_wrong_secret_is_401(client: Client, admin: Headers) -> None:
    wrong = admin["Authorization"][:-4] + "AAAA"
    response = await client.get(DEVICES, headers={"Authorization": wrong})
    body = await assert_problem(response, 401)
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="depot-node", error="invalid_token"'
    # The same answer as for an unknown key: nothing tells which key ids exist.
    assert body["detail"] == "the API key is not valid"


async def test_revoked_key_is_401(client: Client, store: SqliteStore, db_path: Path) -> None:
    key_id, full, key_hash = new_api_key()
    await store.insert_api_key(key_id, "admin", key_hash)
    headers = {"Authorization": f"Bearer {full}"}
    assert (await client.get(DEVICES, headers=headers)).status_code == 200
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE api_keys SET revoked_at = 1 WHERE key_id = ?", (key_id,))
    conn.close()
    await assert_problem(await client.get(DEVICES, headers=headers), 401)


async def test_scheme_is_case_insensitive(client: Client, viewer: Headers) -> None:
    key = viewer["Authorization"].removeprefix("Bearer ")
    response = await client.get(DEVICES, headers={"Authorization": f"bearer {key}"})
    assert response.status_code == 200


@pytest.mark.parametrize("role", ["viewer", "operator"])
async def test_device_admin_needs_admin(client: Client, keys: dict[str, Headers], role: str) -> None:
    create = await client.post(DEVICES, json={"device_id": "emu-1", "type": "dc_meter"}, headers=keys[role])
    body = await assert_problem(create, 403)
    assert "admin" in str(body["detail"])
    await assert_problem(await client.delete(f"{DEVICES}/emu-1", headers=keys[role]), 403)


@pytest.mark.parametrize("role", ROLES)
async def test_every_role_reads(client: Client, keys: dict[str, Headers], role: str) -> None:
    for path in (DEVICES, "/api/v1/quarantine"):
        response = await client.get(path, headers=keys[role])
        assert response.status_code == 200, path


async def test_authentication_comes_before_validation(client: Client) -> None:
    # An anonymous caller must not learn what a valid body looks like.
    response = await client.post(DEVICES, json={"bogus": True})
    await assert_problem(response, 401)


async def test_unauthenticated_probes_stay_open(client: Client) -> None:
    for path in ("/healthz", "/metrics", "/openapi.json"):
        assert (await client.get(path)).status_code == 200, path


def test_role_order() -> None:
    assert has_role("admin", "admin")
    assert has_role("admin", "viewer")
    assert has_role("operator", "viewer")
    assert not has_role("operator", "admin")
    assert not has_role("viewer", "operator")
    # A role this node does not know grants nothing.
    assert not has_role("root", "viewer")
    assert set(ROLES) == {"admin", "operator", "viewer"}
