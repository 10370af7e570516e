"""Hypothesis-generated CONNECT, PUBLISH and SUBSCRIBE attempts on raw sockets against a real node.

Three devices are registered: ``victim`` (connected for the whole module and subscribed to
its own commands topic), ``attacker`` (whose real secret the attempts may use) and
``canary`` (a legitimate device that publishes after every attempt). Each example opens a
fresh socket and sends one generated attempt. After it:

* an attempt never gets a session under another identity: CONNACK 0 only for the attacker
  with its own secret, client id and username;
* a SUBSCRIBE to anything but the attacker's own ``iot/attacker/commands`` gets 0x80;
* nothing crosses: the victim's socket has received nothing, and no message of any kind
  has been counted or stored for the victim;
* the node still serves: the canary's QoS 1 PUBLISH is acknowledged (so committed) and its
  reading can be read back over HTTP.

Strategies, and why their bounds: identities mix the real ids with text that has every kind
of trouble in it (MQTT wildcards, ``/``, NUL, non-ASCII, bytes that are not UTF-8, and
strings up to the 65,535 bytes an MQTT string can hold, well past the node's 8 KiB CONNECT
limit); topics mix the victim's
and the node's own topics with wildcards and generated text; raw attacks are truncations of
valid packets, remaining lengths that are malformed or announce far more than the limit,
reserved packet types and plain random bytes.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import mqtt_raw
from tests.payloads import telemetry
from tests.protocol.target import NodeTarget, metric_samples

CONNACK, PUBLISH, PUBACK, SUBACK = 2, 3, 4, 9
VICTIM, ATTACKER, CANARY = "victim", "attacker", "canary"
#: How long an attempt's answers are read for: refusals and closes come at once.
READ_FOR: Final = 0.3

# Each example opens sockets and makes HTTP reads against the shared node; examples are
# bounded so that the module (three tests) stays well under a minute.
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@dataclass
class Fleet:
    target: NodeTarget
    secrets: dict[str, str]
    victim: socket.socket
    canary: socket.socket
    http: httpx.Client
    canary_seq: int = 0


def open_session(target: NodeTarget, device_id: str, secret: str) -> socket.socket:
    sock = socket.create_connection((target.mqtt_host, target.mqtt_port), timeout=10)
    sock.sendall(mqtt_raw.connect(device_id, device_id, secret, keepalive=0))
    assert mqtt_raw.read_packet(sock) == (CONNACK, b"\x00\x00")
    return sock


@pytest.fixture(scope="module")
def fleet(node_target: NodeTarget) -> Iterator[Fleet]:
    with node_target.http() as http:
        secrets = {}
        for device_id in (VICTIM, ATTACKER, CANARY):
            resp = http.post("/api/v1/devices", json={"device_id": device_id, "type": "dc_meter"})
            assert resp.status_code == 201, resp.text
            secrets[device_id] = resp.json()["secret"]
        victim = open_session(node_target, VICTIM, secrets[VICTIM])
        victim.sendall(mqtt_raw.subscribe([(f"iot/{VICTIM}/commands", 1)]))
        assert mqtt_raw.read_packet(victim) == (SUBACK, b"\x00\x01\x01")
        canary = open_session(node_target, CANARY, secrets[CANARY])
        fleet = Fleet(node_target, secrets, victim, canary, http)
        yield fleet
        check_isolation(fleet)
        # The attempts reached every kind of refusal (a guard against strategies that only
        # ever produce harmless input).
        text = http.get("/metrics").text
        for name in ("depot_node_auth_refused_total", "depot_node_acl_denied_total"):
            assert sum(metric_samples(text, name).values()) > 0, name
        closed = metric_samples(text, "depot_node_mqtt_connections_closed_total")
        assert closed['reason="malformed"'] > 0, closed
        assert closed['reason="packet_too_large"'] > 0, closed
        # The victim's session outlived every attempt: it still answers a PINGREQ.
        victim.sendall(mqtt_raw.PINGREQ)
        assert mqtt_raw.read_packet(victim)[0] == 13  # PINGRESP
        victim.close()
        canary.close()


def attempt(target: NodeTarget, data: bytes) -> list[tuple[int, bytes]]:
    """Send *data* on a fresh connection; the packets the node answers within READ_FOR."""
    answers: list[tuple[int, bytes]] = []
    with socket.create_connection((target.mqtt_host, target.mqtt_port), timeout=10) as sock:
        with contextlib.suppress(OSError):  # the node may close before it has read it all
            sock.sendall(data)
        sock.settimeout(READ_FOR)
        with contextlib.suppress(OSError, ConnectionError):
            while True:
                answers.append(mqtt_raw.read_packet(sock))
    return answers


def check_isolation(fleet: Fleet) -> None:
    fleet.victim.settimeout(0.0)
    try:
        received = fleet.victim.recv(65536)
    except BlockingIOError:
        received = b""
    finally:
        fleet.victim.settimeout(10)
    assert received == b"", f"the victim received {received[:200]!r}"
    device = fleet.http.get(f"/api/v1/devices/{VICTIM}").json()
    assert device["counters"]["received"] == 0, device
    assert device["state"]["last_seq"] is None, device
    assert fleet.http.get("/api/v1/quarantine", params={"device_id": VICTIM}).json()["items"] == []


def check_still_serving(fleet: Fleet) -> None:
    seq = fleet.canary_seq
    fleet.canary_seq += 1
    packet_id = seq % 0xFFFF + 1
    fleet.canary.sendall(mqtt_raw.publish(f"iot/{CANARY}/telemetry", telemetry(CANARY, 1, seq), packet_id=packet_id))
    assert mqtt_raw.read_packet(fleet.canary) == (PUBACK, struct.pack("!H", packet_id))
    state = fleet.http.get(f"/api/v1/devices/{CANARY}").json()["state"]
    assert state["last_seq"] == seq, state


def after_attempt(fleet: Fleet) -> None:
    check_isolation(fleet)
    check_still_serving(fleet)


# -- strategies ---------------------------------------------------------------------------

TROUBLE: Final = ["+", "#", "/", "\x00", "$SYS", " ", "é", "\u202e", "🚆", "\ufeff", "..", "iot/+/commands"]

trouble_text = st.one_of(
    st.sampled_from(TROUBLE),
    st.lists(st.sampled_from(["a", "-", *TROUBLE]), max_size=12).map("".join),
    st.text(max_size=80),  # any unicode, surrogates excluded by hypothesis' text()
    # Up to an MQTT string's 65,535 bytes: over the node's 8 KiB CONNECT limit.
    st.integers(min_value=100, max_value=65_535 // 4).map(lambda n: "🚆" * n),
)
#: MQTT strings must be UTF-8 without NUL (§1.5.3); these are not.
not_utf8 = st.sampled_from([b"\xff\xfe", b"victim\xc0", b"\xed\xa0\x80", b"attacker\x00"]) | st.binary(max_size=40)


def identities(
    fleet_secrets: dict[str, str],
) -> st.SearchStrategy[tuple[str | bytes, str | bytes | None, str | bytes | None]]:
    near_misses = [VICTIM, ATTACKER, CANARY, VICTIM.upper(), f"{VICTIM}/x", f"{VICTIM}\x00", f" {ATTACKER}"]
    ids = st.one_of(st.sampled_from(near_misses), trouble_text, not_utf8)
    passwords = st.one_of(st.none(), st.sampled_from([fleet_secrets[ATTACKER], "wrong"]), trouble_text, not_utf8)
    return st.tuples(ids, st.one_of(st.none(), ids), passwords)


topics = st.one_of(
    st.sampled_from(
        [
            f"iot/{VICTIM}/telemetry",
            f"iot/{VICTIM}/commands",
            f"iot/{VICTIM}/status",
            f"iot/{CANARY}/commands",
            "iot/+/commands",
            "iot/+/telemetry",
            "#",
            "+/+/+",
            "iot/#",
            "$SYS/#",
            f"iot/{ATTACKER}/../{VICTIM}/commands",
            f"iot/{ATTACKER}/commands/#",
            f"iot/{ATTACKER}/telemetry",
            f"iot/{ATTACKER}/commands",
        ]
    ),
    trouble_text.filter(lambda t: len(t.encode()) < 8000),
)


@st.composite
def session_packets(draw: st.DrawFn) -> list[tuple[str, bytes, str]]:
    """PUBLISHes and SUBSCRIBEs of the attacker's own session: (kind, packet, topic)."""
    out = []
    for i in range(draw(st.integers(min_value=1, max_value=4))):
        topic = draw(topics)
        if draw(st.booleans()):
            qos = draw(st.integers(min_value=0, max_value=2))
            payload = draw(st.one_of(st.binary(max_size=200), st.just(telemetry(VICTIM, 1, i))))
            out.append(("publish", mqtt_raw.publish(topic, payload, qos=qos, packet_id=i + 1), topic))
        else:
            out.append(("subscribe", mqtt_raw.subscribe([(topic, draw(st.integers(0, 2)))], packet_id=i + 1), topic))
    return out


