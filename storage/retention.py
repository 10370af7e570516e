"""Retention: deleting local rows that were forwarded long enough ago, a small batch at a time.

The rule (ADR 0007): a row of a source is deleted only when

1. at least one *forwarder* of that source is enabled (telemetry: InfluxDB; raw messages: the
   S3 archive) — a source that is forwarded nowhere is kept whole;
2. every enabled forwarder of the source forwarded it ``retention_days`` ago or earlier (the
   first cursor mark at or above its rowid is at least that old; a row skipped by the disk
   budget's drop policy has a mark at time 0);
3. it is at or below the position of every other cursor of that source whose consumer is
   enabled (the energy aggregator's ``energy`` cursor on telemetry): such a cursor guards as
   soon as its row exists, and a consumer named in ``required`` guards from position 0 even
   before it has one;
4. it is not the newest row of its table: rowids are numbered max + 1, so deleting the newest
   row would hand its rowid out again, behind every cursor.

A raw message that typed readings still reference (``telemetry.raw_id``) keeps its row, and its
payload is emptied instead (it has been archived; the row stays for the reference). Quarantine
rows go with their raw message. The history tables (audit log, connection events, cleared
alerts, finished commands, energy periods) go by age instead: :mod:`storage.history_retention`,
through :meth:`RetentionStore.prune_history_step`, on the same connection.

Each call of :meth:`RetentionStore.prune_step` is one short transaction on a connection of its
own that deletes at most ``limit`` rows of one table, so the ingest writer waits a few
milliseconds at most for the write lock; the retention actor sleeps between steps.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio

from storage.credentials import transaction
from storage.history_retention import history_step
from storage.outbox import SOURCES, Source, open_connection, run_in_thread
from storage.records import HistoryCutoffs, PruneResult, RetentionPolicy


class RetentionStore:
    def __init__(self, path: Path) -> None:
        self._conn = open_connection(path, read_only=False)
        self._limiter = anyio.CapacityLimiter(1)
        #: Raw rows up to here have had their payload emptied (a restart rescans, harmlessly).
        self._emptied_upto = 0

    def close(self) -> None:
        self._conn.close()

    async def prune_step(self, policy: RetentionPolicy, forwarded_before: float, limit: int) -> PruneResult:
        """Delete at most *limit* rows of one table that the rule allows (see the module docs)."""
        return await run_in_thread(lambda c: self._step(c, policy, forwarded_before, limit), self._conn, self._limiter)

    async def prune_history_step(self, policy: RetentionPolicy, cutoffs: HistoryCutoffs, limit: int) -> PruneResult:
        """Delete at most *limit* old rows of one history table (:mod:`storage.history_retention`)."""
        return await run_in_thread(lambda c: history_step(c, policy, cutoffs, limit), self._conn, self._limiter)

    def _step(self, c: sqlite3.Connection, policy: RetentionPolicy, cutoff: float, limit: int) -> PruneResult:
        result = PruneResult()
        with transaction(c):
            bounds = {source: retention_bound(c, policy, source, cutoff) for source in SOURCES}
            deleted = _delete_upto(c, "telemetry", bounds["telemetry"], limit)
            if deleted:
                result.changed["telemetry"] = deleted
            else:
                self._raw_step(c, bounds["raw_messages"], limit, result)
            if not result.total:
                c.execute(_FORGET_OLD_MARKS, (cutoff, cutoff))
        return result

    def _raw_step(self, c: sqlite3.Connection, bound: int, limit: int, result: PruneResult) -> None:
        # Telemetry rowids and their raw_ids grow together (one writer, one transaction per
        # group), so the first remaining reading holds the lowest raw_id still referenced.
        first_ref = c.execute("SELECT raw_id FROM telemetry ORDER BY id LIMIT 1").fetchone()
        free_upto = bound if first_ref is None else min(bound, int(first_ref[0]) - 1)
        if free_upto > 0:
            quarantined = c.execute(
                "DELETE FROM quarantine WHERE id IN (SELECT id FROM quarantine WHERE raw_id <= ? LIMIT ?)",
                (free_upto, limit),
            ).rowcount
            if quarantined:
                result.changed["quarantine"] = quarantined
                return
            deleted = _delete_upto(c, "raw_messages", free_upto, limit)
            if deleted:
                result.changed["raw_messages"] = deleted
                return
        low = max(self._emptied_upto, free_upto)
        if bound > low:
            ids = [
                r[0]
                for r in c.execute(
                    "SELECT id FROM raw_messages WHERE id > ? AND id <= ? AND length(payload) > 0 ORDER BY id LIMIT ?",
                    (low, bound, limit),
                )
            ]
            if ids:
                c.executemany("UPDATE raw_messages SET payload = x'' WHERE id = ?", [(i,) for i in ids])
                result.changed["raw_payloads"] = len(ids)
                self._emptied_upto = ids[-1]
            else:
                self._emptied_upto = bound


def retention_bound(c: sqlite3.Connection, policy: RetentionPolicy, source: Source, cutoff: float) -> int:
    """The highest rowid of *source* that the retention rule lets go (0: none)."""
    forwarders = policy.forwarders.get(source, frozenset())
    if not forwarders:
        return 0
    bound: int = c.execute(f"SELECT coalesce(max(id), 0) - 1 FROM {source}").fetchone()[0]  # noqa: S608 - a Literal
    for name in forwarders:
        row = c.execute("SELECT max(position) FROM cursor_marks WHERE name = ? AND at <= ?", (name, cutoff)).fetchone()
        bound = min(bound, int(row[0] or 0))
    cursors = dict(c.execute("SELECT name, position FROM cursors WHERE source = ?", (source,)).fetchall())
    for name in policy.required.get(source, frozenset()):
        bound = min(bound, int(cursors.get(name, 0)))
    for name, position in cursors.items():
        if name not in forwarders and name not in policy.disabled:
            bound = min(bound, int(position))
    return max(bound, 0)


def _delete_upto(c: sqlite3.Connection, table: str, bound: int, limit: int) -> int:
    if bound <= 0:
        return 0
    sql = f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE id <= ? ORDER BY id LIMIT ?)"  # noqa: S608
    return int(c.execute(sql, (bound, limit)).rowcount)


# Marks older than the cutoff matter only through the newest of them per forwarder.
_FORGET_OLD_MARKS = """
    DELETE FROM cursor_marks WHERE at <= ? AND (name, position) NOT IN
        (SELECT name, max(position) FROM cursor_marks WHERE at <= ? GROUP BY name)
"""
