"""HTTP rate limits of the app (web/limits.py), through Quart's test client."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from quart.typing import TestClientProtocol as Client

from web.app import create_app
from web.limits import BoundedMemoryStore, HttpRateLimits
from web.services import WebServices

from .conftest import Headers

pytestmark = pytest.mark.anyio


@pytest.fixture
def limited(services: WebServices) -> Client:
    services.rate_limits = HttpRateLimits(per_key_per_s=0.1, per_key_burst=2, anonymous_per_s=0.1, anonymous_burst=2)
    return create_app(services).test_client()


async def test_forwarded_for_does_not_make_a_new_caller(limited: Client) -> None:
    statuses = [
        (await limited.get("/api/v1/devices", headers={"X-Forwarded-For": f"10.0.0.{i}"})).status_code for i in range(3)
    ]
    assert statuses == [401, 401, 429]


async def test_each_key_has_its_own_bucket(limited: Client, admin: Headers, viewer: Headers) -> None:
    assert [(await limited.get("/api/v1/devices", headers=admin)).status_code for _ in range(3)] == [200, 200, 429]
    assert (await limited.get("/api/v1/devices", headers=viewer)).status_code == 200
    # The anonymous bucket of the same address is another one again.
    assert (await limited.get("/api/v1/devices")).status_code == 401


async def test_limits_of_zero_switch_the_limiter_off(services: WebServices, admin: Headers) -> None:
    services.rate_limits = HttpRateLimits(per_key_per_s=0, anonymous_per_s=0)
    client = create_app(services).test_client()
    statuses = [(await client.get("/api/v1/devices", headers=admin)).status_code for _ in range(20)]
    assert statuses == [200] * 20
    spec = await (await client.get("/openapi.json")).get_json()
    assert "429" not in spec["paths"]["/api/v1/devices"]["get"]["responses"]


async def test_the_store_forgets_full_buckets_first_and_stays_bounded() -> None:
    store = BoundedMemoryStore(max_callers=3)
    now = datetime.now(UTC)
    await store.set("idle", now - timedelta(seconds=1))  # a full bucket: the same as no entry
    for name in ("a", "b", "c"):
        await store.set(name, now + timedelta(seconds=60))
    assert await store.get("idle", now) == now  # forgotten
    assert await store.get("a", now) > now
    for i in range(10):
        await store.set(f"busy-{i}", now + timedelta(seconds=60))
    assert len(store._tats) == 3


async def _new_key(client: Client, admin: Headers, role: str) -> tuple[str, Headers]:
    response = await client.post("/api/v1/keys", json={"role": role}, headers=admin)
    assert response.status_code == 201
    created = await response.get_json()
    return str(created["key_id"]), {"Authorization": f"Bearer {created['key']}"}


async def test_keys_managed_through_the_api_have_buckets_by_key_id(services: WebServices, admin: Headers) -> None:
    """creds' key management and the limiter: a key made through the API gets its own bucket
    (keyed by its id); deleting a key refuses it at once (401), although its bucket had room,
    and from then on it counts against its address, like any request without a valid key."""
    services.rate_limits = HttpRateLimits(per_key_per_s=0.1, per_key_burst=3, anonymous_per_s=0.1, anonymous_burst=2)
    limited = create_app(services).test_client()
    key_a, headers_a = await _new_key(limited, admin, "viewer")
    key_b, headers_b = await _new_key(limited, admin, "viewer")
    assert key_a != key_b
    assert [(await limited.get("/api/v1/devices", headers=headers_a)).status_code for _ in range(4)] == [
        200, 200, 200, 429,
    ]  # fmt: skip
    assert (await limited.get("/api/v1/devices", headers=headers_b)).status_code == 200  # its own bucket
    assert (await limited.delete(f"/api/v1/keys/{key_b}", headers=admin)).status_code == 204
    statuses = [(await limited.get("/api/v1/devices", headers=headers_b)).status_code for _ in range(3)]
    assert statuses == [401, 401, 429]  # the address's bucket (burst 2), not the deleted key's
    # The admin key's bucket took the two creations and the deletion: it has none left, and
    # viewer A's is spent; neither is touched by B's requests.
    assert (await limited.get("/api/v1/devices", headers=admin)).status_code == 429
    assert (await limited.get("/api/v1/devices", headers=headers_a)).status_code == 429
