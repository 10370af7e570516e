"""Soak benchmark: the node under a steady QoS 1 load for an hour, RSS and open fds watched.

Run from the repository root (not part of the test suite):

    uv run python bench/soak.py                          # 1 hour at 1,000 msg/s, 100 devices
    uv run python bench/soak.py --duration 180 --sample-seconds 15   # a 3-minute smoke run

A node starts on a fresh data dir (``python -m node serve``, default settings: fast path
on, ``sqlite_synchronous = FULL``; ``--no-fast-path`` turns the fast path off), ``--devices``
devices are registered, and ``bench/soak_loader.py`` (a process of its own, raw sockets, each
PUBLISH encoded when it is due) offers ``--rate`` msg/s spread over them for ``--duration``
seconds. Every ``--sample-seconds`` the node's RSS, USS and open file descriptors are
sampled and printed with the loader's progress (sent, acknowledged, latency over the last
interval).

At the end every message is accounted for: sent == acknowledged == stored (the sum of the
devices' ``counters.stored`` through the API). Verdicts:

* **warm-up** is the first ``--warmup`` seconds (default 600, or a third of the run when the
  run is shorter than 30 minutes): caches, SQLite's page cache, the allocator's arenas and
  the WAL fill up then. The sample taken at the end of the warm-up is the reference.
* **RSS growth** = (highest RSS sampled after the warm-up - the reference) / the reference,
  must be ≤ ``--max-rss-growth`` percent (5).
* **no fd growth**: no sample after the warm-up, while the devices are connected, has more
  open fds than the reference.

The exit code is 1 when a message was lost or not acknowledged, or a process failed; the
verdicts are printed as PASS/FAIL.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import queue
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import psutil

if __package__ in (None, ""):  # run as bench/soak.py: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ingest import (
    MIB,
    REPO,
    BenchError,
    Child,
    NodeProcess,
    child_env,
    machine_info,
    register_devices,
    run_bench,
    spawn_child,
    start_node_process,
    verdict,
)

#: Below this run length the warm-up defaults to a third of the run instead of 10 minutes.
SHORT_RUN_S: Final = 1800.0


@dataclass
class Sample:
    t_s: float
    rss: int
    uss: int
    fds: int
    connections: int
    sent: int
    acked: int
    p99_ms: float
    cpu_s: float


@dataclass
class SoakReport:
    machine: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    warmup_s: float = 0.0
    sent: int = 0
    acked: int = 0
    stored: int = 0
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    max_ms: float = math.nan
    loader_cpu_s: float = 0.0
    rss_reference_mib: float = math.nan
    rss_growth_pct: float = math.nan
    fd_reference: int = 0
    fd_max_after: int = 0
    #: After the load, every device disconnected and the counters read.
    fds_idle: int = 0
    rss_idle_mib: float = math.nan
    problems: list[str] = field(default_factory=list)


def metric(client: httpx.Client, name: str) -> float:
    resp = client.get("/metrics")
    if resp.status_code != 200:
        raise BenchError(f"GET /metrics: {resp.status_code}")
    for line in resp.text.splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            return float(value)
    raise BenchError(f"no {name} in /metrics")


class Soak:
    def __init__(self, opts: argparse.Namespace, tmp: Path, kids: list[Child]) -> None:
        self.opts = opts
        self.tmp = tmp
        self.kids = kids
        self.env = child_env()
        self.spawn = functools.partial(spawn_child, kids, tmp, self.env)
        self.report = SoakReport()
        self.progress: dict[str, Any] = {"sent": 0, "acked": 0, "p99_ms": math.nan}

    def sample(self, node: NodeProcess, t: float) -> Sample:
        full = node.proc.memory_full_info()
        cpu = node.proc.cpu_times()
        s = Sample(
            t_s=round(t, 1),
            rss=int(full.rss),
            uss=int(full.uss),
            fds=node.proc.num_fds(),
            connections=int(metric(node.client, "depot_node_mqtt_connections")),
            sent=int(self.progress["sent"]),
            acked=int(self.progress["acked"]),
            p99_ms=float(self.progress.get("p99_ms", math.nan)),
            cpu_s=float(cpu.user + cpu.system),
        )
        self.report.samples.append(s)
        print(
            f"  t={s.t_s:7.0f} s  RSS {s.rss / MIB:7.1f} MiB  USS {s.uss / MIB:7.1f} MiB  fds {s.fds:5d}"
            f"  connections {s.connections:5d}  sent {s.sent:9,d}  acked {s.acked:9,d}"
            f"  p99 {s.p99_ms:6.1f} ms (last interval)  node CPU {s.cpu_s:8.1f} s",
            flush=True,
        )
        return s

    def run(self) -> bool:
        o, r = self.opts, self.report
        env = {
            **self.env,
            "DEPOT_NODE_LOG_LEVEL": "warning",
            "DEPOT_NODE_BROKER_FAST_PATH": "false" if o.no_fast_path else "true",
        }
        print(f"node: starting (fast path {'off' if o.no_fast_path else 'on'}), registering {o.devices} devices")
        node = start_node_process(self.spawn, "node", src=REPO, env=env, data=self.tmp / "node-data")
        devices = register_devices(node.client, o.devices)
        spec = {
            "host": "127.0.0.1",
            "port": node.mqtt_port,
            "devices": devices,
            "mode": "paced",
            "window": o.window,
            "rate": o.rate,
            "duration": o.duration,
            "keepalive": 60,
            "phase_timeout": 300,
            "connect_timeout": 600,
        }
        path = self.tmp / "spec-soak.json"
        path.write_text(json.dumps(spec))
        progress = str(min(10.0, o.sample_seconds / 2))
        loader = self.spawn("soak-loader", ["-m", "bench.soak_loader", str(path), progress], lines=True)
        loader.expect("ready", timeout=660)
        print(
            f"soak: {o.rate:,.0f} msg/s over {o.devices} devices for {o.duration:,.0f} s, window {o.window};"
            f" a sample every {o.sample_seconds:g} s, warm-up {r.warmup_s:.0f} s"
        )
        loader.send("go")
        t0 = time.monotonic()
        self.sample(node, 0.0)
        done = self.watch(loader, node, t0)
        self.sample(node, time.monotonic() - t0)
        r.sent, r.acked = int(done["sent"]), int(done["acked"])
        r.p50_ms, r.p99_ms, r.max_ms = done["p50_ms"], done["p99_ms"], done["max_ms"]
        r.loader_cpu_s = float(done["loader_cpu_s"])
        loader.expect("closed", timeout=120)
        code = loader.proc.wait(60)
        if code != 0:
            r.problems.append(f"the loader exited with {code}{loader.tail()}")
        self.kids.remove(loader)
        loader.stop()
        if done.get("error") or done.get("timed_out"):
            r.problems.append(f"the loader: {done.get('error') or 'timed out'}")
        r.stored = self.stored(node, devices)
        time.sleep(2.0)  # the loader has disconnected: what the node holds with no connection
        r.fds_idle = node.proc.num_fds()
        r.rss_idle_mib = node.proc.memory_info().rss / MIB
        if not r.sent == r.acked == r.stored:
            r.problems.append(f"sent {r.sent}, acknowledged {r.acked}, stored {r.stored}")
        node.client.close()
        self.kids.remove(node.child)
        code = node.child.stop(graceful=60)
        if code not in (0, -signal.SIGTERM):
            r.problems.append(f"node exited with {code} on SIGTERM")
        return self.summary()

    def watch(self, loader: Child, node: NodeProcess, t0: float) -> dict[str, Any]:
        """Sample every ``--sample-seconds`` until the loader is done; its done event."""
        o = self.opts
        next_sample = t0 + o.sample_seconds
        while True:
            try:
                line = loader.lines.get(timeout=max(0.0, min(next_sample - time.monotonic(), 1.0)))
            except queue.Empty:
                line = ""
            if line is None:
                raise BenchError(f"the loader exited (code {loader.proc.wait(5)}) during the soak{loader.tail()}")
            if line:
                msg: dict[str, Any] = json.loads(line)
                if msg.get("event") == "error":
                    raise BenchError(f"the loader: {msg.get('error')}{loader.tail()}")
                if msg.get("event") == "progress":
                    self.progress = msg
                elif msg.get("event") == "done":
                    return msg
            if time.monotonic() >= next_sample:
                self.sample(node, time.monotonic() - t0)
                next_sample += o.sample_seconds
            if node.child.proc.poll() is not None:
                raise BenchError(f"the node exited with {node.child.proc.returncode}{node.child.tail()}")

    @staticmethod
    def stored(node: NodeProcess, devices: list[tuple[str, str]]) -> int:
        total = 0
        for device_id, _ in devices:
            resp = node.client.get(f"/api/v1/devices/{device_id}")
            if resp.status_code != 200:
                raise BenchError(f"GET device {device_id}: {resp.status_code} {resp.text[:200]}")
            total += int(resp.json()["counters"]["stored"])
        return total

    def summary(self) -> bool:
        o, r = self.opts, self.report
        after = [s for s in r.samples if s.t_s >= r.warmup_s]
        reference = after[0] if after else r.samples[-1]
        later = after[1:]
        r.rss_reference_mib = reference.rss / MIB
        r.rss_growth_pct = (max((s.rss for s in later), default=reference.rss) / reference.rss - 1) * 100
        r.fd_reference = reference.fds
        # fds under load only: the sample taken as the devices disconnect at the end (no
        # connections left) catches sockets closing, not a leak; the idle figure below shows that.
        loaded = [s for s in later if s.connections > 0]
        r.fd_max_after = max((s.fds for s in loaded), default=reference.fds)
        first = r.samples[0]
        print()
        print("== summary " + "=" * 69)
        m = r.machine
        print(f"machine      {m['cores']} cores, {m['cpu']}, Python {m['python']}, amqtt {m['amqtt']}, {m['date']}")
        print(
            f"load         {o.rate:,.0f} msg/s offered over {o.devices} devices for {o.duration:,.0f} s;"
            f" fast path {'off' if o.no_fast_path else 'on'}"
        )
        print(
            f"messages     sent {r.sent:,}, acknowledged {r.acked:,}, stored {r.stored:,}:"
            f" {'every message accounted for' if r.sent == r.acked == r.stored else 'MISMATCH'}"
        )
        print(f"latency      p50 {r.p50_ms:.1f} ms, p99 {r.p99_ms:.1f} ms, max {r.max_ms:.1f} ms (whole run)")
        print(
            f"RSS          {first.rss / MIB:.1f} MiB at the start, {r.rss_reference_mib:.1f} MiB after the"
            f" {r.warmup_s:.0f} s warm-up (t={reference.t_s:g} s), {r.samples[-1].rss / MIB:.1f} MiB at the end;"
            f" growth after the warm-up {r.rss_growth_pct:+.1f} %   target <= {o.max_rss_growth:g} %:"
            f" {verdict(r.rss_growth_pct <= o.max_rss_growth)}"
        )
        print(
            f"fds          {first.fds} at the start, {r.fd_reference} after the warm-up, at most {r.fd_max_after}"
            f" after it   no growth: {verdict(r.fd_max_after <= r.fd_reference)}"
        )
        print(
            f"after        every device disconnected: {r.fds_idle} fds, RSS {r.rss_idle_mib:.1f} MiB"
            f" (before the load, with every device connected: {first.fds} fds)"
        )
        cpu = (r.samples[-1].cpu_s - first.cpu_s) / max(r.acked, 1) * 1000
        print(
            f"CPU          node {cpu:.3f} s per 1,000 msgs; loader {r.loader_cpu_s:.1f} s"
            f" ({r.loader_cpu_s / max(o.duration, 1e-9):.0%} of one core)"
        )
        if not later:
            print("note         no sample after the warm-up reference: the run is too short for the verdicts")
        if r.problems:
            print("PROBLEMS")
            for p in r.problems:
                print(f"  {p}")
        print("=" * 80)
        return not r.problems


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/soak.py",
        description="Soak of depot-node: a steady QoS 1 load, RSS and open fds sampled, every message accounted for.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=3600.0, help="seconds of load")
    parser.add_argument("--rate", type=float, default=1000.0, help="msg/s offered, all devices together")
    parser.add_argument("--devices", type=int, default=100, help="devices (one MQTT connection each)")
    parser.add_argument("--window", type=int, default=10, help="QoS 1 PUBLISHes in flight per connection at most")
    parser.add_argument("--sample-seconds", type=float, default=60.0, help="how often RSS and fds are sampled")
    parser.add_argument(
        "--warmup",
        type=float,
        help=f"warm-up seconds (default 600, or a third of --duration below {SHORT_RUN_S:.0f} s)",
    )
    parser.add_argument("--max-rss-growth", type=float, default=5.0, help="percent of RSS growth after the warm-up")
    parser.add_argument("--no-fast-path", action="store_true", help="run the node with broker_fast_path = false")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every figure to PATH as JSON")
    opts = parser.parse_args(argv)
    if min(opts.duration, opts.rate, opts.devices, opts.window, opts.sample_seconds) <= 0:
        parser.error("--duration, --rate, --devices, --window and --sample-seconds must be positive")
    if opts.warmup is None:
        opts.warmup = 600.0 if opts.duration >= SHORT_RUN_S else opts.duration / 3
    return opts


def _soak(opts: argparse.Namespace, tmp: Path, kids: list[Child]) -> bool:
    soak = Soak(opts, tmp, kids)
    soak.report.machine = machine_info(tmp)
    soak.report.options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()}
    soak.report.warmup_s = opts.warmup
    ok = soak.run()
    if opts.json is not None:
        opts.json.write_text(json.dumps(asdict(soak.report), indent=2) + "\n")
    return ok


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    return run_bench("bench/soak.py", lambda tmp, kids: _soak(opts, tmp, kids), errors=(psutil.Error,))


if __name__ == "__main__":
    sys.exit(main())
