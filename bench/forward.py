"""Forwarder throughput against the node's own ingest throughput, in one run.

A backlog drains only if the forwarders send faster than the node takes readings in. This
starts a node (in this process) with both forwarders enabled and both sinks down: the InfluxDB
test server (``tests/forwarding/influx_fake.py``) not listening, moto's S3 server without the
bucket. ``bench/loader.py`` (its own process) saturates the node with QoS 1 telemetry from
``--devices`` devices, ``--messages`` each; ingest throughput = acknowledged messages / time
from the first PUBLISH to the last PUBACK. Then the sinks come back and each forwarder drains
the whole backlog; forward throughput = rows / time from the sinks' return to the last
confirmed batch. The sinks are local test servers: this measures the node's side (reading,
encoding, HTTP), not a WAN.

Usage: ``uv run python bench/forward.py [--devices 20] [--messages 1000]``. Prints a JSON
summary; exits 1 when a forwarder is not faster than ingest. Record figures in
``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aioboto3
import anyio
import httpx
from pydantic import SecretStr

from node.app import NodeAddresses, run_node
from node.config import Settings
from tests.forwarding.influx_fake import BUCKET, ORG, TOKEN
from tests.integration.conftest import make_admin_key

S3_BUCKET = "bench-archive"
S3_KEYS = {"aws_access_key_id": "bench", "aws_secret_access_key": "bench-secret"}


async def load(port: int, devices: list[tuple[str, str]], messages: int, tmp: Path) -> dict[str, Any]:
    spec = tmp / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "host": "127.0.0.1",
                "port": port,
                "devices": devices,
                "mode": "saturate",
                "window": 20,
                "messages": messages,
            }
        )
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.loader", str(spec), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    done: dict[str, Any] = {}
    while line := await proc.stdout.readline():
        event = json.loads(line)
        if event["event"] == "ready":
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
        elif event["event"] == "done":
            done = event
        elif event["event"] == "error":
            raise RuntimeError(event["error"])
    await proc.wait()
    return done


async def bench(devices_n: int, messages: int) -> dict[str, Any]:
    # moto in its own process, like a real S3 endpoint: its CPU is not the node's.
    port = free_port()
    moto = subprocess.Popen(  # noqa: ASYNC220 - started once, before anything is measured
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    s3_url = f"http://127.0.0.1:{port}"
    await wait_listening(port)
    influx_port = free_port()  # nothing listens there until the load is in
    influx_url = f"http://127.0.0.1:{influx_port}"
    tmp = Path(tempfile.mkdtemp(prefix="depot-forward-bench-"))
    key = make_admin_key(tmp)
    settings = Settings(
        data_dir=tmp,
        mqtt_bind="127.0.0.1:0",
        http_bind="127.0.0.1:0",
        sqlite_synchronous="NORMAL",
        log_level="warning",
        alerts_enabled=False,
        influxdb_enabled=True,
        influxdb_url=influx_url,
        influxdb_org=ORG,
        influxdb_bucket=BUCKET,
        influxdb_token=SecretStr(TOKEN),
        s3_enabled=True,
        s3_bucket=S3_BUCKET,
        s3_endpoint_url=s3_url,
        s3_path_style=True,
        s3_access_key_id=S3_KEYS["aws_access_key_id"],
        s3_secret_access_key=SecretStr(S3_KEYS["aws_secret_access_key"]),
        s3_window_s=1.0,
        s3_grace_s=0.2,
        forward_retry_initial_s=0.05,
        forward_retry_max_s=0.2,
        forward_poll_interval_s=0.05,
        forward_monitor_interval_s=0.2,
    )
    shutdown = anyio.Event()
    result: dict[str, Any] = {"devices": devices_n, "messages_per_device": messages}
    async with anyio.create_task_group() as tg:
        addresses: NodeAddresses = await tg.start(
            lambda task_status: run_node(settings, shutdown=shutdown, task_status=task_status)
        )
        http = httpx.AsyncClient(
            base_url="http://{}:{}".format(*addresses.http), headers={"Authorization": f"Bearer {key}"}, timeout=30
        )
        devices = []
        for i in range(devices_n):
            device_id = f"bench-{i:03d}"
            resp = await http.post("/api/v1/devices", json={"device_id": device_id, "type": "dc_meter"})
            devices.append((device_id, resp.json()["secret"]))
        done = await load(addresses.mqtt[1], devices, messages, tmp)
        ingest_s = done["last_ack"] - done["first_send"]
        result["ingest"] = {
            "acked": done["acked"],
            "seconds": round(ingest_s, 3),
            "rows_per_s": round(done["acked"] / ingest_s),
        }
        rows = done["acked"]
        # The S3 archive takes only windows that have closed: let the last one close first.
        await anyio.sleep(settings.s3_window_s + settings.s3_grace_s)
        # The test server starts in ~0.3 s; the forwarder's next retry (<= 0.25 s) finds it.
        # The sinks come back.
        started = time.monotonic()
        influx = subprocess.Popen(  # noqa: ASYNC220 - the sink comes back
            [sys.executable, "-m", "tests.forwarding.influx_fake", str(influx_port)]
        )
        async with aioboto3.Session(region_name="us-east-1", **S3_KEYS).client("s3", endpoint_url=s3_url) as s3:
            await s3.create_bucket(Bucket=S3_BUCKET)
        finished: dict[str, float] = {}
        while len(finished) < 2:
            for item in (await http.get("/api/v1/forwarders")).json()["items"]:
                if item["name"] not in finished and item["position"] == rows:
                    finished[item["name"]] = time.monotonic() - started
            await anyio.sleep(0.05)
        for name, seconds in finished.items():
            result[name] = {"rows": rows, "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds)}
        await http.aclose()
        shutdown.set()
    influx.terminate()
    influx.wait()
    moto.terminate()
    moto.wait()
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_listening(port: int) -> None:
    with anyio.fail_after(60):
        while True:
            try:
                stream = await anyio.connect_tcp("127.0.0.1", port)
            except OSError:
                await anyio.sleep(0.1)
                continue
            await stream.aclose()
            return


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto logs every request
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--messages", type=int, default=1000, help="per device")
    args = parser.parse_args(argv)
    result = asyncio.run(bench(args.devices, args.messages))
    print(json.dumps(result, indent=2))
    ingest = result["ingest"]["rows_per_s"]
    slow = [name for name in ("influxdb", "s3") if result[name]["rows_per_s"] <= ingest]
    if slow:
        print(f"slower than ingest ({ingest} rows/s): {', '.join(slow)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
