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
