"""Quarantine through the API: newest first, per device or all, payload as it arrived."""

from __future__ import annotations

import base64

import pytest
from quart.typing import TestClientProtocol as Client

from storage.contract import QuarantineReason

from .conftest import CommitReadings, Headers
from .problems import assert_problem

pytestmark = pytest.mark.anyio

URL = "/api/v1/quarantine"


@pytest.fixture
async def quarantined(commit_readings: CommitReadings) -> None:
    # Quarantine does not need a registered device: a message may name any id.
    await commit_readings(
        "emu-1",
        [],
        quarantine=[
            (QuarantineReason.NOT_UTF8_JSON, b"\xff\xfe not json"),
            (QuarantineReason.SCHEMA, b'{"v": 2}'),
        ],
    )
    await commit_readings("emu-2", [], quarantine=[(QuarantineReason.UNSUPPORTED_VERSION, b'{"v": 1}')])


async def test_newest_first(client: Client, viewer: Headers, quarantined: None) -> None:
    page = await (await client.get(URL, headers=viewer)).get_json()
    assert page["next_cursor"] is None
    items = page["items"]
    assert [(q["device_id"], q["reason"]) for q in items] == [
        ("emu-2", "unsupported_version"),
        ("emu-1", "schema"),
        ("emu-1", "not_utf8_json"),
    ]
    oldest = items[-1]
    assert set(oldest) == {"id", "device_id", "topic", "received_at", "reason", "detail", "payload_base64"}
    assert oldest["topic"] == "iot/emu-1/telemetry"
    assert oldest["detail"] == "bad message 0"
    assert oldest["received_at"] == "2026-11-23T16:06:40.000Z"
    assert base64.b64decode(oldest["payload_base64"]) == b"\xff\xfe not json"
    assert items[0]["id"] > items[1]["id"] > items[2]["id"]


async def test_one_device(client: Client, viewer: Headers, quarantined: None) -> None:
    page = await (await client.get(URL, query_string={"device_id": "emu-1"}, headers=viewer)).get_json()
    assert [q["reason"] for q in page["items"]] == ["schema", "not_utf8_json"]
    page = await (await client.get(URL, query_string={"device_id": "emu-9"}, headers=viewer)).get_json()
    assert page == {"items": [], "next_cursor": None}


async def test_pages(client: Client, viewer: Headers, quarantined: None) -> None:
    first = await (await client.get(URL, query_string={"limit": 2}, headers=viewer)).get_json()
    assert len(first["items"]) == 2
    second = await (
        await client.get(URL, query_string={"limit": 2, "cursor": first["next_cursor"]}, headers=viewer)
    ).get_json()
    assert second["next_cursor"] is None
    assert [q["reason"] for q in first["items"] + second["items"]] == ["unsupported_version", "schema", "not_utf8_json"]


async def test_bad_device_id_is_422(client: Client, viewer: Headers) -> None:
    problem = await assert_problem(await client.get(URL, query_string={"device_id": "EMU/1"}, headers=viewer), 422)
    assert [e["loc"] for e in problem["errors"]] == [["query", "device_id"]]


async def test_bad_cursor_is_400(client: Client, viewer: Headers) -> None:
    await assert_problem(await client.get(URL, query_string={"cursor": "%%%"}, headers=viewer), 400)
