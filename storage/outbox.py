"""The forwarders' side of SQLite: rows after a cursor, cursors and their marks, the backlog.

Two sources can be forwarded, each a table read by rowid: ``telemetry`` (to InfluxDB) and
``raw_messages`` (every accepted or quarantined payload, to the S3 archive). A consumer's
cursor (table ``cursors``, shared with the energy aggregator) holds the last rowid it consumed.
A third source, ``energy_periods`` (to InfluxDB's ``energy`` measurement), is read by ``rev``
instead: every change of a period gives it the next ``rev`` (:func:`storage.energy.energy_changes`),
so a cursor on it holds the last ``rev`` sent, and a period that changes again is sent again.
Retention never deletes energy periods, so only the rowid sources are in :data:`SOURCES`.

Reads go through a read-only connection of the outbox's own, so a forwarder draining a large
backlog never queues behind API reads and never touches the ingest writer's connection.
Cursor updates and backlog drops go through a second, writing connection in transactions of
one or two statements: they hold SQLite's write lock for well under a millisecond, and the
ingest writer's busy timeout (30 s) covers that wait.

A cursor only moves forward (``max()`` in the upsert): a late confirmation of an old batch can
never move a forwarder back behind rows that a drop already skipped. Every move of a
forwarder's cursor may leave a *mark* (position, wall time): retention counts its days from
the time a row was forwarded, which is the time of the first mark at or above its rowid.

Nothing here raises anything but :class:`storage.errors.StorageError`.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal

import anyio

from storage.checkpoint import WRITER_AUTOCHECKPOINT_PAGES
from storage.energy import EnergyChange, energy_changes
from storage.errors import StorageError
from storage.records import Backlog, RawOut, TelemetryOut

#: The sources retention prunes (by rowid).
Source = Literal["telemetry", "raw_messages"]
SOURCES: Final[tuple[Source, ...]] = ("telemetry", "raw_messages")
#: Every source a forwarder's cursor can follow, and the column its position counts.
CursorTable = Literal["telemetry", "raw_messages", "energy_periods"]
_POSITION_COLUMN: Final[dict[CursorTable, str]] = {"telemetry": "id", "raw_messages": "id", "energy_periods": "rev"}

#: How many of the newest rows the backlog's bytes-per-row estimate averages over.
_SIZE_SAMPLE: Final = 256
#: A row's size in SQLite beyond its payload columns (rowid, integers, device id, page overhead).
_ROW_OVERHEAD: Final = 48
#: An energy period row with its ``rev`` index entry (device id, eight numbers, page overhead).
_ENERGY_ROW_BYTES: Final = 128


def utc_now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def open_connection(path: Path, *, read_only: bool) -> sqlite3.Connection:
    """A connection beside the ingest writer's; the file and its schema must exist already."""
    if read_only:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False, timeout=30.0)
        conn.execute("PRAGMA query_only=ON")
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
        # Like the ingest writer's: checkpoints run beside the writers (storage.checkpoint).
        conn.execute(f"PRAGMA wal_autocheckpoint={WRITER_AUTOCHECKPOINT_PAGES}")
    return conn


