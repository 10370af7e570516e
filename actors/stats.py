"""Plain counters the actors bump; ``web.metrics`` turns them into Prometheus metrics.

Actors never touch prometheus_client: a bump here is one integer add, no label lookup, and
the metric names live in one place (``web/metrics.py``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class GuardClose(enum.StrEnum):
    """Why the MQTT listener's limits (node.guard) refused or closed a connection."""

    #: Over ``max_connections``: answered with CONNACK 3 (server unavailable).
    CAPACITY = "capacity"
    #: A packet over ``max_packet_bytes`` (or a CONNECT over its own, smaller limit).
    PACKET_TOO_LARGE = "packet_too_large"
    #: A malformed remaining length, a reserved packet type, or a first packet that is not a
    #: CONNECT (MQTT-3.1.0-1).
    MALFORMED = "malformed"
    #: No whole CONNECT, or a begun packet not finished, within ``mqtt_packet_timeout_s``.
    PACKET_TIMEOUT = "packet_timeout"


@dataclass(slots=True)
class AlertStats:
    """What :class:`actors.alerts.AlertActor` counts. Keys are :class:`actors.alerts.AlertRule`
    values, a closed set, so they are safe as metric labels."""

    #: Alerts not cleared (state ``open`` or ``acknowledged``), per rule.
    open: dict[str, int] = field(default_factory=dict)
    #: Alerts raised (new rows; a repeat of an open alert is not counted again), per rule.
    raised: dict[str, int] = field(default_factory=dict)
    #: Signals lost because the alert actor's mailbox was full or closed.
    signals_dropped: int = 0


@dataclass(slots=True)
class CommandStats:
    """What :class:`actors.commands.CommandActor` counts. Keys are command states, ack statuses
    and quarantine reasons: closed sets, safe as metric labels."""

    #: Commands not final, by state (``queued``, ``sent``).
    pending: dict[str, int] = field(default_factory=dict)
    #: Commands that entered each state (a resend does not enter ``sent`` again).
    transitions: dict[str, int] = field(default_factory=dict)
    resends: int = 0
    expirations: int = 0
    #: Acks ignored, by why: ``unknown`` command, ``other_device``'s command, ``finished`` already.
    acks_ignored: dict[str, int] = field(default_factory=dict)
    #: Acks that could not be decoded, by quarantine reason.
    acks_quarantined: dict[str, int] = field(default_factory=dict)
    #: Connect/subscribe hints lost to a full mailbox (the periodic sweep makes up for them).
    hints_dropped: int = 0

    def count(self, state: str) -> None:
        self.transitions[state] = self.transitions.get(state, 0) + 1

    def count_quarantined(self, reason: str) -> None:
        self.acks_quarantined[reason] = self.acks_quarantined.get(reason, 0) + 1


class ForwarderStats:
    """What one forwarder (:class:`actors.forwarder.Forwarder`) reports; read by ``/metrics`` and
    ``GET /api/v1/forwarders``. Times are wall-clock epoch seconds."""

    enabled: bool = False
    #: The last rowid the sink confirmed (None until the forwarder has started).
    position: int | None = None
    rows_behind: int = 0
    #: Estimated size of the unforwarded rows (see :class:`storage.outbox.Backlog`).
    backlog_bytes: int = 0
    #: Receipt time of the oldest unforwarded row; None when nothing is behind.
    oldest_unforwarded_at: float | None = None
    #: When the backlog was last measured.
    checked_at: float | None = None
    batches: int = 0
    rows: int = 0
    #: Attempts the sink failed (each retry that failed counts).
    failures: int = 0
    #: Rows skipped unforwarded by the disk budget's drop policy.
    rows_dropped: int = 0
    last_success_at: float | None = None
    #: The sink's last error, without secrets; cleared by the next success.
    last_error: str | None = None
    last_error_at: float | None = None


class EnergyStats:
    """What :class:`actors.energy_aggregator.EnergyAggregator` counts."""

    #: The last telemetry rowid aggregated (the ``energy`` cursor).
    position: int = 0
    readings: int = 0
    #: Of those, rows whose periods were recomputed from the table (late or out-of-order
    #: readings, a clock that went back, a device's first rows after a start), not extended in memory.
    readings_recomputed: int = 0
    batches: int = 0
    #: Period rows inserted or changed (a late reading changes periods already written).
    periods_written: int = 0
    #: Storage errors the aggregator retried after.
    failures: int = 0


@dataclass(slots=True)
class IngestStats:
    publishes: int = 0
    readings_stored: int = 0
    readings_duplicate: int = 0
    readings_late: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    commits: int = 0
    commit_rows: int = 0
    commit_seconds: float = 0.0
    commit_failures: int = 0
    actor_restarts: int = 0
    actors_started: int = 0
    actors_retired: int = 0
    devices_parked: int = 0
    active_actors: int = 0
    auth_refused: dict[str, int] = field(default_factory=dict)
    acl_denied: dict[str, int] = field(default_factory=dict)
    connections: int = 0
    #: PUBLISHes over a device's messages/s or bytes/s limit, by limit (actors.limits.LimitKind).
    limit_exceeded: dict[str, int] = field(default_factory=dict)
    #: MQTT connections closed or refused by the listener's limits, by reason (node.guard).
    guard_closed: dict[str, int] = field(default_factory=dict)
    alerts: AlertStats = field(default_factory=AlertStats)
    commands: CommandStats = field(default_factory=CommandStats)
    #: Forwarder name ("influxdb", "influxdb-energy", "s3") → its stats; every known forwarder, enabled or not.
    forwarders: dict[str, ForwarderStats] = field(default_factory=dict)
    #: Rows deleted by retention, per table (``raw_payloads``: payloads emptied).
    retention_deleted: dict[str, int] = field(default_factory=dict)
    energy: EnergyStats = field(default_factory=EnergyStats)

    def count_quarantine(self, reason: str) -> None:
        self.quarantined[reason] = self.quarantined.get(reason, 0) + 1

    def count_refusal(self, reason: str) -> None:
        self.auth_refused[reason] = self.auth_refused.get(reason, 0) + 1

    def count_denial(self, action: str) -> None:
        self.acl_denied[action] = self.acl_denied.get(action, 0) + 1

    def count_limit(self, limit: str) -> None:
        self.limit_exceeded[limit] = self.limit_exceeded.get(limit, 0) + 1

    def count_guard_close(self, reason: str) -> None:
        self.guard_closed[reason] = self.guard_closed.get(reason, 0) + 1
