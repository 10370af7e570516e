"""``GET /api/v1/devices/{id}/energy``: periods, aggregates, AC fields, and every bad request.

Telemetry is committed the way the storage writer does it and the energy aggregator runs over
it on the same SQLite file, so these tests read what the node would serve.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from quart.typing import TestClientProtocol as Client

from actors.energy_aggregator import EnergyAggregator
from actors.stats import EnergyStats
from storage.energy import SqliteEnergyStore
from storage.records import EnergyReading
from storage.sqlite import SqliteStore
from tests.energy_scenario import BOOT7, BOOT8, EXPECTED, LATE, MIN, T0_MS, telemetry_batch
from tests.unit.test_energy import approx
from tests.web.conftest import Headers, Register

pytestmark = pytest.mark.anyio

URL = "/api/v1/devices/{}/energy"
FROM = "2026-11-23T16:00:00Z"


async def aggregate(store: SqliteStore, db_path: Path, device_id: str, readings: list[EnergyReading]) -> None:
    await store.commit([telemetry_batch(device_id, readings)])
    energy = SqliteEnergyStore(db_path, store)
    try:
        actor = EnergyAggregator(energy, EnergyStats())
        while await actor.step():
            pass
    finally:
        energy.close()


async def get(client: Client, headers: Headers, device_id: str, **params: str) -> tuple[int, Any]:
    response = await client.get(URL.format(device_id), query_string=params, headers=headers)
    return response.status_code, await response.get_json()


async def test_five_minute_periods_of_the_train(
    client: Client, viewer: Headers, register: Register, store: SqliteStore, db_path: Path
) -> None:
    await register("emu-4021-m1")
    await aggregate(store, db_path, "emu-4021-m1", [*BOOT7, *BOOT8, LATE])
    status, body = await get(client, viewer, "emu-4021-m1", **{"from": FROM, "to": "2026-11-23T16:20:00Z"})
    assert status == 200, body
    assert (body["device_id"], body["period"]) == ("emu-4021-m1", "5m")
    got = [
        (i["start"], i["end"], approx(i["consumed_kwh"]), approx(i["regenerated_kwh"]), i["complete"])
        for i in body["items"]
    ]
    assert got == [
        (f"2026-11-23T16:{m:02d}:00.000Z", f"2026-11-23T16:{m + 5:02d}:00.000Z", c, r, ok) for m, c, r, ok in EXPECTED
    ]
    assert [i["covered_s"] for i in body["items"]] == [270.0, 240.0, 300.0, 300.0]
    assert all("reactive_import_kvarh" not in i for i in body["items"]), "a DC meter has no reactive fields"


async def test_hour_and_day(
    client: Client, viewer: Headers, register: Register, store: SqliteStore, db_path: Path
) -> None:
    await register("emu-4021-m1")
    await aggregate(store, db_path, "emu-4021-m1", [*BOOT7, *BOOT8, LATE])
    status, body = await get(
        client, viewer, "emu-4021-m1", **{"from": FROM, "to": "2026-11-23T17:00:00Z", "period": "1h"}
    )
    assert status == 200, body
    (hour,) = body["items"]
    assert (hour["start"], hour["end"]) == ("2026-11-23T16:00:00.000Z", "2026-11-23T17:00:00.000Z")
    assert (hour["consumed_kwh"], hour["regenerated_kwh"], hour["complete"]) == (approx(101), approx(32), False)
    # A day is aligned to UTC midnight: from 16:00 selects the day that holds it.
    status, body = await get(
        client, viewer, "emu-4021-m1", **{"from": FROM, "to": "2026-11-23T16:00:01Z", "period": "1d"}
    )
    assert status == 200, body
    (day,) = body["items"]
    assert (day["start"], day["end"], day["consumed_kwh"]) == (
        "2026-11-23T00:00:00.000Z",
        "2026-11-24T00:00:00.000Z",
        approx(101),
    )


async def test_ac_meter_has_reactive_energy(
    client: Client, viewer: Headers, register: Register, store: SqliteStore, db_path: Path
) -> None:
    await register("loc-1216-020", "ac_meter")
    reactive = [
        EnergyReading(
            3, i, T0_MS + i * MIN, 10.0 * i, 0.0, reactive_import_kvarh=2.0 * i, reactive_export_kvarh=0.5 * i
        )
        for i in range(6)
    ]
    await aggregate(store, db_path, "loc-1216-020", reactive)
    status, body = await get(client, viewer, "loc-1216-020", **{"from": FROM, "to": "2026-11-23T16:10:00Z"})
    assert status == 200, body
    first, second = body["items"]
    assert (
        first["consumed_kwh"],
        first["reactive_import_kvarh"],
        first["reactive_export_kvarh"],
        first["complete"],
    ) == (
        50.0,
        10.0,
        2.5,
        True,
    )
    assert (second["consumed_kwh"], second["reactive_import_kvarh"], second["complete"]) == (0.0, None, False)


async def test_periods_without_data_are_zero_and_incomplete(
    client: Client, viewer: Headers, register: Register
) -> None:
    await register("emu-9")
    status, body = await get(client, viewer, "emu-9", **{"from": FROM, "to": "2026-11-23T17:00:00Z"})
    assert status == 200, body
    assert len(body["items"]) == 12
    assert all(i["consumed_kwh"] == 0 and i["regenerated_kwh"] == 0 and not i["complete"] for i in body["items"])


async def test_default_range_is_the_last_day(client: Client, viewer: Headers, register: Register) -> None:
    await register("emu-9")
    status, body = await get(client, viewer, "emu-9")
    assert status == 200, body
    assert len(body["items"]) == 288
    status, body = await get(client, viewer, "emu-9", period="1d", to="2026-11-23T16:00:00Z")
    assert (status, len(body["items"]), body["items"][-1]["start"]) == (200, 31, "2026-11-23T00:00:00.000Z")


@pytest.mark.parametrize(
    ("params", "where"),
    [
        ({"period": "15m"}, ["query", "period"]),
        ({"from": "2026-11-23T16:00:00"}, ["query", "from"]),
        ({"from": "2026-11-23T17:00:00Z", "to": "2026-11-23T16:00:00Z"}, ["query"]),
        ({"bogus": "1"}, ["query", "bogus"]),
    ],
)
async def test_bad_queries_are_422(
    client: Client, viewer: Headers, register: Register, params: dict[str, str], where: list[str]
) -> None:
    await register("emu-9")
    response = await client.get(URL.format("emu-9"), query_string=params, headers=viewer)
    assert response.status_code == 422
    assert response.content_type == "application/problem+json"
    body = await response.get_json()
    assert body["type"].endswith("/validation")
    assert body["errors"][0]["loc"][: len(where)] == where


@pytest.mark.parametrize(
    ("period", "to"),
    [("5m", "2020-01-09T00:00:00Z"), ("1h", "2020-04-04T00:00:00Z"), ("1d", "2023-01-03T00:00:00Z")],
    ids=["5m-8-days", "1h-94-days", "1d-1098-days"],
)
async def test_too_large_ranges_are_refused(
    client: Client, viewer: Headers, register: Register, period: str, to: str
) -> None:
    await register("emu-9")
    params = {"from": "2020-01-01T00:00:00Z", "to": to, "period": period}
    response = await client.get(URL.format("emu-9"), query_string=params, headers=viewer)
    assert response.status_code == 422
    assert response.content_type == "application/problem+json"
    body = await response.get_json()
    assert body["type"].endswith("/range-too-large")
    assert "days" in body["detail"]


async def test_largest_allowed_range_is_answered(client: Client, viewer: Headers, register: Register) -> None:
    await register("emu-9")
    status, body = await get(client, viewer, "emu-9", **{"from": "2020-01-01T00:00:00Z", "to": "2020-01-08T00:00:00Z"})
    assert (status, len(body["items"])) == (200, 7 * 288)


async def test_unknown_device_is_404(client: Client, viewer: Headers) -> None:
    status, body = await get(client, viewer, "nobody")
    assert status == 404
    assert body["detail"] == "no device 'nobody'"


async def test_needs_a_key(client: Client, register: Register) -> None:
    await register("emu-9")
    response = await client.get(URL.format("emu-9"))
    assert response.status_code == 401


async def test_documented_in_openapi(client: Client) -> None:
    doc = await (await client.get("/openapi.json")).get_json()
    op = doc["paths"]["/api/v1/devices/{device_id}/energy"]["get"]
    assert {"200", "404", "422"} <= set(op["responses"])
    assert {p["name"] for p in op["parameters"]} >= {"from", "to", "period"}
