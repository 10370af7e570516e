"""Energy aggregator throughput: how fast a telemetry backlog becomes energy periods.

Run from the repository root:

    uv run python bench/energy.py                       # 20 devices, 1 h of 1 Hz readings each
    uv run python bench/energy.py --devices 50 --seconds 600 --late 0.05

A fresh SQLite file (``synchronous=NORMAL``) is filled the way the storage writer fills it
(``SqliteStore.commit``, 500 readings per transaction), with ``--late`` of the readings held
back and committed at the end (late readings filling gaps). Then the aggregator drains the
whole backlog batch after batch, on the same store classes the node uses. Printed: rows per
second of the drain, and the longest and median ``save_energy`` transaction (the time it holds
the writer connection, which a group commit would wait behind).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import anyio

from actors.energy_aggregator import EnergyAggregator, EnergyConfig
from actors.stats import EnergyStats
from storage.energy import SqliteEnergyStore
from storage.records import EnergyPeriod, EnergyReading
from storage.sqlite import SqliteStore
from tests.energy_scenario import T0_MS, telemetry_batch


class TimedStore(SqliteEnergyStore):
    def __init__(self, path: Path, writer: SqliteStore) -> None:
        super().__init__(path, writer)
        self.saves: list[float] = []

    async def save_energy(self, periods: list[tuple[str, EnergyPeriod]], position: int) -> int:  # type: ignore[override]
        started = time.perf_counter()
        changed = await super().save_energy(periods, position)
        self.saves.append(time.perf_counter() - started)
        return changed


async def main(devices: int, seconds: int, late: float) -> None:
    rnd = random.Random(7)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.sqlite3"
        store = SqliteStore(path, synchronous="NORMAL")
        held: dict[str, list[EnergyReading]] = {}
        for d in range(devices):
            device = f"emu-{d:04d}"
            imp = exp = 0.0
            readings = []
            for s in range(seconds):
                imp += rnd.uniform(0, 0.2)
                exp += rnd.uniform(0, 0.05)
                readings.append(EnergyReading(1, s, T0_MS + s * 1000, imp, exp))
            held[device] = [r for r in readings if rnd.random() < late]
            kept = [r for r in readings if r not in held[device]]
            for i in range(0, len(kept), 500):
                await store.commit([telemetry_batch(device, kept[i : i + 500])])
        for device, readings in held.items():
            await store.commit([telemetry_batch(device, readings)])
        total = devices * seconds
        energy = TimedStore(path, store)
        stats = EnergyStats()
        actor = EnergyAggregator(energy, stats, EnergyConfig())
        started = time.perf_counter()
        while await actor.step():
            pass
        elapsed = time.perf_counter() - started
        energy.close()
        store.close()
    print(f"rows={total} late={sum(len(v) for v in held.values())} devices={devices} batches={stats.batches}")
    print(f"drain: {elapsed:.2f} s, {total / elapsed:,.0f} rows/s, periods written {stats.periods_written}")
    print(f"save_energy: median {statistics.median(energy.saves) * 1000:.1f} ms, max {max(energy.saves) * 1000:.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--seconds", type=int, default=3600, help="readings per device, one a second")
    parser.add_argument("--late", type=float, default=0.02, help="share of readings committed last")
    args = parser.parse_args()
    anyio.run(main, args.devices, args.seconds, args.late)
