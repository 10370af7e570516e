"""The ``depot-node`` command: serve, keys create | list | delete, ca init | server-cert | issue,
healthcheck, simulate."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import signal
import sqlite3
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import anyio
import click

from node.config import Settings, load_settings, parse_bind
from node.sim.meter import SUPPLIES
from storage.audit import CLI_ACTOR
from storage.errors import ConfigError, NodeError
from storage.secrets import ROLES, new_api_key


def _settings(config: Path | None, **flags: Any) -> Settings:
    try:
        return load_settings(config, **flags)
    except ConfigError as exc:
        raise click.UsageError(f"configuration error: {exc}") from exc


@click.group()
@click.version_option(package_name="depot-node")
def main() -> None:
    """depot-node: a self-contained telemetry node for rail power metering."""


config_option = click.option(
    "--config", type=click.Path(dir_okay=False, path_type=Path), help="TOML configuration file."
)
data_dir_option = click.option(
    "--data-dir", type=click.Path(file_okay=False, path_type=Path), help="Directory for the SQLite database."
)


#: glibc's mallopt parameter number for the mmap threshold (malloc.h: M_MMAP_THRESHOLD).
_M_MMAP_THRESHOLD = -3


def fix_mmap_threshold(threshold: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold, so that large buffers are mmapped and go back to the OS on free.

    glibc raises its threshold after the first large block is freed (up to 32 MiB): every
    Argon2 verification's 19 MiB buffer then comes from the heap of its worker thread, and the
    node's RSS keeps ~20 MiB per auth thread for good (bench/memory.py showed ~150 KB per device
    at 1,000 devices with the dynamic threshold, ~64 KB without it, before the fast path's
    slimming). A fixed threshold keeps glibc from adjusting it. False where there is no glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def tune_gil(switch_interval_ms: float) -> None:
    """Let the storage writer's thread have the GIL back sooner (ADR 0015).

    The sqlite3 module lets go of the GIL around every ``sqlite3_step``; after each step of a
    group commit the writer's thread waits for the busy event loop thread to give the GIL back,
    which it does, when asked, only after the switch interval (Python's default: 5 ms). Every
    PUBACK of the group waits with it.
    """
    if switch_interval_ms:
        sys.setswitchinterval(switch_interval_ms / 1000)


def tune_gc(gen0_threshold: int) -> None:
    """Make the cyclic garbage collector fit a long-running ingest process (ADR 0012).

    With Python's defaults, bench/ingest.py measured a quarter of the node's CPU in the GC at
    saturation (about 500 collections a minute, some of them full ones over everything the
    imports created). Everything that exists before the node starts lives as long as the
    process: ``gc.freeze()`` takes it out of every future collection. A larger first threshold
    lets the short-lived per-message objects die before a collection sees them; each
    collection then pauses longer (tens of ms on this machine), far below the latency target.
    """
    gc.collect()
    gc.freeze()
    if gen0_threshold:
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(gen0_threshold, max(gen1, 20), gen2)


@main.command()
@config_option
@data_dir_option
@click.option("--mqtt-bind", metavar="HOST:PORT", help="MQTT listener (default 127.0.0.1:1883).")
@click.option("--http-bind", metavar="HOST:PORT", help="HTTP API listener (default 127.0.0.1:8080).")
@click.option("--mqtts-bind", metavar="HOST:PORT", help="Turn on the MQTT TLS listener here (e.g. 0.0.0.0:8883).")
@click.option(
    "--require-client-cert", is_flag=True, default=None, help="Refuse TLS sessions without a device certificate."
)
@click.option(
    "--mqtt-plain/--no-mqtt-plain", default=None, help="The plain MQTT listener on --mqtt-bind (off: TLS only)."
)
def serve(  # noqa: PLR0917 - click passes every option as an argument
    config: Path | None,
    data_dir: Path | None,
    mqtt_bind: str | None,
    http_bind: str | None,
    mqtts_bind: str | None,
    require_client_cert: bool | None,
    mqtt_plain: bool | None,
) -> None:
    """Run the node until SIGINT or SIGTERM."""
    from node import logs, memtrace
    from node.app import run_node

    settings = _settings(
        config,
        data_dir=data_dir,
        mqtt_bind=mqtt_bind,
        http_bind=http_bind,
        mqtts_bind=mqtts_bind,
        mqtts_enabled=True if mqtts_bind else None,
        mqtts_require_client_cert=require_client_cert,
        mqtt_plain_enabled=mqtt_plain,
    )
    logs.configure(settings.log_level, settings.log_format)
    try:
        memtrace.install_from_env(os.environ)  # debug hook, off unless its variable is set
    except ConfigError as exc:
        raise click.UsageError(f"configuration error: {exc}") from exc

    async def main_() -> None:
        shutdown = anyio.Event()
        loop_module = type(asyncio.get_running_loop()).__module__.partition(".")[0]
        logging.getLogger("node").info("event loop: %s", "uvloop" if loop_module == "uvloop" else "asyncio")

        async def watch_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    shutdown.set()
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_signals)
            await run_node(settings, shutdown=shutdown)
            tg.cancel_scope.cancel()

    tune_gc(settings.gc_gen0_threshold)
    tune_gil(settings.gil_switch_interval_ms)
    fix_mmap_threshold()
    try:
        anyio.run(main_, backend="asyncio", backend_options={"use_uvloop": settings.event_loop == "uvloop"})
    except (OSError, NodeError, BaseExceptionGroup) as exc:
        failure = _failure(exc)
        if failure is None:
            raise
        prefix = "cannot start: " if isinstance(failure, OSError) else ""
        click.echo(f"depot-node: {prefix}{failure}", err=True)
        sys.exit(1)


def _failure(exc: BaseException) -> OSError | NodeError | None:
    """The error to report when the node stops on *exc*: an OSError or NodeError (a port that
    is taken, an unwritable data directory), also when the task groups wrapped it in an
    exception group. None when anything else is in it: that is a bug, and its traceback shows."""
    if isinstance(exc, OSError | NodeError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        match, rest = exc.split((OSError, NodeError))
        while rest is None and match is not None:
            first = match.exceptions[0]
            if not isinstance(first, BaseExceptionGroup):
                return cast("OSError | NodeError", first)
            match = first
    return None


@main.group()
def keys() -> None:
    """Manage API keys."""


@contextmanager
def _database(config: Path | None, data_dir: Path | None) -> Iterator[sqlite3.Connection]:
    """The node's database as a writer connection (SQLite's locking makes it safe beside a
    running node; a write waits for the node's current commit)."""
    from node.app import database_path
    from storage.sqlite import connect

    settings = _settings(config, data_dir=data_dir)
    try:
        conn = connect(database_path(settings.data_dir), synchronous=settings.sqlite_synchronous)
    except (sqlite3.Error, OSError, NodeError) as exc:
        raise click.ClickException(f"cannot open the database in {settings.data_dir}: {exc}") from exc
    try:
        yield conn
    finally:
        conn.close()


@keys.command("create")
@click.option("--role", type=click.Choice(ROLES), required=True, help="What the key may do.")
@click.option("--name", default=None, help="What the key is for, e.g. grafana (shown in `keys list`).")
@config_option
@data_dir_option
def keys_create(role: str, name: str | None, config: Path | None, data_dir: Path | None) -> None:
    """Create an API key and print it once (the key alone is the last line of stdout)."""
    from storage.sqlite import insert_api_key

    key_id, key, key_hash = new_api_key()
    with _database(config, data_dir) as conn:
        insert_api_key(conn, key_id, role, key_hash, name=name, by=CLI_ACTOR)
    click.echo(f"Created {role} API key {key_id}. It is shown only now; store it safely:")
    click.echo(key)


@main.group()
def ca() -> None:
    """A device CA for sites without their own PKI (files under DATA_DIR/tls)."""


server_name_option = click.option(
    "--server-name",
    "server_names",
    multiple=True,
    metavar="NAME",
    help="Another DNS name or IP address for the server certificate (repeatable); "
    "localhost, 127.0.0.1 and ::1 are always in it.",
)


@ca.command("init")
@config_option
@data_dir_option
@server_name_option
@click.option("--force", is_flag=True, help="Replace an existing CA (every device certificate must be reissued).")
def ca_init(config: Path | None, data_dir: Path | None, server_names: tuple[str, ...], *, force: bool) -> None:
    """Create the device CA and the TLS listener's server certificate."""
    from node.ca import CaError, init_ca

    settings = _settings(config, data_dir=data_dir)
    try:
        tls_dir = init_ca(settings.data_dir, server_names=server_names, force=force)
    except CaError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"Created the device CA and the server certificate in {tls_dir}.")
    click.echo("Keep ca.key secret and off the node if you can: it signs device certificates.")


