"""Memory benchmark: the node's RSS per idle connected device, with the fast path on and off.

Run from the repository root:

    uv run python bench/memory.py                   # 1,000 devices, fast path on, then off
    uv run python bench/memory.py --tracemalloc     # also: where the memory goes
    uv run python bench/memory.py --quick           # smoke run: 100 devices

For each mode, a node starts on a fresh data dir (``python -m node serve``), ``--devices``
devices are registered through the API, and then a load generator (``bench/loader.py`` in
its ``idle`` mode: raw sockets in a process of its own, keep-alive 0, no PUBLISH ever)
connects them in two steps, each held open until the end:

1. ``--warm`` devices. Their CONNECTs run the Argon2 checks whose 19 MiB buffers the
   allocator keeps afterwards, and they create whatever a first connection creates once.
2. the rest, up to ``--devices``.

The node's RSS (and USS, its private memory) is read from psutil after each step, once the
node's ``depot_node_mqtt_connections`` gauge shows every connection and RSS has stopped
moving. Two figures per mode:

* **marginal** KB per idle device = (RSS with all - RSS with ``--warm``) / (the rest): what
  one more idle device costs. The target (issue #7, ≤ 25 KB) is judged on this one.
* **average** KB per idle device = (RSS with all - RSS before any connection) / all: includes
  one-off costs of the first connections (the Argon2 arena above, buffers, code paths run
  for the first time), so it is higher, and falls as the device count grows.

With ``--tracemalloc`` the node also runs with ``DEPOT_NODE_DEBUG_TRACEMALLOC`` (see
``node/memtrace.py``): a snapshot is taken after each step, and the difference between the
two, divided by the devices of step 2, is printed by allocation site (the line that
allocated) and by traceback: the memory that each idle connection holds, and where it was
allocated. Tracing inflates RSS (every traced block carries its traceback), so a
``--tracemalloc`` run's RSS figures are not the benchmark's: compare its traced totals.
"""

from __future__ import annotations

import argparse
import functools
import json
import signal
import sys
import time
import tracemalloc
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import psutil

if __package__ in (None, ""):  # run as bench/memory.py: make `bench` importable
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

KB_TARGET: Final = 25.0
KIB: Final = 1024


@dataclass
class ModeResult:
    """One node (fast path on or off) and its figures; memory in bytes."""

    fast_path: bool
    devices: int
    warm: int
    rss_ready: int = 0
    rss_registered: int = 0
    rss_warm: int = 0
    rss_all: int = 0
    uss_registered: int = 0
    uss_warm: int = 0
    uss_all: int = 0
    connect_s: float = 0.0
    #: Traced bytes (tracemalloc) held per device of step 2, total; and the top sites.
    traced_per_device: float | None = None
    top_sites: list[dict[str, Any]] = field(default_factory=list)
    top_callers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def marginal_kb(self) -> float:
        return (self.rss_all - self.rss_warm) / max(self.devices - self.warm, 1) / KIB

    @property
    def marginal_uss_kb(self) -> float:
        return (self.uss_all - self.uss_warm) / max(self.devices - self.warm, 1) / KIB

    @property
    def average_kb(self) -> float:
        return (self.rss_all - self.rss_registered) / max(self.devices, 1) / KIB


def mqtt_connections(client: httpx.Client) -> int:
    resp = client.get("/metrics")
    if resp.status_code != 200:
        raise BenchError(f"GET /metrics: {resp.status_code}")
    for line in resp.text.splitlines():
        name, _, value = line.partition(" ")
        if name == "depot_node_mqtt_connections":
            return int(float(value))
    raise BenchError("no depot_node_mqtt_connections in /metrics")


def steady_memory(proc: psutil.Process, client: httpx.Client, want: int, timeout: float = 120) -> tuple[int, int]:
    """(RSS, USS) once *want* connections are open and RSS stayed within 64 KiB for 2 s."""
    deadline = time.monotonic() + timeout
    while mqtt_connections(client) < want:
        if time.monotonic() > deadline:
            raise BenchError(f"only {mqtt_connections(client)} of {want} connections open after {timeout:.0f} s")
        time.sleep(0.2)
    last = proc.memory_info().rss
    stable_since = time.monotonic()
    while time.monotonic() - stable_since < 2.0 and time.monotonic() < deadline:
        time.sleep(0.25)
        rss = proc.memory_info().rss
        if abs(rss - last) > 64 * KIB:
            last, stable_since = rss, time.monotonic()
    full = proc.memory_full_info()
    return int(full.rss), int(full.uss)


