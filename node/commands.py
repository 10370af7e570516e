"""The command actor's place in the node: delivery through amqtt, settings, supervision, stop.

:class:`BrokerDeliverer` is the :class:`actors.commands.Deliverer` the node gives the actor.
It sends a command as a PUBLISH on the device's live amqtt session (the handler's own
``mqtt_publish``, so amqtt numbers the packet and runs the QoS 1 flow), never through a
loopback MQTT client and never through amqtt's broadcast queue, whose result cannot be known.
It delivers only to a device that is connected and subscribed to its ``commands`` topic, with
the QoS of that subscription capped at 1; the device's answer on ``commands/ack`` is what
counts, so amqtt's PUBACK wait is bounded and its outcome only logged.

Kept out of ``node.app`` so that the composition root only wires it in, like ``node.alerting``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final

import anyio
from amqtt.mqtt.constants import QOS_1

from actors.commands import CommandActor, CommandConfig, Delivery
from actors.stats import CommandStats
from actors.supervisor import Restart, RestartIntensityExceeded, RestartPolicy, supervise
from node.config import Settings
from storage.contract import TopicKind, topic_for
from storage.interfaces import CommandStore

if TYPE_CHECKING:
    from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

    from node.bridge import Bridge

log = logging.getLogger(__name__)

#: Like alerts: past this the actor stays down (the API answers 503 for new commands) and
#: ingest goes on; its commands wait in SQLite for the next start.
RESTART_POLICY: Final = RestartPolicy(restart=Restart.TRANSIENT, max_restarts=10, period=60.0)

#: At shutdown the actor saves its last changes; a store that hangs must not hold up the stop.
STOP_TIMEOUT_S: Final = 10.0


class BrokerDeliverer:
    """Delivers command payloads on the live amqtt session of a device (see module docstring)."""

    def __init__(self, bridge: Bridge, *, puback_timeout: float) -> None:
        self._bridge = bridge
        self._puback_timeout = max(1, round(puback_timeout))
        #: Publishing tasks, kept so they are not collected mid-flight and cancelled at stop.
        self._tasks: set[asyncio.Task[None]] = set()

    def deliver(self, device_id: str, payload: bytes) -> Delivery:
        broker = self._bridge.broker
        handlers = broker.live.get(device_id) if broker is not None else None
        if broker is None or not handlers:
            return Delivery.NOT_CONNECTED
        handler = handlers[-1]
        session = handler.session
        if session is None or session.transitions.state != "connected":
            return Delivery.NOT_CONNECTED
        topic = topic_for(device_id, TopicKind.COMMANDS)
        # The ACL lets a device subscribe to exactly this topic, so no wildcard matching.
        granted = [qos for s, qos in broker.subscriptions.get(topic, []) if s.client_id == device_id]
        if not granted:
            return Delivery.NOT_SUBSCRIBED
        qos = min(max(granted), QOS_1)
        task = asyncio.get_running_loop().create_task(
            self._publish(handler, topic, payload, qos), name=f"command[{device_id}].publish"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return Delivery.SENT

    async def _publish(self, handler: BrokerProtocolHandler, topic: str, payload: bytes, qos: int) -> None:
        try:
            await handler.mqtt_publish(topic, payload, qos, retain=False, ack_timeout=self._puback_timeout)
        except (TimeoutError, OSError, ConnectionError) as exc:
            # The command stays `sent`; no ack within the node's ack timeout means a resend.
            log.info("PUBLISH of a command on %s was not acknowledged by MQTT: %r", topic, exc)
        except Exception:
            log.exception("PUBLISH of a command on %s failed", topic)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()


def command_config(settings: Settings) -> CommandConfig:
    return CommandConfig(
        ack_timeout=settings.command_ack_timeout_s,
        max_attempts=settings.command_max_attempts,
        sweep=settings.command_ack_timeout_s,
    )


def build_commands(
    settings: Settings, store: CommandStore, stats: CommandStats, bridge: Bridge
) -> tuple[CommandActor, BrokerDeliverer]:
    """The actor, delivering through *bridge*'s broker; acks and hints reach it through *bridge*."""
    deliverer = BrokerDeliverer(bridge, puback_timeout=settings.command_ack_timeout_s)
    actor = CommandActor(store, deliverer, stats, command_config(settings))
    bridge.commands = actor
    return actor, deliverer


async def run_commands(actor: CommandActor, done: anyio.Event) -> None:
    try:
        await supervise("commands", actor.run, RESTART_POLICY)
    except RestartIntensityExceeded:
        log.exception("the command actor crashed too often; commands wait in storage until the node restarts")
    finally:
        actor.fail_waiting()
        actor.mailbox.close()
        done.set()


async def stop_commands(actor: CommandActor, done: anyio.Event, deliverer: BrokerDeliverer) -> None:
    """Let the actor apply what is queued and save it; returns when it ended (or timed out)."""
    actor.mailbox.close_sending()
    with anyio.move_on_after(STOP_TIMEOUT_S) as scope:
        await done.wait()
    if scope.cancelled_caught:
        log.warning("the command actor did not stop within %g s; its last changes may be lost", STOP_TIMEOUT_S)
    deliverer.close()
