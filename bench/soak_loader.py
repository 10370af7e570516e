"""The load generator of ``bench/soak.py``: a steady rate of QoS 1 telemetry for a long time.

``python -m bench.soak_loader SPEC.json [PROGRESS_S]`` (the :class:`bench.loader.Spec` fields, ``mode``
``"paced"``, with ``rate`` and ``duration``). Unlike ``bench/loader.py``, which encodes every
PUBLISH of a phase before the clock starts, this one encodes each PUBLISH when it is due and
keeps nothing per message but its PUBLISH → PUBACK latency (8 bytes in an ``array``), so an
hour at 1,000 msg/s stays small. Device k % N sends message k, with consecutive ``seq``
per device from ``seq_start``.

Conversation with the parent, one JSON object per line on stdout, plain lines on stdin:
connect every device, ``{"event": "ready"}``, wait for ``go``; then every PROGRESS_S
seconds (default 10) ``{"event": "progress", "sent", "acked", "p50_ms", "p99_ms", "max_ms"}`` (latency
over the interval since the previous one, from each message's *scheduled* time), and at the
end ``{"event": "done", ...}`` with the totals and the percentiles of the whole run; DISCONNECT
on every connection, ``{"event": "closed"}``.
"""

from __future__ import annotations

import array
import asyncio
import collections
import sys
import time
from pathlib import Path
from typing import Any

from bench.loader import (
    DeviceConnection,
    LoadError,
    Spec,
    Tally,
    connect_all,
    emit,
    encode_publish,
    expect_line,
    latency_figures,
    packet_id_for,
    stdin_reader,
    telemetry,
)

#: Seconds between progress events (the second command-line argument overrides it).
PROGRESS_S = 10.0


class StreamConnection(DeviceConnection):
    """One device that encodes each PUBLISH when it is released (no per-message lists)."""

    latencies: array.array[float]

    def __init__(self, device_id: str, secret: str, spec: Spec, tally: Tally) -> None:
        super().__init__(device_id, secret, spec, tally)
        self.topic = f"iot/{device_id}/telemetry"
        self.boot = spec.boot
        self.seq = spec.seq_start
        self.due: collections.deque[float] = collections.deque()  # released, not yet written
        self.due_of: dict[int, float] = {}  # packet id in flight -> when it was due
        self.sent = 0

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connack.done():
            self.connack.set_exception(ConnectionError(f"{self.device_id}: closed before CONNACK ({exc!r})"))
        if not self.closing:
            self.tally.fail(f"{self.device_id}: connection lost after {self.acked} PUBACKs ({exc!r})")

    def release_one(self, due: float) -> None:
        self.due.append(due)
        self._pump()

    def _pump(self) -> None:
        transport = self.transport
        if transport is None or self.closing:
            return
        room = self.window - len(self.due_of)
        if room <= 0 or not self.due:
            return
        chunks = []
        while room > 0 and self.due:
            packet_id = packet_id_for(self.sent)
            self.due_of[packet_id] = self.due.popleft()
            chunks.append(
                encode_publish(self.topic, telemetry(self.device_id, self.boot, self.seq), packet_id=packet_id)
            )
            self.seq += 1
            self.sent += 1
            room -= 1
        transport.write(b"".join(chunks))

    def _on_puback(self, packet_id: int, now: float) -> None:
        due = self.due_of.pop(packet_id, None)
        if due is None:
            return
        self.latencies.append(now - due)
        self.acked += 1
        self.tally.ack()


async def run_stream(conns: list[StreamConnection], spec: Spec, tally: Tally, progress_s: float) -> None:
    """Release message k to device k % N at ``start + k / rate``; progress every *progress_s*."""
    n = len(conns)
    interval = 1.0 / spec.rate
    start = time.monotonic()
    deadline = start + spec.duration + spec.phase_timeout
    next_progress = start + progress_s
    mark = 0  # latencies[mark:] are the current interval's
    k = 0
    latencies = StreamConnection.latencies
    while k < tally.expected and tally.error is None:
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError
        if now >= next_progress:
            window = list(latencies[mark:])
            mark = len(latencies)
            emit("progress", sent=sum(c.sent for c in conns), acked=tally.acked, **latency_figures(window))
            next_progress += progress_s
        due = start + k * interval
        if due > now:
            await asyncio.sleep(min(due, next_progress) - now)
            continue
        while k < tally.expected and start + k * interval <= now:
            conns[k % n].release_one(start + k * interval)
            k += 1
    await asyncio.wait_for(tally.finished.wait(), max(1.0, deadline - time.monotonic()))


async def main_async(spec: Spec, progress_s: float) -> int:
    stdin = await stdin_reader()
    tally = Tally(expected=round(spec.rate * spec.duration))
    StreamConnection.latencies = array.array("d")
    t_connect = time.monotonic()
    conns: list[Any] = await connect_all(spec, tally, StreamConnection)
    try:
        emit("ready", connect_s=time.monotonic() - t_connect, messages=tally.expected)
        await expect_line(stdin, "go", spec.connect_timeout)
        cpu0, t0 = time.process_time(), time.monotonic()
        timed_out = False
        try:
            await run_stream(conns, spec, tally, progress_s)
        except TimeoutError:
            timed_out = True
        emit(
            "done",
            expected=tally.expected,
            sent=sum(c.sent for c in conns),
            acked=tally.acked,
            wall_s=time.monotonic() - t0,
            loader_cpu_s=time.process_time() - cpu0,
            timed_out=timed_out,
            error=tally.error,
            **latency_figures(list(StreamConnection.latencies)),
        )
    finally:
        for conn in conns:
            conn.close()
        await asyncio.sleep(0.1)  # let the DISCONNECTs go out before the loop closes
    emit("closed")
    return 0


def main() -> int:
    if len(sys.argv) not in (2, 3):
        print("usage: python -m bench.soak_loader SPEC.json [PROGRESS_S]", file=sys.stderr)
        return 2
    spec = Spec.load(Path(sys.argv[1]))
    progress_s = float(sys.argv[2]) if len(sys.argv) == 3 else PROGRESS_S
    try:
        return asyncio.run(main_async(spec, progress_s))
    except (LoadError, OSError, TimeoutError) as exc:
        emit("error", error=f"{type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
