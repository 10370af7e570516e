"""Reconnect storm: 1,000 devices connect at once while 20 others keep publishing telemetry.

Run from the repository root:

    uv run python bench/reconnect_storm.py                  # defaults, see --help
    uv run python bench/reconnect_storm.py --storm 200      # a smaller storm

Processes: the node (``python -m node serve`` on a fresh data directory, default settings,
``auth_concurrency = 2``), the telemetry load generator and the storm load generator
(``bench/storm_load.py``: raw asyncio sockets), so the node's event loop shares nothing with
the load.

1. ``--telemetry`` devices (20) connect and publish QoS 1 at ``--rate`` messages per second
   each, one in flight; latency is PUBLISH (its scheduled time) → PUBACK, which the node sends
   after the SQLite commit.
2. After ``--baseline`` seconds, ``--storm`` devices (1,000) open their connections and send
   CONNECT with their passwords all at once. **Cold**: the node has never verified these
   secrets, so each costs one Argon2id verification (~20 ms CPU, 19 MiB) in a worker thread.
   Time to all connected = last CONNACK - first connection attempt.
3. They disconnect, and after a pause reconnect at once again. **Warm**: the node remembers
   verified secrets (a keyed digest), so no Argon2 is needed.
4. The telemetry devices' latency is reported for the messages scheduled before the first
   storm, during each storm (from its start to its last CONNACK) and after.

The exit code is 1 when something broke: a device was refused, a phase timed out, a process
failed, a telemetry message was not acknowledged. On a shared machine, look at the ratio of
the latencies during and before a storm within one run, not at absolute figures across runs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ingest import (
    BenchError,
    Child,
    NodeProcess,
    children,
    cpu_seconds,
    machine_busy,
    spawn_child,
    start_node_process,
)
from bench.loader import percentile

REPO: Final = Path(__file__).resolve().parent.parent


class Run:
    def __init__(self, opts: argparse.Namespace, tmp: Path, kids: list[Child]) -> None:
        self.opts = opts
        self.tmp = tmp
        self.kids = kids
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DEPOT_NODE_")}
        self.env["PYTHONUNBUFFERED"] = "1"

    def spawn(self, name: str, args: list[str]) -> Child:
        child = Child(name, args, env=self.env, log=self.tmp / f"{name}.log", stdout_lines=True)
        self.kids.append(child)
        return child

    def start_node(self) -> NodeProcess:
        # The bench registers every device through the API with one key, as fast as Argon2
        # allows: the per-key HTTP rate limit (ADR 0011) is off, so a larger --storm than the
        # limit's burst is not throttled into a failed registration.
        env = {**self.env, "DEPOT_NODE_LOG_LEVEL": "warning", "DEPOT_NODE_HTTP_RATE_LIMIT_PER_S": "0"}
        if self.opts.connect_concurrency is not None:
            env["DEPOT_NODE_MQTT_CONNECT_CONCURRENCY"] = str(self.opts.connect_concurrency)
        spawn = functools.partial(spawn_child, self.kids, self.tmp, self.env)
        return start_node_process(spawn, "node", src=REPO, env=env, data=self.tmp / "node-data")

    def register(self, client: httpx.Client, prefix: str, count: int) -> list[tuple[str, str]]:
        def one(i: int) -> tuple[str, str]:
            device_id = f"{prefix}-{i:05d}"
            resp = client.post("/api/v1/devices", json={"device_id": device_id, "type": "dc_meter"})
            if resp.status_code != 201:
                raise BenchError(f"registering {device_id}: {resp.status_code} {resp.text[:200]}")
            return device_id, str(resp.json()["secret"])

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            return list(pool.map(one, range(count)))

    def spec(self, name: str, port: int, devices: list[tuple[str, str]], **extra: Any) -> str:
        path = self.tmp / f"spec-{name}.json"
        path.write_text(json.dumps({"host": "127.0.0.1", "port": port, "devices": devices, **extra}))
        return str(path)

    def storm(self, name: str, port: int, devices: list[tuple[str, str]], node: psutil.Process) -> dict[str, Any]:
        loader = self.spawn(name, ["-m", "bench.storm_load", "storm", self.spec(name, port, devices, timeout=600)])
        loader.expect("ready", timeout=120)
        cpu0, busy0, wall0 = sum(cpu_seconds(node)), machine_busy(), time.monotonic()
        loader.send("go")
        result = loader.expect("connected", timeout=660)
        cpu1, busy1, wall1 = sum(cpu_seconds(node)), machine_busy(), time.monotonic()
        result["node_cpu_s"] = cpu1 - cpu0
        result["machine_cores"] = (busy1 - busy0) / max(wall1 - wall0, 1e-9)
        result["loader"] = loader
        if result["failed"]:
            raise BenchError(f"{name}: {result['failed']} devices not connected, e.g. {result['failures']}")
        return result

    def release(self, result: dict[str, Any]) -> None:
        loader: Child = result.pop("loader")
        loader.send("release")
        loader.expect("closed", timeout=120)
        loader.proc.wait(60)
        self.kids.remove(loader)
        loader.stop()


def figures(records: list[list[float]], lo: float, hi: float) -> dict[str, float]:
    ms = sorted((acked - due) * 1000 for due, acked in records if lo <= due < hi and acked)
    missing = sum(1 for due, acked in records if lo <= due < hi and not acked)
    return {
        "messages": len(ms),
        "unacked": missing,
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "max_ms": ms[-1] if ms else math.nan,
    }


def row(name: str, f: dict[str, float]) -> str:
    return (
        f"  {name:<28} {f['messages']:>7,.0f} msgs  p50 {f['p50_ms']:7.1f} ms  p99 {f['p99_ms']:7.1f} ms"
        f"  max {f['max_ms']:7.1f} ms"
    )


def run(opts: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="storm-") as tmp_name, children() as kids:
        r = Run(opts, Path(tmp_name), kids)
        started_node = r.start_node()
        node, port, client = started_node.proc, started_node.mqtt_port, started_node.client
        t0 = time.monotonic()
        telemetry_devices = r.register(client, "tele", opts.telemetry)
        storm_devices = r.register(client, "storm", opts.storm)
        print(f"registered {opts.telemetry} + {opts.storm} devices in {time.monotonic() - t0:.1f} s")

        tele = r.spawn(
            "telemetry",
            ["-m", "bench.storm_load", "telemetry", r.spec("telemetry", port, telemetry_devices, rate=opts.rate)],
        )
        tele.expect("ready", timeout=120)
        tele.send("go")
        started = time.monotonic()
        time.sleep(opts.baseline)
        storms: list[tuple[str, dict[str, Any]]] = []
        for kind in ("cold", "warm"):
            result = r.storm(f"storm-{kind}", port, storm_devices, node)
            took = result["last"] - result["start"]
            conn_s = result["connect_s"]
            print(
                f"{kind} storm: {result['connected']:,} devices connected in {took:.2f} s"
                f" (median device {percentile(conn_s, 50):.2f} s, p99 {percentile(conn_s, 99):.2f} s);"
                f" node CPU {result['node_cpu_s']:.1f} s; machine {result['machine_cores']:.2f} cores busy"
            )
            time.sleep(opts.hold)
            r.release(result)
            storms.append((kind, result))
            time.sleep(opts.pause)
        tele.send("stop")
        done = tele.expect("done", timeout=120)
        records: list[list[float]] = done["records"]

        lo = started + 1.0  # skip the first second (start-up of the publishers)
        first = storms[0][1]["start"]
        print(f"telemetry: {opts.telemetry} devices x {opts.rate:g} msg/s, QoS 1, one in flight each")
        print(row("before the storms", figures(records, lo, first)))
        failed = sum(1 for _, acked in records if not acked) > opts.telemetry  # the last one may be cut off
        for i, (kind, res) in enumerate(storms):
            print(row(f"during the {kind} storm", figures(records, res["start"], res["last"])))
            after_hi = storms[i + 1][1]["start"] if i + 1 < len(storms) else math.inf
            print(row(f"after the {kind} storm", figures(records, res["last"], after_hi)))
        metrics = client.get("/metrics").text
        refused = [line for line in metrics.splitlines() if line.startswith("depot_node_auth_refused_total")]
        print(f"node: refused CONNECTs {refused or 'none'}; lost telemetry connections {done['lost']}")
        if failed or done["lost"]:
            print("FAIL: telemetry messages were not acknowledged or connections were lost")
            return 1
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--storm", type=int, default=1000, help="devices reconnecting at once (default 1000)")
    p.add_argument("--telemetry", type=int, default=20, help="devices publishing throughout (default 20)")
    p.add_argument("--rate", type=float, default=10.0, help="messages/s per telemetry device (default 10)")
    p.add_argument("--baseline", type=float, default=10.0, help="seconds of telemetry before the storm")
    p.add_argument("--hold", type=float, default=3.0, help="seconds the storm devices stay connected")
    p.add_argument("--pause", type=float, default=5.0, help="seconds between and after the storms")
    p.add_argument(
        "--connect-concurrency",
        type=int,
        default=None,
        help="the node's mqtt_connect_concurrency (default: the node's default); 10000 = unbounded",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    try:
        return run(opts)
    except BenchError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
