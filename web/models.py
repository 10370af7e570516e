"""The API's request and response models (pydantic, read by quart-schema for OpenAPI).

Times go out as RFC 3339 UTC strings in the node's one format (:func:`storage.contract.format_ts`)
and come in as RFC 3339 with an explicit offset; a time without one is ambiguous and refused.
The device-id rule is the contract's (:func:`storage.contract.is_valid_device_id`), not a copy.
This module does no I/O and raises nothing but validation errors.
"""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Final, Literal, Self

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    model_validator,
)

from actors.alerts import AlertRule, AlertState, Severity
from actors.stats import ForwarderStats
from storage.audit import AuditAction, AuditRecord, DetailValue
from storage.contract import DEVICE_ID_PATTERN, DeviceType, format_ts, is_valid_device_id
from storage.credentials import ApiKeyRow
from storage.reader import DeviceRow, EventItem, QuarantineItem, TelemetryItem
from storage.records import AlertRecord, DeviceStateRecord
from storage.validation import SUPPLY_LIMITS, SupplySystem

DEFAULT_PAGE: Final = 100
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)

# RFC 3339 §5.6 date-time. Stricter than pydantic, which also takes unix numbers and
# ISO 8601 shapes a client would not mean ("2026-11-23" alone, week dates).
_RFC3339: Final = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")


def _device_id(value: str) -> str:
    if not is_valid_device_id(value):
        msg = "not a valid device id"
        raise ValueError(msg)
    return value


def _rfc3339(value: object) -> object:
    if not isinstance(value, str) or _RFC3339.fullmatch(value) is None:
        msg = "must be an RFC 3339 date-time with an offset, e.g. 2026-11-23T16:05:00Z ('+' is %2B in a URL)"
        raise ValueError(msg)
    return value


DeviceId = Annotated[
    str, Field(pattern=DEVICE_ID_PATTERN, max_length=64, examples=["emu-4021-m1"]), AfterValidator(_device_id)
]
Rfc3339 = Annotated[AwareDatetime, BeforeValidator(_rfc3339)]
Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"}, examples=["2026-11-23T16:05:00.000Z"])]
Cursor = Annotated[str, Field(max_length=200, description="`next_cursor` of the previous page")]
Limit = Annotated[
    int,
    # le: the largest maximum a node has (WebServices.max_page may be lower, web.paging checks
    # that); without it the document would promise any size, and a client could not know.
    Field(ge=1, le=1000, description=f"page size, 1 to the node's maximum (1000); default {DEFAULT_PAGE}"),
]


def epoch_to_ts(seconds: float) -> str:
    return format_ts(datetime.fromtimestamp(seconds, UTC))


def ms_to_ts(ms: int) -> str:
    # Exact integer arithmetic: a float division would round some milliseconds down by one.
    return format_ts(_EPOCH + ms * _MS)


