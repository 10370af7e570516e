"""Prometheus metrics of the node: every metric name is defined here and nowhere else.

The actors count into :class:`actors.stats.IngestStats` (plain integers, no label lookups on
the hot path); :class:`IngestCollector` turns those into metric families when Prometheus
scrapes. Each app gets its own :class:`~prometheus_client.CollectorRegistry`, never the global
one, so two nodes (or two tests) in one process do not share or collide on metrics.

Naming: prefix ``depot_node_``, base units (seconds), ``_total`` on counters (prometheus_client
adds it to counter samples). No per-device labels: label values come from bounded sets (the
quarantine reasons of the contract, auth refusal reasons, ACL actions, alert rules).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Final

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from actors.alerts import AlertRule
from actors.commands import IGNORED_FINISHED, IGNORED_OTHER_DEVICE, IGNORED_UNKNOWN
from actors.limits import LimitKind
from actors.stats import CommandStats, GuardClose, IngestStats
from storage.command_contract import CommandState
from storage.contract import QuarantineReason

PREFIX: Final = "depot_node_"

PUBLISHES_RECEIVED: Final = PREFIX + "publishes_received"
READINGS_STORED: Final = PREFIX + "readings_stored"
READINGS_DUPLICATE: Final = PREFIX + "readings_duplicate"
READINGS_LATE: Final = PREFIX + "readings_late"
QUARANTINED: Final = PREFIX + "quarantined"
COMMITS: Final = PREFIX + "commits"
COMMITTED_MESSAGES: Final = PREFIX + "committed_messages"
COMMIT_SECONDS: Final = PREFIX + "commit_seconds"
COMMIT_FAILURES: Final = PREFIX + "commit_failures"
ACTOR_RESTARTS: Final = PREFIX + "actor_restarts"
ACTORS_STARTED: Final = PREFIX + "actors_started"
ACTORS_RETIRED: Final = PREFIX + "actors_retired"
DEVICE_ACTORS: Final = PREFIX + "device_actors"
DEVICES_PARKED: Final = PREFIX + "devices_parked"
AUTH_REFUSED: Final = PREFIX + "auth_refused"
ACL_DENIED: Final = PREFIX + "acl_denied"
MQTT_CONNECTIONS: Final = PREFIX + "mqtt_connections"
ALERTS_OPEN: Final = PREFIX + "alerts_open"
ALERTS_RAISED: Final = PREFIX + "alerts_raised"
ALERT_SIGNALS_DROPPED: Final = PREFIX + "alert_signals_dropped"
COMMANDS_PENDING: Final = PREFIX + "commands_pending"
COMMAND_TRANSITIONS: Final = PREFIX + "command_transitions"
COMMAND_RESENDS: Final = PREFIX + "command_resends"
COMMAND_EXPIRATIONS: Final = PREFIX + "command_expirations"
COMMAND_ACKS_IGNORED: Final = PREFIX + "command_acks_ignored"
COMMAND_ACKS_QUARANTINED: Final = PREFIX + "command_acks_quarantined"
DEVICE_LIMIT_EXCEEDED: Final = PREFIX + "device_limit_exceeded"
MQTT_CONNECTIONS_CLOSED: Final = PREFIX + "mqtt_connections_closed"
FORWARD_ROWS_BEHIND: Final = PREFIX + "forward_rows_behind"
FORWARD_BACKLOG_BYTES: Final = PREFIX + "forward_backlog_bytes"
FORWARD_OLDEST_AGE: Final = PREFIX + "forward_oldest_unforwarded_age_seconds"
FORWARD_BATCHES: Final = PREFIX + "forward_batches"
FORWARD_ROWS: Final = PREFIX + "forward_rows"
FORWARD_FAILURES: Final = PREFIX + "forward_failures"
FORWARD_ROWS_DROPPED: Final = PREFIX + "forward_rows_dropped"
RETENTION_DELETED: Final = PREFIX + "retention_deleted_rows"
ENERGY_READINGS: Final = PREFIX + "energy_readings"
ENERGY_READINGS_RECOMPUTED: Final = PREFIX + "energy_readings_recomputed"
ENERGY_PERIODS_WRITTEN: Final = PREFIX + "energy_periods_written"
ENERGY_FAILURES: Final = PREFIX + "energy_failures"
ENERGY_CURSOR: Final = PREFIX + "energy_cursor_position"


class IngestCollector(Collector):
    """Reads :class:`IngestStats` at scrape time.

    ``collect`` runs on the event loop thread (the ``/metrics`` handler calls the exposition
    synchronously), the same thread on which the actors bump the counters, so it reads a
    consistent snapshot without locks.
    """

    def __init__(self, stats: IngestStats) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        s = self._stats
        yield _counter(PUBLISHES_RECEIVED, "MQTT PUBLISH packets handled by device actors.", s.publishes)
        yield _counter(READINGS_STORED, "Readings committed to storage (late ones included).", s.readings_stored)
        yield _counter(READINGS_DUPLICATE, "Readings seen before: counted, not stored again.", s.readings_duplicate)
        yield _counter(READINGS_LATE, "Readings that arrived inside an open sequence gap.", s.readings_late)
        # Every reason of the contract is exported from the start, so rate() sees a 0 → 1 step.
        quarantined = dict.fromkeys((r.value for r in QuarantineReason), 0) | s.quarantined
        yield _labelled_counter(QUARANTINED, "Messages and readings quarantined.", "reason", quarantined)
        yield _counter(COMMITS, "Storage transactions committed (one per group).", s.commits)
        yield _counter(COMMITTED_MESSAGES, "PUBLISHes archived by committed storage transactions.", s.commit_rows)
        yield _counter(COMMIT_SECONDS, "Time spent in storage commits.", s.commit_seconds)
        yield _counter(
            COMMIT_FAILURES, "Storage commits that failed (nothing of the group written).", s.commit_failures
        )
        yield _counter(ACTOR_RESTARTS, "Actor restarts by their supervisor.", s.actor_restarts)
        yield _counter(ACTORS_STARTED, "Device actors started.", s.actors_started)
        yield _counter(ACTORS_RETIRED, "Device actors retired after being idle.", s.actors_retired)
        yield _gauge(DEVICE_ACTORS, "Device actors running.", s.active_actors)
        yield _gauge(DEVICES_PARKED, "Devices whose actor was parked after crashing too often.", s.devices_parked)
        yield _labelled_counter(AUTH_REFUSED, "MQTT connections refused at CONNECT.", "reason", s.auth_refused)
        yield _labelled_counter(
            ACL_DENIED, "MQTT publishes and subscriptions denied by the ACL.", "action", s.acl_denied
        )
        yield _gauge(MQTT_CONNECTIONS, "Open MQTT connections.", s.connections)
        # Every rule is exported from the start (0), like the quarantine reasons.
        rules = dict.fromkeys((r.value for r in AlertRule), 0)
        yield _labelled_gauge(
            ALERTS_OPEN,
            "Alerts not cleared yet: state open or acknowledged (an acknowledgement does not lower it).",
            "rule",
            rules | s.alerts.open,
        )
        yield _labelled_counter(
            ALERTS_RAISED,
            "Alerts raised (a repeat of an uncleared one is not counted).",
            "rule",
            rules | s.alerts.raised,
        )
        yield _labelled_counter(
            DEVICE_LIMIT_EXCEEDED,
            "MQTT PUBLISHes over their device's messages/s or bytes/s limit (quarantined or disconnected).",
            "limit",
            dict.fromkeys((k.value for k in LimitKind), 0) | s.limit_exceeded,
        )
        yield _labelled_counter(
            MQTT_CONNECTIONS_CLOSED,
            "MQTT connections refused or closed by the listener's limits (capacity, packet size, stalls).",
            "reason",
            dict.fromkeys((r.value for r in GuardClose), 0) | s.guard_closed,
        )
        yield _counter(
            ALERT_SIGNALS_DROPPED,
            "Alert signals lost because the alert actor's mailbox was full.",
            s.alerts.signals_dropped,
        )
        yield _counter(ENERGY_READINGS, "Telemetry rows taken into energy per period.", s.energy.readings)
        yield _counter(
            ENERGY_READINGS_RECOMPUTED,
            "Of those, rows whose periods were recomputed from the table (late, out of order, first after a start).",
            s.energy.readings_recomputed,
        )
        yield _counter(
            ENERGY_PERIODS_WRITTEN, "Energy periods written or rewritten (late readings).", s.energy.periods_written
        )
        yield _counter(ENERGY_FAILURES, "Energy aggregation attempts that failed on storage.", s.energy.failures)
        yield _gauge(ENERGY_CURSOR, "The last telemetry rowid taken into energy per period.", s.energy.position)
        yield from _forwarder_metrics(s)
        yield from _command_metrics(s.commands)


def _forwarder_metrics(s: IngestStats) -> Iterable[Metric]:
    # Label `forwarder`: the node's fixed set of forwarders (influxdb, influxdb-energy, s3), enabled or not.
    now = time.time()
    fw = s.forwarders
    yield _labelled_gauge(
        FORWARD_ROWS_BEHIND,
        "Rows not forwarded yet (measured by the forwarder's monitor).",
        "forwarder",
        {n: f.rows_behind for n, f in fw.items()},
    )
    yield _labelled_gauge(
        FORWARD_BACKLOG_BYTES,
        "Estimated bytes of the rows not forwarded yet (the disk budget's measure).",
        "forwarder",
        {n: f.backlog_bytes for n, f in fw.items()},
    )
    yield _labelled_gauge(
        FORWARD_OLDEST_AGE,
        "Age of the oldest row not forwarded yet (0 when none is behind).",
        "forwarder",
        {n: 0.0 if f.oldest_unforwarded_at is None else max(0.0, now - f.oldest_unforwarded_at) for n, f in fw.items()},
    )
    yield _labelled_counter(
        FORWARD_BATCHES, "Batches the sink confirmed.", "forwarder", {n: f.batches for n, f in fw.items()}
    )
    yield _labelled_counter(FORWARD_ROWS, "Rows the sink confirmed.", "forwarder", {n: f.rows for n, f in fw.items()})
    yield _labelled_counter(
        FORWARD_FAILURES,
        "Attempts the sink did not confirm (retried).",
        "forwarder",
        {n: f.failures for n, f in fw.items()},
    )
    yield _labelled_counter(
        FORWARD_ROWS_DROPPED,
        "Unforwarded rows skipped by the disk budget's drop policy.",
        "forwarder",
        {n: f.rows_dropped for n, f in fw.items()},
    )
    yield _labelled_counter(
        RETENTION_DELETED,
        "Rows deleted by retention (raw_payloads: archived payloads emptied).",
        "table",
        s.retention_deleted,
    )


def _command_metrics(c: CommandStats) -> Iterable[Metric]:
    states = dict.fromkeys((st.value for st in CommandState), 0)
    yield _labelled_gauge(
        COMMANDS_PENDING,
        "Commands not final yet, by state (queued, sent).",
        "state",
        dict.fromkeys((CommandState.QUEUED.value, CommandState.SENT.value), 0) | c.pending,
    )
    yield _labelled_counter(
        COMMAND_TRANSITIONS,
        "Commands that entered each state (a resend is not counted).",
        "state",
        states | c.transitions,
    )
    yield _counter(COMMAND_RESENDS, "Commands sent again, with the same command_id, after no ack.", c.resends)
    yield _counter(COMMAND_EXPIRATIONS, "Commands that expired before they were acknowledged.", c.expirations)
    reasons = dict.fromkeys((IGNORED_UNKNOWN, IGNORED_OTHER_DEVICE, IGNORED_FINISHED), 0)
    yield _labelled_counter(
        COMMAND_ACKS_IGNORED,
        "Command acks ignored: unknown command, another device's, or already final.",
        "reason",
        reasons | c.acks_ignored,
    )
    yield _labelled_counter(
        COMMAND_ACKS_QUARANTINED, "Command acks quarantined as undecodable, by reason.", "reason", c.acks_quarantined
    )


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _labelled_counter(name: str, doc: str, label: str, values: Mapping[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def _labelled_gauge(name: str, doc: str, label: str, values: Mapping[str, float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def build_registry(stats: IngestStats) -> CollectorRegistry:
    """A fresh registry holding only the node's metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(IngestCollector(stats))
    return registry
