"""Records that travel from the actors to the store: plain data, no behaviour, no I/O.

A :class:`DeviceBatch` is everything one device actor produced from one drained batch of
its mailbox; the storage writer commits many of them in one transaction (group commit).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from storage.contract import QuarantineReason


class TelemetryRow(NamedTuple):
    """One stored reading. A named tuple, not a frozen dataclass: one is built per reading on
    the batch path, and a frozen dataclass's ``__init__`` costs three times as much."""

    boot: int
    seq: int
    ts_ms: int
    #: The ``m`` object as compact JSON (typed fields only; unknown fields stay in the raw payload).
    m_json: str
    loc_json: str | None


@dataclass(frozen=True, slots=True)
class QuarantineRow:
    reason: QuarantineReason
    detail: str


@dataclass(slots=True)
class RawMessage:
    """One PUBLISH as received, with what became of it."""

    topic: str
    received_at: float
    payload: bytes
    telemetry: list[TelemetryRow] = field(default_factory=list)
    quarantine: list[QuarantineRow] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class DeviceStateRecord:
    """The persisted state of one device's sequence tracker and liveness."""

    device_id: str
    boot: int | None
    low: int
    high: int
    gaps: tuple[tuple[int, int], ...]
    counters: dict[str, int]
    last_seen: float | None
    online: bool
    connected_since: float | None = None


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    """A change of a device's connection state, kept as its history."""

    at: float
    #: ``connected`` or ``disconnected``.
    event: str
    #: Why: for a disconnect ``clean``, ``connection_lost``, ``keepalive_expired``, ``revoked``,
    #: ``taken_over``, ``node_stopping``…; for a connect the remote address.
    detail: str


@dataclass(slots=True)
class DeviceBatch:
    device_id: str
    #: Messages whose payload is archived (accepted or quarantined; duplicates are not).
    messages: list[RawMessage]
    #: The device's state after the whole batch; written in the same transaction.
    state: DeviceStateRecord
    events: list[DeviceEvent] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class AlertRecord:
    """One alert as stored. Times are epoch seconds; ``rule``, ``state`` and ``severity`` are
    the values of :mod:`actors.alerts`' enums (storage does not import the actors)."""

    alert_id: str
    device_id: str
    rule: str
    state: str
    severity: str
    detail: str
    count: int
    raised_at: float
    last_seen_at: float
    acked_at: float | None = None
    acked_by: str | None = None
    cleared_at: float | None = None


@dataclass(frozen=True, slots=True)
class AlertWrite:
    """What the alert actor knows of one alert, written as an upsert: inserted ``open`` when
    new, else its ``detail``, ``count`` and ``last_seen_at`` are set (never its state or ack).
    With ``cleared_at`` it is then cleared, whether it was open or acknowledged.

    The values are absolute, not increments, so writing the same record twice (a retry after a
    failed transaction) is harmless.
    """

    alert_id: str
    device_id: str
    rule: str
    severity: str
    detail: str
    count: int
    raised_at: float
    last_seen_at: float
    cleared_at: float | None = None


@dataclass(frozen=True, slots=True)
class CommandHistoryEntry:
    """One state a command entered, and when (epoch seconds)."""

    state: str
    at: float
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class CommandRecord:
    """One command as stored; ``state`` is a :class:`storage.command_contract.CommandState` value."""

    command_id: str
    device_id: str
    name: str
    args: dict[str, Any]
    state: str
    created_at: float
    expires_at: float
    attempts: int = 0
    last_sent_at: float | None = None
    created_by: str | None = None
    idempotency_key: str | None = None
    #: Filled by the read side only (the command actor does not keep histories in memory).
    history: tuple[CommandHistoryEntry, ...] = ()


@dataclass(frozen=True, slots=True)
class NewCommand:
    """A command to insert ``queued``; *request* is the canonical JSON of what the caller asked,
    compared when the same idempotency key comes again."""

    command_id: str
    device_id: str
    name: str
    args: dict[str, Any]
    created_at: float
    expires_at: float
    request: str
    created_by: str | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True, slots=True)
class CommandChange:
    """A command entered *state* (a resend enters ``sent`` again): the row is updated to these
    values and one history entry is added. Applied in order, in one transaction per batch."""

    command_id: str
    state: str
    at: float
    attempts: int
    last_sent_at: float | None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class QuarantinedAck:
    """A command acknowledgement that could not be decoded, kept with its raw payload."""

    device_id: str
    topic: str
    received_at: float
    payload: bytes
    reason: QuarantineReason
    detail: str


