"""The composition root: builds every part of the node and runs the supervision tree.

Start-up order: storage (migrations) → storage writer → router → broker → HTTP. Readiness
(``/readyz``) turns true part by part and :func:`run_node` reports the bound addresses through
``task_status.started()`` only once all of them are up.

Shutdown order (on ``shutdown`` being set, e.g. SIGINT/SIGTERM): stop HTTP, close the broker
(no new PUBLISH can arrive), let every device actor drain its mailbox, let the storage writer
commit the last group, then close SQLite. Nothing accepted before the shutdown is lost.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import anyio
from amqtt.errors import BrokerError
from anyio.abc import TaskStatus
from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig

from actors.alerts import AlertSink
from actors.device import DeviceActorConfig
from actors.limits import DeviceLimiter
from actors.router import Router, RouterConfig
from actors.stats import IngestStats
from actors.supervisor import Restart, RestartPolicy, supervise
from actors.writer import StorageWriter
from node.alerting import build_alerts, run_alerts, stop_alerts
from node.auth import DeviceGate
from node.bridge import Bridge
from node.broker import PLAIN_LISTENER, TLS_LISTENER, NodeBroker, NodeProtocolHandler, broker_config
from node.commands import build_commands, run_commands, stop_commands
from node.config import Settings, parse_bind
from node.energy import build_energy, run_energy
from node.fastpath import FastProtocolHandler
from node.faults import FaultHooks, FaultyStore
from node.forwarding import build_forwarding, check_forwarding, run_forwarding
from node.guard import ConnectionGuard
from node.limits import device_limits, http_rate_limits
from node.tls import TlsFiles, default_files, server_context
from storage.errors import StartupError
from storage.interfaces import IngestStore
from storage.reader import Reader
from storage.sqlite import SqliteStore
from web.app import create_app
from web.services import WebServices

log = logging.getLogger(__name__)

DB_FILENAME = "depot-node.sqlite3"


@dataclass(frozen=True, slots=True)
class NodeAddresses:
    #: The plain MQTT listener; None when it is turned off (``mqtt_plain_enabled = false``).
    mqtt: tuple[str, int] | None
    http: tuple[str, int]
    #: The TLS MQTT listener, when it is on.
    mqtts: tuple[str, int] | None = None


def database_path(data_dir: Path) -> Path:
    return data_dir / DB_FILENAME


def _http_config(bind: str) -> tuple[HypercornConfig, tuple[str, int]]:
    """Hypercorn's config, on a socket bound here so that port 0 works and the real port is known."""
    host, port = parse_bind(bind)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise StartupError(f"HTTP listener {bind}: {exc.strerror or exc}") from exc
        # Listening now means a client that connects before hypercorn's accept loop runs
        # waits in the backlog instead of being refused: readiness can be reported at once.
        sock.listen(1024)
        addr = sock.getsockname()[:2]
        config = HypercornConfig()
        # Hypercorn takes ownership of the descriptor it is given; ours closes with the block.
        config.bind = [f"fd://{os.dup(sock.fileno())}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 5.0
    return config, addr


async def run_node(  # noqa: PLR0915 - the composition root wires every part in one readable sequence
    settings: Settings,
    *,
    shutdown: anyio.Event,
    faults: FaultHooks | None = None,
    task_status: TaskStatus[NodeAddresses] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run the whole node until *shutdown* is set, then stop it in order.

    *faults* is for tests only (see :mod:`node.faults`).
    """
    faults = faults or FaultHooks()
    check_forwarding(settings)
    stats = IngestStats()
    db = database_path(settings.data_dir)
    store = SqliteStore(db, synchronous=settings.sqlite_synchronous)
    ingest_store: IngestStore = store if faults.commit is None else FaultyStore(store, faults.commit)
    reader = Reader(db)
    writer = StorageWriter(ingest_store, stats, max_group=settings.writer_max_group)
    # Alerts (node/alerting.py): device actors and the bridge signal the alert actor, never wait.
    alerts = build_alerts(settings, store, stats.alerts)
    alerts_done = anyio.Event()
    alert_sink = alerts.signal if alerts is not None else None
    # Energy per period (node/energy.py): follows the telemetry table, never on the ingest path.
    energy = build_energy(settings, db, store, stats.energy)
    router = _router(settings, ingest_store, writer, stats, faults, alerts=alert_sink)
    # Forwarders and retention (node/forwarding.py): off unless configured; never in ingest's way.
    forwarding = build_forwarding(settings, db, stats, alert_sink)
    gate = DeviceGate(
        reader, stats, concurrency=settings.auth_concurrency, require_client_cert=settings.mqtts_require_client_cert
    )
    # Limits (ADR 0011): per-device rates in the bridge (Bridge.admit, both MQTT readers),
    # connection limits in the broker (node.guard).
    bridge = Bridge(
        gate,
        router,
        stats,
        disconnect_on_denial=settings.disconnect_on_acl_denial,
        alerts=alert_sink,
        limiter=DeviceLimiter(device_limits(settings)),
        limit_action=settings.device_limit_action,
    )
    guard = ConnectionGuard(
        stats,
        max_connections=settings.max_connections,
        max_packet_bytes=settings.max_packet_bytes,
        packet_timeout=settings.mqtt_packet_timeout_s,
    )

    async def on_credentials_changed(device_id: str, reason: str) -> None:
        # After the commit: the gate forgets the old verification (and restarts checks in
        # flight), then the live session goes; a reconnect is checked against the new state.
        gate.forget(device_id)
        await bridge.disconnect(device_id, reason)

    # Commands (node/commands.py): acks, connects and subscriptions reach the actor through the bridge.
    commands, deliverer = build_commands(settings, store, stats.commands, bridge)
    commands_done = anyio.Event()

    async def on_revoked(device_id: str) -> None:
        await on_credentials_changed(device_id, "revoked")

    readiness = {"storage": False, "broker": False, "http": False}

    async def on_device_changed(device_id: str) -> None:
        router.device_changed(device_id)

    services = WebServices(
        reader=reader,
        store=store,
        stats=stats,
        readiness=readiness,
        on_revoked=on_revoked,
        on_credentials_changed=on_credentials_changed,
        metrics_require_key=settings.metrics_require_key,
        max_devices=settings.max_devices,
        rate_limits=http_rate_limits(settings),
        on_device_changed=on_device_changed,
    )
    services.commands = commands
    services.command_max_ttl_s = settings.command_max_ttl_s
    app = create_app(services)

    hc, http_addr = _http_config(settings.http_bind)
    http_stop = anyio.Event()
    writer_done = anyio.Event()

    async def run_http() -> None:
        await serve(app, hc, shutdown_trigger=http_stop.wait)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_run_writer, writer, writer_done, name="storage-writer")
            tg.start_soon(run_alerts, alerts, alerts_done, name="alerts")
            tg.start_soon(run_commands, commands, commands_done, name="commands")
            tg.start_soon(run_energy, energy, name="energy")
            await tg.start(router.run, name="router")
            readiness["storage"] = await reader.ping()
            tg.start_soon(run_forwarding, forwarding, name="forwarding")
            stale = await store.mark_all_offline("node_restart")
            if stale:
                log.info("%d devices were online when the node last stopped; marked offline", stale)
            broker, mqtt_addr, mqtts_addr = await _start_broker(settings, bridge, guard)
            tg.start_soon(guard.enforce, name="mqtt-guard")
            if settings.device_inactivity_timeout_s > 0:
                tg.start_soon(broker.enforce_inactivity, settings.device_inactivity_timeout_s, name="inactivity")
            readiness["broker"] = True
            tg.start_soon(run_http, name="http")
            readiness["http"] = True
            for scheme, addr in (("mqtt", mqtt_addr), ("mqtts", mqtts_addr), ("http", http_addr)):
                if addr is not None:
                    log.info("depot-node listening: %s://%s:%d", scheme, *addr)
            log.info("data in %s", db.resolve())
            task_status.started(NodeAddresses(mqtt=mqtt_addr, http=http_addr, mqtts=mqtts_addr))

            await shutdown.wait()
            log.info("shutting down")
            readiness.update(http=False, broker=False)
            http_stop.set()
            with anyio.CancelScope(shield=True):
                await bridge.node_stopping()
                await _drain(broker, router, writer, writer_done)
                await stop_commands(commands, commands_done, deliverer)
                await stop_alerts(alerts, alerts_done)
            tg.cancel_scope.cancel()
    finally:
        writer.fail_pending()
        gate.close()
        if energy is not None:
            energy[1].close()
        reader.close()
        store.close()
        log.info("stopped")


def _router(
    settings: Settings,
    store: IngestStore,
    writer: StorageWriter,
    stats: IngestStats,
    faults: FaultHooks,
    *,
    alerts: AlertSink | None = None,
) -> Router:
    actor = DeviceActorConfig(
        idle_timeout=settings.device_idle_timeout_s,
        max_payload_bytes=settings.max_payload_bytes,
        max_batch_payload_bytes=settings.max_batch_payload_bytes,
        max_future_skew=settings.telemetry_max_future_skew_s,
    )
    config = RouterConfig(mailbox_capacity=settings.device_mailbox, actor=actor)
    return Router(store, writer, stats, config, fault_hook=faults.device, alerts=alerts)


async def _run_writer(writer: StorageWriter, done: anyio.Event) -> None:
    try:
        # Storage is the node's reason to exist: past its restart limit the node stops.
        await supervise(
            "storage-writer", writer.run, RestartPolicy(restart=Restart.TRANSIENT, max_restarts=10, period=60.0)
        )
    finally:
        done.set()


def tls_files(settings: Settings) -> TlsFiles:
    """The TLS listener's files: the configured ones, else those ``depot-node ca init`` wrote."""
    default = default_files(settings.data_dir)
    return TlsFiles(
        cert=settings.tls_cert_file or default.cert,
        key=settings.tls_key_file or default.key,
        ca=settings.tls_ca_file or default.ca,
    )


async def _start_broker(
    settings: Settings, bridge: Bridge, guard: ConnectionGuard
) -> tuple[NodeBroker, tuple[str, int] | None, tuple[str, int] | None]:
    host, port = parse_bind(settings.mqtt_bind)
    tls_bind = parse_bind(settings.mqtts_bind) if settings.mqtts_enabled else None
    tls_context = server_context(tls_files(settings)) if settings.mqtts_enabled else None
    plain = settings.mqtt_plain_enabled
    config = broker_config(
        bridge, host=host, port=port, max_connections=settings.max_connections, tls_bind=tls_bind, plain=plain
    )
    handler_class = FastProtocolHandler if settings.broker_fast_path else NodeProtocolHandler
    # The guard is in place before the listeners accept anything.
    broker = NodeBroker(
        config,
        bridge,
        tls_context,
        handler_class=handler_class,
        guard=guard,
        connect_concurrency=settings.mqtt_connect_concurrency,
    )
    try:
        await broker.start()
    except BrokerError as exc:
        binds = [b for b, on in ((settings.mqtt_bind, plain), (settings.mqtts_bind, tls_bind)) if on]
        raise StartupError(f"MQTT listener {' / '.join(binds)}: {exc.__cause__ or exc}") from exc

    def address(name: str) -> tuple[str, int]:
        server = broker._servers[name]  # noqa: SLF001 - no public accessor
        return tuple(next(iter(server.instance.sockets)).getsockname()[:2])

    tls_name = TLS_LISTENER if plain else PLAIN_LISTENER
    return broker, address(PLAIN_LISTENER) if plain else None, address(tls_name) if tls_bind else None


async def _drain(broker: NodeBroker, router: Router, writer: StorageWriter, writer_done: anyio.Event) -> None:
    """Stop in order so that nothing accepted is lost: broker, device actors, writer."""
    # Bounded: a broker that cannot close its sockets must not keep the data already
    # accepted from being committed below.
    with anyio.move_on_after(15) as broker_stop:
        await broker.shutdown()
    if broker_stop.cancelled_caught:
        log.warning("broker did not close within 15 s; committing what was accepted")
    await router.close()
    writer.mailbox.close_sending()
    await writer_done.wait()
