"""A synchronous MQTT 3.1.1 device connection over a raw socket, built on :mod:`tests.mqtt_raw`.

Synchronous on purpose: a hypothesis state machine is synchronous, and a raw socket gives exact
control of the wire (explicit packet ids, the DUP flag, closing with or without DISCONNECT).
Every socket operation is bounded by a timeout.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from typing import Final, Self

from tests import mqtt_raw

CONNACK: Final = 2
PUBACK: Final = 4

#: CONNACK return codes of MQTT 3.1.1.
ACCEPTED: Final = 0
BAD_USERNAME_OR_PASSWORD: Final = 4
NOT_AUTHORIZED: Final = 5


class ProtocolError(AssertionError):
    """The node answered something the protocol does not allow here."""


class DeviceConnection:
    """One TCP connection to the node's MQTT listener, speaking as one client."""

    def __init__(self, host: str, port: int, *, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.sock: socket.socket | None = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self._next_id = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def open(self) -> bool:
        return self.sock is not None

    def _socket(self) -> socket.socket:
        if self.sock is None:
            raise ProtocolError("connection already closed")
        return self.sock

    def connect(self, client_id: str, username: str | None, password: str | None) -> int:
        """Send CONNECT (clean session) and return the CONNACK return code."""
        sock = self._socket()
        sock.sendall(mqtt_raw.connect(client_id, username, password, keepalive=60))
        kind, body = mqtt_raw.read_packet(sock)
        if kind != CONNACK or len(body) != 2:  # CONNACK has 2 bytes
            raise ProtocolError(f"expected CONNACK, got packet type {kind} ({body!r})")
        return body[1]

    def next_packet_id(self) -> int:
        self._next_id = self._next_id % 0xFFFF + 1
        return self._next_id

    def publish(self, topic: str, payload: bytes, *, packet_id: int, dup: bool = False) -> None:
        """Send a QoS 1 PUBLISH and wait for its PUBACK (the node sends it after the commit)."""
        sock = self._socket()
        sock.sendall(mqtt_raw.publish(topic, payload, qos=1, packet_id=packet_id, dup=dup))
        kind, body = mqtt_raw.read_packet(sock)
        if kind != PUBACK:
            raise ProtocolError(f"expected PUBACK for packet id {packet_id}, got packet type {kind} ({body!r})")
        (acked,) = struct.unpack("!H", body)
        if acked != packet_id:
            raise ProtocolError(f"PUBACK for packet id {acked}, expected {packet_id}")

    def disconnect_clean(self) -> None:
        """Send DISCONNECT, then close."""
        sock = self._socket()
        with contextlib.suppress(OSError):
            sock.sendall(mqtt_raw.DISCONNECT)
        self.close()

    def close_abrupt(self, *, reset: bool) -> None:
        """Close without DISCONNECT: a FIN, or with *reset* a TCP RST (SO_LINGER 0)."""
        sock = self._socket()
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    def closed_by_peer(self, timeout: float) -> bool:
        """True when the node closes the connection within *timeout* (EOF or reset).

        Anything the node sends first is read and ignored.
        """
        sock = self._socket()
        deadline = time.monotonic() + timeout
        try:
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                if not sock.recv(4096):
                    return True
        except TimeoutError:
            return False
        except OSError:
            return True
        finally:
            sock.settimeout(self.timeout)
        return False

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None
