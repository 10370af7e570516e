"""The two amqtt plugins the node always configures: device authentication and topic ACLs.

amqtt loads plugins by dotted path and hands each a copy of its context; the node passes its
:class:`node.bridge.Bridge` through the plugin's ``Config`` dataclass. Event hooks run as
unawaited tasks whose exceptions amqtt logs at DEBUG only, so they do nothing but enqueue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from node.bridge import set_auth_generation
from node.tls import current_transport
from storage.contract import TopicKind, may_publish, may_subscribe, parse_topic


class DeviceAuthPlugin(BaseAuthPlugin):
    @dataclass
    class Config:
        bridge: Any = None

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._bridge = self.config.bridge

    async def authenticate(self, *, session: Session) -> bool | None:
        will_topic = session.will_topic if session.will_flag else None
        gate = self._bridge.gate
        transport = current_transport()
        # Taken before the check: a rotation, disable or revocation committed while this CONNECT
        # is between its check and its registration as live is caught by Bridge.connected. A
        # certificate login may send no username: its identity is then the client id.
        generation = gate.generation(session.username or session.client_id or "")
        ok = bool(await gate.check(session.client_id, session.username, session.password, will_topic, transport))
        if ok and session.username is None:
            # Identified by its client certificate (node.tls): the device id is the identity
            # that the ACL, the PUBLISH path and the bridge read from the session.
            session.username = session.client_id
        if ok:
            set_auth_generation(session, generation)
        return ok

    async def on_broker_client_connected(self, *, client_id: str, client_session: Session) -> None:
        await self._bridge.connected(client_session)

    async def on_broker_client_disconnected(self, *, client_id: str, client_session: Session) -> None:
        await self._bridge.disconnected(client_session)


class DeviceAclPlugin(BaseTopicPlugin):
    @dataclass
    class Config:
        bridge: Any = None

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._bridge = self.config.bridge

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        identity = session.username if session is not None else None
        if identity is None or topic is None:
            return False
        if action is Action.SUBSCRIBE:
            allowed = may_subscribe(identity, topic)
        elif action is Action.PUBLISH:
            # Device PUBLISHes never reach this hook (node.broker takes them first); kept
            # correct for the fallback path.
            allowed = may_publish(identity, topic)
        else:
            # RECEIVE: the node delivers to a device only its own commands.
            parsed = parse_topic(topic)
            allowed = parsed is not None and parsed.device_id == identity and parsed.kind is TopicKind.COMMANDS
        if not allowed:
            self._bridge.denied(identity, action.value if action is not None else "unknown", topic)
        return allowed

    async def on_broker_client_subscribed(self, *, client_id: str, topic: str, qos: int) -> None:
        # Only granted subscriptions fire this event: the device's commands may go now.
        self._bridge.subscribed(client_id, topic)
