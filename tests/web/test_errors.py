"""Every error is a problem document: unknown routes, wrong methods, oversized bodies, and
failures inside the node, which are logged but never shown to the client."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from quart.typing import TestClientProtocol as Client

from storage.reader import DeviceRow, Page, Reader
from storage.sqlite import SqliteStore
from web.app import MAX_BODY_BYTES, create_app
from web.services import WebServices

from .conftest import Headers
from .problems import assert_problem

pytestmark = pytest.mark.anyio

INTERNAL = "database is locked at /var/lib/depot-node/secret-path.sqlite3"


class BrokenReader(Reader):
    """Fails where the storage layer could: the message names internals a client must not see."""

    async def devices(self, limit: int, cursor: str | None) -> Page[DeviceRow]:
        raise RuntimeError(INTERNAL)


@pytest.fixture
def broken_reader(db_path: Path, store: SqliteStore) -> Iterator[BrokenReader]:
    reader = BrokenReader(db_path)
    yield reader
    reader.close()


@pytest.fixture
def broken_client(broken_reader: BrokenReader, services: WebServices) -> Client:
    # Only `devices` is broken: authentication still reads the real API keys.
    services.reader = broken_reader
    return create_app(services).test_client()


async def test_unknown_route_is_404(client: Client, admin: Headers) -> None:
    for path in ("/nope", "/api/v1/nope", "/api/v2/devices", "/api/v1/devices/emu-1/nope"):
        body = await assert_problem(await client.get(path, headers=admin), 404)
        assert body["title"] == "Not Found"
        assert body["type"] == "about:blank"


async def test_wrong_method_is_405_with_allow(client: Client, admin: Headers) -> None:
    response = await client.put("/api/v1/devices", headers=admin, json={})
    await assert_problem(response, 405)
    assert set(response.headers["Allow"].replace(" ", "").split(",")) >= {"GET", "POST"}


async def test_oversized_body_is_413(client: Client, admin: Headers) -> None:
    body = {"device_id": "emu-1", "type": "dc_meter", "name": "x" * MAX_BODY_BYTES}
    await assert_problem(await client.post("/api/v1/devices", json=body, headers=admin), 413)


async def test_failure_is_a_generic_500(
    broken_client: Client, admin: Headers, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="web.errors"):
        response = await broken_client.get("/api/v1/devices", headers=admin)
    body = await assert_problem(response, 500)
    text = await response.get_data(as_text=True)
    assert INTERNAL not in text
    assert "RuntimeError" not in text
    assert "secret-path" not in text
    assert body["detail"] == "the server failed to answer this request; the error has been logged"
    # ...but the operator finds it in the log, with its traceback.
    [record] = [r for r in caplog.records if r.name == "web.errors"]
    assert record.exc_info is not None
    assert INTERNAL in str(record.exc_info[1])


async def test_other_routes_work_beside_a_broken_one(broken_client: Client, admin: Headers) -> None:
    response = await broken_client.get("/api/v1/quarantine", headers=admin)
    assert response.status_code == 200
