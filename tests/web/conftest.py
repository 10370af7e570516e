"""Fixtures for the API tests: a real SQLite file in ``tmp_path``, the app built on it, and API
keys of every role created the way an operator would (``new_api_key`` + ``insert_api_key``)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from actors.stats import IngestStats
from storage.contract import QuarantineReason
from storage.reader import Reader
from storage.records import DeviceBatch, DeviceStateRecord, QuarantineRow, RawMessage, TelemetryRow
from storage.secrets import ROLES, new_api_key
from storage.sqlite import SqliteStore
from web.app import create_app
from web.services import WebServices

#: Smaller than the default so that the "limit above the maximum" path is cheap to reach.
MAX_PAGE = 50

Headers = dict[str, str]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "node.sqlite3"


@pytest.fixture
def store(db_path: Path) -> Iterator[SqliteStore]:
    store = SqliteStore(db_path, synchronous="NORMAL")
    yield store
    store.close()


@pytest.fixture
def reader(store: SqliteStore, db_path: Path) -> Iterator[Reader]:
    # Depends on `store`: the writer creates the file and runs the migrations first.
    reader = Reader(db_path)
    yield reader
    reader.close()


@pytest.fixture
def revoked() -> list[str]:
    """Device ids passed to ``on_revoked``, in order."""
    return []


@pytest.fixture
def changed() -> list[tuple[str, str]]:
    """``(device_id, reason)`` passed to ``on_credentials_changed``, in order."""
    return []


@pytest.fixture
def device_changes() -> list[str]:
    """Device ids passed to ``on_device_changed`` (a registration changed), in order."""
    return []


@pytest.fixture
def services(
    reader: Reader, store: SqliteStore, revoked: list[str], changed: list[tuple[str, str]], device_changes: list[str]
) -> WebServices:
    async def on_revoked(device_id: str) -> None:
        revoked.append(device_id)

    async def on_credentials_changed(device_id: str, reason: str) -> None:
        changed.append((device_id, reason))

    async def on_device_changed(device_id: str) -> None:
        device_changes.append(device_id)

    return WebServices(
        reader=reader,
        store=store,
        stats=IngestStats(),
        readiness={},
        on_revoked=on_revoked,
        on_credentials_changed=on_credentials_changed,
        on_device_changed=on_device_changed,
        max_page=MAX_PAGE,
    )


@pytest.fixture
def app(services: WebServices) -> Quart:
    return create_app(services)


@pytest.fixture
def client(app: Quart) -> Client:
    return app.test_client()


@pytest.fixture
async def keys(store: SqliteStore) -> dict[str, Headers]:
    """``Authorization`` headers for a fresh API key of each role."""
    headers: dict[str, Headers] = {}
    for role in ROLES:
        key_id, full, key_hash = new_api_key()
        await store.insert_api_key(key_id, role, key_hash)
        headers[role] = {"Authorization": f"Bearer {full}"}
    return headers


@pytest.fixture
def admin(keys: dict[str, Headers]) -> Headers:
    return keys["admin"]


@pytest.fixture
def viewer(keys: dict[str, Headers]) -> Headers:
    return keys["viewer"]


Register = Callable[..., Awaitable[dict[str, Any]]]


@pytest.fixture
def register(client: Client, admin: Headers) -> Register:
    """Register a device through the API; returns the 201 body."""

    async def register(device_id: str, type_: str = "dc_meter", name: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"device_id": device_id, "type": type_}
        if name is not None:
            body["name"] = name
        response = await client.post("/api/v1/devices", json=body, headers=admin)
        assert response.status_code == 201, await response.get_data(as_text=True)
        result: dict[str, Any] = await response.get_json()
        return result

    return register


Reading = tuple[int, int, int]  # (boot, seq, ts_ms)
CommitReadings = Callable[..., Awaitable[None]]


@pytest.fixture
def commit_readings(store: SqliteStore) -> CommitReadings:
    """Store readings of one device the way the storage writer does (one ``commit``)."""

    async def commit(
        device_id: str,
        readings: list[Reading],
        *,
        loc: dict[str, float] | None = None,
        quarantine: Sequence[tuple[QuarantineReason, bytes]] = (),
        counters: dict[str, int] | None = None,
        online: bool = True,
        last_seen: float | None = 1_795_449_900.25,
    ) -> None:
        topic = f"iot/{device_id}/telemetry"
        messages = [
            RawMessage(
                topic=topic,
                received_at=1_795_449_900.0 + i,
                payload=json.dumps({"boot": boot, "seq": seq}).encode(),
                telemetry=[
                    TelemetryRow(
                        boot=boot,
                        seq=seq,
                        ts_ms=ts_ms,
                        m_json=json.dumps({"voltage_v": 1500.0 + seq, "power_kw": 1.5}),
                        loc_json=None if loc is None else json.dumps(loc),
                    )
                ],
            )
            for i, (boot, seq, ts_ms) in enumerate(readings)
        ]
        messages += [
            RawMessage(
                topic=topic,
                received_at=1_795_450_000.0 + i,
                payload=payload,
                quarantine=[QuarantineRow(reason=reason, detail=f"bad message {i}")],
            )
            for i, (reason, payload) in enumerate(quarantine)
        ]
        last = max(readings, default=None)
        state = DeviceStateRecord(
            device_id=device_id,
            boot=None if last is None else last[0],
            low=0,
            high=-1 if last is None else last[1],
            gaps=(),
            counters=counters if counters is not None else {"received": len(readings), "stored": len(readings)},
            last_seen=last_seen,
            online=online,
        )
        await store.commit([DeviceBatch(device_id=device_id, messages=messages, state=state)])

    return commit
