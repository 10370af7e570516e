"""A device's credential lifecycle through the API: rotate its secret, disable, enable."""

from __future__ import annotations

import pytest
from quart.typing import TestClientProtocol as Client

from storage.reader import Reader
from storage.secrets import verify_device_secret

from .conftest import Headers, Register
from .problems import assert_problem

pytestmark = pytest.mark.anyio

DEVICES = "/api/v1/devices"


async def test_rotate_replaces_the_secret_and_closes_the_session(
    client: Client, admin: Headers, register: Register, reader: Reader, changed: list[tuple[str, str]]
) -> None:
    old = (await register("emu-1"))["secret"]
    response = await client.post(f"{DEVICES}/emu-1/secret", headers=admin)
    assert response.status_code == 200, await response.get_data(as_text=True)
    body = await response.get_json()
    assert set(body) == {"device_id", "secret", "rotated_at"}
    assert body["device_id"] == "emu-1"
    new = body["secret"]
    assert new != old
    assert len(new) >= 32
    credentials = await reader.credentials("emu-1")
    assert credentials is not None
    assert verify_device_secret(credentials.secret_hash, new)
    assert not verify_device_secret(credentials.secret_hash, old)
    assert changed == [("emu-1", "secret_rotated")]
    # Each rotation gives a different secret.
    again = await (await client.post(f"{DEVICES}/emu-1/secret", headers=admin)).get_json()
    assert again["secret"] not in (old, new)


async def test_disable_and_enable(
    client: Client, admin: Headers, register: Register, reader: Reader, changed: list[tuple[str, str]]
) -> None:
    secret = (await register("emu-1"))["secret"]
    response = await client.post(f"{DEVICES}/emu-1/disable", headers=admin)
    assert response.status_code == 200
    assert (await response.get_json())["disabled"] is True
    assert (await (await client.get(f"{DEVICES}/emu-1", headers=admin)).get_json())["disabled"] is True
    credentials = await reader.credentials("emu-1")
    assert credentials is not None
    assert credentials.disabled
    assert changed == [("emu-1", "disabled")]
    # Idempotent: disabling again answers the same and closes any session again.
    assert (await (await client.post(f"{DEVICES}/emu-1/disable", headers=admin)).get_json())["disabled"] is True
    assert changed == [("emu-1", "disabled"), ("emu-1", "disabled")]

    response = await client.post(f"{DEVICES}/emu-1/enable", headers=admin)
    assert (await response.get_json())["disabled"] is False
    credentials = await reader.credentials("emu-1")
    assert credentials is not None
    assert not credentials.disabled
    # The same secret as before.
    assert verify_device_secret(credentials.secret_hash, secret)
    assert (await (await client.post(f"{DEVICES}/emu-1/enable", headers=admin)).get_json())["disabled"] is False
    assert len(changed) == 2


@pytest.mark.parametrize("action", ["secret", "disable", "enable"])
async def test_unknown_device_is_404(client: Client, admin: Headers, action: str) -> None:
    for device_id in ("emu-9", "Not+Valid", "x" * 100):
        await assert_problem(await client.post(f"{DEVICES}/{device_id}/{action}", headers=admin), 404)


@pytest.mark.parametrize("action", ["secret", "disable", "enable"])
async def test_revoked_device_is_final(
    client: Client, admin: Headers, register: Register, action: str, changed: list[tuple[str, str]]
) -> None:
    await register("emu-1")
    assert (await client.delete(f"{DEVICES}/emu-1", headers=admin)).status_code == 204
    body = await assert_problem(await client.post(f"{DEVICES}/emu-1/{action}", headers=admin), 409)
    assert body["type"].endswith("device-revoked")
    assert changed == []


async def test_rotating_keeps_a_disabled_device_disabled(client: Client, admin: Headers, register: Register) -> None:
    await register("emu-1")
    await client.post(f"{DEVICES}/emu-1/disable", headers=admin)
    assert (await client.post(f"{DEVICES}/emu-1/secret", headers=admin)).status_code == 200
    assert (await (await client.get(f"{DEVICES}/emu-1", headers=admin)).get_json())["disabled"] is True


async def test_openapi_statuses(client: Client) -> None:
    spec = await (await client.get("/openapi.json")).get_json()
    for action in ("secret", "disable", "enable"):
        operation = spec["paths"][f"/api/v1/devices/{{device_id}}/{action}"]["post"]
        assert set(operation["responses"]) == {"200", "401", "403", "404", "409"}, action
        assert operation["x-required-role"] == "admin"
