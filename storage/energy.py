"""SQLite side of energy per period: the aggregator's reads and writes, and the API's series.

:class:`SqliteEnergyStore` implements :class:`storage.interfaces.EnergyStore`. It reads
telemetry through its **own read-only connection** (one worker thread, a limiter of one), so
the aggregator's reads never queue behind or in front of the ingest writer. Its writes (the
changed periods of a batch and the cursor, one small transaction) go through the writer
connection of :class:`storage.sqlite.SqliteStore`, between group commits, like the alerts.

The cursor is the row ``('energy', 'telemetry')`` of the shared ``cursors`` table: the last
telemetry rowid aggregated. Retention must not delete telemetry above it.

The energy registers are read with ``json_extract`` from the stored ``m`` object, so no
reading is decoded in Python only to be thrown away.
"""

from __future__ import annotations

import sqlite3
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import anyio

from storage.contract import format_ts
from storage.errors import StorageError
from storage.records import EnergyHead, EnergyInput, EnergyNeighbours, EnergyPeriod, EnergyReading
from storage.sqlite import SqliteStore

CURSOR_NAME: Final = "energy"
CURSOR_SOURCE: Final = "telemetry"
#: The base period (kept equal to ``actors.energy.PERIOD_MS``; storage does not import actors).
PERIOD_MS: Final = 300_000

#: A row's registers in :class:`EnergyReading`'s field order, as REAL (the contract requires
#: the two energy registers; a missing reactive one is NULL): rows become readings with
#: ``EnergyReading._make``, with no conversion in Python. This runs for every telemetry row.
_REGISTERS: Final = (
    "boot, seq, ts_ms, CAST(json_extract(m, '$.energy_import_kwh') AS REAL),"
    " CAST(json_extract(m, '$.energy_export_kwh') AS REAL),"
    " CAST(json_extract(m, '$.reactive_import_kvarh') AS REAL),"
    " CAST(json_extract(m, '$.reactive_export_kvarh') AS REAL)"
)

_reading: Final = EnergyReading._make