class MemoryBench:
    def __init__(self, opts: argparse.Namespace, tmp: Path, kids: list[Child]) -> None:
        self.opts = opts
        self.tmp = tmp
        self.kids = kids
        self.env = child_env()
        self.spawn = functools.partial(spawn_child, kids, tmp, self.env)

    def connect(self, name: str, port: int, devices: list[tuple[str, str]]) -> tuple[Child, float]:
        """A loader holding *devices* connected (idle, keep-alive 0) until it is released."""
        spec = {
            "host": "127.0.0.1",
            "port": port,
            "devices": devices,
            "mode": "idle",
            "window": 1,
            "keepalive": 0,
            "hold": True,
            "connect_timeout": 900,
            "hold_timeout": 3600,
        }
        path = self.tmp / f"spec-{name}.json"
        path.write_text(json.dumps(spec))
        loader = self.spawn(name, ["-m", "bench.loader", str(path)], lines=True)
        ready = loader.expect("ready", timeout=960)
        loader.send("go")
        loader.expect("done", timeout=60)
        return loader, float(ready["connect_s"])

    def snapshot(self, proc: psutil.Process, snaps: Path, number: int) -> tracemalloc.Snapshot:
        proc.send_signal(signal.SIGUSR1)
        path = snaps / f"snapshot-{proc.pid}-{number}.tracemalloc"
        deadline = time.monotonic() + 300
        while not path.exists():
            if time.monotonic() > deadline:
                raise BenchError(f"no tracemalloc snapshot {path.name} within 300 s")
            time.sleep(0.2)
        return tracemalloc.Snapshot.load(str(path)).filter_traces(
            [
                tracemalloc.Filter(inclusive=False, filename_pattern=tracemalloc.__file__),
                tracemalloc.Filter(inclusive=False, filename_pattern="<frozen importlib._bootstrap*>"),
            ]
        )

    def run_mode(self, *, fast: bool) -> ModeResult:
        o = self.opts
        label = "fast" if fast else "slow"
        title = "fast path on" if fast else "fast path off"
        res = ModeResult(fast_path=fast, devices=o.devices, warm=o.warm)
        env = {**self.env, "DEPOT_NODE_LOG_LEVEL": "warning", "DEPOT_NODE_BROKER_FAST_PATH": str(fast).lower()}
        if o.mmap_threshold:
            env["MALLOC_MMAP_THRESHOLD_"] = str(o.mmap_threshold)
        snaps = self.tmp / f"snaps-{label}"
        if o.tracemalloc:
            env["DEPOT_NODE_DEBUG_TRACEMALLOC"] = str(snaps)
            env["DEPOT_NODE_DEBUG_TRACEMALLOC_FRAMES"] = str(o.frames)
        print(f"node, {title}: starting, registering {o.devices} devices")
        node = start_node_process(self.spawn, f"node-{label}", src=REPO, env=env, data=self.tmp / f"data-{label}")
        try:
            res.rss_ready = node.proc.memory_info().rss
            t0 = time.monotonic()
            devices = register_devices(node.client, o.devices)
            print(f"  registered in {time.monotonic() - t0:.1f} s")
            res.rss_registered, res.uss_registered = steady_memory(node.proc, node.client, 0)
            print(f"  RSS {res.rss_registered / MIB:.1f} MiB, USS {res.uss_registered / MIB:.1f} MiB, no connection")
            self.step(node, res, devices, snaps)
        finally:
            node.client.close()
            self.kids.remove(node.child)
            node.child.stop(graceful=30)
        return res

    def step(self, node: NodeProcess, res: ModeResult, devices: list[tuple[str, str]], snaps: Path) -> None:
        o = self.opts
        warm_loader, s1 = self.connect(f"loader-warm-{node.proc.pid}", node.mqtt_port, devices[: o.warm])
        res.rss_warm, res.uss_warm = steady_memory(node.proc, node.client, o.warm)
        print(f"  RSS {res.rss_warm / MIB:.1f} MiB, USS {res.uss_warm / MIB:.1f} MiB, {o.warm} idle devices")
        before = self.snapshot(node.proc, snaps, 1) if o.tracemalloc else None
        rest_loader, s2 = self.connect(f"loader-rest-{node.proc.pid}", node.mqtt_port, devices[o.warm :])
        res.connect_s = s1 + s2
        res.rss_all, res.uss_all = steady_memory(node.proc, node.client, o.devices)
        print(
            f"  RSS {res.rss_all / MIB:.1f} MiB, USS {res.uss_all / MIB:.1f} MiB, {o.devices} idle devices"
            f" (connected in {res.connect_s:.1f} s)"
        )
        if before is not None:
            self.attribute(res, before, self.snapshot(node.proc, snaps, 2))
        for loader in (rest_loader, warm_loader):
            loader.send("release")
            loader.expect("closed", timeout=120)
            self.kids.remove(loader)
            loader.stop()

    def attribute(self, res: ModeResult, before: tracemalloc.Snapshot, after: tracemalloc.Snapshot) -> None:
        """Print what the devices of step 2 hold, by allocation site and by traceback."""
        o = self.opts
        n = res.devices - res.warm
        by_line = after.compare_to(before, "lineno")
        res.traced_per_device = sum(s.size_diff for s in by_line) / n
        print(
            f"  tracemalloc: {res.traced_per_device / KIB:.2f} KiB traced per idle device of step 2"
            f" ({n} devices); top allocation sites, per device:"
        )
        for stat in by_line[: o.top]:
            if stat.size_diff <= 0:
                break
            frame = stat.traceback[-1]
            site = {
                "file": short_path(frame.filename),
                "line": frame.lineno,
                "bytes_per_device": stat.size_diff / n,
                "blocks_per_device": stat.count_diff / n,
            }
            res.top_sites.append(site)
            print(
                f"    {site['bytes_per_device']:8.0f} B  {site['blocks_per_device']:5.1f} blocks"
                f"  {site['file']}:{site['line']}"
            )
        by_traceback = after.compare_to(before, "traceback")
        callers: dict[str, list[float]] = {}
        for stat in by_traceback:
            frame = owning_frame(stat.traceback)
            key = f"{short_path(frame.filename)}:{frame.lineno}"
            entry = callers.setdefault(key, [0.0, 0.0])
            entry[0] += stat.size_diff
            entry[1] += stat.count_diff
        ranked = sorted(callers.items(), key=lambda kv: -kv[1][0])
        print("  by the innermost line of amqtt or the node that led to the allocation, per device:")
        for key, (size, count) in ranked[: o.top]:
            if size <= 0:
                break
            res.top_callers.append({"site": key, "bytes_per_device": size / n, "blocks_per_device": count / n})
            print(f"    {size / n:8.0f} B  {count / n:5.1f} blocks  {key}")
        print("  top tracebacks (oldest frame first, the allocating line last), per device:")
        for stat in by_traceback[: o.top_tracebacks]:
            if stat.size_diff <= 0:
                break
            print(f"    {stat.size_diff / n:8.0f} B  {stat.count_diff / n:5.1f} blocks")
            for frame in list(stat.traceback)[-o.frames_shown :]:
                print(f"        {short_path(frame.filename)}:{frame.lineno}")


