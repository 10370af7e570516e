"""node/broker.py and node/fastpath.py replace amqtt internals; these fail when the replaced upstream code changes.

When one fails after an amqtt upgrade: read the new upstream code, re-check what
``NodeProtocolHandler`` and ``NodeBroker`` rely on (see node/broker.py's docstring), adapt them,
then update the digests here.
"""

from __future__ import annotations

import hashlib
import inspect
from importlib.metadata import version

import amqtt.adapters
import amqtt.broker
import amqtt.mqtt.packet
import amqtt.mqtt.protocol.broker_handler
import amqtt.mqtt.protocol.handler
import amqtt.plugins.manager
import amqtt.session

from node.broker import AMQTT_VERSION

PINNED = {
    # handle_publish is what we override; _reader_loop is what calls it (one task per packet),
    # and what node/fastpath.py replaces whole (it mirrors its start, end and dispatch);
    # _handle_qos2_message_flow's incoming half is what our QoS 2 acknowledgement mirrors.
    "ProtocolHandler.handle_publish": (amqtt.mqtt.protocol.handler.ProtocolHandler.handle_publish, "b8f1fd3212c7134e"),
    "ProtocolHandler._reader_loop": (amqtt.mqtt.protocol.handler.ProtocolHandler._reader_loop, "93f3b8e4483040d0"),
    "ProtocolHandler._handle_qos2_message_flow": (
        amqtt.mqtt.protocol.handler.ProtocolHandler._handle_qos2_message_flow,
        "f2d96f1fc4eca34f",
    ),
    # _initialize_client_session builds the handler through init_from_connect; we re-class it.
    # NodeBroker replaces it whole (the CONNECT is authenticated before the session lookup,
    # then the lookup as amqtt does it), answers a refused CONNECT as _handle_client_session
    # would (attach + mqtt_connack_authorize), returns the verdict from _authenticate, and
    # ends a taken-over connection of a persistent session without _handle_disconnect's will
    # (calling _stop_handler).
    "Broker._initialize_client_session": (amqtt.broker.Broker._initialize_client_session, "5dd89158bbe46266"),
    "Broker._authenticate": (amqtt.broker.Broker._authenticate, "4d7db8cc6fe2c3f6"),
    "Broker._stop_handler": (amqtt.broker.Broker._stop_handler, "496013328caf21d0"),
    "BrokerProtocolHandler.mqtt_connack_authorize": (
        amqtt.mqtt.protocol.broker_handler.BrokerProtocolHandler.mqtt_connack_authorize,
        "4e64256ea1f5c73c",
    ),
    "ProtocolHandler.attach": (amqtt.mqtt.protocol.handler.ProtocolHandler.attach, "ff8ecc04c80a9feb"),
    "BrokerProtocolHandler.init_from_connect": (
        amqtt.mqtt.protocol.broker_handler.BrokerProtocolHandler.init_from_connect,
        "036dc04c1133a18f",
    ),
    # stream_connected is wrapped to close the transport whatever amqtt did.
    "Broker.stream_connected": (amqtt.broker.Broker.stream_connected, "d1c68240cb49f94a"),
    # Overridden: keep-alive enforcement and disconnect reasons.
    "BrokerProtocolHandler.handle_read_timeout": (
        amqtt.mqtt.protocol.broker_handler.BrokerProtocolHandler.handle_read_timeout,
        "ffd79f12457f41e1",
    ),
    "BrokerProtocolHandler.handle_disconnect": (
        amqtt.mqtt.protocol.broker_handler.BrokerProtocolHandler.handle_disconnect,
        "63b454d06eab58f8",
    ),
    # Overridden to note activity for the node's inactivity timeout.
    "BrokerProtocolHandler.handle_pingreq": (
        amqtt.mqtt.protocol.broker_handler.BrokerProtocolHandler.handle_pingreq,
        "de126279f40d7031",
    ),
    # The live-connection registry: a refused CONNECT must not delete a live session (it is
    # deleted before auth in _handle_client_session's order), takeover happens in start().
    "Broker._delete_session": (amqtt.broker.Broker._delete_session, "a8333dded50648a7"),
    "Broker._handle_client_session": (amqtt.broker.Broker._handle_client_session, "8b1b52a03df9daf5"),
    "BrokerProtocolHandler.start": (amqtt.mqtt.protocol.broker_handler.BrokerProtocolHandler.start, "f7637c34a27f905e"),
    "BrokerProtocolHandler.stop": (amqtt.mqtt.protocol.broker_handler.BrokerProtocolHandler.stop, "70e440da78e7178b"),
    "BrokerProtocolHandler.__init__": (
        amqtt.mqtt.protocol.broker_handler.BrokerProtocolHandler.__init__,
        "95a1c78fecfdbffa",
    ),
    # node/fastpath.py: the reader task's start and stop around _reader_loop, the adapters'
    # streams it reads and writes directly, and the fixed header it builds for amqtt's decoders.
    "ProtocolHandler.start": (amqtt.mqtt.protocol.handler.ProtocolHandler.start, "684c58c16be73a2d"),
    "ProtocolHandler.stop": (amqtt.mqtt.protocol.handler.ProtocolHandler.stop, "874ae8871911881f"),
    "StreamReaderAdapter.__init__": (amqtt.adapters.StreamReaderAdapter.__init__, "2594a16cfbf64a25"),
    "StreamWriterAdapter.__init__": (amqtt.adapters.StreamWriterAdapter.__init__, "9612036ac78e5ab2"),
    "StreamWriterAdapter.write": (amqtt.adapters.StreamWriterAdapter.write, "a204e5a548e08184"),
    "MQTTFixedHeader.__init__": (amqtt.mqtt.packet.MQTTFixedHeader.__init__, "0051f99b0b811f71"),
    # node/fastpath.py slims idle connections: the client loop it replaces (only the disconnect
    # wait is kept, then _handle_disconnect as amqtt calls it), the subscription handling it
    # calls directly instead of through the handler's queues, the session's state machine and
    # queues it swaps (SessionStates, UNUSED_QUEUE, _LazyQueue).
    "Broker._client_message_loop": (amqtt.broker.Broker._client_message_loop, "916c4647c3389918"),
    "Broker._handle_subscription": (amqtt.broker.Broker._handle_subscription, "3dae18afa195209e"),
    "Broker._handle_unsubscription": (amqtt.broker.Broker._handle_unsubscription, "29253b1b63036d7a"),
    "Broker._handle_disconnect": (amqtt.broker.Broker._handle_disconnect, "8c3b8702f3567055"),
    "BrokerProtocolHandler.handle_subscribe": (
        amqtt.mqtt.protocol.broker_handler.BrokerProtocolHandler.handle_subscribe,
        "7625fdfa3a8de496",
    ),
    "BrokerProtocolHandler.handle_unsubscribe": (
        amqtt.mqtt.protocol.broker_handler.BrokerProtocolHandler.handle_unsubscribe,
        "90d48fa79285c504",
    ),
    "BrokerProtocolHandler.wait_disconnect": (
        amqtt.mqtt.protocol.broker_handler.BrokerProtocolHandler.wait_disconnect,
        "ea4857d4707ef8d9",
    ),
    "Subscription.__init__": (amqtt.mqtt.protocol.broker_handler.Subscription.__init__, "5be79d7a161f725a"),
    "UnSubscription.__init__": (amqtt.mqtt.protocol.broker_handler.UnSubscription.__init__, "c826492606d1d9f0"),
    "Session.__init__": (amqtt.session.Session.__init__, "ad7888c0daff2038"),
    "Session._init_states": (amqtt.session.Session._init_states, "63c76988bf4f81ce"),
    # TLS (node/tls.py): _create_ssl_context is replaced by the node's own context, which
    # _start_listeners asks for. The client certificate reaches the auth plugin through a
    # context variable set in stream_connected: that needs _client_connected to authenticate
    # in the connection's own task and _map_plugin_method to run plugins with ensure_future
    # (which copies the context).
    "Broker._create_ssl_context": (amqtt.broker.Broker._create_ssl_context, "a08eef5bbc53bf9a"),
    "Broker._start_listeners": (amqtt.broker.Broker._start_listeners, "5ac2d716d33babb4"),
    "Broker._client_connected": (amqtt.broker.Broker._client_connected, "432b724bc4fb7946"),
    "PluginManager._map_plugin_method": (
        amqtt.plugins.manager.PluginManager._map_plugin_method,
        "54c50c05df3ad189",
    ),
}


def digest(obj: object) -> str:
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]  # type: ignore[arg-type]


def test_amqtt_version_is_pinned() -> None:
    assert version("amqtt") == AMQTT_VERSION


def test_replaced_upstream_code_is_unchanged() -> None:
    actual = {name: digest(obj) for name, (obj, _) in PINNED.items()}
    expected = {name: pinned for name, (_, pinned) in PINNED.items()}
    assert actual == expected