class Outbox:
    """Rows after a cursor, cursors and the backlog (one per node, shared by the forwarders)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._read = open_connection(path, read_only=True)
        self._write = open_connection(path, read_only=False)
        self._read_limiter = anyio.CapacityLimiter(1)
        self._write_limiter = anyio.CapacityLimiter(1)

    def close(self) -> None:
        self._read.close()
        self._write.close()

    async def _reading[T](self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await run_in_thread(fn, self._read, self._read_limiter)

    async def _writing[T](self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await run_in_thread(fn, self._write, self._write_limiter)

    # -- cursors --------------------------------------------------------------------------------

    async def position(self, name: str) -> int:
        """The last rowid *name* consumed (0 when it never confirmed anything)."""
        return await self._reading(lambda c: cursor_position(c, name))

    async def save_position(self, name: str, source: CursorTable, position: int, *, mark_at: float | None) -> int:
        """Move *name*'s cursor forward to *position* (never back); returns the cursor after.

        With *mark_at* (wall time, epoch seconds) a mark records when this position was reached.
        """

        def run(c: sqlite3.Connection) -> int:
            c.execute("BEGIN IMMEDIATE")
            try:
                c.execute(_UPSERT_CURSOR, (name, source, position, utc_now_text()))
                if mark_at is not None:
                    c.execute(_INSERT_MARK, (name, position, mark_at))
                (after,) = c.execute("SELECT position FROM cursors WHERE name = ?", (name,)).fetchone()
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise
            return int(after)

        return await self._writing(run)

    async def drop_oldest(self, name: str, source: CursorTable, after: int, rows: int) -> int:
        """Skip the oldest *rows* rows after *after* (the disk-budget drop policy): the cursor moves
        past them with a mark at time 0, so retention may delete them at once. Returns the new
        position (``after`` when there was nothing to skip)."""

        key = _POSITION_COLUMN[source]

        def find(c: sqlite3.Connection) -> int:
            row = c.execute(
                f"SELECT {key} FROM {source} WHERE {key} > ? ORDER BY {key} LIMIT 1 OFFSET ?",  # noqa: S608 - Literals
                (after, rows - 1),
            ).fetchone()
            if row is not None:
                return int(row[0])
            return int(c.execute(f"SELECT coalesce(max({key}), ?) FROM {source}", (after,)).fetchone()[0])  # noqa: S608

        target = await self._reading(find)
        if target <= after:
            return after
        return await self.save_position(name, source, target, mark_at=0.0)

    # -- rows -----------------------------------------------------------------------------------

    async def telemetry_after(self, after: int, limit: int) -> list[TelemetryOut]:
        """Up to *limit* readings with rowid above *after*, oldest (by rowid) first."""

        def run(c: sqlite3.Connection) -> list[TelemetryOut]:
            rows = c.execute(
                "SELECT t.id, t.device_id, coalesce(d.type, 'unknown'), t.boot, t.seq, t.ts_ms, t.m FROM telemetry t"
                " LEFT JOIN devices d ON d.device_id = t.device_id WHERE t.id > ? ORDER BY t.id LIMIT ?",
                (after, limit),
            ).fetchall()
            return [TelemetryOut(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6])) for r in rows]

        return await self._reading(run)

    async def raw_after(
        self, after: int, limit: int, received_before: float, *, max_bytes: int = 1 << 62
    ) -> list[RawOut]:
        """Up to *limit* raw messages with rowid above *after*, oldest first, that were received
        before *received_before*: the batch ends at the first row received later, so it is always
        a prefix of what follows the cursor (a cursor cannot skip a row). It also ends before the
        row that would take its payloads past *max_bytes* (one row at least), which depends only
        on the rows themselves: a batch read again from the same cursor is never shorter."""

        def run(c: sqlite3.Connection) -> list[RawOut]:
            rows = c.execute(
                "SELECT id, device_id, topic, received_at, payload FROM raw_messages WHERE id > ? ORDER BY id LIMIT ?",
                (after, limit),
            ).fetchall()
            cut, size = 0, 0
            for r in rows:
                size += len(r[4])
                if r[3] >= received_before or (cut and size > max_bytes):
                    break
                cut += 1
            rows = rows[:cut]
            if not rows:
                return []
            reasons: dict[int, list[tuple[str, str]]] = {}
            for raw_id, reason, detail in c.execute(
                "SELECT raw_id, reason, detail FROM quarantine WHERE raw_id BETWEEN ? AND ? ORDER BY id",
                (rows[0][0], rows[-1][0]),
            ):
                reasons.setdefault(raw_id, []).append((reason, detail))
            return [RawOut(r[0], r[1], r[2], r[3], bytes(r[4]), tuple(reasons.get(r[0], ()))) for r in rows]

        return await self._reading(run)

    async def energy_after(self, after: int, limit: int) -> list[EnergyChange]:
        """Up to *limit* energy periods changed after ``rev`` *after*, oldest change first."""
        return await self._reading(lambda c: energy_changes(c, after, limit))

    async def backlog(self, source: CursorTable, after: int) -> Backlog:
        """How much of *source* lies after rowid (``rev``) *after* (cheap: a few index seeks and a sample)."""
        if source == "energy_periods":
            return await self._reading(lambda c: energy_backlog(c, after))
        return await self._reading(lambda c: backlog(c, source, after))


def cursor_position(conn: sqlite3.Connection, name: str) -> int:
    row = conn.execute("SELECT position FROM cursors WHERE name = ?", (name,)).fetchone()
    return 0 if row is None else int(row[0])


def backlog(conn: sqlite3.Connection, source: Source, after: int) -> Backlog:
    newest = int(conn.execute(f"SELECT coalesce(max(id), 0) FROM {source}").fetchone()[0])  # noqa: S608
    if newest <= after:
        return Backlog(rows=0, bytes=0, oldest_at=None, newest_id=newest)
    # Rowids above a cursor are contiguous: the writer numbers rows max+1, and nothing above a
    # cursor is deleted (retention stays below every cursor; a drop moves the cursor first).
    first = conn.execute(f"SELECT min(id) FROM {source} WHERE id > ?", (after,)).fetchone()[0]  # noqa: S608
    rows = newest - int(first) + 1
    if source == "telemetry":
        size_sql = "SELECT avg(length(m)) FROM (SELECT m FROM telemetry ORDER BY id DESC LIMIT ?)"
        oldest_sql = "SELECT r.received_at FROM telemetry t JOIN raw_messages r ON r.id = t.raw_id WHERE t.id = ?"
    else:
        size_sql = "SELECT avg(length(payload)) FROM (SELECT payload FROM raw_messages ORDER BY id DESC LIMIT ?)"
        oldest_sql = "SELECT received_at FROM raw_messages WHERE id = ?"
    mean = conn.execute(size_sql, (_SIZE_SAMPLE,)).fetchone()[0] or 0.0
    oldest = conn.execute(oldest_sql, (first,)).fetchone()
    return Backlog(
        rows=rows,
        bytes=int(rows * (float(mean) + _ROW_OVERHEAD)),
        oldest_at=None if oldest is None else float(oldest[0]),
        newest_id=newest,
    )


def energy_backlog(conn: sqlite3.Connection, after: int) -> Backlog:
    """The energy period changes after ``rev`` *after*. Periods have no receipt time, so
    ``oldest_at`` is None: their age is not a node-side fact (a late reading rewrites an old one)."""
    newest = int(conn.execute("SELECT coalesce(max(rev), 0) FROM energy_periods").fetchone()[0])
    if newest <= after:
        return Backlog(rows=0, bytes=0, oldest_at=None, newest_id=newest)
    # Not newest - after: a period changed twice keeps only its latest rev (counted once).
    rows = int(conn.execute("SELECT count(*) FROM energy_periods WHERE rev > ?", (after,)).fetchone()[0])
    return Backlog(rows=rows, bytes=rows * _ENERGY_ROW_BYTES, oldest_at=None, newest_id=newest)


_UPSERT_CURSOR = """
    INSERT INTO cursors (name, source, position, updated_at) VALUES (?, ?, ?, ?)
    ON CONFLICT (name) DO UPDATE SET
        position = max(cursors.position, excluded.position), updated_at = excluded.updated_at