# -- forwarding ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TelemetryOut:
    """A stored reading as the InfluxDB forwarder sends it."""

    id: int
    device_id: str
    #: ``dc_meter`` / ``ac_meter`` (from the device's registration).
    device_type: str
    boot: int
    seq: int
    ts_ms: int
    m: dict[str, float]


@dataclass(frozen=True, slots=True)
class RawOut:
    """An archived PUBLISH as the S3 forwarder sends it."""

    id: int
    device_id: str
    topic: str
    #: Node time of receipt, epoch seconds (device time may be anything; receipt time is not).
    received_at: float
    payload: bytes
    #: ``(reason, detail)`` of each reading or message of it that was quarantined; empty when
    #: everything in it was accepted.
    quarantine: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Backlog:
    """What a consumer has not consumed yet."""

    #: Rows after the cursor (exact: rowids above a cursor are never deleted or skipped).
    rows: int
    #: Estimated bytes those rows take: ``rows`` times the mean size of the newest rows.
    bytes: int
    #: Receipt time (epoch seconds) of the oldest row after the cursor; None when there is none.
    oldest_at: float | None
    #: The newest rowid of the source (0 when it is empty).
    newest_id: int


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """Which consumers guard each source; built by the node from its settings."""

    #: Enabled forwarders per source: their marks decide when a row was forwarded.
    forwarders: Mapping[str, frozenset[str]]
    #: Known consumers that are switched off: their cursors do not guard.
    disabled: frozenset[str] = frozenset()
    #: Enabled non-forwarding consumers per source that guard even before they have a cursor.
    required: Mapping[str, frozenset[str]] = field(default_factory=dict)
    #: Enabled forwarders of ``energy_periods`` (by ``rev``): a period above any of their cursors
    #: has not been sent and is never deleted.
    energy_forwarders: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class HistoryCutoffs:
    """Rows of the history tables older than these go (None: that table is kept forever).
    Times are epoch seconds, except ``energy_before_ms`` (period start, epoch milliseconds)."""

    audit_before: float | None = None
    #: Connection events, cleared alerts, finished commands with their history.
    history_before: float | None = None
    energy_before_ms: int | None = None


@dataclass(slots=True)
class PruneResult:
    """Rows changed by one step: table name → rows (``raw_payloads``: payloads emptied)."""

    changed: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.changed.values())


class EnergyReading(NamedTuple):
    """The energy registers of one stored reading: what the energy aggregator works from. A
    named tuple: the aggregator builds one per telemetry row (see :class:`TelemetryRow`)."""

    boot: int
    seq: int
    ts_ms: int
    import_kwh: float
    export_kwh: float
    #: AC meters only; None when the reading has no reactive registers.
    reactive_import_kvarh: float | None = None
    reactive_export_kvarh: float | None = None


@dataclass(frozen=True, slots=True)
class EnergyPeriod:
    """The energy of one device in one 5-minute period (``docs/energy.md``).

    ``complete`` is true only when readings cover the whole period (``covered_ms``) and no
    uncertain interval (a sequence gap, readings more than a period apart, a missing reactive
    register) was used in it. Reactive sums are None when no interval with reactive registers
    touched the period.
    """

    start_ms: int
    consumed_kwh: float
    regenerated_kwh: float
    reactive_import_kvarh: float | None
    reactive_export_kvarh: float | None
    covered_ms: int
    complete: bool


class EnergyInput(NamedTuple):
    """A telemetry row the energy aggregator has not seen yet: its rowid (the cursor), device and registers."""

    rowid: int
    device_id: str
    reading: EnergyReading


@dataclass(frozen=True, slots=True)
class EnergyNeighbours:
    """The ``seq`` neighbours of a reading within its boot: now, and among the rows up to the
    aggregator's previous cursor position (before the batch being processed arrived)."""

    pred: EnergyReading | None
    succ: EnergyReading | None
    old_pred: EnergyReading | None
    old_succ: EnergyReading | None


@dataclass(frozen=True, slots=True)
class EnergyHead:
    """Where a device's readings end, for the energy aggregator's memory of it."""

    #: The device's last reading in ``(boot, seq)`` order.
    tip: EnergyReading
    #: The latest device time among its readings from the start of the tip's period on
    #: (usually the tip's own; later when a clock went back).
    last_ts_ms: int
