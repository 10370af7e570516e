"""The app over real HTTP: hypercorn on a loopback port, httpx as the client.

The test client skips the ASGI server; this catches what only a server shows (status lines,
an empty 204, headers as sent on the wire).
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest
from hypercorn.asyncio import serve
from hypercorn.config import Config
from quart import Quart

from .conftest import Headers

pytestmark = pytest.mark.anyio


@pytest.fixture
async def base_url(app: Quart) -> AsyncIterator[str]:
    # Bind first (port 0: the kernel picks a free one), then hand hypercorn a duplicate of the
    # socket, the way the node does, so the port is known before the server starts.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = Config()
        config.bind = [f"fd://{os.dup(sock.fileno())}"]
    config.accesslog = None
    config.graceful_timeout = 1.0
    stop = anyio.Event()

    async def run() -> None:
        await serve(app, config, shutdown_trigger=stop.wait)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, name="hypercorn")
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=url) as probe:
            with anyio.fail_after(5):
                while True:
                    try:
                        await probe.get("/healthz")
                        break
                    except httpx.ConnectError:
                        await anyio.sleep(0.01)
        yield url
        stop.set()


async def test_device_lifecycle_over_http(base_url: str, admin: Headers) -> None:
    async with httpx.AsyncClient(base_url=base_url, headers=admin) as http:
        created = await http.post("/api/v1/devices", json={"device_id": "emu-1", "type": "dc_meter"})
        assert created.status_code == 201
        assert created.headers["content-type"] == "application/json"
        assert created.json()["secret"]

        shown = await http.get("/api/v1/devices/emu-1")
        assert shown.status_code == 200
        assert shown.json()["counters"]["received"] == 0

        gone = await http.delete("/api/v1/devices/emu-1")
        assert gone.status_code == 204
        assert gone.content == b""

        missing = await http.get("/api/v1/devices/emu-2")
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/problem+json"
        assert missing.json()["status"] == 404


async def test_problem_over_http(base_url: str) -> None:
    async with httpx.AsyncClient(base_url=base_url) as http:
        response = await http.get("/api/v1/devices")
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["title"] == "Unauthorized"