#: Code whose lines are named as the owner of an allocation (the rest is stdlib and helpers).
OWNERS: Final = ("/amqtt/", *(f"{REPO}/{package}/" for package in ("node", "actors", "storage", "web")))


def owning_frame(traceback: tracemalloc.Traceback) -> tracemalloc.Frame:
    """The most recent frame of *traceback* in amqtt or the node; else the allocating one."""
    for frame in reversed(traceback):
        if any(owner in frame.filename for owner in OWNERS):
            return frame
    return traceback[-1]


def short_path(filename: str) -> str:
    """A file name relative to site-packages or the repository, to keep the report readable."""
    for marker in ("site-packages/", f"{REPO}/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


@dataclass
class MemoryReport:
    machine: dict[str, Any]
    options: dict[str, Any]
    modes: list[dict[str, Any]]


def summary(opts: argparse.Namespace, results: list[ModeResult]) -> None:
    print()
    print("== summary " + "=" * 69)
    note = " (tracemalloc on: RSS inflated, see the traced figures)" if opts.tracemalloc else ""
    print(f"{opts.devices} idle devices (keep-alive 0), {opts.warm} of them connected first{note}")
    for r in results:
        title = "fast path on " if r.fast_path else "fast path off"
        print(
            f"{title}  marginal {r.marginal_kb:6.1f} KB RSS per idle device ({r.marginal_uss_kb:.1f} KB USS);"
            f" average {r.average_kb:.1f} KB   target <= {KB_TARGET:.0f} KB (marginal):"
            f" {verdict(r.marginal_kb <= KB_TARGET)}"
        )
        print(
            f"               RSS ready {r.rss_ready / MIB:.1f}, registered {r.rss_registered / MIB:.1f},"
            f" {r.warm} connected {r.rss_warm / MIB:.1f}, {r.devices} connected {r.rss_all / MIB:.1f} MiB"
        )
        if r.traced_per_device is not None:
            print(f"               traced (tracemalloc) {r.traced_per_device / KIB:.2f} KiB per idle device")
    print("=" * 80)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/memory.py",
        description="RSS of depot-node per idle connected device, fast path on and off.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--devices", type=int, default=1000, help="idle devices connected in the end")
    parser.add_argument("--warm", type=int, default=100, help="devices connected first (the marginal baseline)")
    parser.add_argument("--no-fast", action="store_true", help="skip the node with the fast path on")
    parser.add_argument("--no-slow", action="store_true", help="skip the node with the fast path off")
    parser.add_argument("--tracemalloc", action="store_true", help="trace the node's allocations, print the top sites")
    parser.add_argument("--frames", type=int, default=12, help="--tracemalloc: frames kept per allocation")
    parser.add_argument("--top", type=int, default=20, help="--tracemalloc: allocation sites shown")
    parser.add_argument("--top-tracebacks", type=int, default=8, help="--tracemalloc: tracebacks shown")
    parser.add_argument("--frames-shown", type=int, default=6, help="--tracemalloc: frames shown per traceback")
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=0,
        metavar="BYTES",
        help="run the node with MALLOC_MMAP_THRESHOLD_=BYTES (glibc: fixed threshold, so Argon2's 19 MiB"
        " buffers are always mmapped and returned on free); 0 = glibc's default, a dynamic threshold",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every figure to PATH as JSON")
    parser.add_argument("--quick", action="store_true", help="smoke run: 100 devices, 20 first (overrides those)")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.devices, opts.warm = 100, 20
    if not 0 < opts.warm < opts.devices:
        parser.error("--warm must be at least 1 and fewer than --devices")
    if opts.no_fast and opts.no_slow:
        parser.error("--no-fast and --no-slow leave nothing to run")
    return opts


def _memory(opts: argparse.Namespace, tmp: Path, kids: list[Child]) -> bool:
    bench = MemoryBench(opts, tmp, kids)
    machine = machine_info(tmp)
    print(f"depot-node memory benchmark  {machine['date']}  {machine['cores']} cores {machine['cpu']}")
    results = [bench.run_mode(fast=fast) for fast in (True, False) if not (opts.no_fast if fast else opts.no_slow)]
    summary(opts, results)
    if opts.json is not None:
        modes = [
            {
                **asdict(r),
                "marginal_kb": r.marginal_kb,
                "marginal_uss_kb": r.marginal_uss_kb,
                "average_kb": r.average_kb,
            }
            for r in results
        ]
        doc = MemoryReport(machine, {k: str(v) for k, v in vars(opts).items()}, modes)
        opts.json.write_text(json.dumps(asdict(doc), indent=2) + "\n")
    return True  # the figures are the result: summary() prints PASS/FAIL against the target


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    return run_bench("bench/memory.py", lambda tmp, kids: _memory(opts, tmp, kids))


if __name__ == "__main__":
    sys.exit(main())