def valid_packets(secret: str) -> list[bytes]:
    return [
        mqtt_raw.connect(ATTACKER, ATTACKER, secret),
        mqtt_raw.publish(f"iot/{ATTACKER}/telemetry", telemetry(ATTACKER, 1, 0)),
        mqtt_raw.subscribe([(f"iot/{VICTIM}/commands", 1)]),
    ]


@st.composite
def raw_attacks(draw: st.DrawFn, secret: str) -> bytes:
    """Bytes that are not a valid MQTT stream, after a valid CONNECT or instead of one."""
    prefix = draw(st.sampled_from([b"", mqtt_raw.connect(ATTACKER, ATTACKER, secret)]))
    packet = draw(st.sampled_from(valid_packets(secret)))
    attack = draw(
        st.one_of(
            # A truncated packet: the node waits at most mqtt_packet_timeout_s for the rest.
            st.integers(min_value=1, max_value=len(packet) - 1).map(lambda n: packet[:n]),
            # A malformed remaining length (five bytes) or one far over the packet limit.
            st.sampled_from([b"\x30\xff\xff\xff\xff\x7f", b"\x30\xff\xff\xff\x7f", b"\x82\x80\x80\x80\x01"]),
            # Reserved packet types 0 and 15, and a second CONNECT.
            st.sampled_from([b"\x00\x00", b"\xf0\x00", mqtt_raw.connect(ATTACKER, ATTACKER, secret)]),
            st.binary(min_size=1, max_size=300),
        )
    )
    return prefix + attack


