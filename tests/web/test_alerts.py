"""Alerts through the API: listing with filters and pages, acknowledging, and the metrics.

Alerts are written the way the alert actor writes them (``SqliteStore.write_alerts``), into
the real SQLite file of the test.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from quart.typing import TestClientProtocol as Client
from ulid import ULID

from actors.alerts import AlertRule
from storage.records import AlertWrite
from storage.secrets import parse_api_key
from storage.sqlite import SqliteStore
from web.services import WebServices

from .conftest import Headers
from .problems import assert_problem
from .test_health import scrape

pytestmark = pytest.mark.anyio

URL = "/api/v1/alerts"
T0 = 1_795_449_600.0  # 2026-11-23T16:00:00Z


def write(device_id: str, rule: str, i: int, *, cleared: bool = False, severity: str = "warning") -> AlertWrite:
    return AlertWrite(
        alert_id=str(ULID.from_timestamp(T0 + i)),
        device_id=device_id,
        rule=rule,
        severity=severity,
        detail=f"{rule} #{i}",
        count=i + 1,
        raised_at=T0 + i,
        last_seen_at=T0 + i + 0.5,
        cleared_at=T0 + i + 1 if cleared else None,
    )


@pytest.fixture
async def alerts(store: SqliteStore) -> list[AlertWrite]:
    """Four alerts, oldest first: one cleared, three uncleared."""
    writes = [
        write("emu-1", "sequence_gap", 0, cleared=True),
        write("emu-1", "sequence_gap", 1),
        write("emu-2", "acl_denial", 2, severity="critical"),
        write("emu-1", "device_offline", 3),
    ]
    await store.write_alerts(writes)
    return writes


def key_id(headers: Headers) -> str:
    found = parse_api_key(headers["Authorization"].removeprefix("Bearer "))
    assert found is not None
    return found


async def listed(client: Client, headers: Headers, **query: Any) -> dict[str, Any]:
    response = await client.get(URL, query_string=query, headers=headers)
    assert response.status_code == 200, await response.get_data(as_text=True)
    body: dict[str, Any] = await response.get_json()
    return body


async def test_newest_first(client: Client, viewer: Headers, alerts: list[AlertWrite]) -> None:
    page = await listed(client, viewer)
    assert page["next_cursor"] is None
    assert [a["alert_id"] for a in page["items"]] == [w.alert_id for w in reversed(alerts)]
    cleared = page["items"][-1]
    assert cleared == {
        "alert_id": alerts[0].alert_id,
        "device_id": "emu-1",
        "rule": "sequence_gap",
        "state": "cleared",
        "severity": "warning",
        "detail": "sequence_gap #0",
        "count": 1,
        "raised_at": "2026-11-23T16:00:00.000Z",
        "last_seen_at": "2026-11-23T16:00:00.500Z",
        "acked_at": None,
        "acked_by": None,
        "cleared_at": "2026-11-23T16:00:01.000Z",
    }
    assert page["items"][0]["state"] == "open"


async def test_filters(client: Client, viewer: Headers, alerts: list[AlertWrite]) -> None:
    async def ids(**query: Any) -> list[str]:
        return [a["detail"] for a in (await listed(client, viewer, **query))["items"]]

    assert await ids(state="open") == ["device_offline #3", "acl_denial #2", "sequence_gap #1"]
    assert await ids(state="cleared") == ["sequence_gap #0"]
    assert await ids(state="acknowledged") == []
    assert await ids(device_id="emu-1", rule="sequence_gap") == ["sequence_gap #1", "sequence_gap #0"]
    assert await ids(device_id="emu-2", state="open") == ["acl_denial #2"]
    assert await ids(rule="stale_boot") == []


async def test_pages(client: Client, viewer: Headers, alerts: list[AlertWrite]) -> None:
    first = await listed(client, viewer, limit=3)
    assert len(first["items"]) == 3
    second = await listed(client, viewer, limit=3, cursor=first["next_cursor"])
    assert second["next_cursor"] is None
    assert [a["alert_id"] for a in first["items"] + second["items"]] == [w.alert_id for w in reversed(alerts)]


@pytest.mark.parametrize(
    ("query", "loc"),
    [
        ({"state": "closed"}, ["query", "state"]),
        ({"rule": "cpu_hot"}, ["query", "rule"]),
        ({"device_id": "EMU/1"}, ["query", "device_id"]),
        ({"limit": 0}, ["query", "limit"]),
    ],
)
async def test_bad_query_is_422(client: Client, viewer: Headers, query: dict[str, Any], loc: list[str]) -> None:
    problem = await assert_problem(await client.get(URL, query_string=query, headers=viewer), 422)
    assert [e["loc"] for e in problem["errors"]] == [loc]


async def test_bad_cursor_is_400(client: Client, viewer: Headers) -> None:
    await assert_problem(await client.get(URL, query_string={"cursor": "%%%"}, headers=viewer), 400)


async def test_listing_needs_a_key(client: Client) -> None:
    await assert_problem(await client.get(URL), 401)


async def test_ack_by_an_operator(
    client: Client, keys: dict[str, Headers], alerts: list[AlertWrite], store: SqliteStore
) -> None:
    alert_id = alerts[1].alert_id
    response = await client.post(f"{URL}/{alert_id}/ack", headers=keys["operator"])
    assert response.status_code == 200, await response.get_data(as_text=True)
    acked = await response.get_json()
    assert (acked["alert_id"], acked["state"]) == (alert_id, "acknowledged")
    assert acked["acked_by"] == key_id(keys["operator"])
    assert acked["acked_at"] is not None
    assert acked["cleared_at"] is None

    # Idempotent: a second acknowledgement (by anyone) keeps the first.
    again = await client.post(f"{URL}/{alert_id}/ack", headers=keys["admin"])
    assert again.status_code == 200
    assert await again.get_json() == acked
    assert [a["alert_id"] for a in (await listed(client, keys["viewer"], state="acknowledged"))["items"]] == [alert_id]

    # The rule still clears an acknowledged alert; the acknowledgement stays on record.
    await store.write_alerts([dataclasses.replace(alerts[1], cleared_at=T0 + 9)])
    (cleared,) = (await listed(client, keys["viewer"], state="cleared", device_id="emu-1", limit=1))["items"]
    assert (cleared["alert_id"], cleared["acked_by"]) == (alert_id, key_id(keys["operator"]))


async def test_ack_of_a_cleared_alert_is_409(
    client: Client, keys: dict[str, Headers], alerts: list[AlertWrite]
) -> None:
    problem = await assert_problem(await client.post(f"{URL}/{alerts[0].alert_id}/ack", headers=keys["operator"]), 409)
    assert problem["type"] == "tag:depot-node,2026:problem/alert-cleared"


@pytest.mark.parametrize("alert_id", [str(ULID.from_timestamp(T0)), "not-a-ulid", "0" * 27])
async def test_ack_of_an_unknown_alert_is_404(client: Client, keys: dict[str, Headers], alert_id: str) -> None:
    await assert_problem(await client.post(f"{URL}/{alert_id}/ack", headers=keys["operator"]), 404)


async def test_ack_needs_the_operator_role(client: Client, viewer: Headers, alerts: list[AlertWrite]) -> None:
    await assert_problem(await client.post(f"{URL}/{alerts[1].alert_id}/ack", headers=viewer), 403)
    await assert_problem(await client.post(f"{URL}/{alerts[1].alert_id}/ack"), 401)
    assert (await listed(client, viewer, state="acknowledged"))["items"] == []


async def test_metrics(client: Client, services: WebServices) -> None:
    before = await scrape(client)
    # Every rule is exported from the start, at 0 before any alert.
    rules = tuple(r.value for r in AlertRule)
    assert {"acl_denial", "device_offline", "device_parked", "quarantine_burst", "sequence_gap"} <= set(rules)
    assert {"implausible_value", "forwarder_backlog", "forwarder_dropped"} <= set(rules)
    assert before["depot_node_alerts_open"] == {(("rule", r),): 0 for r in rules}
    assert before["depot_node_alerts_raised_total"] == {(("rule", r),): 0 for r in rules}
    assert before["depot_node_alert_signals_dropped_total"] == {(): 0}

    services.stats.alerts.open.update(sequence_gap=2, device_offline=1)
    services.stats.alerts.raised.update(sequence_gap=5)
    services.stats.alerts.signals_dropped = 3
    after = await scrape(client)
    assert after["depot_node_alerts_open"][(("rule", "sequence_gap"),)] == 2
    assert after["depot_node_alerts_open"][(("rule", "device_offline"),)] == 1
    assert after["depot_node_alerts_open"][(("rule", "stale_boot"),)] == 0
    assert after["depot_node_alerts_raised_total"][(("rule", "sequence_gap"),)] == 5
    assert after["depot_node_alert_signals_dropped_total"] == {(): 3}


async def test_openapi_statuses(client: Client) -> None:
    spec = await (await client.get("/openapi.json")).get_json()
    assert set(spec["paths"]["/api/v1/alerts"]["get"]["responses"]) == {"200", "400", "401", "403", "422"}
    ack = spec["paths"]["/api/v1/alerts/{alert_id}/ack"]["post"]
    assert set(ack["responses"]) == {"200", "401", "403", "404", "409"}
    params = {p["name"]: p for p in spec["paths"]["/api/v1/alerts"]["get"]["parameters"]}
    assert set(params) >= {"state", "device_id", "rule", "limit", "cursor"}
