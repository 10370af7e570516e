"""The forwarders and retention in the node: built from the settings, supervised, out of ingest's way.

:func:`build_forwarding` checks the settings (a :class:`ConfigError` names what is missing) and
opens the outbox's own SQLite connections; :func:`run_forwarding` runs each enabled forwarder
and the retention actor under its own supervisor in the root task group. They only read
committed rows and write their cursors in short transactions of their own, so the node stops
them by cancelling them, at any point: what was not confirmed is sent again by the next run.

With ``energy_enabled`` as well, the InfluxDB forwarder has a second stream, ``influxdb-energy``:
the energy periods (``energy_periods``, cursor position = the last ``rev`` sent) as the
``energy`` measurement, to the same bucket, with its own cursor, retries, backlog, status and
metrics. A period that changes (a late reading) is sent again and overwrites its point.

Retention also deletes old history by age (audit log, connection events, cleared alerts,
finished commands, energy periods: ``*_retention_days``), so it runs on every node whose
settings do not keep all of that forever, forwarders or not.

A forwarder or retention that crashes past its restart limit stays down (logged) and ingest goes
on, like the alert actor. Both forwarders are off unless enabled: a node with no forwarder and
every ``*_retention_days`` at 0 opens no connection and starts no task here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import anyio
import stamina

from actors.alerts import AlertSink
from actors.forwarder import Forwarder, ForwarderConfig
from actors.retention import RetentionActor, RetentionConfig
from actors.stats import ForwarderStats, IngestStats
from actors.supervisor import Restart, RestartIntensityExceeded, RestartPolicy, supervise
from node.config import Settings
from storage.energy import CURSOR_NAME as ENERGY_CURSOR
from storage.errors import ConfigError
from storage.influx_sink import InfluxSink, energy_change_line, to_line
from storage.interfaces import Forwardable, ForwardSource
from storage.outbox import EnergySource, Outbox, RawSource, TelemetrySource
from storage.records import RetentionPolicy
from storage.retention import RetentionStore
from storage.s3_sink import S3Sink

log = logging.getLogger(__name__)

INFLUXDB: Final = "influxdb"
#: The InfluxDB forwarder's energy stream: on when both ``influxdb_enabled`` and ``energy_enabled``.
INFLUXDB_ENERGY: Final = "influxdb-energy"
S3: Final = "s3"
#: Every forwarder the node knows, enabled or not (``GET /api/v1/forwarders`` lists them all).
FORWARDERS: Final = (INFLUXDB, INFLUXDB_ENERGY, S3)

RESTART_POLICY: Final = RestartPolicy(
    restart=Restart.TRANSIENT, max_restarts=10, period=300.0, backoff_initial=1.0, backoff_max=60.0
)

type Child = Callable[[], Awaitable[None]]


@dataclass(slots=True)
class Forwarding:
    """What :func:`run_forwarding` runs. Its SQLite connections are opened by the children when
    they first run and closed when :func:`run_forwarding` ends."""

    db: Path
    children: dict[str, Child] = field(default_factory=dict)
    outbox: Outbox | None = None
    retention: RetentionStore | None = None

    def open_outbox(self) -> Outbox:
        if self.outbox is None:
            self.outbox = Outbox(self.db)
        return self.outbox

    def open_retention(self) -> RetentionStore:
        if self.retention is None:
            self.retention = RetentionStore(self.db)
        return self.retention

    def close(self) -> None:
        if self.outbox is not None:
            self.outbox.close()
            self.outbox = None
        if self.retention is not None:
            self.retention.close()
            self.retention = None


def _required(settings: Settings, *names: str) -> None:
    for name in names:
        if getattr(settings, name) in (None, ""):
            enabled = "influxdb_enabled" if name.startswith("influxdb") else "s3_enabled"
            raise ConfigError(name, f"required when {enabled} is true")


def check_forwarding(settings: Settings) -> None:
    """Raise :class:`ConfigError` naming the first setting an enabled forwarder lacks."""
    if settings.influxdb_enabled:
        _required(settings, "influxdb_url", "influxdb_org", "influxdb_bucket")
        if not settings.influxdb_url or not settings.influxdb_url.startswith(("http://", "https://")):
            raise ConfigError("influxdb_url", "must be an http:// or https:// URL")
        influx_token(settings)
    if settings.s3_enabled:
        _required(settings, "s3_bucket")
        if settings.s3_endpoint_url is not None and not settings.s3_endpoint_url.startswith(("http://", "https://")):
            raise ConfigError("s3_endpoint_url", "must be an http:// or https:// URL")
        if (settings.s3_access_key_id is None) != (settings.s3_secret_access_key is None):
            raise ConfigError("s3_secret_access_key", "s3_access_key_id and s3_secret_access_key go together")


def influx_token(settings: Settings) -> str:
    """The InfluxDB token from ``influxdb_token`` (env) or ``influxdb_token_file``; never logged."""
    if settings.influxdb_token is not None and settings.influxdb_token.get_secret_value():
        return settings.influxdb_token.get_secret_value()
    path = settings.influxdb_token_file
    if path is None:
        raise ConfigError("influxdb_token", "required when influxdb_enabled is true (or influxdb_token_file)")
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            "influxdb_token_file", f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    if not token:
        raise ConfigError("influxdb_token_file", f"{path} is empty")
    return token


def forwarder_config(settings: Settings, name: str, batch_rows: int) -> ForwarderConfig:
    return ForwarderConfig(
        name=name,
        batch_rows=batch_rows,
        poll_interval=settings.forward_poll_interval_s,
        rate_limit=settings.forward_rate_limit_rows_s,
        retry_initial=settings.forward_retry_initial_s,
        retry_max=settings.forward_retry_max_s,
        monitor_interval=settings.forward_monitor_interval_s,
        budget_bytes=settings.forward_backlog_budget_bytes,
        warn_fraction=settings.forward_backlog_warn_fraction,
        drop_oldest=settings.forward_backlog_drop == "oldest",
    )


def build_forwarding(
    settings: Settings,
    db: Path,
    stats: IngestStats,
    alerts: AlertSink | None,
    *,
    clock: Callable[[], float] = time.time,
) -> Forwarding:
    """Build what is enabled (nothing runs yet); raises :class:`ConfigError` like :func:`check_forwarding`."""
    check_forwarding(settings)
    # The forwarders log and count each retry themselves (actors.forwarder); stamina's own hooks
    # would log it twice and count it in prometheus_client's global registry, which the node
    # never exposes.
    stamina.instrumentation.set_on_retry_hooks([])
    for name in FORWARDERS:
        stats.forwarders.setdefault(name, ForwarderStats())
    fw = Forwarding(db=db)
    if settings.influxdb_enabled:
        fw.children[INFLUXDB] = _influx_child(
            settings, fw, stats.forwarders[INFLUXDB], alerts, name=INFLUXDB, source=TelemetrySource, line=to_line
        )
        if settings.energy_enabled:
            fw.children[INFLUXDB_ENERGY] = _influx_child(
                settings,
                fw,
                stats.forwarders[INFLUXDB_ENERGY],
                alerts,
                name=INFLUXDB_ENERGY,
                source=EnergySource,
                line=energy_change_line,
            )
    if settings.s3_enabled:
        fw.children[S3] = _s3_child(settings, fw, stats.forwarders[S3], alerts, clock)
    retention_config = RetentionConfig(
        days=settings.retention_days,
        interval=settings.retention_interval_s,
        batch_rows=settings.retention_batch_rows,
        audit_days=settings.audit_retention_days,
        history_days=settings.history_retention_days,
        energy_days=settings.energy_retention_days,
    )
    if not fw.children and retention_config.keeps_history:
        return fw
    policy = retention_policy(settings)

    async def run_retention() -> None:
        await RetentionActor(fw.open_retention(), policy, retention_config, stats.retention_deleted, clock=clock).run()

    fw.children["retention"] = run_retention
    return fw


def _influx_child[T: Forwardable](
    settings: Settings,
    fw: Forwarding,
    stats: ForwarderStats,
    alerts: AlertSink | None,
    *,
    name: str,
    source: Callable[[Outbox, str], ForwardSource[T]],
    line: Callable[[T], str],
) -> Child:
    """A stream of the InfluxDB forwarder: readings (``influxdb``) or energy periods (``influxdb-energy``)."""
    token = influx_token(settings)
    config = forwarder_config(settings, name, settings.influxdb_batch_rows)

    async def run() -> None:
        async with InfluxSink(
            settings.influxdb_url or "",
            settings.influxdb_org or "",
            settings.influxdb_bucket or "",
            token,
            timeout_s=settings.influxdb_timeout_s,
            gzip=settings.influxdb_gzip,
            line=line,
        ) as sink:
            await Forwarder(source(fw.open_outbox(), name), sink, config, stats, alerts=alerts).run()

    return run


def _s3_child(
    settings: Settings, fw: Forwarding, stats: ForwarderStats, alerts: AlertSink | None, clock: Callable[[], float]
) -> Child:
    secret = settings.s3_secret_access_key
    config = forwarder_config(settings, S3, settings.s3_batch_rows)

    async def run() -> None:
        source = RawSource(fw.open_outbox(), S3, window=settings.s3_window_s, grace=settings.s3_grace_s, clock=clock)
        async with S3Sink(
            bucket=settings.s3_bucket or "",
            prefix=settings.s3_prefix,
            window=settings.s3_window_s,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            path_style=settings.s3_path_style,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=None if secret is None else secret.get_secret_value(),
            timeout_s=settings.s3_timeout_s,
        ) as sink:
            await Forwarder(source, sink, config, stats, alerts=alerts).run()

    return run


def retention_policy(settings: Settings) -> RetentionPolicy:
    """Who guards which source (the rule: :mod:`storage.retention`).

    The energy aggregator (cursor ``energy`` on telemetry) guards through its cursor row; while
    ``energy_enabled`` it is in ``required`` too, so that it guards before its first cursor
    write (a fresh node, or one that had energy off), and when switched off in ``disabled``, so
    that a cursor it left behind does not hold telemetry forever. The energy stream's cursor
    (``influxdb-energy``) guards ``energy_periods`` (deleted by age) while that stream runs.
    """
    enabled = {
        INFLUXDB: settings.influxdb_enabled,
        INFLUXDB_ENERGY: settings.influxdb_enabled and settings.energy_enabled,
        S3: settings.s3_enabled,
        ENERGY_CURSOR: settings.energy_enabled,
    }
    return RetentionPolicy(
        forwarders={
            "telemetry": frozenset({INFLUXDB}) if settings.influxdb_enabled else frozenset(),
            "raw_messages": frozenset({S3}) if settings.s3_enabled else frozenset(),
        },
        disabled=frozenset(name for name, on in enabled.items() if not on),
        required={"telemetry": frozenset({ENERGY_CURSOR})} if settings.energy_enabled else {},
        energy_forwarders=frozenset({INFLUXDB_ENERGY}) if enabled[INFLUXDB_ENERGY] else frozenset(),
    )


async def run_forwarding(fw: Forwarding) -> None:
    """Run every child of *fw* under its own supervisor until cancelled."""
    try:
        async with anyio.create_task_group() as tg:
            for name, child in fw.children.items():
                tg.start_soon(_supervised, name, child, name=f"forwarding[{name}]")
    finally:
        # Every child has ended: a query in a worker thread is waited for, never abandoned.
        fw.close()


async def _supervised(name: str, child: Child) -> None:
    try:
        await supervise(f"forwarding[{name}]", child, RESTART_POLICY)
    except RestartIntensityExceeded:
        log.exception("%s crashed too often; it stays down until the node restarts (ingest goes on)", name)
