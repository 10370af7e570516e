"""Fixtures for the forwarding tests: a real SQLite file with readings in it, the InfluxDB test
server (``influx_fake.py``) and moto's S3 server, both over real HTTP on 127.0.0.1."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.contract import QuarantineReason
from storage.records import DeviceBatch, DeviceStateRecord, QuarantineRow, RawMessage, TelemetryRow
from storage.sqlite import SqliteStore
from tests.payloads import BASE_TS

from .influx_fake import FakeInflux

#: Device time of reading seq 0 (ms); readings are one second apart.
BASE_MS = int(BASE_TS.timestamp() * 1000)


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


def measurements(seq: int) -> dict[str, float]:
    return {"voltage_v": 1500.0 + seq % 7, "current_a": 230.5, "power_kw": -12.25 if seq % 2 else 348.4}


async def commit_readings(
    store: SqliteStore,
    device_id: str,
    seqs: range,
    *,
    boot: int = 1,
    received_at: float = 1_795_449_900.0,
    quarantined: int = 0,
) -> None:
    """Commit readings *seqs* of *device_id* the way the storage writer does (one transaction),
    plus *quarantined* messages; the payload of each is its reading as JSON."""
    messages = [
        RawMessage(
            topic=f"iot/{device_id}/telemetry",
            received_at=received_at,
            payload=json.dumps({"v": 2, "device_id": device_id, "boot": boot, "seq": seq}).encode(),
            telemetry=[
                TelemetryRow(
                    boot=boot, seq=seq, ts_ms=BASE_MS + seq * 1000, m_json=json.dumps(measurements(seq)), loc_json=None
                )
            ],
        )
        for seq in seqs
    ]
    messages += [
        RawMessage(
            topic=f"iot/{device_id}/telemetry",
            received_at=received_at,
            payload=b"\xff not utf-8 " + str(i).encode(),
            quarantine=[QuarantineRow(QuarantineReason.NOT_UTF8_JSON, f"bad message {i}")],
        )
        for i in range(quarantined)
    ]
    last = seqs[-1] if seqs else -1
    state = DeviceStateRecord(
        device_id=device_id, boot=boot, low=0, high=last, gaps=(), counters={}, last_seen=received_at, online=True
    )
    await store.commit([DeviceBatch(device_id=device_id, messages=messages, state=state)])


_hash = itertools.count()


async def register(store: SqliteStore, device_id: str, type_: str = "dc_meter") -> None:
    await store.insert_device(device_id, type_, None, f"not-a-real-hash-{next(_hash)}")


@pytest.fixture
def influx() -> Iterator[FakeInflux]:
    fake = FakeInflux()
    fake.start()
    yield fake
    fake.stop()
    assert fake.violations == [], fake.violations


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's standalone S3 server on 127.0.0.1 (one per session: it takes a second to import)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
    if server._server is not None:
        server._server.server_close()