@ca.command("server-cert")
@config_option
@data_dir_option
@server_name_option
def ca_server_cert(config: Path | None, data_dir: Path | None, server_names: tuple[str, ...]) -> None:
    """Renew the TLS listener's server certificate with the existing CA (restart the node after)."""
    from node.ca import CaError, renew_server

    settings = _settings(config, data_dir=data_dir)
    try:
        cert = renew_server(settings.data_dir, server_names=server_names)
    except CaError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"Wrote {cert}; device certificates stay valid. Restart the node to use it.")


@ca.command("issue")
@click.argument("device_id")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for DEVICE_ID.crt, DEVICE_ID.key and ca.crt.",
)
@config_option
@data_dir_option
@click.option("--days", default=825, show_default=True, type=click.IntRange(1, 36500), help="Validity in days.")
@click.option("--force", is_flag=True, help="Replace this device's certificate and key in --out.")
def ca_issue(device_id: str, out: Path, config: Path | None, data_dir: Path | None, days: int, *, force: bool) -> None:
    """Sign a client certificate for DEVICE_ID with the device CA."""
    from node.ca import CaError, issue_device

    settings = _settings(config, data_dir=data_dir)
    try:
        cert, key, ca_cert = issue_device(settings.data_dir, device_id, out, days=days, force=force)
    except CaError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"Wrote {cert}, {key} (private, mode 0600) and {ca_cert}.")


