"""Configuration: one path from a TOML file and ``DEPOT_NODE_*`` environment variables to a
typed, validated :class:`Settings`.

Precedence: CLI flags > environment > file > defaults. Every default is safe on a laptop:
data under ``./data``, MQTT on 127.0.0.1:1883, HTTP on 127.0.0.1:8080. A bad value stops the
node at start with a :class:`ConfigError` that names the setting.
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import AfterValidator, Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from actors.alerts import AlertRule
from storage.contract import PUBLISH_KINDS, topic_for
from storage.errors import ConfigError

#: What a QoS 1 PUBLISH's remaining length holds besides its payload, at most: the topic's
#: length prefix, the longest topic a device may publish to (a 64-character id) and the packet id.
PUBLISH_OVERHEAD_BYTES: Final = 2 + max(len(topic_for("x" * 64, kind).encode()) for kind in PUBLISH_KINDS) + 2


def _check_bind(value: str) -> str:
    parse_bind(value)
    return value


def parse_bind(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:1883`` for IPv6) → ``(host, port)``; raises ValueError."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        msg = f"expected HOST:PORT, got {value!r}"
        raise ValueError(msg)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:  # noqa: PLR2004
        msg = f"port must be a number from 0 to 65535, got {port_text!r}"
        raise ValueError(msg)
    return host, int(port_text)


Bind = Annotated[str, AfterValidator(_check_bind)]

#: Room for a PUBLISH's topic and packet id around a payload of max_payload_bytes: a device's
#: longest topic is 83 characters.
_PUBLISH_OVERHEAD = 1024


class Settings(BaseSettings):
    """Every setting of the node. Environment: ``DEPOT_NODE_<NAME>`` (e.g. ``DEPOT_NODE_MQTT_BIND``).

    Alerting is ``alerts_enabled`` plus the ``alert_*`` rules and thresholds below; what each
    rule raises and clears is tabled in :mod:`actors.alerts`.
    """

    model_config = SettingsConfigDict(env_prefix="DEPOT_NODE_", extra="forbid", frozen=True)

    data_dir: Path = Path("data")
    mqtt_bind: Bind = "127.0.0.1:1883"
    http_bind: Bind = "127.0.0.1:8080"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    #: ``FULL`` survives power loss; ``NORMAL`` only a crash of the process (fewer fsyncs).
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL"
    max_payload_bytes: int = Field(default=16 * 1024, ge=256, le=256 * 1024 * 1024)
    #: Limit of a batched telemetry payload (up to 1,000 readings); a single reading keeps
    #: ``max_payload_bytes``.
    max_batch_payload_bytes: int = Field(default=512 * 1024, ge=256, le=256 * 1024 * 1024)
    #: A reading whose device time is further ahead of the node's clock is quarantined.
    telemetry_max_future_skew_s: float = Field(default=300.0, ge=0)
    max_connections: int = Field(default=0, ge=0, description="0 means unlimited")
    #: The broker's fast path (node/fastpath.py, ADR 0012); false falls back to amqtt's reader.
    broker_fast_path: bool = True
    #: The event loop ``serve`` runs on: asyncio's own, or uvloop (ADR 0012, docs/benchmarks.md).
    event_loop: Literal["asyncio", "uvloop"] = "asyncio"
    #: The garbage collector's first threshold for ``serve`` (0 keeps Python's default, 2000);
    #: see node.cli.tune_gc.
    gc_gen0_threshold: int = Field(default=10_000, ge=0, le=10_000_000)
    #: How long ``serve``'s threads may hold the GIL while another waits for it, in ms (0 keeps
    #: Python's default, 5 ms); see node.cli.tune_gil.
    gil_switch_interval_ms: float = Field(default=1.0, ge=0, le=100)
    device_mailbox: int = Field(default=1024, ge=1, le=1_000_000)
    device_idle_timeout_s: float = Field(default=300.0, gt=0)
    #: Close a session that sent no PUBLISH or PINGREQ for this long (0 = never). A backstop
    #: for clients with keep-alive 0; devices with a keep-alive are closed at 1.5 x it anyway.
    device_inactivity_timeout_s: float = Field(default=900.0, ge=0)
    writer_max_group: int = Field(default=512, ge=1, le=100_000)
    #: Concurrent Argon2 verifications (each ~20 ms CPU and 19 MiB): a reconnect storm queues.
    auth_concurrency: int = Field(default=2, ge=1, le=64)
    #: CONNECT set-ups (authentication to CONNACK and session start) running at once; a
    #: reconnect storm's other CONNECTs wait in order, so connected devices' telemetry does
    #: not wait behind a thousand set-ups (node.broker, ADR 0014).
    mqtt_connect_concurrency: int = Field(default=8, ge=1, le=10_000)
    #: Close a device's session when it publishes where its ACL forbids.
    disconnect_on_acl_denial: bool = False
    #: ``/metrics`` answers only with an API key (any role, viewer or higher).
    metrics_require_key: bool = False
    # Alerts (see actors/alerts.py for each rule's raise and clear):
    #: Run the alert rules at all; off, nothing raises or clears alerts (the API still lists them).
    alerts_enabled: bool = True
    #: Rules to leave off, e.g. ``["acl_denial"]`` (env: a JSON list). Their uncleared alerts clear.
    alert_rules_disabled: frozenset[AlertRule] = frozenset()
    #: device_offline: raised when a link died (connection_lost, keepalive_expired, inactive) and
    #: the device has not reconnected for this long (0 = at once); cleared on reconnect.
    alert_offline_grace_s: float = Field(default=60.0, ge=0)
    #: sequence_gap: raised when this many readings are missing in the current boot's open gaps;
    #: cleared when none is missing any more or the device reboots.
    alert_gap_min_missing: int = Field(default=1, ge=1)
    #: quarantine_burst: raised at this many quarantined messages of one device within
    #: ``alert_quarantine_window_s``; cleared after a whole window without one.
    alert_quarantine_burst: int = Field(default=10, ge=1)
    alert_quarantine_window_s: float = Field(default=60.0, gt=0)
    #: acl_denial: cleared after this long without a denial (0 = never).
    alert_acl_clear_after_s: float = Field(default=3600.0, ge=0)
    #: stale_boot: cleared after this long without a stale reading (0, the default = never:
    #: the quarantined readings need someone to look at them).
    alert_stale_boot_clear_after_s: float = Field(default=0.0, ge=0)
    #: implausible_value: cleared after this long without an implausible reading (0 = never).
    alert_implausible_clear_after_s: float = Field(default=3600.0, ge=0)
    # Commands (see actors/commands.py for the timing rules):
    #: A sent command with no ack for this long is sent again (same command_id)…
    command_ack_timeout_s: float = Field(default=30.0, gt=0, le=86400)
    #: …up to this many deliveries in all; then it waits for its ack or its expiry.
    command_max_attempts: int = Field(default=5, ge=1, le=100)
    #: The longest ``ttl_s`` a command may ask for.
    command_max_ttl_s: int = Field(default=7 * 86400, ge=1, le=365 * 86400)

    # TLS (node/tls.py; production set-up in docs/security.md):
    #: The TLS MQTT listener. Setting ``mqtts_bind`` (file, env or --mqtts-bind) turns it on.
    mqtts_enabled: bool = False
    mqtts_bind: Bind = "127.0.0.1:8883"
    #: Refuse a TLS session without a client certificate from the device CA (mutual TLS).
    mqtts_require_client_cert: bool = False
    #: Server certificate (chain), its key and the device CA; by default the files that
    #: ``depot-node ca init`` wrote under ``DATA_DIR/tls``. Sites with a PKI point these at theirs.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    #: The plain (unencrypted) MQTT listener on ``mqtt_bind``; off in production (TLS only).
    mqtt_plain_enabled: bool = True

    @model_validator(mode="before")
    @classmethod
    def _bind_enables_tls(cls, data: Any) -> Any:
        if isinstance(data, dict) and "mqtts_bind" in data and "mqtts_enabled" not in data:
            return {**data, "mqtts_enabled": True}
        return data

    @field_validator("mqtts_require_client_cert")
    @classmethod
    def _require_cert_needs_tls(cls, value: bool, info: ValidationInfo) -> bool:
        if value and not info.data.get("mqtts_enabled"):
            msg = "needs the TLS listener (set mqtts_bind or mqtts_enabled)"
            raise ValueError(msg)
        return value

    @field_validator("mqtt_plain_enabled")
    @classmethod
    def _some_listener(cls, value: bool, info: ValidationInfo) -> bool:
        if not value and not info.data.get("mqtts_enabled"):
            msg = "with the plain listener off, the TLS listener must be on (set mqtts_bind or mqtts_enabled)"
            raise ValueError(msg)
        return value

    # Limits (docs/adr/0011-limits.md). Rates of 0 switch that limit off.
    #: MQTT packets larger than this (remaining length) close the connection before they are
    #: read; payloads between max_payload_bytes and this are quarantined as payload_too_large.
    #: One limit for both MQTT readers (node.fastpath and amqtt's): node.guard checks it.
    max_packet_bytes: int = Field(default=1024 * 1024, ge=1280, le=256 * 1024 * 1024 + 65_536)
    #: A new connection must send its whole CONNECT within this, and a packet once begun must
    #: arrive whole within this; otherwise the connection is closed.
    mqtt_packet_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    #: Most devices registered and not revoked at once (0 = unlimited).
    max_devices: int = Field(default=10_000, ge=0)
    #: Per device, token buckets: sustained PUBLISHes per second and how many may come at once.
    device_max_messages_per_s: float = Field(default=100.0, ge=0)
    device_burst_messages: int = Field(default=1000, ge=1)
    #: Per device: sustained payload bytes per second and how many may come at once.
    device_max_bytes_per_s: float = Field(default=1024.0 * 1024, ge=0)
    device_burst_bytes: int = Field(default=4 * 1024 * 1024, ge=1)
    #: What a PUBLISH over the device limits gets: quarantined as rate_limited (and acknowledged),
    #: or not acknowledged and the device disconnected (it resends after reconnecting).
    device_limit_action: Literal["quarantine", "disconnect"] = "quarantine"
    #: HTTP requests per API key: sustained per second, and how many may come at once (then 429).
    http_rate_limit_per_s: float = Field(default=100.0, ge=0)
    http_rate_limit_burst: int = Field(default=1000, ge=1)
    #: HTTP requests without a valid API key, per remote address.
    http_anonymous_rate_limit_per_s: float = Field(default=10.0, ge=0)
    http_anonymous_rate_limit_burst: int = Field(default=100, ge=1)

    @field_validator("max_packet_bytes")
    @classmethod
    def _packet_holds_payload(cls, value: int, info: ValidationInfo) -> int:
        payload = info.data.get("max_payload_bytes")
        if payload is not None and value < payload + _PUBLISH_OVERHEAD:
            msg = f"must be at least max_payload_bytes + {_PUBLISH_OVERHEAD} ({payload + _PUBLISH_OVERHEAD})"
            raise ValueError(msg)
        # A full batch of readings must get through the broker too.
        batch = info.data.get("max_batch_payload_bytes")
        if batch is not None and value < batch + PUBLISH_OVERHEAD_BYTES:
            msg = (
                f"must be at least max_batch_payload_bytes + {PUBLISH_OVERHEAD_BYTES} = "
                f"{batch + PUBLISH_OVERHEAD_BYTES}, so that a full batch gets through the broker"
            )
            raise ValueError(msg)
        return value

    # Forwarding to InfluxDB and S3, backlog and retention (node/forwarding.py, ADR 0007). Both
    # forwarders are off unless enabled; an enabled one needs its url/bucket settings.
    influxdb_enabled: bool = False
    influxdb_url: str | None = None
    influxdb_org: str | None = None
    influxdb_bucket: str | None = None
    #: The token: from ``DEPOT_NODE_INFLUXDB_TOKEN``, or read from ``influxdb_token_file``. Never logged.
    influxdb_token: SecretStr | None = None
    influxdb_token_file: Path | None = None
    influxdb_batch_rows: int = Field(default=5000, ge=1, le=100_000)
    influxdb_timeout_s: float = Field(default=10.0, gt=0)
    influxdb_gzip: bool = True
    s3_enabled: bool = False
    s3_bucket: str | None = None
    #: Key prefix of the archive objects; give each node its own when several share a bucket.
    s3_prefix: str = "depot-node/"
    #: A custom endpoint (MinIO, …); None means AWS.
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    #: Path-style addressing (``endpoint/bucket/key``), which MinIO usually needs.
    s3_path_style: bool = False
    #: Without keys, boto's default chain applies (AWS_* environment, shared files, instance role).
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    #: One archive object per device and window of this many seconds (receipt time, UTC-aligned)…
    s3_window_s: float = Field(default=3600.0, ge=1, le=86_400)
    #: …written this long after the window closed (commits of its last messages).
    s3_grace_s: float = Field(default=60.0, ge=0)
    #: Raw messages per batch; a batch also stops at 32 MiB of payloads.
    s3_batch_rows: int = Field(default=10_000, ge=1, le=100_000)
    s3_timeout_s: float = Field(default=30.0, gt=0)
    #: Rows per second each forwarder sends at most (0: unlimited), to spare a thin WAN.
    forward_rate_limit_rows_s: float = Field(default=0.0, ge=0)
    forward_poll_interval_s: float = Field(default=1.0, gt=0)
    forward_retry_initial_s: float = Field(default=1.0, gt=0)
    forward_retry_max_s: float = Field(default=60.0, gt=0)
    #: How often the backlog is measured (metrics, API, disk budget).
    forward_monitor_interval_s: float = Field(default=5.0, gt=0)
    #: Disk budget of each forwarder's unforwarded backlog, in (estimated) bytes.
    forward_backlog_budget_bytes: int = Field(default=1 << 30, ge=1)
    #: ``forwarder_backlog`` is raised past this fraction of the budget.
    forward_backlog_warn_fraction: float = Field(default=0.8, gt=0, le=1)
    #: ``oldest``: past the budget, skip (and let retention delete) the oldest unforwarded rows,
    #: counted and alerted. ``off`` (the default): never; the backlog grows and the alert stays.
    forward_backlog_drop: Literal["off", "oldest"] = "off"
    #: Keep forwarded rows this many days after they were forwarded (0: delete at once).
    retention_days: float = Field(default=30.0, ge=0)
    retention_interval_s: float = Field(default=300.0, gt=0)
    retention_batch_rows: int = Field(default=1000, ge=1, le=100_000)
    # History retention (storage/history_retention.py, ADR 0007), by age; 0 keeps forever.
    #: Audit log rows are kept this many days.
    audit_retention_days: float = Field(default=365.0, ge=0, le=36_525)
    #: Connection events, cleared alerts and finished commands (with their state history) are
    #: kept this many days after their last change.
    history_retention_days: float = Field(default=90.0, ge=0, le=36_525)
    #: Energy periods are kept this many days after their start (three years of billing data by
    #: default); one the ``influxdb-energy`` forwarder has not sent yet is never deleted.
    energy_retention_days: float = Field(default=1096.0, ge=0, le=36_525)
    # Energy per period (docs/energy.md):
    #: Compute consumed and regenerated energy per 5-minute period from the telemetry.
    energy_enabled: bool = True
    #: Two readings further apart than this do not count: the energy between them is not
    #: spread over the periods, which are then incomplete (5 min to 1 day).
    energy_max_interval_s: float = Field(default=3600.0, ge=300, le=86400)
    #: How often the energy aggregator looks for new telemetry once it has caught up.
    energy_poll_s: float = Field(default=1.0, gt=0, le=3600)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init (CLI flags and the file, merged by load_settings) < env would be wrong: flags
        # must beat env. load_settings() passes the file as `_file` values and flags as init.
        return (init_settings, env_settings)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings: defaults < *config_file* < environment < *overrides* (CLI flags)."""
    file_values: dict[str, Any] = {}
    if config_file is not None:
        try:
            with config_file.open("rb") as f:
                file_values = tomllib.load(f)
        except OSError as exc:
            raise ConfigError("--config", f"cannot read {config_file}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", f"{config_file} is not valid TOML: {exc}") from exc
        unknown = sorted(set(file_values) - set(Settings.model_fields))
        if unknown:
            raise ConfigError(unknown[0], f"unknown setting in {config_file}")
    flags = {k: v for k, v in overrides.items() if v is not None}
    try:
        from_env = Settings()
        # Env wins over the file for the fields env actually set.
        env_set = from_env.model_fields_set
        merged = {**file_values, **{k: getattr(from_env, k) for k in env_set}, **flags}
        return Settings(**merged) if merged else from_env
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        setting = ".".join(str(p) for p in err["loc"]) or "settings"
        raise ConfigError(setting, err["msg"]) from None