def read_cursor(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT position FROM cursors WHERE name = ?", (CURSOR_NAME,)).fetchone()
    return 0 if row is None else int(row[0])


def new_readings(conn: sqlite3.Connection, after: int, limit: int) -> list[EnergyInput]:
    rows = conn.execute(
        f"SELECT id, device_id, {_REGISTERS} FROM telemetry WHERE id > ? ORDER BY id LIMIT ?",  # noqa: S608 - constant columns
        (after, limit),
    ).fetchall()
    # This runs once per telemetry row: tuple.__new__ through _make, not the named tuples'
    # generated __new__ (a Python function call each, a tenth of energy's CPU at saturation).
    make_input, make_reading = EnergyInput._make, EnergyReading._make
    return [make_input((row[0], row[1], make_reading(row[2:]))) for row in rows]


def _one(conn: sqlite3.Connection, sql: str, args: tuple[object, ...]) -> EnergyReading | None:
    row = conn.execute(f"SELECT {_REGISTERS} FROM telemetry WHERE {sql}", args).fetchone()  # noqa: S608 - our own fragments
    return None if row is None else _reading(row)


_PRED: Final = "device_id = ? AND boot = ? AND seq < ? AND id <= ? ORDER BY seq DESC LIMIT 1"
_SUCC: Final = "device_id = ? AND boot = ? AND seq > ? AND id <= ? ORDER BY seq LIMIT 1"
_ID_REGISTERS: Final = "id, " + _REGISTERS


def _near(conn: sqlite3.Connection, where: str, args: tuple[object, ...]) -> tuple[int, EnergyReading] | None:
    row = conn.execute(f"SELECT {_ID_REGISTERS} FROM telemetry WHERE {where}", args).fetchone()  # noqa: S608
    return None if row is None else (row[0], _reading(row[1:]))


type _Found = tuple[int, EnergyReading] | None


def _seq_range(
    conn: sqlite3.Connection, device_id: str, boot: int, lo: int, hi: int, *, until: int
) -> list[EnergyReading]:
    return [r for _, r in _seq_range_with_ids(conn, device_id, boot, lo, hi, until=until)]


def _seq_range_with_ids(
    conn: sqlite3.Connection, device_id: str, boot: int, lo: int, hi: int, *, until: int
) -> list[tuple[int, EnergyReading]]:
    rows = conn.execute(
        f"SELECT {_ID_REGISTERS} FROM telemetry"  # noqa: S608 - constant columns
        " WHERE device_id = ? AND boot = ? AND seq BETWEEN ? AND ? AND id <= ? ORDER BY seq",
        (device_id, boot, lo, hi, until),
    ).fetchall()
    return [(r[0], _reading(r[1:])) for r in rows]


def _current_neighbours(
    conn: sqlite3.Connection, keys: Sequence[tuple[str, int, int]], until: int
) -> dict[tuple[str, int, int], tuple[_Found, _Found]]:
    """Each key's predecessor and successor in its boot among rowids <= *until*, with their rowids.

    Keys of one device and boot that lie close together (a batch of readings in order, the
    usual case) are answered from one range read plus two seeks; scattered ones by two index
    seeks each, so a late reading far below the others never reads everything in between.
    """
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for device_id, boot, seq in keys:
        groups[device_id, boot].append(seq)
    out: dict[tuple[str, int, int], tuple[_Found, _Found]] = {}
    for (device_id, boot), seqs in groups.items():
        lo, hi = min(seqs), max(seqs)
        if hi - lo + 1 > 4 * len(seqs) + 64:
            for seq in seqs:
                key = (device_id, boot, seq)
                out[key] = (_near(conn, _PRED, (*key, until)), _near(conn, _SUCC, (*key, until)))
            continue
        ordered = [
            _near(conn, _PRED, (device_id, boot, lo, until)),
            *_seq_range_with_ids(conn, device_id, boot, lo, hi, until=until),
            _near(conn, _SUCC, (device_id, boot, hi, until)),
        ]
        index = {found[1].seq: i for i, found in enumerate(ordered) if found is not None}
        for seq in seqs:
            i = index[seq]
            out[device_id, boot, seq] = (ordered[i - 1], ordered[i + 1])
    return out


def neighbours(
    conn: sqlite3.Connection, keys: Sequence[tuple[str, int, int]], old_until: int, until: int
) -> list[EnergyNeighbours]:
    """Each key's neighbours among the rows with ``id <= until``, and among those with
    ``id <= old_until``.

    Two index seeks per key. The old neighbours are derived: a neighbour that is itself new
    has the old neighbour of that reading, worked out first by going through the keys in
    ``seq`` order (ascending for predecessors, descending for successors). Only a new neighbour
    that is not among *keys* costs more seeks (the aggregator passes every new row of a device).
    """
    now = _current_neighbours(conn, keys, until)
    old: dict[tuple[str, int, int], list[EnergyReading | None]] = {key: [None, None] for key in keys}
    for side, where in ((0, _PRED), (1, _SUCC)):
        for key in sorted(keys, reverse=side == 1):
            device, boot, _ = key
            found = now[key][side]
            while found is not None and found[0] > old_until:
                nkey = (device, boot, found[1].seq)
                if nkey in old and nkey != key:
                    old[key][side] = old[nkey][side]
                    break
                found = _near(conn, where, (*nkey, until))
            else:
                old[key][side] = None if found is None else found[1]
    return [EnergyNeighbours(_reading_of(now[k][0]), _reading_of(now[k][1]), *old[k]) for k in keys]


def _reading_of(found: tuple[int, EnergyReading] | None) -> EnergyReading | None:
    return None if found is None else found[1]


def window_readings(
    conn: sqlite3.Connection, device_id: str, start_ms: int, end_ms: int, max_interval_ms: int, *, until: int
) -> list[EnergyReading]:
    """Every reading with ``id <= until`` that an interval touching ``[start_ms, end_ms)`` needs.

    The readings in the window; per boot, the last reading within *max_interval_ms* before it
    (an interval may span the whole window, and a longer one does not count); and per boot
    everything between the lowest and highest ``seq`` of those plus one neighbour on either
    side, so that neighbours here are neighbours in the table (a reading whose clock jumped out
    of the window is still seen).
    """
    found: dict[tuple[int, int], EnergyReading] = {}
    rows = conn.execute(
        f"SELECT {_REGISTERS} FROM telemetry WHERE device_id = ? AND ts_ms >= ? AND ts_ms < ? AND id <= ?",  # noqa: S608
        (device_id, start_ms, end_ms, until),
    ).fetchall()
    before = conn.execute(
        "SELECT boot, max(ts_ms) FROM telemetry WHERE device_id = ? AND ts_ms >= ? AND ts_ms < ? AND id <= ?"
        " GROUP BY boot",
        (device_id, start_ms - max_interval_ms, start_ms, until),
    ).fetchall()
    edges = [
        _one(
            conn,
            "device_id = ? AND ts_ms = ? AND boot = ? AND id <= ? ORDER BY seq DESC LIMIT 1",
            (device_id, ts, boot, until),
        )
        for boot, ts in before
    ]
    for r in (*[_reading(r) for r in rows], *edges):
        if r is not None:
            found[r.boot, r.seq] = r
    spans: dict[int, tuple[int, int]] = {}
    for boot, seq in found:
        lo, hi = spans.get(boot, (seq, seq))
        spans[boot] = (min(lo, seq), max(hi, seq))
    counts = Counter(boot for boot, _ in found)
    for boot, (lo, hi) in spans.items():
        # Usually the readings in the window are all of that seq range already.
        between = [] if counts[boot] == hi - lo + 1 else _seq_range(conn, device_id, boot, lo, hi, until=until)
        ends = (
            _one(conn, _PRED, (device_id, boot, lo, until)),
            _one(conn, _SUCC, (device_id, boot, hi, until)),
        )
        for r in (*between, *ends):
            if r is not None:
                found[r.boot, r.seq] = r
    return list(found.values())


def head(conn: sqlite3.Connection, device_id: str, until: int) -> EnergyHead | None:
    """Where the readings of *device_id* with ``id <= until`` end (two index seeks)."""
    tip = _one(conn, "device_id = ? AND id <= ? ORDER BY boot DESC, seq DESC LIMIT 1", (device_id, until))
    if tip is None:
        return None
    (last,) = conn.execute(
        "SELECT max(ts_ms) FROM telemetry WHERE device_id = ? AND ts_ms >= ? AND id <= ?",
        (device_id, tip.ts_ms - tip.ts_ms % PERIOD_MS, until),
    ).fetchone()
    return EnergyHead(tip, last)


def _has_content(p: EnergyPeriod) -> bool:
    return p.covered_ms > 0 or p.consumed_kwh != 0 or p.regenerated_kwh != 0 or p.reactive_import_kvarh is not None


def _row(p: EnergyPeriod) -> tuple[object, ...]:
    return (
        p.consumed_kwh,
        p.regenerated_kwh,
        p.reactive_import_kvarh,
        p.reactive_export_kvarh,
        p.covered_ms,
        int(p.complete),
    )


_SELECT_PERIOD = (
    "SELECT consumed_kwh, regenerated_kwh, reactive_import_kvarh, reactive_export_kvarh, covered_ms, complete"
    " FROM energy_periods WHERE device_id = ? AND start_ms = ?"
)
_UPSERT_PERIOD = """
    INSERT INTO energy_periods (device_id, start_ms, consumed_kwh, regenerated_kwh, reactive_import_kvarh,
                                reactive_export_kvarh, covered_ms, complete, rev)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (device_id, start_ms) DO UPDATE SET
        consumed_kwh = excluded.consumed_kwh, regenerated_kwh = excluded.regenerated_kwh,
        reactive_import_kvarh = excluded.reactive_import_kvarh, reactive_export_kvarh = excluded.reactive_export_kvarh,
        covered_ms = excluded.covered_ms, complete = excluded.complete, rev = excluded.rev
"""
_UPSERT_CURSOR = """
    INSERT INTO cursors (name, source, position, updated_at) VALUES (?, ?, ?, ?)
    ON CONFLICT (name) DO UPDATE SET position = excluded.position, updated_at = excluded.updated_at
"""


def save_energy(conn: sqlite3.Connection, periods: Sequence[tuple[str, EnergyPeriod]], position: int) -> int:
    """Write the periods that changed and the cursor, in one transaction; returns the changes.

    A period is written only when it differs from its row (recomputing gives bit-identical
    values, so an unchanged period keeps its ``rev``), and an empty one only over a row.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        rev: int = conn.execute("SELECT coalesce(max(rev), 0) FROM energy_periods").fetchone()[0]
        writes = []
        for device_id, p in periods:
            old = conn.execute(_SELECT_PERIOD, (device_id, p.start_ms)).fetchone()
            new = _row(p)
            if (old is None and not _has_content(p)) or (old is not None and tuple(old) == new):
                continue
            rev += 1
            writes.append((device_id, p.start_ms, *new, rev))
        conn.executemany(_UPSERT_PERIOD, writes)
        conn.execute(_UPSERT_CURSOR, (CURSOR_NAME, CURSOR_SOURCE, position, format_ts(datetime.now(UTC))))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return len(writes)


def energy_series(
    conn: sqlite3.Connection, device_id: str, start_ms: int, end_ms: int, size_ms: int
) -> list[EnergyPeriod]:
    """Periods of *size_ms* (a multiple of 5 minutes) over ``[start_ms, end_ms)`` (aligned), oldest
    first, every one of them: a period without rows is empty and incomplete. A longer period is
    the sum of its 5-minute periods, complete when all of them are stored and complete."""
    per = size_ms // PERIOD_MS
    rows = conn.execute(
        "SELECT ? + ((start_ms - ?) / ?) * ? AS bucket, sum(consumed_kwh), sum(regenerated_kwh),"
        " sum(reactive_import_kvarh), sum(reactive_export_kvarh), sum(covered_ms), count(*), sum(complete)"
        " FROM energy_periods WHERE device_id = ? AND start_ms >= ? AND start_ms < ?"
        " GROUP BY bucket ORDER BY bucket",
        (start_ms, start_ms, size_ms, size_ms, device_id, start_ms, end_ms),
    ).fetchall()
    found = {r[0]: r for r in rows}
    out = []
    for start in range(start_ms, end_ms, size_ms):
        r = found.get(start)
        if r is None:
            out.append(EnergyPeriod(start, 0.0, 0.0, None, None, 0, complete=False))
            continue
        out.append(EnergyPeriod(start, r[1], r[2], r[3], r[4], r[5], complete=r[6] == per and r[7] == per))
    return out


@dataclass(frozen=True, slots=True)
class EnergyChange:
    """A period row as a forwarder sees it: ``rev`` is its cursor position."""

    rev: int
    device_id: str
    #: The device's type (``dc_meter``, ``ac_meter``); None if the device row is gone.
    device_type: str | None
    period: EnergyPeriod

    @property
    def id(self) -> int:
        """The forwarders' position (:class:`storage.interfaces.Forwardable`): the ``rev``."""
        return self.rev


def energy_changes(conn: sqlite3.Connection, after_rev: int, limit: int) -> list[EnergyChange]:
    """Periods changed after *after_rev*, oldest change first: what a forwarder reads by cursor
    (source ``energy_periods``, position = the last ``rev`` sent) to send them on, e.g. as
    :func:`storage.energy_influx.energy_line`. A period changed twice is returned once, at its
    latest ``rev``."""
    rows = conn.execute(
        "SELECT e.rev, e.device_id, d.type, e.start_ms, e.consumed_kwh, e.regenerated_kwh, e.reactive_import_kvarh,"
        " e.reactive_export_kvarh, e.covered_ms, e.complete FROM energy_periods e"
        " LEFT JOIN devices d ON d.device_id = e.device_id WHERE e.rev > ? ORDER BY e.rev LIMIT ?",
        (after_rev, limit),
    ).fetchall()
    return [
        EnergyChange(r[0], r[1], r[2], EnergyPeriod(r[3], r[4], r[5], r[6], r[7], r[8], complete=bool(r[9])))
        for r in rows
    ]


class SqliteEnergyStore:
    """:class:`storage.interfaces.EnergyStore` on the node's database (see the module docstring)."""

    def __init__(self, path: Path, writer: SqliteStore, *, max_interval_ms: int = 3_600_000) -> None:
        self._writer = writer
        #: The aggregator's ``max_interval_ms``: how far before a window an interval can begin.
        self._max_interval_ms = max_interval_ms
        # Opened in the worker thread on first use; check_same_thread=False because anyio may
        # pick another worker thread next time (the limiter still allows one at a time).
        self._uri = f"file:{path}?mode=ro"
        self._conn: sqlite3.Connection | None = None
        self._limiter = anyio.CapacityLimiter(1)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _read[T](self, fn: Any, *args: Any) -> T:
        def call() -> T:
            if self._conn is None:
                self._conn = sqlite3.connect(self._uri, uri=True, check_same_thread=False, timeout=30.0)
                self._conn.execute("PRAGMA query_only=ON")
            result: T = fn(self._conn, *args)
            return result

        try:
            return await anyio.to_thread.run_sync(call, limiter=self._limiter)
        except sqlite3.Error as exc:
            raise StorageError(str(exc)) from exc

    async def energy_cursor(self) -> int:
        return await self._read(read_cursor)

    async def new_readings(self, after: int, limit: int) -> list[EnergyInput]:
        return await self._read(new_readings, after, limit)

    async def neighbours(
        self, keys: Sequence[tuple[str, int, int]], old_until: int, until: int
    ) -> list[EnergyNeighbours]:
        return await self._read(neighbours, keys, old_until, until)

    async def window_readings(self, windows: Sequence[tuple[str, int, int]], until: int) -> list[list[EnergyReading]]:
        def run(conn: sqlite3.Connection, ws: Iterable[tuple[str, int, int]]) -> list[list[EnergyReading]]:
            return [window_readings(conn, d, lo, hi, self._max_interval_ms, until=until) for d, lo, hi in ws]

        return await self._read(run, windows)

    async def heads(self, devices: Sequence[str], until: int) -> list[EnergyHead | None]:
        return await self._read(lambda conn: [head(conn, d, until) for d in devices])

    async def save_energy(self, periods: Sequence[tuple[str, EnergyPeriod]], position: int) -> int:
        return await self._writer.run_in_writer(lambda c: save_energy(c, periods, position))
