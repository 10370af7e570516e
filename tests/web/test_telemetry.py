"""Telemetry through the API: oldest first, keyset pages, ``from``/``to`` on device time."""

from __future__ import annotations

from typing import Any

import pytest
from quart.typing import TestClientProtocol as Client

from .conftest import CommitReadings, Headers, Register
from .problems import assert_problem

pytestmark = pytest.mark.anyio

# 2026-11-23T16:05:00Z in epoch milliseconds.
T0 = 1_795_449_900_000


def url(device_id: str = "emu-1") -> str:
    return f"/api/v1/devices/{device_id}/telemetry"


@pytest.fixture
async def device(register: Register, commit_readings: CommitReadings) -> str:
    """emu-1 with readings at T0 + 0 s … 9 s: boot 1 seq 0‥4, then boot 2 seq 0‥4.

    They are committed out of order (the second boot first) to show that pages follow
    device time, not arrival order.
    """
    await register("emu-1")
    await commit_readings("emu-1", [(2, seq, T0 + (5 + seq) * 1000) for seq in range(5)])
    await commit_readings("emu-1", [(1, seq, T0 + seq * 1000) for seq in range(5)], loc={"lat": 52.09, "lon": 5.12})
    return "emu-1"


async def fetch_all(client: Client, headers: Headers, **query: Any) -> tuple[list[dict[str, Any]], int]:
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    while True:
        qs = dict(query) if cursor is None else {**query, "cursor": cursor}
        response = await client.get(url(), query_string=qs, headers=headers)
        assert response.status_code == 200, await response.get_data(as_text=True)
        page = await response.get_json()
        items += page["items"]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            return items, pages


async def test_readings_oldest_first(client: Client, viewer: Headers, device: str) -> None:
    page = await (await client.get(url(), headers=viewer)).get_json()
    assert page["next_cursor"] is None
    items = page["items"]
    assert [(r["boot"], r["seq"]) for r in items] == [(1, s) for s in range(5)] + [(2, s) for s in range(5)]
    assert items[0] == {
        "boot": 1,
        "seq": 0,
        "ts": "2026-11-23T16:05:00.000Z",
        "m": {"voltage_v": 1500.0, "power_kw": 1.5},
        "loc": {"lat": 52.09, "lon": 5.12},
    }
    assert items[5]["ts"] == "2026-11-23T16:05:05.000Z"
    assert items[5]["loc"] is None


async def test_pages_cover_everything_once(client: Client, viewer: Headers, device: str) -> None:
    items, pages = await fetch_all(client, viewer, limit=3)
    assert pages == 4
    assert [(r["boot"], r["seq"]) for r in items] == [(1, s) for s in range(5)] + [(2, s) for s in range(5)]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"from": "2026-11-23T16:05:03Z"}, [(1, 3), (1, 4), (2, 0), (2, 1), (2, 2), (2, 3), (2, 4)]),
        ({"to": "2026-11-23T16:05:02Z"}, [(1, 0), (1, 1)]),
        ({"from": "2026-11-23T16:05:04Z", "to": "2026-11-23T16:05:06Z"}, [(1, 4), (2, 0)]),
        # Another offset, same instant: 17:05:04+01:00 is 16:05:04Z.
        ({"from": "2026-11-23T17:05:04+01:00", "to": "2026-11-23T16:05:06Z"}, [(1, 4), (2, 0)]),
        # A bound between two milliseconds: 04.0005 is after the reading at 04.000.
        ({"from": "2026-11-23T16:05:04.0005Z", "to": "2026-11-23T16:05:06Z"}, [(2, 0)]),
        ({"from": "2026-11-23T16:06:00Z"}, []),
    ],
)
async def test_from_to(
    client: Client, viewer: Headers, device: str, query: dict[str, str], expected: list[tuple[int, int]]
) -> None:
    items, _ = await fetch_all(client, viewer, **query)
    assert [(r["boot"], r["seq"]) for r in items] == expected


async def test_from_to_with_pages(client: Client, viewer: Headers, device: str) -> None:
    items, pages = await fetch_all(
        client, viewer, limit=2, **{"from": "2026-11-23T16:05:01Z", "to": "2026-11-23T16:05:08Z"}
    )
    assert pages == 4
    assert [(r["boot"], r["seq"]) for r in items] == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 0), (2, 1), (2, 2)]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"from": "yesterday"}, "from"),
        ({"from": "2026-11-23"}, "from"),
        ({"from": "2026-11-23T16:05:00"}, "from"),  # no offset: ambiguous
        ({"to": "1795449900"}, "to"),
        ({"to": "2026-13-23T16:05:00Z"}, "to"),
        ({"limit": "0"}, "limit"),
    ],
)
async def test_bad_query_is_422(
    client: Client, viewer: Headers, device: str, query: dict[str, str], field: str
) -> None:
    problem = await assert_problem(await client.get(url(), query_string=query, headers=viewer), 422)
    assert [e["loc"] for e in problem["errors"]] == [["query", field]]


@pytest.mark.parametrize(
    ("start", "end"),
    [("2026-11-23T16:05:03Z", "2026-11-23T16:05:03Z"), ("2026-11-23T16:05:04Z", "2026-11-23T16:05:03Z")],
)
async def test_from_not_before_to_is_422(client: Client, viewer: Headers, device: str, start: str, end: str) -> None:
    response = await client.get(url(), query_string={"from": start, "to": end}, headers=viewer)
    problem = await assert_problem(response, 422)
    assert "before" in problem["errors"][0]["msg"]


async def test_bad_cursor_is_400(client: Client, viewer: Headers, device: str) -> None:
    # A devices cursor (one string) is not a telemetry cursor (two integers).
    response = await client.get(url(), query_string={"cursor": "WyJlbXUtMSJd"}, headers=viewer)
    await assert_problem(response, 400)


async def test_unknown_device_is_404(client: Client, viewer: Headers) -> None:
    await assert_problem(await client.get(url("nope"), headers=viewer), 404)


async def test_device_without_readings(client: Client, viewer: Headers, register: Register) -> None:
    await register("emu-2")
    page = await (await client.get(url("emu-2"), headers=viewer)).get_json()
    assert page == {"items": [], "next_cursor": None}


async def test_needs_a_key(client: Client, device: str) -> None:
    await assert_problem(await client.get(url()), 401)
