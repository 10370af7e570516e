"""The node under test: one started here in a background thread, or a running node given on
the command line (``--node-url``, ``--mqtt-url``, ``--admin-key``; see ``README.md`` here).

The protocol tests talk to either through real TCP only (raw MQTT sockets and a synchronous
``httpx`` client), so the same tests run against both.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
import pytest
from anyio.abc import TaskStatus
from anyio.from_thread import start_blocking_portal
from argon2 import PasswordHasher

import storage.secrets
from node.app import NodeAddresses, database_path, run_node
from node.config import Settings
from storage.secrets import new_api_key
from storage.sqlite import connect, insert_api_key

ADMIN_KEY_ENV = "DEPOT_NODE_TEST_ADMIN_KEY"

_METRIC_LINE = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


@dataclass(frozen=True)
class NodeTarget:
    """Where the node under test listens, and an admin API key for it."""

    http_url: str
    mqtt_host: str
    mqtt_port: int
    admin_key: str
    #: True for the node these tests started: nothing else talks to it, so node-wide metrics
    #: can be checked exactly (against an external node only that they do not go backwards).
    local: bool

    def http(self, timeout: float = 10.0) -> httpx.Client:
        return httpx.Client(
            base_url=self.http_url, headers={"Authorization": f"Bearer {self.admin_key}"}, timeout=timeout
        )


def new_run_prefix() -> str:
    """A device id prefix no other run uses (ids are never reused by a node)."""
    return f"pt-{uuid.uuid4().hex[:12]}"


def parse_mqtt_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in {"mqtt", "tcp"} or not parts.hostname:
        raise ValueError(f"--mqtt-url must look like mqtt://HOST:PORT, got {url!r}")
    return parts.hostname, parts.port or 1883


def parse_http_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"--node-url must look like http://HOST:PORT, got {url!r}")
    return url.rstrip("/")


def external_target(node_url: str | None, mqtt_url: str | None, admin_key: str | None) -> NodeTarget | None:
    """The running node given on the command line, or None to start one here.

    Raises ValueError when only part of what is needed was given.
    """
    admin_key = admin_key or os.environ.get(ADMIN_KEY_ENV) or None
    if node_url is None and mqtt_url is None:
        return None
    if node_url is None or mqtt_url is None:
        raise ValueError("--node-url and --mqtt-url go together: give both to test a running node")
    if not admin_key:
        raise ValueError(f"testing a running node needs an admin API key: --admin-key KEY or {ADMIN_KEY_ENV}")
    host, port = parse_mqtt_url(mqtt_url)
    return NodeTarget(parse_http_url(node_url), host, port, admin_key, local=False)


def make_admin_key(data_dir: Path) -> str:
    key_id, key, key_hash = new_api_key()
    conn = connect(database_path(data_dir))
    try:
        insert_api_key(conn, key_id, "admin", key_hash)
    finally:
        conn.close()
    return key


@contextmanager
def local_node(data_dir: Path, **settings: Any) -> Iterator[NodeTarget]:
    """Run a real node on free loopback ports in a background thread with its own event loop.

    The node stops (in its normal shutdown order) when the block ends.
    """
    key = make_admin_key(data_dir)
    config = Settings(data_dir=data_dir, mqtt_bind="127.0.0.1:0", http_bind="127.0.0.1:0", **settings)
    with start_blocking_portal(backend="asyncio") as portal:
        shutdown: anyio.Event = portal.call(anyio.Event)

        async def run(*, task_status: TaskStatus[NodeAddresses]) -> None:
            await run_node(config, shutdown=shutdown, task_status=task_status)

        future, addresses = portal.start_task(run, name="depot-node")
        try:
            http_host, http_port = addresses.http
            assert addresses.mqtt is not None
            mqtt_host, mqtt_port = addresses.mqtt
            yield NodeTarget(f"http://{http_host}:{http_port}", mqtt_host, mqtt_port, key, local=True)
        finally:
            portal.call(shutdown.set)
            # Surfaces an exception of the node, and bounds the shutdown.
            future.result(timeout=30)


def cheap_device_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the in-process node hash and check device secrets with cheap Argon2id parameters.

    Same code path (Argon2id hash at registration, verify at CONNECT), a fraction of the CPU:
    the state machine registers and first connects ~250 devices, which at the production
    cost (~25 ms per hash or check) would dominate its run time. Only for the node this
    process runs; a running node keeps its own parameters.
    """
    if hasattr(storage.secrets, "_HASHER"):
        monkeypatch.setattr(storage.secrets, "_HASHER", PasswordHasher(time_cost=1, memory_cost=64, parallelism=1))


def metric_samples(text: str, name: str) -> dict[str, float]:
    """Samples of metric *name* in a Prometheus text exposition, by their label string."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC_LINE.match(line)
        if m is not None and m["name"] == name:
            found[m["labels"] or ""] = float(m["value"])
    return found