"""
# The first time a position was reached is when its rows were forwarded: a replayed
# confirmation of the same position keeps the earlier mark.
_INSERT_MARK = "INSERT OR IGNORE INTO cursor_marks (name, position, at) VALUES (?, ?, ?)"


async def run_in_thread[T](
    fn: Callable[[sqlite3.Connection], T], conn: sqlite3.Connection, limiter: anyio.CapacityLimiter
) -> T:
    try:
        return await anyio.to_thread.run_sync(fn, conn, limiter=limiter)
    except sqlite3.Error as exc:
        raise StorageError(str(exc)) from exc


class CursorSource:
    """One consumer's view of a source: its cursor *name* over table *source*."""

    def __init__(self, outbox: Outbox, name: str, source: CursorTable) -> None:
        self._outbox = outbox
        self.name = name
        self.source: CursorTable = source

    async def position(self) -> int:
        return await self._outbox.position(self.name)

    async def confirm(self, position: int, at: float | None) -> int:
        return await self._outbox.save_position(self.name, self.source, position, mark_at=at)

    async def backlog(self, after: int) -> Backlog:
        return await self._outbox.backlog(self.source, after)

    async def drop_oldest(self, after: int, rows: int) -> int:
        return await self._outbox.drop_oldest(self.name, self.source, after, rows)


class TelemetrySource(CursorSource):
    """The ``telemetry`` table as a forwarder's source, under cursor *name*."""

    def __init__(self, outbox: Outbox, name: str) -> None:
        super().__init__(outbox, name, "telemetry")

    async def next_batch(self, after: int, limit: int) -> list[TelemetryOut]:
        return await self._outbox.telemetry_after(after, limit)


class EnergySource(CursorSource):
    """The ``energy_periods`` table as a forwarder's source, under cursor *name*: the position is
    the last ``rev`` sent (see the module docs)."""

    def __init__(self, outbox: Outbox, name: str) -> None:
        super().__init__(outbox, name, "energy_periods")

    async def next_batch(self, after: int, limit: int) -> list[EnergyChange]:
        return await self._outbox.energy_after(after, limit)


class RawSource(CursorSource):
    """The ``raw_messages`` table as the S3 archive's source, under cursor *name*.

    A batch holds only messages received in time windows that have closed (``window`` seconds,
    aligned to the epoch, plus ``grace`` seconds for the commits of their last messages), so an
    archive object is written once its window can get no more lines. *clock* is wall time.
    A batch holds at most *max_bytes* of payloads (32 MiB: a batch is held in memory whole).
    """

    def __init__(
        self,
        outbox: Outbox,
        name: str,
        *,
        window: float,
        grace: float,
        clock: Callable[[], float],
        max_bytes: int = 32 << 20,
    ) -> None:
        super().__init__(outbox, name, "raw_messages")
        self.window = window
        self.grace = grace
        self.max_bytes = max_bytes
        self._clock = clock

    def closed_before(self) -> float:
        """Messages received before this time are in closed windows."""
        return (self._clock() - self.grace) // self.window * self.window

    async def next_batch(self, after: int, limit: int) -> list[RawOut]:
        return await self._outbox.raw_after(after, limit, self.closed_before(), max_bytes=self.max_bytes)
