"""Backlog benchmark: trains back at the depot upload their buffered readings in batches.

Run from the repository root:

    uv run python bench/backlog.py                # 100 devices x 10,000 readings, batches of 100
    uv run python bench/backlog.py --quick        # smoke run: 10 devices x 1,000 readings

The node (``python -m node serve`` on a fresh data directory, default ``sqlite_synchronous =
FULL``) and the load generator (``bench/loader.py`` in its batch mode: raw asyncio sockets,
every batched PUBLISH encoded before the clock starts, one connection per device, ``--window``
PUBLISHes in flight each) run as separate processes, started the way ``bench/ingest.py`` starts
them (its helpers are reused). Every device replays its backlog, oldest first, as batched
telemetry (``docs/protocol.md``, "Batched telemetry"); the node PUBACKs a batch only once
all of its readings are committed.

Printed: durable readings/s (readings acknowledged / (last PUBACK - first PUBLISH)), the time
to drain the whole backlog, PUBLISH -> PUBACK latency of a batch, the node's CPU per 1,000
readings and readings per node CPU-second (comparable between runs on a shared machine, where
the node may get a fraction of a core), the storage writer's readings per commit, and the
loader's CPU as a share of one core, to show that the load generator is not what limits the
figure. Afterwards every
device's ``counters.stored`` is read back through the API and must equal its backlog.

Target (PASS/FAIL; the exit code is 0 either way): at least 50,000 durable readings/s. The exit
code is 1 when something broke (a reading lost or not acknowledged, a timeout, a process died).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Final

# Run as a script (``python bench/backlog.py``): the repository root holds the bench package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ingest import MIB, Bench, Child, machine_info, node_source, run_bench

TARGET_READINGS_S: Final = 50_000.0


def run(opts: argparse.Namespace, bench: Bench) -> bool:
    o = opts
    # The fast path on: label "node"; off: "slow" (the labels bench/ingest.py reports under).
    node = bench.start_node("node" if o.fast_path else "slow", fast=o.fast_path)
    total = o.devices * o.readings
    publishes = o.readings // o.batch
    print(
        f"backlog: {o.devices} devices x {o.readings:,} readings in {publishes} batches of {o.batch}"
        f" ({o.encoding}), window {o.window} batches; {total:,} readings in all"
    )
    res = bench.run_load(
        "backlog",
        node.node.mqtt_port,
        {node.label: node.proc},
        {"mode": "saturate", "messages": publishes, "batch": o.batch, "encoding": o.encoding, "seq_start": 0},
        devices=node.devices,
        probe=lambda: Bench.writer_metrics(node.client),
    )
    for device_id in node.expected:
        node.expected[device_id] = publishes * o.batch
    stored = bench.check_stored(node)
    readings_acked = res.acked * o.batch
    rate = readings_acked / res.ack_span_s
    cpu_per_1000 = res.target_cpu_s / max(readings_acked, 1) * 1000
    # What the node gets through per second of CPU it was given: on a shared machine, where it
    # may get a fraction of a core, this is the figure to compare between runs.
    per_cpu_s = readings_acked / max(res.target_cpu_s, 1e-9)
    commits = res.probe.get("commits", 0.0)
    per_commit = readings_acked / commits if commits else float("nan")
    ms_per_commit = res.probe.get("seconds", 0.0) / commits * 1000 if commits else float("nan")
    loader_share = res.loader_cpu_s / max(res.wall_s, 1e-9)
    print(
        f"  connect {res.connect_s:.1f} s; {res.acked:,}/{res.sent:,} batches acknowledged;"
        f" stored (API) {stored:,} of {total:,} readings"
    )
    print(f"  durable readings/s: {rate:,.0f}   time to drain: {res.ack_span_s:.2f} s")
    print(
        f"  batch PUBLISH->PUBACK: p50 {res.p50_ms:.0f} ms, p99 {res.p99_ms:.0f} ms, max {res.max_ms:.0f} ms;"
        f" node CPU {cpu_per_1000:.3f} s per 1,000 readings ({res.target_cpu_s / res.wall_s:.2f} cores)"
    )
    print(f"  readings per node CPU-second: {per_cpu_s:,.0f}")
    print(
        f"  storage writer: {commits:,.0f} commits, {per_commit:,.0f} readings per commit,"
        f" {ms_per_commit:.1f} ms per commit"
    )
    print(
        f"  loader CPU {res.loader_cpu_s:.2f} s over {res.wall_s:.2f} s = {loader_share:.0%} of one core"
        f" (not the bottleneck while well under 100 %)"
    )
    print(f"  node RSS {node.proc.memory_info().rss / MIB:.0f} MiB; rest of the machine {res.other_cores:.2f} cores")
    Bench.phase_footer(res, "node")
    bench.stop_node(node)
    result = {
        "readings": total,
        "readings_acked": readings_acked,
        "readings_stored": stored,
        "durable_readings_s": rate,
        "drain_s": res.ack_span_s,
        "batch_p50_ms": res.p50_ms,
        "batch_p99_ms": res.p99_ms,
        "node_cpu_s_per_1000": cpu_per_1000,
        "readings_per_node_cpu_s": per_cpu_s,
        "node_cores": res.target_cpu_s / max(res.wall_s, 1e-9),
        "readings_per_commit": per_commit,
        "loader_core_share": loader_share,
        "other_cores": res.other_cores,
    }
    ok = stored == total and res.acked == res.sent == o.devices * publishes and not bench.report.problems
    verdict = "PASS" if rate >= TARGET_READINGS_S else "FAIL"
    print(f"target: >= {TARGET_READINGS_S:,.0f} durable readings/s: {verdict} ({rate:,.0f})")
    for problem in bench.report.problems:
        print(f"  problem: {problem}")
    if o.json is not None:
        o.json.write_text(json.dumps({"machine": bench.report.machine, "options": vars_of(o), **result}, indent=2))
    return ok


def vars_of(opts: argparse.Namespace) -> dict[str, object]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/backlog.py",
        description="Backlog benchmark of depot-node: devices replay buffered readings as batched telemetry.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--devices", type=int, default=100, help="devices (one MQTT connection each)")
    parser.add_argument("--readings", type=int, default=10_000, help="buffered readings per device")
    parser.add_argument("--batch", type=int, default=100, help="readings per PUBLISH (at most 1,000)")
    parser.add_argument("--window", type=int, default=4, help="batched PUBLISHes in flight per connection")
    parser.add_argument("--encoding", choices=("json", "cbor"), default="json", help="payload encoding")
    parser.add_argument(
        "--sync", choices=("FULL", "NORMAL"), default="FULL", help="the node's sqlite_synchronous (FULL is its default)"
    )
    parser.add_argument("--phase-timeout", type=float, default=600.0, help="the backlog must drain within this")
    parser.add_argument(
        "--no-fast-path",
        dest="fast_path",
        action="store_false",
        help="run the node with broker_fast_path = false (amqtt's own packet reader)",
    )
    parser.add_argument(
        "--rev",
        metavar="REV",
        help="run the node from this git revision (exported to the temp dir) instead of the working tree",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every figure to PATH as JSON")
    parser.add_argument("--quick", action="store_true", help="smoke run: 10 devices x 1,000 readings")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.devices, opts.readings = 10, 1_000
    if min(opts.devices, opts.readings, opts.batch, opts.window) <= 0:
        parser.error("--devices, --readings, --batch and --window must be positive")
    if opts.batch > 1000 or opts.readings % opts.batch:
        parser.error("--batch must be at most 1,000 and divide --readings")
    opts.settle_timeout = 0.0  # Bench.run_load reads it; the backlog holds no connections open
    return opts


def _backlog(opts: argparse.Namespace, tmp: Path, kids: list[Child]) -> bool:
    bench = Bench(opts, tmp, kids)
    bench.report.machine = m = machine_info(tmp)
    bench.node_src, m["node"] = node_source(opts.rev, tmp)
    print(
        f"depot-node backlog benchmark  {m['date']}  {m['cores']} cores {m['cpu']}"
        f"  Python {m['python']}  data on {m['data_dir_fs']}"
    )
    print(f"node under test: {m['node']}, run from {bench.node_src}")
    return run(opts, bench)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    return run_bench("bench/backlog.py", lambda tmp, kids: _backlog(opts, tmp, kids))


if __name__ == "__main__":
    sys.exit(main())
