"""The load generator of ``bench/ingest.py``: N MQTT 3.1.1 devices publishing QoS 1 telemetry.

It runs as its own process (``python -m bench.loader SPEC.json``), started and steered by
``bench/ingest.py``, so that the node (or the bare broker) and the load never share a core's
event loop. It is written to stay out of the way of what it measures: raw asyncio protocols
(no MQTT client library), every PUBLISH encoded before the clock starts, one TCP connection
per device, PUBACKs parsed incrementally from the byte stream, and the next PUBLISH written
from the PUBACK's own callback.

Conversation with the parent, one JSON object per line on stdout, plain lines on stdin:

1. connect every device (CONNECT with client id = username = device id, password = secret),
   then print ``{"event": "ready"}`` and wait for ``go``;
2. run the phase, print ``{"event": "done", ...figures}``;
3. with ``hold``, keep every connection open until the parent writes ``release`` (the bare
   broker's hook may still be working through what it already acknowledged);
4. send DISCONNECT on every connection, close, print ``{"event": "closed"}`` and exit.

Phases: ``idle`` (no PUBLISH at all: the connections only exist, for ``bench/memory.py``),
``saturate`` (every device sends ``messages`` as fast as its in-flight ``window``
allows) and ``paced`` (``rate`` messages per second in total, spread over the devices, for
``duration`` seconds; latency is measured from each message's *scheduled* time, so a stalled
window shows up as latency instead of being hidden).

All clocks are ``time.monotonic()`` (CLOCK_MONOTONIC, the same clock in every process here).
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from tests import mqtt_raw

# --------------------------------------------------------------------------- MQTT encoding
# The packet encoder the tests use (tests/mqtt_raw.py): this process runs from the repository
# root (``python -m bench.loader``), so the one encoder serves both.

PUBACK: Final = 4
CONNACK: Final = 2


def encode_connect(client_id: str, username: str, password: str, *, keepalive: int) -> bytes:
    return mqtt_raw.connect(client_id, username, password, keepalive=keepalive)


def encode_publish(topic: str, payload: bytes, *, packet_id: int) -> bytes:
    return mqtt_raw.publish(topic, payload, qos=1, packet_id=packet_id)


def packet_id_for(index: int) -> int:
    """Packet id of a connection's *index*-th PUBLISH (1..65535; a window is far smaller)."""
    return index % 65535 + 1


# --------------------------------------------------------------------------- payloads
# Protocol v2 telemetry, the same shape as docs/protocol.md and tests/payloads.py.

BASE_TS: Final = datetime(2026, 11, 23, 16, 5, tzinfo=UTC)


def telemetry(device_id: str, boot: int, seq: int) -> bytes:
    ts = BASE_TS + timedelta(seconds=seq)
    doc = {
        "v": 2,
        "device_id": device_id,
        "boot": boot,
        "seq": seq,
        "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
        "m": {
            "voltage_v": 1512.3,
            "current_a": 230.4,
            "power_kw": 348.4,
            "energy_import_kwh": round(123456.789 + seq, 3),
            "energy_export_kwh": 2345.6,
        },
    }
    return json.dumps(doc).encode()


