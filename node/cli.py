"""The ``depot-node`` command: serve, keys create | list | delete, healthcheck."""

from __future__ import annotations

import signal
import sqlite3
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import click

from node.config import Settings, load_settings, parse_bind
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


@main.command()
@config_option
@data_dir_option
@click.option("--mqtt-bind", metavar="HOST:PORT", help="MQTT listener (default 127.0.0.1:1883).")
@click.option("--http-bind", metavar="HOST:PORT", help="HTTP API listener (default 127.0.0.1:8080).")
def serve(config: Path | None, data_dir: Path | None, mqtt_bind: str | None, http_bind: str | None) -> None:
    """Run the node until SIGINT or SIGTERM."""
    from node import logs
    from node.app import run_node

    settings = _settings(config, data_dir=data_dir, mqtt_bind=mqtt_bind, http_bind=http_bind)
    logs.configure(settings.log_level, settings.log_format)

    async def main_() -> None:
        shutdown = anyio.Event()

        async def watch_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    shutdown.set()
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_signals)
            await run_node(settings, shutdown=shutdown)
            tg.cancel_scope.cancel()

    try:
        anyio.run(main_, backend="asyncio")
    except OSError as exc:
        click.echo(f"depot-node: cannot start: {exc}", err=True)
        sys.exit(1)
    except NodeError as exc:
        click.echo(f"depot-node: {exc}", err=True)
        sys.exit(1)


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