def ts_to_ms_ceil(value: datetime) -> int:
    """Epoch milliseconds, rounded up: readings are stored with millisecond resolution, so
    ``ts >= t`` and ``ts < t`` select the same readings as ``ts_ms >= ceil(t)``, ``< ceil(t)``."""
    return -((_EPOCH - value) // _MS)


# -- problems -----------------------------------------------------------------------------------


class Problem(BaseModel):
    """An RFC 9457 problem."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str


class FieldError(BaseModel):
    #: Where the error is: ``["body" | "query" | "header", field, ...]``.
    loc: list[str | int]
    msg: str
    #: pydantic's error type, e.g. ``string_pattern_mismatch``, ``missing``, ``extra_forbidden``.
    type: str


class ValidationProblem(Problem):
    """An RFC 9457 problem: the request was not valid; ``errors`` says where and why."""

    errors: list[FieldError]


class NoContent(BaseModel):
    """Done; no body."""


class RateLimited(Problem):
    """Too many requests: wait the number of seconds in `Retry-After`, then try again."""


class MetricsText(BaseModel):
    """Prometheus metrics in the text exposition format (OpenMetrics when the Accept header asks)."""


# -- devices ------------------------------------------------------------------------------------


def _supplies_of(device_type: str) -> list[JsonValue]:
    return [s.value for s, limits in SUPPLY_LIMITS.items() if limits.device_type == device_type]


#: The rule of ``DeviceCreate._supply_fits_type`` in the published schema too (JSON Schema
#: if/then), so that a client, or schemathesis, can tell a valid registration from the schema.
_SUPPLY_BY_TYPE: Final[dict[str, JsonValue]] = {
    "allOf": [
        {
            "if": {"properties": {"type": {"const": device_type}}, "required": ["type"]},
            "then": {"properties": {"supply": {"anyOf": [{"enum": _supplies_of(device_type)}, {"type": "null"}]}}},
        }
        for device_type in ("dc_meter", "ac_meter")
    ]
}


class DeviceCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_SUPPLY_BY_TYPE)

    device_id: DeviceId
    type: DeviceType
    name: str | None = Field(default=None, max_length=200)
    #: The supply system (nominal voltage) the meter runs on: its readings' voltage is checked
    #: against that system's EN 50163 range. Without it, against the widest range of its type.
    supply: SupplySystem | None = None

    @model_validator(mode="after")
    def _supply_fits_type(self) -> Self:
        if self.supply is not None and SUPPLY_LIMITS[self.supply].device_type != self.type:
            msg = f"supply {self.supply.value!r} is not a supply of a {self.type}"
            raise ValueError(msg)
        return self


class DeviceUpdate(BaseModel):
    """What may change in a registration: the supply system (null: none, the widest range)."""

    model_config = ConfigDict(extra="forbid")

    supply: SupplySystem | None


class Device(BaseModel):
    """A registered device."""

    device_id: str
    type: DeviceType
    name: str | None
    created_at: Timestamp
    revoked: bool
    #: A disabled device is refused at CONNECT until it is enabled again (same secret).
    disabled: bool = False
    #: null: registered without one (voltage checked against the widest range of its type).
    supply: SupplySystem | None = None

    @classmethod
    def from_row(cls, row: DeviceRow) -> Self:
        return cls(
            device_id=row.device_id,
            type=row.type,  # type: ignore[arg-type] # the schema's CHECK allows only DeviceType
            name=row.name,
            created_at=epoch_to_ts(row.created_at),
            revoked=row.revoked_at is not None,
            disabled=row.disabled_at is not None,
            supply=None if row.supply is None else SupplySystem(row.supply),
        )


class DeviceCreated(Device):
    """The device is registered. ``secret`` (its MQTT password) is shown this once only."""

    secret: str


class DeviceState(BaseModel):
    online: bool
    #: When the current connection began (null while offline).
    connected_since: Timestamp | None = None
    last_seen: Timestamp | None
    boot: int | None
    #: The highest ``seq`` seen in ``boot``.
    last_seq: int | None


class DeviceCounters(BaseModel):
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    missing: int = 0
    late: int = 0
    resets: int = 0
    quarantined: int = 0


class DeviceDetail(Device):
    """A device with its sequence state and counters (all zero before its first message)."""

    state: DeviceState
    counters: DeviceCounters

    @classmethod
    def from_records(cls, row: DeviceRow, record: DeviceStateRecord | None) -> Self:
        base = Device.from_row(row).model_dump()
        if record is None:
            return cls(
                **base,
                state=DeviceState(online=False, last_seen=None, boot=None, last_seq=None),
                counters=DeviceCounters(),
            )
        known = DeviceCounters.model_fields.keys()
        return cls(
            **base,
            state=DeviceState(
                online=record.online,
                connected_since=None if record.connected_since is None else epoch_to_ts(record.connected_since),
                last_seen=None if record.last_seen is None else epoch_to_ts(record.last_seen),
                boot=record.boot,
                last_seq=record.high if record.boot is not None else None,
            ),
            counters=DeviceCounters(**{k: v for k, v in record.counters.items() if k in known}),
        )


class DevicePage(BaseModel):
    """A page of devices ordered by id; ``next_cursor`` is null on the last page."""

    items: list[Device]
    next_cursor: str | None


class PageQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: Limit | None = None
    cursor: Cursor | None = None


# -- telemetry ----------------------------------------------------------------------------------


class TelemetryQuery(PageQuery):
    from_: Rfc3339 | None = Field(default=None, alias="from", description="readings at or after (device time)")
    to: Rfc3339 | None = Field(default=None, description="readings before (device time)")

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.from_ is not None and self.to is not None and self.from_ >= self.to:
            msg = "'from' must be before 'to'"
            raise ValueError(msg)
        return self


class TelemetryReading(BaseModel):
    boot: int
    seq: int
    #: Device time of the measurement.
    ts: Timestamp
    m: dict[str, float]
    #: WGS84 position (``lat``, ``lon``), null when the reading had none.
    loc: dict[str, float] | None

    @classmethod
    def from_item(cls, item: TelemetryItem) -> Self:
        return cls(boot=item.boot, seq=item.seq, ts=ms_to_ts(item.ts_ms), m=item.m, loc=item.loc)


class TelemetryPage(BaseModel):
    """Readings oldest (device time) first; ``next_cursor`` is null on the last page."""

    items: list[TelemetryReading]
    next_cursor: str | None


# -- quarantine ---------------------------------------------------------------------------------


class QuarantineQuery(PageQuery):
    device_id: DeviceId | None = None


class QuarantinedMessage(BaseModel):
    id: int
    device_id: str
    topic: str
    received_at: Timestamp
    #: Machine-readable, one of :class:`storage.contract.QuarantineReason`.
    reason: str
    detail: str
    #: The payload exactly as received, base64 (standard alphabet, padded).
    payload_base64: str

    @classmethod
    def from_item(cls, item: QuarantineItem) -> Self:
        return cls(
            id=item.id,
            device_id=item.device_id,
            topic=item.topic,
            received_at=epoch_to_ts(item.received_at),
            reason=item.reason,
            detail=item.detail,
            payload_base64=base64.b64encode(item.payload).decode("ascii"),
        )


class QuarantinePage(BaseModel):
    """Quarantined messages, newest first; ``next_cursor`` is null on the last page."""

    items: list[QuarantinedMessage]
    next_cursor: str | None


class DeviceEventOut(BaseModel):
    id: int
    at: Timestamp
    #: ``connected``, ``disconnected``, or ``will_published`` (just before its disconnect).
    event: Literal["connected", "disconnected", "will_published"]
    #: For a connect, the peer address; for a disconnect why: ``clean`` (DISCONNECT packet),
    #: ``connection_lost`` (socket closed without one), ``keepalive_expired``, ``revoked``,
    #: ``secret_rotated``, ``disabled``, ``credentials_changed``, ``closed_by_node``,
    #: ``node_stopping``, ``node_restart`` (the node stopped without recording it: a crash or a
    #: kill); for ``will_published`` the will's topic and payload.
    detail: str

    @classmethod
    def from_item(cls, item: EventItem) -> Self:
        return cls(id=item.id, at=epoch_to_ts(item.at), event=item.event, detail=item.detail)  # type: ignore[arg-type]


class DeviceEventPage(BaseModel):
    """A device's connection history, newest first; ``next_cursor`` is null on the last page."""

    items: list[DeviceEventOut]
    next_cursor: str | None


# -- alerts -------------------------------------------------------------------------------------


class AlertQuery(PageQuery):
    state: AlertState | None = None
    device_id: DeviceId | None = None
    rule: AlertRule | None = None


class Alert(BaseModel):
    """An alert: at most one per device and rule is not cleared at a time."""

    #: A ULID: sortable by when the alert was raised.
    alert_id: str
    device_id: str
    rule: AlertRule
    #: ``open`` → ``acknowledged`` (an operator) → ``cleared`` (the rule; also from ``open``).
    state: AlertState
    severity: Severity
    detail: str
    #: Occurrences while not cleared (denials, stale readings, quarantined messages, gaps opened).
    count: int
    raised_at: Timestamp
    last_seen_at: Timestamp
    acked_at: Timestamp | None
    #: The id of the API key that acknowledged it.
    acked_by: str | None
    cleared_at: Timestamp | None

    @classmethod
    def from_record(cls, r: AlertRecord) -> Self:
        return cls(
            alert_id=r.alert_id,
            device_id=r.device_id,
            rule=AlertRule(r.rule),
            state=AlertState(r.state),
            severity=Severity(r.severity),
            detail=r.detail,
            count=r.count,
            raised_at=epoch_to_ts(r.raised_at),
            last_seen_at=epoch_to_ts(r.last_seen_at),
            acked_at=None if r.acked_at is None else epoch_to_ts(r.acked_at),
            acked_by=r.acked_by,
            cleared_at=None if r.cleared_at is None else epoch_to_ts(r.cleared_at),
        )


class AlertPage(BaseModel):
    """Alerts, newest (last raised) first; ``next_cursor`` is null on the last page."""

    items: list[Alert]
    next_cursor: str | None


# -- health -------------------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ok"] = "ok"
    #: Component name → up.
    components: dict[str, bool]


class NotReady(Problem):
    """An RFC 9457 problem: the node is not ready; ``down`` names the components that are not up."""

    down: list[str]


# -- credentials, API keys, audit -----------------------------------------------------------------


class DeviceSecret(BaseModel):
    """The device's new MQTT password, shown this once; the old one no longer works."""

    device_id: str
    secret: str
    rotated_at: Timestamp


KeyRole = Literal["viewer", "operator", "admin"]


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: KeyRole
    #: What the key is for, e.g. "grafana" (never needed to use it).
    name: str | None = Field(default=None, max_length=200)


class ApiKey(BaseModel):
    """An API key as listed: never the key itself, which is shown only when it is created."""

    key_id: str
    role: KeyRole
    name: str | None
    created_at: Timestamp
    revoked: bool
    revoked_at: Timestamp | None

    @classmethod
    def from_row(cls, row: ApiKeyRow) -> Self:
        return cls(
            key_id=row.key_id,
            role=row.role,  # type: ignore[arg-type] # the schema's CHECK allows only these
            name=row.name,
            created_at=epoch_to_ts(row.created_at),
            revoked=row.revoked_at is not None,
            revoked_at=None if row.revoked_at is None else epoch_to_ts(row.revoked_at),
        )


class ApiKeyCreated(ApiKey):
    """The key is created. ``key`` (the bearer token) is shown this once only."""

    key: str


class ApiKeyPage(BaseModel):
    """API keys ordered by id, revoked ones included; ``next_cursor`` is null on the last page."""

    items: list[ApiKey]
    next_cursor: str | None


class AuditQuery(PageQuery):
    action: AuditAction | None = None
    #: A device id, API key id or alert id.
    target: str | None = Field(default=None, max_length=200)
    since: Rfc3339 | None = Field(default=None, description="entries at or after this time")


class AuditEntryOut(BaseModel):
    """One change: what (``action`` on ``target``), who (``actor``: an API key id or ``cli``,
    with its ``role``), when (``at``), and ``details`` (never a secret)."""

    id: int
    at: Timestamp
    action: AuditAction
    target: str
    actor: str
    role: str | None
    details: dict[str, DetailValue]

    @classmethod
    def from_record(cls, r: AuditRecord) -> Self:
        return cls(
            id=r.id,
            at=epoch_to_ts(r.at),
            action=AuditAction(r.action),
            target=r.target,
            actor=r.actor,
            role=r.role,
            details=r.details,
        )


class AuditPage(BaseModel):
    """The audit log, newest first; ``next_cursor`` is null on the last page."""

    items: list[AuditEntryOut]
    next_cursor: str | None


# -- forwarders ---------------------------------------------------------------------------------


class ForwarderStatus(BaseModel):
    """One forwarder (``influxdb``, ``influxdb-energy``, ``s3``): where it is, what is behind, how it went last.

    The backlog figures are measured every ``forward_monitor_interval_s`` (``checked_at``).
    """

    name: str
    enabled: bool
    #: The last rowid of its source that the sink confirmed; null until it has started.
    position: int | None
    rows_behind: int | None
    #: Estimated bytes of the unforwarded rows, against ``forward_backlog_budget_bytes``.
    backlog_bytes: int | None
    #: Age of the oldest unforwarded row (receipt time); null when nothing is behind.
    oldest_unforwarded_age_s: float | None
    batches_forwarded: int
    rows_forwarded: int
    #: Attempts that the sink did not confirm (each failed retry counts).
    failures: int
    #: Rows skipped by the disk budget's drop policy.
    rows_dropped: int
    last_success_at: Timestamp | None
    #: The sink's last error (HTTP status and message, never a secret); null after a success.
    last_error: str | None
    last_error_at: Timestamp | None
    checked_at: Timestamp | None

    @classmethod
    def from_stats(cls, name: str, s: ForwarderStats, now: float) -> Self:
        def ts(value: float | None) -> str | None:
            return None if value is None else epoch_to_ts(value)

        running = s.enabled and s.checked_at is not None
        oldest = s.oldest_unforwarded_at
        return cls(
            name=name,
            enabled=s.enabled,
            position=s.position,
            rows_behind=s.rows_behind if running else None,
            backlog_bytes=s.backlog_bytes if running else None,
            oldest_unforwarded_age_s=None if oldest is None else max(0.0, now - oldest),
            batches_forwarded=s.batches,
            rows_forwarded=s.rows,
            failures=s.failures,
            rows_dropped=s.rows_dropped,
            last_success_at=ts(s.last_success_at),
            last_error=s.last_error,
            last_error_at=ts(s.last_error_at),
            checked_at=ts(s.checked_at),
        )


class ForwarderList(BaseModel):
    """Every forwarder the node knows, enabled or not, by name."""

    items: list[ForwarderStatus]


# -- energy -------------------------------------------------------------------------------------

EnergyPeriodName = Literal["5m", "1h", "1d"]


class EnergyQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    from_: Rfc3339 | None = Field(
        default=None, alias="from", description="first period: the one holding this time (default: `to` minus a span)"
    )
    to: Rfc3339 | None = Field(default=None, description="periods that begin before this time (default: now)")
    period: EnergyPeriodName = Field(default="5m", description="period length, aligned to UTC")

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.from_ is not None and self.to is not None and self.from_ >= self.to:
            msg = "'from' must be before 'to'"
            raise ValueError(msg)
        return self


class _EnergyItemBase(BaseModel):
    start: Timestamp
    end: Timestamp
    #: Energy drawn from the supply (import register).
    consumed_kwh: float
    #: Energy fed back by regenerative braking (export register).
    regenerated_kwh: float
    #: Seconds of the period covered by counted readings.
    covered_s: float
    #: True only when readings cover the whole period and nothing in it is uncertain (no
    #: sequence gap, reboot, decreasing register or readings more than 5 minutes apart).
    complete: bool


class EnergyItem(_EnergyItemBase):
    """The energy of a DC meter in one period."""


class AcEnergyItem(_EnergyItemBase):
    """The energy of an AC meter in one period, with reactive energy (null when its readings
    had no reactive registers)."""

    reactive_import_kvarh: float | None
    reactive_export_kvarh: float | None


class EnergyPage(BaseModel):
    """Every period of the range, oldest first; a period without readings is 0 and incomplete."""

    device_id: str
    period: EnergyPeriodName
    items: list[AcEnergyItem] | list[EnergyItem]
