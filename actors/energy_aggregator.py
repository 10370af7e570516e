"""The energy aggregator: keeps ``energy_periods`` up to date from the telemetry table.

It follows the telemetry table by rowid cursor (the ``energy`` row of the shared ``cursors``
table) and never touches the ingest path: device actors and the storage writer do not know it
exists. For each batch of new rows it works out which 5-minute periods they can change
(:func:`actors.energy.effect_span` of the intervals each new reading makes and of the one it
splits), recomputes those periods from scratch (:func:`actors.energy.compute_window`) and
writes the ones that changed together with the new cursor position, in one small transaction
through an :class:`~storage.interfaces.EnergyStore`. A late reading is just a new row: the
periods around it are recomputed, whatever was stored for them before.

Because the cursor moves in the same transaction as the periods, a crash or a restart resumes
exactly: a batch is either applied and past the cursor, or neither. When the store fails, the
aggregator keeps its position, waits with backoff and tries again; ingest goes on, and the
energy catches up afterwards.

This module must never import an I/O library, and nothing on the ingest path waits for it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio

from actors.energy import DEFAULT_MAX_INTERVAL_MS, compute_window, effect_span, merge_runs
from actors.stats import EnergyStats
from storage.errors import StorageError
from storage.interfaces import EnergyStore
from storage.records import EnergyInput, EnergyPeriod

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EnergyConfig:
    #: Intervals longer than this are not counted (``energy_max_interval_s``).
    max_interval_ms: int = DEFAULT_MAX_INTERVAL_MS
    #: How long to wait for new telemetry when the aggregator has caught up.
    poll_interval: float = 1.0
    #: Rows per batch: bounds the transaction that holds the writer connection (a few ms) and
    #: the memory of one pass; a backlog drains at many batches per second.
    batch: int = 2000
    retry_initial: float = 0.5
    retry_max: float = 30.0


class EnergyAggregator:
    def __init__(self, store: EnergyStore, stats: EnergyStats, config: EnergyConfig | None = None) -> None:
        self._store = store
        self._stats = stats
        self._config = config or EnergyConfig()
        self._wake = anyio.Event()
        #: The last rowid aggregated; None until read from the store.
        self._position: int | None = None

    def nudge(self) -> None:
        """Look for new telemetry now instead of at the next poll (never blocks)."""
        self._wake.set()

    async def run(self) -> None:
        """Aggregate forever; the supervisor restarts it after a crash (it resumes from the cursor)."""
        self._position = None  # after a crash: reload the cursor, the store is the truth
        while True:
            done = await self._retrying(self.step)
            if done == 0:
                with anyio.move_on_after(self._config.poll_interval):
                    await self._wake.wait()
                self._wake = anyio.Event()

    async def step(self) -> int:
        """Aggregate one batch of new telemetry rows; returns how many rows it took (0: none new)."""
        if self._position is None:
            self._position = self._stats.position = await self._store.energy_cursor()
        position = self._position
        rows = await self._store.new_readings(position, self._config.batch)
        if not rows:
            return 0
        periods = await self._recompute(rows, position)
        changed = await self._store.save_energy(periods, rows[-1].rowid)
        self._position = self._stats.position = rows[-1].rowid
        self._stats.readings += len(rows)
        self._stats.periods_written += changed
        self._stats.batches += 1
        return len(rows)

    async def _recompute(self, rows: list[EnergyInput], position: int) -> list[tuple[str, EnergyPeriod]]:
        """Every period the new *rows* can change, recomputed (rows up to *position* are old)."""
        cfg = self._config
        keys = [(r.device_id, r.reading.boot, r.reading.seq) for r in rows]
        found = await self._store.neighbours(keys, position)
        ranges: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for row, nb in zip(rows, found, strict=True):
            # The intervals the new reading makes, and the one it splits (or that two new
            # readings split): every period that can change is in one of their spans.
            for a, b in ((nb.pred, row.reading), (row.reading, nb.succ), (nb.old_pred, nb.old_succ)):
                if a is not None and b is not None:
                    ranges[row.device_id] += effect_span(a, b, cfg.max_interval_ms)
        windows = [(device, lo, hi) for device, spans in ranges.items() for lo, hi in merge_runs(spans)]
        inputs = await self._store.window_readings(windows)
        return [
            (device, period)
            for (device, lo, hi), readings in zip(windows, inputs, strict=True)
            for period in compute_window(readings, lo, hi, cfg.max_interval_ms)
        ]

    async def _retrying[T](self, call: Callable[[], Awaitable[T]]) -> T:
        delay = self._config.retry_initial
        while True:
            try:
                return await call()
            except StorageError:
                self._stats.failures += 1
                log.exception("energy aggregation failed, retrying in %.2f s", delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, self._config.retry_max)