def telemetry_batch(device_id: str, boot: int, seq_start: int, count: int, encoding: str) -> bytes:
    """A batched message of *count* readings from *seq_start* (``bench/backlog.py``'s load)."""
    readings = []
    for seq in range(seq_start, seq_start + count):
        reading = json.loads(telemetry(device_id, boot, seq))
        del reading["v"], reading["device_id"]
        readings.append(reading)
    doc = {"v": 2, "device_id": device_id, "readings": readings}
    if encoding == "cbor":
        import cbor2

        return cbor2.dumps(doc)
    return json.dumps(doc, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- the load


@dataclass(slots=True)
class Spec:
    host: str
    port: int
    devices: list[tuple[str, str]]
    mode: str  # "idle" | "saturate" | "paced"
    window: int
    messages: int = 0  # saturate: per device
    rate: float = 0.0  # paced: messages per second, all devices together
    duration: float = 0.0  # paced: seconds
    boot: int = 1
    seq_start: int = 0
    hold: bool = False
    keepalive: int = 300
    connect_timeout: float = 120.0
    phase_timeout: float = 300.0
    hold_timeout: float = 300.0
    connect_concurrency: int = 64
    #: Readings per PUBLISH: 0 sends single readings; more sends batched messages
    #: (``messages`` is then PUBLISHes per device) in ``encoding`` ("json" or "cbor").
    batch: int = 0
    encoding: str = "json"

    @classmethod
    def load(cls, path: Path) -> Spec:
        raw: dict[str, Any] = json.loads(path.read_text())
        raw["devices"] = [(str(d), str(s)) for d, s in raw["devices"]]
        return cls(**raw)


class LoadError(Exception):
    pass


@dataclass(slots=True)
class Tally:
    """What all connections share: how many PUBACKs are still expected, and the first error."""

    expected: int = 0
    acked: int = 0
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    error: str | None = None

    def ack(self) -> None:
        self.acked += 1
        if self.acked >= self.expected:
            self.finished.set()

    def fail(self, why: str) -> None:
        if self.error is None:
            self.error = why
        self.finished.set()


class DeviceConnection(asyncio.Protocol):
    """One device: its pre-encoded PUBLISHes, their send and PUBACK times, its in-flight window."""

    def __init__(self, device_id: str, secret: str, spec: Spec, tally: Tally) -> None:
        self.device_id = device_id
        self.connect_packet = encode_connect(device_id, device_id, secret, keepalive=spec.keepalive)
        self.window = spec.window
        self.tally = tally
        self.transport: asyncio.Transport | None = None
        self.connack: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.buf = bytearray()
        self.packets: list[bytes] = []
        self.scheduled: list[float] = []  # paced: when each message was due
        self.sent_at: list[float] = []
        self.acked_at: list[float] = []
        self.in_flight: dict[int, int] = {}  # packet id -> message index
        self.next_index = 0  # next message to write
        self.released = 0  # messages that may be written (saturate: all; paced: those due)
        self.acked = 0
        self.closing = False

    # ---- setup

    def prepare(self, count: int, boot: int, seq_start: int, batch: int = 0, encoding: str = "json") -> None:
        topic = f"iot/{self.device_id}/telemetry" + ("/cbor" if encoding == "cbor" else "")
        if batch:
            payloads = [
                telemetry_batch(self.device_id, boot, seq_start + i * batch, batch, encoding) for i in range(count)
            ]
        else:
            payloads = [telemetry(self.device_id, boot, seq_start + i) for i in range(count)]
        self.packets = [
            encode_publish(topic, payload, packet_id=packet_id_for(i)) for i, payload in enumerate(payloads)
        ]
        self.scheduled = [0.0] * count
        self.sent_at = [0.0] * count
        self.acked_at = [0.0] * count

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.connect_packet)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connack.done():
            self.connack.set_exception(ConnectionError(f"{self.device_id}: closed before CONNACK ({exc!r})"))
        if not self.closing and self.acked < len(self.packets):
            self.tally.fail(f"{self.device_id}: connection lost after {self.acked} PUBACKs ({exc!r})")

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos, end = 0, len(buf)
        now = 0.0
        while end - pos >= 2:
            first = buf[pos]
            length, shift, i, complete = 0, 0, pos + 1, False
            while i < end and shift < 28:  # the remaining length has at most 4 bytes
                b = buf[i]
                i += 1
                length |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    complete = True
                    break
            if not complete:
                if shift >= 28:
                    self.tally.fail(f"{self.device_id}: malformed packet from the broker")
                break  # remaining-length field incomplete
            if end - i < length:
                break  # body incomplete
            ptype = first >> 4
            if ptype == PUBACK and length >= 2:
                if not now:
                    now = time.monotonic()
                self._on_puback((buf[i] << 8) | buf[i + 1], now)
            elif ptype == CONNACK and length >= 2 and not self.connack.done():
                self.connack.set_result(buf[i + 1])
            pos = i + length
        del buf[:pos]
        self._pump()

    # ---- sending

    def _on_puback(self, packet_id: int, now: float) -> None:
        index = self.in_flight.pop(packet_id, None)
        if index is None:
            return  # not ours (or a duplicate PUBACK): ignore
        self.acked_at[index] = now
        self.acked += 1
        self.tally.ack()

    def _pump(self) -> None:
        """Write every released message that the window has room for, in one write."""
        transport = self.transport
        if transport is None or self.closing:
            return
        room = self.window - len(self.in_flight)
        if room <= 0 or self.next_index >= self.released:
            return
        start = self.next_index
        stop = min(self.released, start + room)
        now = time.monotonic()
        for index in range(start, stop):
            self.in_flight[packet_id_for(index)] = index
            self.sent_at[index] = now
        self.next_index = stop
        transport.write(b"".join(self.packets[start:stop]))

    def release(self, count: int, due: float = 0.0) -> None:
        for index in range(self.released, min(count, len(self.packets))):
            self.scheduled[index] = due
        self.released = min(count, len(self.packets))
        self._pump()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(mqtt_raw.DISCONNECT)
            self.transport.close()


# --------------------------------------------------------------------------- phases


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_figures(latencies_s: list[float]) -> dict[str, float]:
    ms = sorted(x * 1000 for x in latencies_s)
    return {
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "max_ms": ms[-1] if ms else math.nan,
    }


async def run_saturate(conns: list[DeviceConnection], spec: Spec, tally: Tally) -> None:
    for conn in conns:
        conn.release(len(conn.packets))
    await asyncio.wait_for(tally.finished.wait(), spec.phase_timeout)


