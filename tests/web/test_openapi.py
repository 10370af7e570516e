"""The OpenAPI document: every route, its security, and its problem responses."""

from __future__ import annotations

import re
from typing import Any

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

pytestmark = pytest.mark.anyio

# Served by quart-schema itself (and Swagger UI's files by web.docs_ui), hidden from the document.
_DOCS_ROUTES = {"/openapi.json", "/docs", "/docs/static/<name>"}


@pytest.fixture
async def spec(client: Client) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    body: dict[str, Any] = await response.get_json()
    return body


def app_routes(app: Quart) -> set[tuple[str, str]]:
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.rule in _DOCS_ROUTES:
            continue
        path = re.sub(r"<(?:[^:<>]*:)?([^<>]+)>", r"{\1}", rule.rule)
        routes |= {(path, method.lower()) for method in rule.methods or () if method not in {"HEAD", "OPTIONS"}}
    return routes


async def test_lists_every_route(app: Quart, spec: dict[str, Any]) -> None:
    documented = {(path, method) for path, item in spec["paths"].items() for method in item}
    assert documented == app_routes(app)
    assert {
        ("/api/v1/devices", "post"),
        ("/api/v1/devices", "get"),
        ("/api/v1/devices/{device_id}", "get"),
        ("/api/v1/devices/{device_id}", "delete"),
        ("/api/v1/devices/{device_id}/telemetry", "get"),
        ("/api/v1/quarantine", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
    } <= documented


async def test_title_and_security_scheme(spec: dict[str, Any]) -> None:
    assert spec["info"]["title"] == "depot-node"
    assert spec["components"]["securitySchemes"]["bearer"]["type"] == "http"
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


async def test_api_routes_need_the_key_and_document_their_problems(spec: dict[str, Any]) -> None:
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if not path.startswith("/api/"):
                assert "security" not in operation, (method, path)
                continue
            assert operation["security"] == [{"bearer": []}], (method, path)
            for status in ("401", "403"):
                content = operation["responses"][status]["content"]
                assert list(content) == ["application/problem+json"], (method, path, status)


async def test_statuses_per_route(spec: dict[str, Any]) -> None:
    def statuses(path: str, method: str) -> set[str]:
        return set(spec["paths"][path][method]["responses"])

    # A body can also be malformed (400) or too large (413) before it is validated (422).
    assert statuses("/api/v1/devices", "post") == {"201", "400", "401", "403", "409", "413", "422"}
    assert statuses("/api/v1/devices", "get") == {"200", "400", "401", "403", "422"}
    assert statuses("/api/v1/devices/{device_id}", "get") == {"200", "401", "403", "404"}
    assert statuses("/api/v1/devices/{device_id}", "delete") == {"204", "401", "403", "404"}
    assert statuses("/api/v1/devices/{device_id}/telemetry", "get") == {"200", "400", "401", "403", "404", "422"}
    assert statuses("/readyz", "get") == {"200", "503"}
    assert "content" not in spec["paths"]["/api/v1/devices/{device_id}"]["delete"]["responses"]["204"]


async def test_query_parameters(spec: dict[str, Any]) -> None:
    params = {p["name"] for p in spec["paths"]["/api/v1/devices/{device_id}/telemetry"]["get"]["parameters"]}
    assert params == {"device_id", "from", "to", "limit", "cursor"}


async def test_docs_page(client: Client) -> None:
    response = await client.get("/docs")
    assert response.status_code == 200
    assert "/openapi.json" in await response.get_data(as_text=True)


async def test_docs_page_needs_no_internet(client: Client) -> None:
    """Swagger UI's script and stylesheet come from the node, not from a CDN."""
    page = await (await client.get("/docs")).get_data(as_text=True)
    urls = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert urls, page
    assert all(url.startswith("/docs/static/") for url in urls), urls
    for url, kind, needle in zip(
        sorted(urls), ("text/javascript", "text/css"), ("SwaggerUIBundle", ".swagger-ui"), strict=True
    ):
        response = await client.get(url)
        assert response.status_code == 200, url
        assert response.mimetype == kind
        assert needle in await response.get_data(as_text=True)


@pytest.mark.parametrize("name", ["index.html", "..%2Fpyproject.toml", "swagger-ui.js", "LICENSE"])
async def test_docs_static_serves_only_swagger_uis_two_files(client: Client, name: str) -> None:
    response = await client.get(f"/docs/static/{name}")
    assert response.status_code == 404
    assert response.mimetype == "application/problem+json"
