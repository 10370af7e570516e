"""A minimal MQTT 3.1.1 packet encoder/decoder for tests that need exact control of the wire
(pipelining a burst and a DISCONNECT in one write, malformed packets). Not a client."""

from __future__ import annotations

import socket
import struct


def _varlen(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def connect(
    client_id: str | bytes,
    username: str | bytes | None = None,
    password: str | bytes | None = None,
    *,
    keepalive: int = 60,
    clean: bool = True,
    will: tuple[str, bytes] | None = None,
) -> bytes:
    """A CONNECT; *will* is (topic, message), sent with QoS 1 and retain."""
    flags = 0x02 if clean else 0
    payload = _str(client_id)
    if will is not None:
        flags |= 0x04 | (1 << 3) | 0x20
        payload += _str(will[0]) + _str(will[1])
    if username is not None:
        flags |= 0x80
        payload += _str(username)
    if password is not None:
        flags |= 0x40
        payload += _str(password)
    variable = _str("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive)
    body = variable + payload
    return bytes([0x10]) + _varlen(len(body)) + body


def publish(topic: str, payload: bytes, *, qos: int = 1, packet_id: int = 1, dup: bool = False) -> bytes:
    header = 0x30 | (qos << 1) | (0x08 if dup else 0)
    body = _str(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return bytes([header]) + _varlen(len(body)) + body


def puback(packet_id: int) -> bytes:
    return b"\x40\x02" + struct.pack("!H", packet_id)


DISCONNECT = b"\xe0\x00"


def read_packet(sock: socket.socket) -> tuple[int, bytes]:
    """(packet type, body) of the next packet; raises ConnectionError on EOF."""
    first = _recv_exact(sock, 1)[0]
    mult, length = 1, 0
    while True:
        b = _recv_exact(sock, 1)[0]
        length += (b & 0x7F) * mult
        if not b & 0x80:
            break
        mult *= 128
    return first >> 4, _recv_exact(sock, length)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return buf


def subscribe(filters: list[tuple[str | bytes, int]], *, packet_id: int = 1) -> bytes:
    """SUBSCRIBE to (filter, QoS) pairs."""
    body = struct.pack("!H", packet_id) + b"".join(_str(f) + bytes([qos]) for f, qos in filters)
    return bytes([0x82]) + _varlen(len(body)) + body


PINGREQ = b"\xc0\x00"