@keys.command("list")
@config_option
@data_dir_option
def keys_list(config: Path | None, data_dir: Path | None) -> None:
    """List API keys (id, role, name, created, revoked); never the keys themselves."""
    from storage.credentials import select_api_keys

    with _database(config, data_dir) as conn:
        rows = select_api_keys(conn, "", 1 << 30)
    click.echo(f"{'KEY ID':<12}  {'ROLE':<8}  {'CREATED (UTC)':<20}  {'REVOKED (UTC)':<20}  NAME")
    for row in rows:
        revoked = _utc(row.revoked_at) if row.revoked_at is not None else "-"
        click.echo(f"{row.key_id:<12}  {row.role:<8}  {_utc(row.created_at):<20}  {revoked:<20}  {row.name or ''}")


@keys.command("delete")
@click.argument("key_id")
@config_option
@data_dir_option
def keys_delete(key_id: str, config: Path | None, data_dir: Path | None) -> None:
    """Delete (revoke) the API key KEY_ID: the node refuses it from its next request on."""
    from storage.credentials import Change, revoke_api_key

    with _database(config, data_dir) as conn:
        change = revoke_api_key(conn, key_id, CLI_ACTOR)
    if change is Change.MISSING:
        raise click.ClickException(f"no API key {key_id!r} (see `depot-node keys list`)")
    click.echo(f"API key {key_id} {'was deleted already' if change is Change.UNCHANGED else 'deleted'}.")


def _utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S")


@main.command()
@config_option
@click.option("--http-bind", metavar="HOST:PORT", help="Where the node's HTTP API listens.")
@click.option("--timeout", default=3.0, show_default=True, help="Seconds to wait for an answer.")
def healthcheck(config: Path | None, http_bind: str | None, timeout: float) -> None:
    """Exit 0 when the local node answers /healthz."""
    settings = _settings(config, http_bind=http_bind)
    host, port = parse_bind(settings.http_bind)
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - a wildcard bind is reached on loopback
        host = "127.0.0.1" if host != "::" else "::1"
    url_host = f"[{host}]" if ":" in host else host
    try:
        with urllib.request.urlopen(f"http://{url_host}:{port}/healthz", timeout=timeout) as resp:
            ok = resp.status == 200  # noqa: PLR2004
    except (urllib.error.URLError, OSError) as exc:
        click.echo(f"unhealthy: {exc}", err=True)
        sys.exit(1)
    if not ok:
        click.echo("unhealthy", err=True)
        sys.exit(1)
    click.echo("ok")


