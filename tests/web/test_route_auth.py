"""Every route of the app, every role: a new route cannot be left open by accident.

The test walks the app's URL map and ``/openapi.json``. Each route either is on the explicit
public allow-list below, or its operation in the document names its least role
(``x-required-role``, declared once per route by ``web.auth.requires``). It then asks each
route without a key (401), with a bad key (401), with every role below the least one (403) and
with the least one (anything but 401 and 403).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, Final

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from web.app import create_app
from web.limits import EXEMPT, HttpRateLimits
from web.openapi import RATE_LIMIT_EXEMPT
from web.roles import RANK
from web.services import WebServices

from .conftest import Headers, Register
from .problems import assert_problem

pytestmark = pytest.mark.anyio

#: Routes anyone may call: probes, and the API's own description. Nothing else.
PUBLIC: Final = frozenset(
    {
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/openapi.json", "get"),
        ("/docs", "get"),
        ("/docs/static/{name}", "get"),  # Swagger UI's own files (web.docs_ui)
    }
)

#: Values for path parameters: an existing device (registered below), ids of the right shape.
PATH_VALUES: Final = {
    "device_id": "emu-1",
    "alert_id": "01JDEPOTNODE0000000000000A",
    "key_id": "000000000000",
    "command_id": "01JDEPOTNODE0000000000000C",
    "name": "swagger-ui.css",
}

ROLES_BY_RANK: Final = sorted(RANK, key=RANK.__getitem__)


def endpoints(app: Quart) -> dict[tuple[str, str], str]:
    """``(OpenAPI path, method)`` → endpoint name, for every route of *app*."""
    found = {}
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[^:<>]*:)?([^<>]+)>", r"{\1}", rule.rule)
        found |= {(path, m.lower()): rule.endpoint for m in rule.methods or () if m not in {"HEAD", "OPTIONS"}}
    return found


def routes(app: Quart) -> list[tuple[str, str]]:
    return sorted(endpoints(app))


def concrete(path: str) -> str:
    return re.sub(r"\{([^}]+)\}", lambda m: PATH_VALUES[m.group(1)], path)


#: HTTP rate limits high enough for the walk's requests (web.limits), so that the walk checks
#: authentication with the limiter installed in front of every route.
WALK_RATE_LIMITS: Final = HttpRateLimits(
    per_key_per_s=1000.0, per_key_burst=10_000, anonymous_per_s=1000.0, anonymous_burst=10_000
)


@pytest.fixture(params=[None, WALK_RATE_LIMITS], ids=["no-rate-limits", "rate-limits"])
def protected_app(services: WebServices, request: pytest.FixtureRequest) -> Quart:
    """The app with every optional protection on (``metrics_require_key``), without and with
    the HTTP rate limiter."""
    return create_app(replace(services, metrics_require_key=True, rate_limits=request.param))


async def call(client: Client, method: str, path: str, headers: Headers) -> Any:
    # A body for the methods that take one: authentication comes before validation anyway.
    body = {} if method in {"post", "put", "patch"} else None
    return await client.open(concrete(path), method=method.upper(), json=body, headers=headers)


async def walk(app: Quart, keys: dict[str, Headers]) -> set[tuple[str, str, str]]:
    """Check every route of *app*; returns ``(path, method, least role)`` of the guarded ones."""
    client = app.test_client()
    spec = await (await client.get("/openapi.json")).get_json()
    checked = set()
    for path, method in routes(app):
        if (path, method) in PUBLIC:
            assert (await call(client, method, path, {})).status_code not in (401, 403), (method, path)
            continue
        operation = spec["paths"].get(path, {}).get(method)
        assert operation is not None, f"{method.upper()} {path} is neither public nor in /openapi.json"
        least = operation.get("x-required-role")
        assert least in RANK, f"{method.upper()} {path} declares no role: guard it with web.auth.requires"
        assert operation["security"] == [{"bearer": []}], (method, path)

        await assert_problem(await call(client, method, path, {}), 401)
        await assert_problem(await call(client, method, path, {"Authorization": "Bearer dnk_0_bad"}), 401)
        for role in ROLES_BY_RANK:
            response = await call(client, method, path, keys[role])
            if RANK[role] < RANK[least]:
                body = await assert_problem(response, 403)
                assert least in body["detail"], (method, path, role)
            else:
                assert response.status_code not in (401, 403), (method, path, role, await response.get_data())
        checked.add((path, method, least))
        if app.config.get(RATE_LIMIT_EXEMPT) is not None and endpoints(app)[path, method] not in EXEMPT:
            # web.limits is installed: every guarded route documents its 429 as well.
            assert "429" in operation["responses"], (method, path)
    return checked


async def test_every_route_is_public_or_declares_its_role(
    protected_app: Quart, keys: dict[str, Headers], register: Register
) -> None:
    await register("emu-1")
    checked = await walk(protected_app, keys)
    # The walk reached the routes that must be guarded, with the roles the README promises.
    assert {
        ("/metrics", "get", "viewer"),
        ("/api/v1/devices", "get", "viewer"),
        ("/api/v1/devices", "post", "admin"),
        ("/api/v1/devices/{device_id}/secret", "post", "admin"),
        ("/api/v1/devices/{device_id}/disable", "post", "admin"),
        ("/api/v1/devices/{device_id}/enable", "post", "admin"),
        ("/api/v1/alerts/{alert_id}/ack", "post", "operator"),
        ("/api/v1/keys", "get", "admin"),
        ("/api/v1/keys", "post", "admin"),
        ("/api/v1/keys/{key_id}", "delete", "admin"),
        ("/api/v1/audit", "get", "admin"),
        ("/api/v1/devices/{device_id}", "patch", "admin"),
        ("/api/v1/devices/{device_id}/commands", "post", "operator"),
        ("/api/v1/devices/{device_id}/commands", "get", "viewer"),
        ("/api/v1/devices/{device_id}/commands/{command_id}", "get", "viewer"),
        ("/api/v1/devices/{device_id}/energy", "get", "viewer"),
        ("/api/v1/forwarders", "get", "viewer"),
    } <= checked


async def test_an_unguarded_route_fails_the_walk(protected_app: Quart, keys: dict[str, Headers]) -> None:
    @protected_app.get("/api/v1/forgotten")
    async def forgotten() -> dict[str, str]:
        return {"secret": "everyone can read this"}

    with pytest.raises(AssertionError, match="declares no role"):
        await walk(protected_app, keys)


async def test_metrics_is_open_unless_configured(client: Client, spec_unprotected: dict[str, Any]) -> None:
    assert (await client.get("/metrics")).status_code == 200
    operation = spec_unprotected["paths"]["/metrics"]["get"]
    assert "security" not in operation
    assert "x-required-role" not in operation
    assert "401" not in operation["responses"]


async def test_protected_metrics_documents_its_problems(protected_app: Quart, viewer: Headers) -> None:
    client = protected_app.test_client()
    spec = await (await client.get("/openapi.json")).get_json()
    responses = spec["paths"]["/metrics"]["get"]["responses"]
    assert list(responses["401"]["content"]) == ["application/problem+json"]
    assert list(responses["403"]["content"]) == ["application/problem+json"]
    response = await client.get("/metrics", headers=viewer)
    assert response.status_code == 200
    assert "depot_node_" in await response.get_data(as_text=True)


@pytest.fixture
async def spec_unprotected(client: Client) -> dict[str, Any]:
    body: dict[str, Any] = await (await client.get("/openapi.json")).get_json()
    return body
