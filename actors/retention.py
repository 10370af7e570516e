"""The retention actor: deletes forwarded rows and old history once they are old enough, a small
batch at a time.

Every ``interval`` seconds it asks the store for one step after another, first of forwarded rows
(:mod:`storage.retention`, where that rule lives), then of the history tables by age (audit log,
connection events, cleared alerts, finished commands, energy periods:
:mod:`storage.history_retention`), each at most ``batch_rows`` rows in one short transaction, with a
``pause`` between steps so that the ingest writer gets the write lock in between: pruning a
large backlog of old rows takes longer, and ingest does not notice. A failing step (SQLite busy
or broken) is logged and tried again at the next round; retention is housekeeping, never a
reason to stop the node.

This module must never import an I/O library.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio

from storage.errors import StorageError
from storage.interfaces import RetentionStore
from storage.records import HistoryCutoffs, PruneResult, RetentionPolicy

log = logging.getLogger(__name__)

DAY_S = 86_400.0


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    #: Keep rows this long after they were forwarded (0: delete as soon as forwarded).
    days: float = 30.0
    interval: float = 300.0
    batch_rows: int = 1000
    #: Between two steps of one round; a step holds the write lock for a few milliseconds.
    pause: float = 0.05
    #: Ages (days) past which history goes; 0 keeps it forever. The node passes its settings
    #: (``audit_retention_days``…); the defaults here keep everything.
    audit_days: float = 0.0
    #: Connection events, cleared alerts, finished commands (by their last change).
    history_days: float = 0.0
    #: Energy periods, by period start.
    energy_days: float = 0.0

    def cutoffs(self, now: float) -> HistoryCutoffs:
        def before(days: float) -> float | None:
            return now - days * DAY_S if days > 0 else None

        energy = before(self.energy_days)
        return HistoryCutoffs(
            audit_before=before(self.audit_days),
            history_before=before(self.history_days),
            energy_before_ms=None if energy is None else int(energy * 1000),
        )

    @property
    def keeps_history(self) -> bool:
        """True when every history table is kept forever (nothing to do there)."""
        return not (self.audit_days or self.history_days or self.energy_days)


class RetentionActor:
    def __init__(
        self,
        store: RetentionStore,
        policy: RetentionPolicy,
        config: RetentionConfig,
        deleted: dict[str, int],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._policy = policy
        self._config = config
        #: Table → rows deleted (``raw_payloads``: payloads emptied); shown as a metric.
        self._deleted = deleted
        self._clock = clock

    async def run(self) -> None:
        while True:
            try:
                await self.prune()
            except StorageError:
                log.exception("retention step failed; trying again in %g s", self._config.interval)
            await anyio.sleep(self._config.interval)

    async def prune(self) -> int:
        """One round: step until nothing more may go, forwarded rows first, then history.
        Returns the rows changed."""
        cfg = self._config
        now = self._clock()
        cutoff = now - cfg.days * DAY_S
        total = await self._steps(lambda: self._store.prune_step(self._policy, cutoff, cfg.batch_rows))
        if not cfg.keeps_history:
            cutoffs = cfg.cutoffs(now)
            total += await self._steps(lambda: self._store.prune_history_step(self._policy, cutoffs, cfg.batch_rows))
        if total:
            log.info("retention: %d rows deleted", total)
        return total

    async def _steps(self, step: Callable[[], Awaitable[PruneResult]]) -> int:
        total = 0
        while True:
            result = await step()
            if not result.total:
                return total
            for table, rows in result.changed.items():
                self._deleted[table] = self._deleted.get(table, 0) + rows
            total += result.total
            await anyio.sleep(self._config.pause)
