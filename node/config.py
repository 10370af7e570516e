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
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from actors.alerts import AlertRule
from storage.errors import ConfigError


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
    max_connections: int = Field(default=0, ge=0, description="0 means unlimited")
    #: The largest MQTT packet a client may send; a larger one closes its connection before it
    #: is buffered. Payloads between ``max_payload_bytes`` and this are quarantined instead.
    mqtt_max_packet_bytes: int = Field(default=1024 * 1024, ge=1024, le=268_435_455)
    #: The broker's fast path (node/fastpath.py, ADR 0012); false falls back to amqtt's reader.
    broker_fast_path: bool = True
    #: The garbage collector's first threshold for ``serve`` (0 keeps Python's default, 2000);
    #: see node.cli.tune_gc.
    gc_gen0_threshold: int = Field(default=10_000, ge=0, le=10_000_000)
    device_mailbox: int = Field(default=1024, ge=1, le=1_000_000)
    device_idle_timeout_s: float = Field(default=300.0, gt=0)
    #: Close a session that sent no PUBLISH or PINGREQ for this long (0 = never). A backstop
    #: for clients with keep-alive 0; devices with a keep-alive are closed at 1.5 x it anyway.
    device_inactivity_timeout_s: float = Field(default=900.0, ge=0)
    writer_max_group: int = Field(default=512, ge=1, le=100_000)
    #: Concurrent Argon2 verifications (each ~20 ms CPU and 19 MiB): a reconnect storm queues.
    auth_concurrency: int = Field(default=2, ge=1, le=64)
    #: Close a device's session when it publishes where its ACL forbids.
    disconnect_on_acl_denial: bool = False
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
