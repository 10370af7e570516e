"""The energy aggregator: keeps ``energy_periods`` up to date from the telemetry table.

It follows the telemetry table by rowid cursor (the ``energy`` row of the shared ``cursors``
table) and never touches the ingest path: device actors and the storage writer do not know it
exists. It takes new rows in batches, once per ``poll_interval`` (back to back while a backlog
fills whole batches), so that its fixed costs per batch are spread over many readings.

Readings that arrive in order, the common case, cost no SQL read: the aggregator keeps each
device's last reading and open periods in memory (:class:`actors.energy_state.DeviceEnergy`)
and only extends them. Everything else (late or out-of-order readings, a clock that went back,
the first rows of a device after a start) is recomputed from the table: the aggregator works
out which 5-minute periods those rows can change (:func:`actors.energy.effect_span` of the
intervals each new reading makes and of the one it splits), recomputes those periods from
scratch (:func:`actors.energy.compute_window`), and builds the device's state again. Either
way a period comes out exactly as the computation from scratch over all stored readings gives
it (ADR 0008, ADR 0013). Each changed period is written once per batch, together with the new
cursor position, in one small transaction through an :class:`~storage.interfaces.EnergyStore`.

Because the cursor moves in the same transaction as the periods, a crash or a restart resumes
exactly: a batch is either applied and past the cursor, or neither. The memory is only ever
ahead of the store between reading a batch and saving it; when that fails, the aggregator
forgets its memory and position (the store is the truth), waits with backoff and tries again;
ingest goes on, and the energy catches up afterwards.

This module must never import an I/O library, and nothing on the ingest path waits for it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio

from actors.energy import DEFAULT_MAX_INTERVAL_MS, PERIOD_MS, compute_window, effect_span, merge_runs, period_of
from actors.energy_state import DeviceEnergy
from actors.stats import EnergyStats
from storage.errors import StorageError
from storage.interfaces import EnergyStore
from storage.records import EnergyInput, EnergyPeriod, EnergyReading

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EnergyConfig:
    #: Intervals longer than this are not counted (``energy_max_interval_s``).
    max_interval_ms: int = DEFAULT_MAX_INTERVAL_MS
    #: How long to wait between batches that did not fill up: a new period shows within about
    #: this, and under steady load a batch holds this much telemetry.
    poll_interval: float = 1.0
    #: Rows per batch. In-order readings cost memory (~0.3 KB a row) and no SQL, and a batch
    #: writes each period it changed once, so larger batches are cheaper; the limit bounds the
    #: memory of one pass and the recomputation after a start (a few ms of the writer
    #: connection per thousand devices).
    batch: int = 10_000
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
        #: Device → its tip and open periods, as of ``_position`` (devices not here are cold).
        self._devices: dict[str, DeviceEnergy] = {}

    def nudge(self) -> None:
        """Look for new telemetry now instead of at the next poll (never blocks)."""
        self._wake.set()

    async def run(self) -> None:
        """Aggregate forever; the supervisor restarts it after a crash (it resumes from the cursor)."""
        self._position = None  # after a crash: reload the cursor, the store is the truth
        while True:
            done = await self._retrying(self.step)
            if done < self._config.batch:
                with anyio.move_on_after(self._config.poll_interval):
                    await self._wake.wait()
                self._wake = anyio.Event()

    async def step(self) -> int:
        """Aggregate one batch of new telemetry rows; returns how many rows it took (0: none new)."""
        if self._position is None:
            self._devices.clear()
            self._position = self._stats.position = await self._store.energy_cursor()
        position = self._position
        rows = await self._store.new_readings(position, self._config.batch)
        if not rows:
            return 0
        until = rows[-1].rowid
        try:
            periods, recomputed = await self._aggregate(rows, position, until)
            changed = await self._store.save_energy(periods, until)
        except BaseException:
            # The memory may now be ahead of the store: start again from the store.
            self._position = None
            raise
        self._position = self._stats.position = until
        self._stats.readings += len(rows)
        self._stats.readings_recomputed += recomputed
        self._stats.periods_written += changed
        self._stats.batches += 1
        return len(rows)

    async def _aggregate(
        self, rows: list[EnergyInput], position: int, until: int
    ) -> tuple[list[tuple[str, EnergyPeriod]], int]:
        """Every period the new *rows* (rowids ``position < id <= until``) change, as it is now,
        and how many of the rows were recomputed from the table."""
        by_device: dict[str, list[EnergyReading]] = defaultdict(list)
        for row in rows:
            by_device[row.device_id].append(row.reading)
        out: dict[tuple[str, int], EnergyPeriod] = {}
        cold: set[str] = set()  # every row of these devices is recomputed
        late: set[tuple[str, int, int]] = set()  # and these rows of the others
        for device, readings in by_device.items():
            state = self._devices.pop(device, None)
            if state is None:
                cold.add(device)
                continue
            tip = (state.tip.boot, state.tip.seq)
            newer = [r for r in readings if (r.boot, r.seq) > tip]
            changed = state.extend(newer, self._config.max_interval_ms)
            if changed is None:
                cold.add(device)
                continue
            out.update(((device, p.start_ms), p) for p in changed)
            if len(newer) == len(readings):
                self._devices[device] = state
            else:
                # Late rows only split intervals among the rows aggregated before (their seq is
                # below the tip's), never one of the newer rows': recompute just them, and load
                # the state again, since they may reach the open periods.
                late.update((device, r.boot, r.seq) for r in readings if (r.boot, r.seq) <= tip)
        slow = [
            row for row in rows if row.device_id in cold or (row.device_id, row.reading.boot, row.reading.seq) in late
        ]
        if slow:
            # Recomputed periods are complete as of *until*: they replace what the state gave.
            out.update(((device, p.start_ms), p) for device, p in await self._recompute(slow, position, until))
        return [(device, p) for (device, _), p in out.items()], len(slow)

    async def _recompute(self, rows: list[EnergyInput], position: int, until: int) -> list[tuple[str, EnergyPeriod]]:
        """Every period the new *rows* can change, recomputed from the table (rows up to
        *position* are old, rows after *until* not there yet), and their devices' state built
        again. The rows are all the batch's rows of their devices."""
        cfg = self._config
        keys = [(r.device_id, r.reading.boot, r.reading.seq) for r in rows]
        found = await self._store.neighbours(keys, position, until)
        ranges: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for row, nb in zip(rows, found, strict=True):
            # The intervals the new reading makes, and the one it splits (or that two new
            # readings split): every period that can change is in one of their spans.
            for a, b in ((nb.pred, row.reading), (row.reading, nb.succ), (nb.old_pred, nb.old_succ)):
                if a is not None and b is not None:
                    ranges[row.device_id] += effect_span(a, b, cfg.max_interval_ms)
        windows = [(device, lo, hi) for device, spans in ranges.items() for lo, hi in merge_runs(spans)]
        # The state to go on from: every period from the tip's on (none of the device's readings
        # is after the window's end).
        devices = sorted({r.device_id for r in rows})
        heads = [
            (device, head)
            for device, head in zip(devices, await self._store.heads(devices, until), strict=True)
            if head is not None
        ]
        opens = [(device, period_of(h.tip.ts_ms), period_of(h.last_ts_ms) + PERIOD_MS) for device, h in heads]
        inputs = await self._store.window_readings([*windows, *opens], until)
        for (device, head), (_, _, end), readings in zip(heads, opens, inputs[len(windows) :], strict=True):
            self._devices[device] = DeviceEnergy.build(head.tip, readings, end, cfg.max_interval_ms)
        return [
            (device, period)
            for (device, lo, hi), readings in zip(windows, inputs[: len(windows)], strict=True)
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