# -- the attempts ---------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_connect_attempts_get_no_one_elses_session(fleet: Fleet, data: st.DataObject) -> None:
    client_id, username, password = data.draw(identities(fleet.secrets))
    packet = mqtt_raw.connect(client_id, username, password)
    answers = attempt(fleet.target, packet)
    legit = client_id == username == ATTACKER and password == fleet.secrets[ATTACKER]
    for kind, body in answers:
        if kind == CONNACK and body[1:] == b"\x00":
            assert legit, f"CONNECT accepted for client id {client_id[:80]!r}, username {username!r:.80}"
    after_attempt(fleet)


@FUZZ
@given(data=st.data())
def test_publishes_and_subscriptions_stay_within_the_own_topics(fleet: Fleet, data: st.DataObject) -> None:
    packets = data.draw(session_packets())
    wire = mqtt_raw.connect(ATTACKER, ATTACKER, fleet.secrets[ATTACKER]) + b"".join(p for _, p, _ in packets)
    answers = attempt(fleet.target, wire)
    subscribed = [topic for kind, _, topic in packets if kind == "subscribe"]
    subacks = [body for kind, body in answers if kind == SUBACK]
    for topic, body in zip(subscribed, subacks, strict=False):
        allowed = topic == f"iot/{ATTACKER}/commands"
        assert (body[2] != 0x80) == allowed, f"SUBACK {body!r} for {topic[:80]!r}"
    after_attempt(fleet)


@FUZZ
@given(data=st.data())
def test_malformed_truncated_and_oversized_streams_are_refused(fleet: Fleet, data: st.DataObject) -> None:
    answers = attempt(fleet.target, data.draw(raw_attacks(fleet.secrets[ATTACKER])))
    # Whatever came back, it was never a delivery of someone else's message.
    assert all(kind != PUBLISH for kind, _ in answers), answers
    after_attempt(fleet)
