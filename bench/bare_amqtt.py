"""A bare amqtt broker with one counting plugin: the baseline of ``bench/ingest.py``.

``python -m bench.bare_amqtt --port P --control-port C`` runs a plain ``amqtt.broker.Broker``
(the version the node pins) with anonymous authentication and :class:`CountingPlugin`, whose
``on_broker_message_received`` hook counts every message amqtt's delivery chain hands to
plugins. That hook is where a plugin-based ingest would see telemetry; amqtt sends the PUBACK
before it runs, so the publishers' PUBACKs say nothing about it and the count is what counts.

A TCP connection to the control port gets one JSON line and is closed:
``{"count": N, "first": T, "last": T, "pid": PID}``, with ``first``/``last`` the
``time.monotonic()`` of the first and the latest counted message (CLOCK_MONOTONIC, shared
with the load generator's clock).

The process stops on SIGINT/SIGTERM, when its standard input closes (its parent is gone),
or after ``--max-seconds``, whichever comes first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import BaseContext
from amqtt.plugins.base import BasePlugin


@dataclass(slots=True)
class Counts:
    count: int = 0
    first: float = 0.0
    last: float = 0.0


COUNTS = Counts()


class CountingPlugin(BasePlugin[BaseContext]):
    """Counts the messages that reach amqtt's ``broker_message_received`` event."""

    async def on_broker_message_received(self, *, client_id: str, message: Any) -> None:
        if message is None:
            return
        now = time.monotonic()
        if not COUNTS.count:
            COUNTS.first = now
        COUNTS.count += 1
        COUNTS.last = now


def broker_config(port: int) -> dict[str, Any]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            # __main__.CountingPlugin when run with -m: the class whose counter we report.
            f"{CountingPlugin.__module__}.CountingPlugin": {},
        },
    }


async def serve(port: int, control_port: int, max_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def report(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = {"count": COUNTS.count, "first": COUNTS.first, "last": COUNTS.last, "pid": os.getpid()}
        writer.write(json.dumps(line).encode() + b"\n")
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()

    async def watch_stdin() -> None:
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while await reader.read(1024):
            pass
        stop.set()

    broker = Broker(broker_config(port))  # inside the running loop, as amqtt requires
    await broker.start()
    control = await asyncio.start_server(report, "127.0.0.1", control_port)
    stdin_task = asyncio.create_task(watch_stdin())
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max_seconds)
    finally:
        stdin_task.cancel()
        control.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(broker.shutdown(), 10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True, help="MQTT port on 127.0.0.1")
    parser.add_argument("--control-port", type=int, required=True, help="control port on 127.0.0.1")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="stop by itself after this long")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(serve(args.port, args.control_port, args.max_seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
