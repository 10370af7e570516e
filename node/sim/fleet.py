"""The fleet simulator's network side: registration over HTTP, one MQTT client per meter.

:class:`Fleet` runs N simulated meters (:mod:`node.sim.meter`) against a node, as
``depot-node simulate`` does. Each meter is a paho-mqtt client (client id = username = device
id, a retained ``online``/``offline`` status with the will, QoS 1 telemetry) with paho's own
network thread; one scheduler thread publishes every meter's readings when they are due, so
N meters cost N + 1 threads. Commands arrive on paho's thread; the meter's answer (and its new
interval or boot) is applied under the meter's lock and acknowledged on ``commands/ack``.

paho-mqtt is a runtime dependency for this: a maintained, typed client that nobody here wrote,
the same one the tests use. amqtt's client would do, but it shares the package whose server
internals the node pins and patches, and a simulator should not share the node's blind spots.

Devices are registered through the API when an admin key is given (their secrets are kept in
the secrets file, 0600, so a later run without a key reuses them); otherwise the secrets come
from that file. Errors a user can fix raise :class:`SimulatorError` with the reason.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from node.sim.meter import DEFAULT_BATCH_BYTES, SUPPLIES, Faults, Meter, Supply, encode_batches
from storage.contract import TopicKind, topic_for
from storage.errors import NodeError

log = logging.getLogger(__name__)

#: Supplies a fleet cycles through, in this order (device i gets supply i mod 6).
DEFAULT_SUPPLIES: Final = tuple(SUPPLIES)
#: How long to wait for a CONNACK.
CONNECT_TIMEOUT_S: Final = 15.0


class SimulatorError(NodeError):
    """The simulator cannot run as asked: no secret for a device, a refused connection…"""


@dataclass(frozen=True, slots=True)
class FleetConfig:
    devices: int
    #: Readings per second of each meter (``set_interval`` changes one meter's).
    rate: float
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    backlog: int = 0
    batch_size: int = 100
    batch_bytes: int = DEFAULT_BATCH_BYTES
    faults: Faults = field(default_factory=Faults)
    api_url: str | None = None
    admin_key: str | None = None
    secrets_file: Path = Path("sim-secrets.json")
    prefix: str = "sim"
    supplies: tuple[str, ...] = DEFAULT_SUPPLIES
    seed: int = 1

    def device_id(self, i: int) -> str:
        return f"{self.prefix}-{self.supplies[i % len(self.supplies)]}-{i:04d}"


@dataclass(slots=True)
class FleetStats:
    messages: int = 0
    readings: int = 0
    batches: int = 0
    commands: int = 0
    acks: int = 0
    #: paho's network threads count commands; the scheduler thread counts readings.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def summary(self) -> str:
        return (
            f"published {self.readings} readings in {self.messages} messages ({self.batches} batches); "
            f"{self.commands} commands received, {self.acks} acknowledged"
        )


class SimDevice:
    """One meter and its MQTT client."""

    def __init__(self, meter: Meter, secret: str, config: FleetConfig, stats: FleetStats) -> None:
        self.meter = meter
        self.lock = threading.Lock()
        self._config = config
        self._stats = stats
        device_id = meter.device_id
        self.telemetry_topic = topic_for(device_id, TopicKind.TELEMETRY)
        self._commands_topic = topic_for(device_id, TopicKind.COMMANDS)
        self._ack_topic = topic_for(device_id, TopicKind.COMMANDS_ACK)
        status = topic_for(device_id, TopicKind.STATUS)
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311)
        client.username_pw_set(device_id, secret)
        client.will_set(status, b"offline", qos=1, retain=True)
        client.max_inflight_messages_set(20)
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        self.client = client
        self._status_topic = status
        self.connected = threading.Event()
        self.refused: str | None = None

    def start(self) -> None:
        self.client.connect_async(self._config.mqtt_host, self._config.mqtt_port, keepalive=30)
        self.client.loop_start()

    def stop(self) -> None:
        if self.connected.is_set():
            self.client.publish(self._status_topic, b"offline", qos=1, retain=True).wait_for_publish(5.0)
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self.refused = str(reason)
            log.error("%s: connection refused: %s", self.meter.device_id, reason)
            self.connected.set()  # wake the waiter, which reads `refused`
            return
        # A clean session every time: subscribe again after each (re)connect.
        client.subscribe(self._commands_topic, qos=1)
        client.publish(self._status_topic, b"online", qos=1, retain=True)
        self.connected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self.lock:
            answer = self.meter.answer(bytes(message.payload), time.time())
        self._stats.add(commands=1)
        if answer.ack is not None:
            client.publish(self._ack_topic, json.dumps(answer.ack).encode(), qos=1)
            self._stats.add(acks=1)
            log.info("%s: answered %s", self.meter.device_id, answer.ack)

    def publish(self, payload: bytes) -> mqtt.MQTTMessageInfo:
        return self.client.publish(self.telemetry_topic, payload, qos=1)


class Fleet:
    """N simulated meters: :meth:`start`, then :meth:`run_until` a stop event, then :meth:`stop`."""

    def __init__(self, config: FleetConfig, *, clock: Callable[[], float] = time.time) -> None:
        if config.devices < 1:
            raise SimulatorError("--devices must be at least 1")
        if not config.rate > 0:
            raise SimulatorError("--rate must be more than 0 readings per second")
        unknown = [s for s in config.supplies if s not in SUPPLIES]
        if unknown:
            raise SimulatorError(f"unknown supply {unknown[0]!r}; known: {', '.join(SUPPLIES)}")
        self.config = config
        self.stats = FleetStats()
        self._clock = clock
        self.devices: list[SimDevice] = []

    # -- set-up --------------------------------------------------------------------------------

    def secrets(self) -> dict[str, str]:
        """Every device's MQTT secret: registered through the API with an admin key, else read
        from the secrets file."""
        cfg = self.config
        ids = [cfg.device_id(i) for i in range(cfg.devices)]
        known = _read_secrets(cfg.secrets_file)
        if cfg.api_url is not None and cfg.admin_key is not None:
            for i, device_id in enumerate(ids):
                if device_id in known:
                    continue
                supply = SUPPLIES[cfg.supplies[i % len(cfg.supplies)]]
                secret = _register(cfg.api_url, cfg.admin_key, device_id, supply, f"simulated {supply.label} meter")
                known[device_id] = secret
                _write_secrets(cfg.secrets_file, known)
        missing = [d for d in ids if d not in known]
        if missing:
            raise SimulatorError(
                f"no secret for {missing[0]} (and {len(missing) - 1} more) in {cfg.secrets_file}: "
                "give --api and --admin-key to register the devices"
            )
        return {d: known[d] for d in ids}

    def start(self) -> None:
        """Register (or read secrets), connect every meter and wait for its CONNACK."""
        cfg = self.config
        secrets = self.secrets()
        for i, (device_id, secret) in enumerate(secrets.items()):
            supply = SUPPLIES[cfg.supplies[i % len(cfg.supplies)]]
            meter = Meter.new(device_id, supply, cfg.seed * 1_000_003 + i, interval_s=1.0 / cfg.rate, faults=cfg.faults)
            self.devices.append(SimDevice(meter, secret, cfg, self.stats))
        for device in self.devices:
            device.start()
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        for device in self.devices:
            if not device.connected.wait(max(0.0, deadline - time.monotonic())):
                raise SimulatorError(f"{device.meter.device_id}: no CONNACK from {cfg.mqtt_host}:{cfg.mqtt_port}")
            if device.refused is not None:
                raise SimulatorError(f"{device.meter.device_id}: the node refused the connection ({device.refused})")

    def stop(self) -> None:
        for device in self.devices:
            device.stop()

    # -- publishing ----------------------------------------------------------------------------

    def send_backlog(self) -> None:
        """Each meter's buffered readings first, as batches, oldest first; waits until every
        batch is acknowledged (or stays queued in paho if the node does not answer)."""
        cfg = self.config
        if cfg.backlog <= 0:
            return
        now = self._clock()
        infos = []
        for device in self.devices:
            with device.lock:
                readings = device.meter.backlog(cfg.backlog, now - device.meter.interval_s)
            batches = encode_batches(
                device.meter.device_id, readings, max_readings=cfg.batch_size, max_bytes=cfg.batch_bytes
            )
            infos += [device.publish(b) for b in batches]
            self.stats.add(batches=len(batches), messages=len(batches), readings=len(readings))
        for info in infos:
            info.wait_for_publish(60.0)

    def run_until(self, stop: threading.Event, duration: float | None = None) -> None:
        """Publish every meter's readings when due until *stop* is set or *duration* passed."""
        end = math.inf if duration is None else time.monotonic() + duration
        start = time.monotonic()
        due = [(start + i * 0.001, i) for i in range(len(self.devices))]  # spread the first ones
        heapq.heapify(due)
        while not stop.is_set():
            when, i = due[0]
            wait = min(when, end) - time.monotonic()
            if wait > 0 and stop.wait(wait):
                break
            if time.monotonic() >= end:
                break
            device = self.devices[i]
            with device.lock:
                payloads = device.meter.messages(self._clock())
                interval = device.meter.interval_s
            for payload in payloads:
                device.publish(payload)
            self.stats.add(messages=len(payloads), readings=1)
            # Never let a slow broker make readings bunch up: the next one is one interval on.
            heapq.heapreplace(due, (max(when + interval, time.monotonic()), i))