async def run_paced(conns: list[DeviceConnection], spec: Spec, tally: Tally) -> None:
    total = tally.expected
    n = len(conns)
    released = [0] * n
    interval = 1.0 / spec.rate
    start = time.monotonic()
    deadline = start + spec.phase_timeout
    k = 0
    while k < total:
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError
        due = start + k * interval
        if due > now:
            await asyncio.sleep(due - now)
            continue
        while k < total and start + k * interval <= now:
            d = k % n
            released[d] += 1
            conns[d].release(released[d], start + k * interval)
            k += 1
    await asyncio.wait_for(tally.finished.wait(), max(1.0, deadline - time.monotonic()))


async def stdin_reader() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def expect_line(reader: asyncio.StreamReader, word: str, within: float) -> None:
    async with asyncio.timeout(within):
        line = await reader.readline()
    if line.strip() != word.encode():
        raise LoadError(f"expected {word!r} from the parent, got {line!r}")


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def connect_all(
    spec: Spec, tally: Tally, factory: type[DeviceConnection] = DeviceConnection
) -> list[DeviceConnection]:
    """Connect every device of *spec* (a *factory* connection each), at most
    ``connect_concurrency`` CONNECTs at a time; LoadError on a refused CONNECT."""
    loop = asyncio.get_running_loop()
    conns = [factory(d, s, spec, tally) for d, s in spec.devices]
    gate = asyncio.Semaphore(spec.connect_concurrency)

    async def one(conn: DeviceConnection) -> None:
        async with gate:
            await loop.create_connection(lambda: conn, spec.host, spec.port)
            code = await conn.connack
        if code != 0:
            raise LoadError(f"{conn.device_id}: CONNACK return code {code}")

    async with asyncio.timeout(spec.connect_timeout):
        await asyncio.gather(*(one(c) for c in conns))
    return conns


def message_counts(spec: Spec, n: int) -> list[int]:
    """How many messages each of the *n* devices sends in the phase."""
    if spec.mode == "idle":
        return [0] * n
    if spec.mode == "saturate":
        return [spec.messages] * n
    if spec.mode == "paced":
        total = round(spec.rate * spec.duration)
        return [len(range(d, total, n)) for d in range(n)]
    raise LoadError(f"unknown mode {spec.mode!r}")


async def main_async(spec: Spec) -> int:
    stdin = await stdin_reader()
    tally = Tally()
    t_connect = time.monotonic()
    conns = await connect_all(spec, tally)
    connect_s = time.monotonic() - t_connect
    try:
        counts = message_counts(spec, len(conns))
        for conn, count in zip(conns, counts, strict=True):
            conn.prepare(count, spec.boot, spec.seq_start, spec.batch, spec.encoding)
        tally.expected = sum(counts)
        emit("ready", connect_s=connect_s, messages=tally.expected)
        await expect_line(stdin, "go", spec.connect_timeout)

        cpu0 = time.process_time()
        t0 = time.monotonic()
        timed_out = False
        try:
            if spec.mode == "saturate":
                await run_saturate(conns, spec, tally)
            elif spec.mode == "paced":
                await run_paced(conns, spec, tally)
        except TimeoutError:
            timed_out = True
        t1 = time.monotonic()
        cpu1 = time.process_time()

        sent = sum(c.next_index for c in conns)
        send_times = [t for c in conns for t in c.sent_at[: c.next_index]]
        ack_times = [t for c in conns for t in c.acked_at if t]
        first_send = min(send_times) if send_times else t0
        last_send = max(send_times) if send_times else t0
        last_ack = max(ack_times) if ack_times else t0
        if spec.mode == "paced":
            lat = [c.acked_at[i] - c.scheduled[i] for c in conns for i in range(len(c.packets)) if c.acked_at[i]]
            stalled = sum(
                1 for c in conns for i in range(c.next_index) if c.sent_at[i] - c.scheduled[i] > 0.001
            )  # written more than 1 ms after it was due (window full or loader late)
        else:
            lat = [c.acked_at[i] - c.sent_at[i] for c in conns for i in range(len(c.packets)) if c.acked_at[i]]
            stalled = 0
        emit(
            "done",
            expected=tally.expected,
            sent=sent,
            acked=tally.acked,
            first_send=first_send,
            last_send=last_send,
            last_ack=last_ack,
            wall_s=t1 - t0,
            loader_cpu_s=cpu1 - cpu0,
            timed_out=timed_out,
            error=tally.error,
            stalled=stalled,
            **latency_figures(lat),
        )
        if spec.hold:
            await expect_line(stdin, "release", spec.hold_timeout)
    finally:
        for conn in conns:
            conn.close()
        await asyncio.sleep(0.1)  # let the DISCONNECTs go out before the loop closes
    emit("closed")
    return 0


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python -m bench.loader SPEC.json", file=sys.stderr)
        return 2
    spec = Spec.load(Path(sys.argv[1]))
    try:
        return asyncio.run(main_async(spec))
    except (LoadError, OSError, TimeoutError) as exc:
        emit("error", error=f"{type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
