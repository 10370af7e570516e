"""The retention actor: deletes forwarded rows once they are old enough, a small batch at a time.

Every ``interval`` seconds it asks the store (:mod:`storage.retention`, where the rule lives) for
one step after another, each at most ``batch_rows`` rows in one short transaction, with a
``pause`` between steps so that the ingest writer gets the write lock in between: pruning a
large backlog of old rows takes longer, and ingest does not notice. A failing step (SQLite busy
or broken) is logged and tried again at the next round; retention is housekeeping, never a
reason to stop the node.

This module must never import an I/O library.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio

from storage.errors import StorageError
from storage.interfaces import RetentionStore
from storage.records import RetentionPolicy

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
        """One round: step until nothing more may go. Returns the rows changed."""
        cfg = self._config
        cutoff = self._clock() - cfg.days * DAY_S
        total = 0
        while True:
            result = await self._store.prune_step(self._policy, cutoff, cfg.batch_rows)
            if not result.total:
                if total:
                    log.info("retention: %d rows deleted", total)
                return total
            for table, rows in result.changed.items():
                self._deleted[table] = self._deleted.get(table, 0) + rows
            total += result.total
            await anyio.sleep(cfg.pause)