@main.command()
@click.option("--devices", type=click.IntRange(min=1), default=10, show_default=True, help="Simulated meters.")
@click.option(
    "--rate", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True, help="Readings/s per meter."
)
@click.option(
    "--backlog",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Buffered readings per meter, sent first as batches.",
)
@click.option(
    "--batch-size", type=click.IntRange(1, 1000), default=100, show_default=True, help="Most readings per batch."
)
@click.option(
    "--faults",
    default="",
    metavar="NAME=P,...",
    help="Probabilities: reboot, duplicate, gap (per reading), noack (per command), e.g. reboot=0.01,gap=0.01.",
)
@click.option(
    "--mqtt",
    "mqtt_addr",
    default="127.0.0.1:1883",
    show_default=True,
    metavar="HOST:PORT",
    help="The node's MQTT listener.",
)
@click.option(
    "--api", "api_url", metavar="URL", help="The node's HTTP API, to register the devices (with --admin-key)."
)
@click.option("--admin-key", envvar="DEPOT_NODE_ADMIN_KEY", help="Admin API key (or DEPOT_NODE_ADMIN_KEY).")
@click.option(
    "--secrets",
    "secrets_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("sim-secrets.json"),
    show_default=True,
    help="Device secrets: written when registering, read otherwise.",
)
@click.option("--prefix", default="sim", show_default=True, help="Device ids are PREFIX-SUPPLY-NNNN.")
@click.option(
    "--supplies",
    default=",".join(SUPPLIES),
    show_default=True,
    help="Supply systems to cycle through; each device is registered with its system's supply "
    f"({', '.join(f'{k}={s.system.value}' for k, s in SUPPLIES.items())}).",
)
@click.option("--duration", type=click.FloatRange(min=0), help="Stop after this many seconds (default: until Ctrl-C).")
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of the readings.")
def simulate(  # click passes every flag by name
    *,
    devices: int,
    rate: float,
    backlog: int,
    batch_size: int,
    faults: str,
    mqtt_addr: str,
    api_url: str | None,
    admin_key: str | None,
    secrets_file: Path,
    prefix: str,
    supplies: str,
    duration: float | None,
    seed: int,
) -> None:
    """Run a fleet of simulated meters against a node: telemetry v2, faults, command answers."""
    import logging
    import threading

    from node.sim.fleet import Fleet, FleetConfig, SimulatorError
    from node.sim.meter import Faults

    try:
        parsed_faults = Faults.parse(faults)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--faults") from exc
    try:
        host, port = parse_bind(mqtt_addr)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--mqtt") from exc
    if (api_url is None) != (admin_key is None):
        raise click.UsageError("--api and --admin-key go together (to register the devices)")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    config = FleetConfig(
        devices=devices,
        rate=rate,
        mqtt_host=host,
        mqtt_port=port,
        backlog=backlog,
        batch_size=batch_size,
        faults=parsed_faults,
        api_url=api_url,
        admin_key=admin_key,
        secrets_file=secrets_file,
        prefix=prefix,
        supplies=tuple(s.strip() for s in supplies.split(",") if s.strip()),
        seed=seed,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        fleet = Fleet(config)
        fleet.start()
    except SimulatorError as exc:
        click.echo(f"depot-node simulate: {exc}", err=True)
        sys.exit(1)
    click.echo(f"{devices} meters connected to {mqtt_addr}", err=True)
    try:
        fleet.send_backlog()
        fleet.run_until(stop, duration)
    except KeyboardInterrupt:
        pass
    finally:
        fleet.stop()
    click.echo(fleet.stats.summary())
