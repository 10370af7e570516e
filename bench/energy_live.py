"""Energy aggregator CPU per reading while it follows live ingest (ADR 0013).

Run from the repository root:

    uv run python bench/energy_live.py                      # 200 devices, 15,000 rows a step
    uv run python bench/energy_live.py --rows-per-step 1000 # small batches: per-period writes show
    uv run python bench/energy_live.py --late 0.01          # 1 % of readings held back, then late

A fresh SQLite file (``synchronous=NORMAL``) gets telemetry the way the storage writer commits
it: groups of 1,000 readings, 10 consecutive readings of a random device at a time, one reading
per device-second. After each step's rows (``--rows-per-step``, about one second of load at
saturation) the aggregator drains what is new, on the node's store classes. Printed: process
CPU per reading of the aggregator's steps (its worker threads included), leaving out the first
step (every device is new then and recomputed from the table), and how many rows were
recomputed rather than extended in memory.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import anyio

from actors.energy_aggregator import EnergyAggregator, EnergyConfig
from actors.stats import EnergyStats
from storage.energy import SqliteEnergyStore
from storage.records import DeviceBatch, EnergyReading
from storage.sqlite import SqliteStore
from tests.energy_scenario import T0_MS, telemetry_batch


async def main(devices: int, rows_per_step: int, steps: int, late: float) -> None:
    rnd = random.Random(1)
    seq = [0] * devices
    register = [0.0] * devices
    held: list[tuple[int, EnergyReading]] = []

    def group() -> list[DeviceBatch]:
        nonlocal held
        out = []
        for _ in range(100):
            d = rnd.randrange(devices)
            readings = []
            for _ in range(10):
                register[d] += rnd.uniform(0, 0.2)
                r = EnergyReading(1, seq[d], T0_MS + seq[d] * 1000, register[d], register[d] / 8)
                seq[d] += 1
                if rnd.random() < late:
                    held.append((d, r))
                else:
                    readings.append(r)
            out.append(telemetry_batch(f"emu-{d:04d}", readings))
        if held and rnd.random() < 0.2:
            out += [telemetry_batch(f"emu-{d:04d}", [r]) for d, r in held]
            held = []
        return out

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.sqlite3"
        store = SqliteStore(path, synchronous="NORMAL")
        energy = SqliteEnergyStore(path, store)
        stats = EnergyStats()
        actor = EnergyAggregator(energy, stats, EnergyConfig())
        cpu = 0.0
        measured = recomputed_before = 0
        for step in range(steps):
            for _ in range(max(1, rows_per_step // 1000)):
                await store.commit(group())
            started = time.process_time()
            taken = 0
            while done := await actor.step():
                taken += done
            if step == 0:
                recomputed_before = stats.readings_recomputed
            else:
                cpu += time.process_time() - started
                measured += taken
        energy.close()
        store.close()
    print(f"devices={devices} rows per step={rows_per_step} steps={steps} late={late}")
    print(
        f"aggregator CPU per reading: {cpu / measured * 1e6:.1f} µs over {measured:,} readings;"
        f" recomputed from the table: {stats.readings_recomputed - recomputed_before:,}"
        f" (first step: {recomputed_before:,}); periods written {stats.periods_written:,}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--rows-per-step", type=int, default=15_000, help="rows committed between aggregator runs")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--late", type=float, default=0.0, help="share of readings held back and committed later")
    args = parser.parse_args()
    anyio.run(main, args.devices, args.rows_per_step, args.steps, args.late)