def _register(api_url: str, admin_key: str, device_id: str, supply: Supply, name: str) -> str:
    """Register *device_id* with its type and supply system (the node checks its voltages
    against that system's EN 50163 range); returns its secret."""
    doc = {"device_id": device_id, "type": supply.device_type, "supply": supply.system.value, "name": name}
    body = json.dumps(doc).encode()
    request = urllib.request.Request(  # noqa: S310 - the URL is the operator's own --api
        api_url.rstrip("/") + "/api/v1/devices",
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {admin_key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            secret: str = json.loads(response.read())["secret"]
            return secret
    except urllib.error.HTTPError as exc:
        detail = _problem_detail(exc)
        if exc.code == 409:  # noqa: PLR2004
            raise SimulatorError(
                f"{device_id} is registered already, and its secret is not in the secrets file: {detail}"
            ) from exc
        raise SimulatorError(f"registering {device_id} failed: HTTP {exc.code}: {detail}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise SimulatorError(f"cannot reach the API at {api_url}: {exc}") from exc


def _problem_detail(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read()).get("detail", ""))
    except (ValueError, AttributeError, OSError):
        return exc.reason or ""


def _read_secrets(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise SimulatorError(f"cannot read the secrets file {path}: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise SimulatorError(f"the secrets file {path} must be a JSON object of device id → secret")
    return data


def _write_secrets(path: Path, secrets: dict[str, str]) -> None:
    """Write the secrets readable by the owner only, replacing the file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(secrets, f, indent=1, sort_keys=True)
    tmp.replace(path)
