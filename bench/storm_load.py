"""The load generators of ``bench/reconnect_storm.py``, each run as its own process.

``python -m bench.storm_load telemetry SPEC.json``
    Connects the telemetry devices, prints ``{"event": "ready"}``, and on ``go`` each device
    publishes QoS 1 telemetry at ``rate`` messages per second, one in flight (the next is
    written at its scheduled time, or at the PUBACK of the previous one if that is later). On
    ``stop`` it prints ``{"event": "done", "records": [[scheduled, acked], ...]}``: latency is
    measured from each message's *scheduled* time, so a stalled device shows as latency instead
    of being hidden by a message not sent.

``python -m bench.storm_load storm SPEC.json``
    Encodes every CONNECT, prints ``ready``; on ``go`` opens every connection at once and
    writes its CONNECT, then prints ``{"event": "connected", ...}`` with when it started, when
    the last CONNACK came, and how many were refused or failed. It keeps the sessions open
    until ``release``, then sends DISCONNECT on each and prints ``closed``.

Raw asyncio sockets and the tests' packet encoder (``tests/mqtt_raw.py``), as in
``bench/loader.py``; every time is ``time.monotonic()`` (CLOCK_MONOTONIC, shared by the
processes of one machine), so the parent can put the telemetry latencies on the storm's clock.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any, Final

from bench.loader import emit, encode_connect, encode_publish, expect_line, packet_id_for, stdin_reader, telemetry
from tests import mqtt_raw

CONNACK: Final = 2
PUBACK: Final = 4


class Connection(asyncio.Protocol):
    """One device's connection: its CONNACK, and the PUBACKs of its one message in flight."""

    def __init__(self, connect: bytes) -> None:
        self.connect = connect
        self.transport: asyncio.Transport | None = None
        self.connack: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.pubacks: asyncio.Queue[int] = asyncio.Queue()
        self.buf = bytearray()
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.connect)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.connack.done():
            self.connack.set_exception(ConnectionError(f"closed before CONNACK ({exc!r})"))
        self.pubacks.put_nowait(-1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 2:
            length, shift, i = 0, 0, 1
            while i < len(self.buf):
                b = self.buf[i]
                i += 1
                length |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    break
            else:
                return
            if len(self.buf) - i < length:
                return
            ptype, body = self.buf[0] >> 4, bytes(self.buf[i : i + length])
            del self.buf[: i + length]
            if ptype == CONNACK and not self.connack.done():
                self.connack.set_result(body[1])
            elif ptype == PUBACK:
                self.pubacks.put_nowait((body[0] << 8) | body[1])

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(mqtt_raw.DISCONNECT)
            self.transport.close()


async def open_connection(host: str, port: int, connect: bytes) -> Connection:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: Connection(connect), host, port)
    return conn


# --------------------------------------------------------------------------- telemetry


async def publisher(
    conn: Connection, device_id: str, rate: float, start: float, stop: asyncio.Event
) -> list[list[float]]:
    """Publish at *rate*/s from *start* until *stop*; ``[scheduled, acked]`` per message (acked 0: none)."""
    assert conn.transport is not None
    records: list[list[float]] = []
    topic = f"iot/{device_id}/telemetry"
    index = 0
    while not stop.is_set() and not conn.lost:
        due = start + index / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        pid = packet_id_for(index)
        conn.transport.write(encode_publish(topic, telemetry(device_id, 1, index), packet_id=pid))
        record = [due, 0.0]
        records.append(record)
        while True:
            acked = await conn.pubacks.get()
            if acked in (pid, -1):
                break
        if acked == pid:
            record[1] = time.monotonic()
        index += 1
    return records


async def run_telemetry(spec: dict[str, Any]) -> None:
    stdin = await stdin_reader()
    devices: list[tuple[str, str]] = spec["devices"]
    conns = [
        await open_connection(spec["host"], spec["port"], encode_connect(d, d, s, keepalive=300)) for d, s in devices
    ]
    for (device_id, _), conn in zip(devices, conns, strict=True):
        code = await asyncio.wait_for(conn.connack, 60)
        if code != 0:
            emit("error", error=f"{device_id}: CONNACK {code}")
            return
    emit("ready")
    await expect_line(stdin, "go", 600)
    stop = asyncio.Event()
    # Stagger the devices over one period so their messages do not arrive in bursts.
    t0 = time.monotonic() + 0.05
    rate = float(spec["rate"])
    tasks = [
        asyncio.create_task(publisher(c, d, rate, t0 + i / (rate * len(conns)), stop))
        for i, ((d, _), c) in enumerate(zip(devices, conns, strict=True))
    ]
    await expect_line(stdin, "stop", 3600)
    stop.set()
    per_device = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    for conn in conns:
        conn.close()
    emit("done", records=[r for records in per_device for r in records], lost=sum(c.lost for c in conns))


# --------------------------------------------------------------------------- storm


async def run_storm(spec: dict[str, Any]) -> None:
    stdin = await stdin_reader()
    devices: list[tuple[str, str]] = spec["devices"]
    packets = [encode_connect(d, d, s, keepalive=600) for d, s in devices]
    emit("ready", devices=len(devices))
    await expect_line(stdin, "go", 600)
    start = time.monotonic()
    done_at: list[float] = []
    failures: list[str] = []
    conns: list[Connection] = []

    async def one(device_id: str, packet: bytes) -> None:
        try:
            conn = await open_connection(spec["host"], spec["port"], packet)
            conns.append(conn)
            code = await conn.connack
        except (OSError, ConnectionError) as exc:
            failures.append(f"{device_id}: {exc}")
            return
        if code != 0:
            failures.append(f"{device_id}: CONNACK {code}")
            return
        done_at.append(time.monotonic())

    await asyncio.wait_for(
        asyncio.gather(*(one(d, p) for (d, _), p in zip(devices, packets, strict=True))), spec["timeout"]
    )
    emit(
        "connected",
        start=start,
        last=max(done_at, default=start),
        connected=len(done_at),
        failed=len(failures),
        failures=failures[:5],
        connect_s=sorted(t - start for t in done_at),
    )
    await expect_line(stdin, "release", 3600)
    for conn in conns:
        conn.close()
    await asyncio.sleep(0.2)  # let the DISCONNECTs go out
    emit("closed")


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] not in ("telemetry", "storm"):
        print("usage: python -m bench.storm_load telemetry|storm SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(sys.argv[2]).read_text())
    runner = run_telemetry if sys.argv[1] == "telemetry" else run_storm
    try:
        asyncio.run(runner(spec))
    except (OSError, TimeoutError, ConnectionError) as exc:
        emit("error", error=f"{type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
