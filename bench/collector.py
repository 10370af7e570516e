"""The Mosquitto peer's collector for ``bench/ingest.py``: paho-mqtt → batched SQLite.

This is the ingest that users build today next to a standalone broker: a paho-mqtt client
subscribes to ``iot/+/telemetry`` with QoS 1 and writes what it receives to SQLite. It is
built to be a fair peer, not a straw man:

* SQLite in WAL mode with ``synchronous = FULL`` (the node's default), one writer
  connection, one transaction per batch with ``executemany``, and a unique
  ``(device_id, boot, seq)`` key like the node's (``INSERT OR IGNORE``: a redelivered message
  is not stored twice, and not counted).
* paho's network loop runs in its own thread (``loop_start``) and only parses the JSON and
  queues the row; the main thread drains the queue in batches of whatever is there (up to
  ``--max-batch``) and commits, so a slow commit grows the next batch instead of stalling
  the network thread.
* paho acknowledges each PUBLISH when ``on_message`` returns, that is *before* the commit
  (paho's default, what a plain collector does). That is a weaker guarantee than the node's
  PUBACK-after-commit, and it favours the peer: Mosquitto can send the next message sooner.

A TCP connection to ``--control-port`` gets one JSON line and is closed:
``{"count": N, "first": T, "last": T, "subscribed": bool, "pid": PID, "commits": C}``, with
``count`` the rows committed (duplicates excluded) and ``first``/``last`` the
``time.monotonic()`` of the first and the latest commit that added rows (CLOCK_MONOTONIC,
the clock of the load generator too).

The process stops on SIGINT/SIGTERM, when its standard input closes (its parent is gone),
or after ``--max-seconds``, whichever comes first; rows already queued are committed first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import socket
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Final

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

TOPIC: Final = "iot/+/telemetry"

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS telemetry (
    id        INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    boot      INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    ts        TEXT NOT NULL,
    m         TEXT NOT NULL,
    payload   BLOB NOT NULL,
    UNIQUE (device_id, boot, seq)
) STRICT;
"""

INSERT: Final = "INSERT OR IGNORE INTO telemetry (device_id, boot, seq, ts, m, payload) VALUES (?, ?, ?, ?, ?, ?)"

Row = tuple[str, int, int, str, str, bytes]


@dataclass(slots=True)
class Counts:
    count: int = 0
    first: float = 0.0
    last: float = 0.0
    commits: int = 0
    bad: int = 0
    subscribed: bool = False


class Collector:
    """The paho client (network thread) and the SQLite writer (the caller's thread)."""

    def __init__(self, db: Path, host: str, port: int, *, max_batch: int) -> None:
        self.counts = Counts()
        self.rows: queue.SimpleQueue[Row | None] = queue.SimpleQueue()
        self.max_batch = max_batch
        self.conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = FULL")
        self.conn.executescript(SCHEMA)
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="bench-collector", protocol=mqtt.MQTTv311, clean_session=True
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.connect(host, port, keepalive=600)
        self.client.loop_start()

    # ---- network thread

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe(TOPIC, qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        self.counts.subscribed = True

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            doc = json.loads(msg.payload)
            row = (
                str(doc["device_id"]),
                int(doc["boot"]),
                int(doc["seq"]),
                str(doc["ts"]),
                json.dumps(doc["m"]),
                bytes(msg.payload),
            )
        except (ValueError, KeyError, TypeError):
            self.counts.bad += 1
            return
        self.rows.put(row)

    # ---- writer

    def write(self, stop: threading.Event) -> None:
        """Commit batches until *stop* is set and the queue is empty."""
        while True:
            try:
                first = self.rows.get(timeout=0.2)
            except queue.Empty:
                if stop.is_set():
                    return
                continue
            if first is None:
                return
            batch = [first]
            with contextlib.suppress(queue.Empty):
                while len(batch) < self.max_batch:
                    row = self.rows.get_nowait()
                    if row is None:
                        break
                    batch.append(row)
            cur = self.conn.cursor()
            cur.execute("BEGIN")
            cur.executemany(INSERT, batch)
            added = cur.rowcount
            cur.execute("COMMIT")
            now = time.monotonic()
            c = self.counts
            c.commits += 1
            if added > 0:
                if not c.count:
                    c.first = now
                c.count += added
                c.last = now

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.conn.close()


def serve_control(collector: Collector, port: int, stop: threading.Event) -> None:
    """Answer each connection to *port* with the counts (a thread of its own)."""
    with socket.create_server(("127.0.0.1", port)) as srv:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            c = collector.counts
            line = {
                "count": c.count,
                "first": c.first,
                "last": c.last,
                "commits": c.commits,
                "bad": c.bad,
                "subscribed": c.subscribed,
                "pid": os.getpid(),
            }
            with conn, contextlib.suppress(OSError):
                conn.sendall(json.dumps(line).encode() + b"\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True, help="the broker's MQTT port on 127.0.0.1")
    parser.add_argument("--control-port", type=int, required=True, help="control port on 127.0.0.1")
    parser.add_argument("--db", type=Path, required=True, help="SQLite database file")
    parser.add_argument("--max-batch", type=int, default=1000, help="rows per transaction at most")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="stop by itself after this long")
    args = parser.parse_args()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def watch_stdin() -> None:
        while sys.stdin.buffer.read(1024):
            pass
        stop.set()

    collector = Collector(args.db, "127.0.0.1", args.port, max_batch=args.max_batch)
    threading.Thread(target=serve_control, args=(collector, args.control_port, stop), daemon=True).start()
    threading.Thread(target=watch_stdin, daemon=True).start()
    timer = threading.Timer(args.max_seconds, stop.set)
    timer.daemon = True
    timer.start()
    try:
        collector.write(stop)
    finally:
        collector.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
