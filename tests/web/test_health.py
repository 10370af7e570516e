"""Probes and metrics: ``/healthz``, ``/readyz`` from the readiness report, ``/metrics`` from
``IngestStats`` at scrape time, in the app's own registry."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from quart.typing import TestClientProtocol as Client

from storage.contract import QuarantineReason
from web import metrics
from web.services import WebServices

from .problems import assert_problem

pytestmark = pytest.mark.anyio


async def test_healthz(client: Client) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert await response.get_json() == {"status": "ok"}


async def test_readyz_before_anything_reported(client: Client) -> None:
    body = await assert_problem(await client.get("/readyz"), 503)
    assert body["down"] == []


async def test_readyz_names_what_is_down(client: Client, services: WebServices) -> None:
    services.readiness.update(storage=True, broker=False, http=False)
    body = await assert_problem(await client.get("/readyz"), 503)
    assert body["down"] == ["broker", "http"]
    assert "broker" in body["detail"]


async def test_readyz_when_all_up(client: Client, services: WebServices) -> None:
    services.readiness.update(storage=True, broker=True, http=True)
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert await response.get_json() == {
        "status": "ok",
        "components": {"storage": True, "broker": True, "http": True},
    }
    # Readiness is read per request: a component going down shows at once.
    services.readiness["broker"] = False
    await assert_problem(await client.get("/readyz"), 503)


async def scrape(client: Client) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Sample name → (sorted labels → value)."""
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(await response.get_data(as_text=True)):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


async def test_metrics_read_stats_at_scrape_time(client: Client, services: WebServices) -> None:
    before = await scrape(client)
    assert before["depot_node_readings_stored_total"] == {(): 0}

    stats = services.stats
    stats.publishes = 12
    stats.readings_stored = 10
    stats.readings_duplicate = 1
    stats.readings_late = 2
    stats.count_quarantine("schema")
    stats.count_quarantine("schema")
    stats.commits = 3
    stats.commit_seconds = 0.25
    stats.commit_failures = 1
    stats.actor_restarts = 4
    stats.active_actors = 5
    stats.devices_parked = 1
    stats.count_refusal("bad_secret")
    stats.count_denial("publish")
    stats.connections = 6

    after = await scrape(client)
    assert after["depot_node_publishes_received_total"] == {(): 12}
    assert after["depot_node_readings_stored_total"] == {(): 10}
    assert after["depot_node_readings_duplicate_total"] == {(): 1}
    assert after["depot_node_readings_late_total"] == {(): 2}
    assert after["depot_node_quarantined_total"][(("reason", "schema"),)] == 2
    assert after["depot_node_commits_total"] == {(): 3}
    assert after["depot_node_commit_seconds_total"] == {(): 0.25}
    assert after["depot_node_commit_failures_total"] == {(): 1}
    assert after["depot_node_actor_restarts_total"] == {(): 4}
    assert after["depot_node_device_actors"] == {(): 5}
    assert after["depot_node_devices_parked"] == {(): 1}
    assert after["depot_node_auth_refused_total"] == {(("reason", "bad_secret"),): 1}
    assert after["depot_node_acl_denied_total"] == {(("action", "publish"),): 1}
    assert after["depot_node_mqtt_connections"] == {(): 6}


async def test_every_quarantine_reason_is_exported_from_the_start(client: Client) -> None:
    quarantined = (await scrape(client))["depot_node_quarantined_total"]
    assert quarantined == {(("reason", r.value),): 0 for r in QuarantineReason}


async def test_metric_names_follow_the_conventions(client: Client) -> None:
    samples = await scrape(client)
    assert samples
    assert all(name.startswith(metrics.PREFIX) for name in samples)
    # No per-device labels: only bounded label names.
    labels = {name for by_labels in samples.values() for key in by_labels for name, _ in key}
    assert labels <= {"reason", "action", "rule", "state", "limit"}  # state: the five command states


async def test_metrics_stay_out_of_the_global_registry(client: Client) -> None:
    await scrape(client)
    assert REGISTRY.get_sample_value("depot_node_commits_total") is None


async def test_openmetrics_on_request(client: Client) -> None:
    response = await client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.status_code == 200
    assert response.content_type.startswith("application/openmetrics-text")
    assert (await response.get_data(as_text=True)).rstrip().endswith("# EOF")
