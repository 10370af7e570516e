"""SQLite, the node's only database: connections, the write side and the admin writes.

One :class:`SqliteStore` owns the single writer connection. Every call runs in a worker
thread (``anyio.to_thread``) under a limiter of one, so the event loop never blocks on disk
and statements never interleave. A commit is one ``BEGIN IMMEDIATE … COMMIT`` for a whole
group of device batches. WAL mode lets the API read through its own connections
(:mod:`storage.reader`) while the writer commits.

Durability: ``synchronous=FULL`` by default, so a PUBACK sent after a commit survives a power
cut, not just a crash of the process. ``NORMAL`` is available for sites that accept losing the
last commits on power loss in exchange for fewer fsyncs.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, Literal

import anyio

from storage import command_sql, credentials
from storage.audit import Actor, AuditAction, AuditEntry, insert_audit
from storage.checkpoint import WRITER_AUTOCHECKPOINT_PAGES, WalCheckpointer
from storage.contract import Measurements
from storage.credentials import Change, transaction
from storage.errors import DeviceExists, DeviceLimitReached, StorageError
from storage.records import (
    AlertRecord,
    AlertWrite,
    CommandChange,
    CommandRecord,
    DeviceBatch,
    DeviceStateRecord,
    NewCommand,
    QuarantinedAck,
)
from storage.schema import migrate
from storage.validation import DeviceContext, DeviceProfile, RegisterMark, SupplySystem
from storage.writer_thread import WriterThread

Synchronous = Literal["FULL", "NORMAL"]

#: The writer connection's page cache (SQLite's default is 2 MiB). Every group commit inserts
#: into the telemetry table, its (device, time) index and the raw messages, at as many places
#: in the index as there are devices publishing: with 2 MiB those pages fall out of the cache
#: as the tables grow and each commit reads them back. Allocated as used, up to this.
WRITER_CACHE_KIB: Final = 64 * 1024


def connect(path: Path, *, synchronous: Synchronous = "FULL") -> sqlite3.Connection:
    """Open the writer connection (creating the file and running migrations)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KIB}")
    # Checkpoints run beside the writer (storage.checkpoint); this is only the backstop.
    conn.execute(f"PRAGMA wal_autocheckpoint={WRITER_AUTOCHECKPOINT_PAGES}")
    migrate(conn)
    return conn


class SqliteStore:
    def __init__(self, path: Path, *, synchronous: Synchronous = "FULL") -> None:
        self.path = path
        self._conn = connect(path, synchronous=synchronous)
        self._writer = WriterThread(self._conn)
        # Device actors load their state through a read connection of their own, not the
        # writer's: a reconnect storm starts a thousand actors at once, and their loads queued
        # on the writer's limiter made every commit (and so every PUBACK) wait behind them
        # (bench/reconnect_storm.py). An actor loads only after a writer barrier, so what it
        # reads here is everything committed for it.
        self._state_conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False, timeout=30.0)
        self._state_conn.execute("PRAGMA query_only=ON")
        self._state_limiter = anyio.CapacityLimiter(1)
        self.checkpointer = WalCheckpointer(path)

    def close(self) -> None:
        self._writer.close()
        self.checkpointer.close()
        self._state_conn.close()
        self._conn.close()

    async def _run[T](self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return await self._writer.call(fn)
        except sqlite3.Error as exc:
            raise StorageError(str(exc)) from exc

    async def run_in_writer[T](self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run *fn* on the writer connection, between group commits: for other actors' small
        writes (``storage.energy``). *fn* owns its transaction and must keep it short."""
        return await self._run(fn)

    # -- ingest ---------------------------------------------------------------------------

    async def load_device_state(self, device_id: str) -> DeviceStateRecord | None:
        try:
            return await anyio.to_thread.run_sync(
                load_device_state, self._state_conn, device_id, limiter=self._state_limiter
            )
        except sqlite3.Error as exc:
            raise StorageError(str(exc)) from exc

    async def commit(self, batches: Sequence[DeviceBatch]) -> None:
        # The rows are built here, on the event loop thread, which has time to spare while the
        # writer is what limits ingest; the writer's thread only binds them and steps SQLite.
        rows = _GroupRows.of(batches)
        await self._run(rows.write)
        self.checkpointer.kick()

    async def load_device_context(self, device_id: str, boot: int | None) -> DeviceContext:
        return await self._run(lambda c: load_device_context(c, device_id, boot))

    # -- admin writes -----------------------------------------------------------------------

    async def insert_device(
        self,
        device_id: str,
        type_: str,
        name: str | None,
        secret_hash: str,
        supply: str | None = None,
        *,
        by: Actor | None = None,
        max_devices: int = 0,
    ) -> float:
        """Register a device; raises :class:`DeviceExists`, or :class:`DeviceLimitReached` when
        *max_devices* (0: no limit) devices that are not revoked exist. Returns its creation time.

        With *by*, the ``device_created`` audit row is written in the same transaction.
        """

        def run(c: sqlite3.Connection) -> float:
            created = time.time()
            # Count and insert on the single writer connection (one statement at a time, under
            # the store's limiter): two registrations at once cannot both take the last place.
            if max_devices and _active_devices(c) >= max_devices:
                if c.execute("SELECT 1 FROM devices WHERE device_id = ?", (device_id,)).fetchone():
                    raise DeviceExists(device_id)
                raise DeviceLimitReached(device_id, max_devices)
            try:
                with transaction(c):
                    c.execute(
                        "INSERT INTO devices (device_id, type, name, created_at, secret_hash, supply)"
                        " VALUES (?, ?, ?, ?, ?, ?)",
                        (device_id, type_, name, created, secret_hash, supply),
                    )
                    if by is not None:
                        details = {"type": type_, "name": name} | ({"supply": supply} if supply else {})
                        insert_audit(c, AuditEntry(AuditAction.DEVICE_CREATED, device_id, by, dict(details), created))
            except sqlite3.IntegrityError as exc:
                raise DeviceExists(device_id) from exc
            return created

        return await self._run(run)

    async def set_device_supply(self, device_id: str, supply: str | None) -> bool:
        """Set (or, with None, clear) a device's supply system; False when there is no such device."""

        def run(c: sqlite3.Connection) -> bool:
            return c.execute("UPDATE devices SET supply = ? WHERE device_id = ?", (supply, device_id)).rowcount == 1

        return await self._run(run)

    async def revoke_device(self, device_id: str, *, by: Actor | None = None) -> bool:
        """Mark *device_id* revoked; False when there is no such active device."""

        def run(c: sqlite3.Connection) -> bool:
            def write() -> credentials.Written[bool]:
                cur = c.execute(
                    "UPDATE devices SET revoked_at = ? WHERE device_id = ? AND revoked_at IS NULL",
                    (time.time(), device_id),
                )
                done = cur.rowcount == 1
                return done, AuditAction.DEVICE_REVOKED if done else None, {}

            return credentials.audited(c, device_id, by, write)

        return await self._run(run)

    # -- credential lifecycle (storage/credentials.py), each with its audit row -------------------

    async def rotate_device_secret(self, device_id: str, secret_hash: str, *, by: Actor | None = None) -> Change:
        return await self._run(lambda c: credentials.rotate_device_secret(c, device_id, secret_hash, by))

    async def set_device_disabled(self, device_id: str, disabled: bool, *, by: Actor | None = None) -> Change:
        return await self._run(lambda c: credentials.set_device_disabled(c, device_id, disabled, by))

    async def revoke_api_key(self, key_id: str, *, by: Actor | None = None) -> Change:
        return await self._run(lambda c: credentials.revoke_api_key(c, key_id, by))

    async def record_audit(self, entry: AuditEntry) -> None:
        """Append *entry* to the audit log: for events that are no database change of their own,
        such as a command sent to a device. Runs on the writer connection, in its own thread."""
        await self._run(lambda c: insert_audit(c, entry))

    async def mark_all_offline(self, detail: str) -> int:
        """At start-up: no device is connected to a node that just started. Returns how many
        were marked (their disconnect was never recorded: a crash, a kill, a power cut)."""

        def run(c: sqlite3.Connection) -> int:
            now = time.time()
            with transaction(c):
                ids = [r[0] for r in c.execute("SELECT device_id FROM device_state WHERE online = 1")]
                _EVENT.run(c, [v for d in ids for v in (d, now, "disconnected", detail)])
                c.execute("UPDATE device_state SET online = 0, connected_since = NULL WHERE online = 1")
            return len(ids)

        return await self._run(run)

    async def insert_api_key(
        self, key_id: str, role: str, key_hash: str, *, name: str | None = None, by: Actor | None = None
    ) -> float:
        return await self._run(lambda c: insert_api_key(c, key_id, role, key_hash, name=name, by=by))

    # -- alerts (the alert actor writes them; an operator acknowledges them) ---------------------

    async def uncleared_alerts(self) -> list[AlertRecord]:
        def run(c: sqlite3.Connection) -> list[AlertRecord]:
            rows = c.execute(SELECT_ALERTS + " WHERE state IN ('open', 'acknowledged') ORDER BY id").fetchall()
            return [alert_from_row(r) for r in rows]

        return await self._run(run)

    async def write_alerts(self, writes: Sequence[AlertWrite]) -> None:
        await self._run(lambda c: _write_alerts(c, writes))

    async def ack_alert(self, alert_id: str, key_id: str, *, by: Actor | None = None) -> AlertRecord | None:
        """Acknowledge *alert_id* if it is open, on behalf of API key *key_id*.

        Returns the alert as it is afterwards (None when there is no such alert): an alert
        that was acknowledged already keeps its first ``acked_at``/``acked_by``, and a cleared
        one stays cleared; the caller tells these apart by ``state``. The update and the read
        run in one call on the writer connection, so no clear can slip in between.
        """

        def run(c: sqlite3.Connection) -> AlertRecord | None:
            def write() -> credentials.Written[AlertRecord | None]:
                acked = c.execute(_ACK_ALERT, (time.time(), key_id, alert_id)).rowcount == 1
                row = c.execute(SELECT_ALERTS + " WHERE alert_id = ?", (alert_id,)).fetchone()
                record = None if row is None else alert_from_row(row)
                if not acked or record is None:
                    return record, None, {}
                return record, AuditAction.ALERT_ACKNOWLEDGED, {"device_id": record.device_id, "rule": record.rule}

            return credentials.audited(c, alert_id, by, write)

        return await self._run(run)

    # -- commands (the command actor is their only writer; storage/command_sql.py) --------------

    async def create_command(self, new: NewCommand) -> tuple[CommandRecord, bool]:
        return await self._run(lambda c: command_sql.create_command(c, new))

    async def unfinished_commands(self) -> list[CommandRecord]:
        return await self._run(command_sql.unfinished_commands)

    async def command_owner(self, command_id: str) -> tuple[str, str] | None:
        return await self._run(lambda c: command_sql.command_owner(c, command_id))

    async def write_command_changes(
        self, changes: Sequence[CommandChange], quarantined: Sequence[QuarantinedAck]
    ) -> None:
        await self._run(lambda c: command_sql.write_command_changes(c, changes, quarantined))


def insert_api_key(
    conn: sqlite3.Connection,
    key_id: str,
    role: str,
    key_hash: str,
    *,
    name: str | None = None,
    by: Actor | None = None,
) -> float:
    """Store a new API key (its hash only), with its ``key_created`` audit row when *by* is given."""
    return credentials.insert_api_key(conn, key_id, role, key_hash, name=name, by=by)


def load_device_state(conn: sqlite3.Connection, device_id: str) -> DeviceStateRecord | None:
    row = conn.execute(
        "SELECT boot, low, high, gaps, counters, last_seen, online, connected_since FROM device_state"
        " WHERE device_id = ?",
        (device_id,),
    ).fetchone()
    if row is None:
        return None
    boot, low, high, gaps, counters, last_seen, online, connected_since = row
    return DeviceStateRecord(
        device_id=device_id,
        boot=boot,
        low=low,
        high=high,
        gaps=tuple((int(a), int(b)) for a, b in json.loads(gaps)),
        counters={k: int(v) for k, v in json.loads(counters).items()},
        last_seen=last_seen,
        online=bool(online),
        connected_since=connected_since,
    )


def load_device_context(conn: sqlite3.Connection, device_id: str, boot: int | None) -> DeviceContext:
    """The device's profile and the registers of its newest stored reading in *boot*."""
    row = conn.execute("SELECT type, supply FROM devices WHERE device_id = ?", (device_id,)).fetchone()
    profile = None if row is None else DeviceProfile(row[0], None if row[1] is None else SupplySystem(row[1]))
    registers = None
    if boot is not None:
        # The unique (device_id, boot, seq) index makes this one seek.
        last = conn.execute(
            "SELECT seq, m FROM telemetry WHERE device_id = ? AND boot = ? ORDER BY seq DESC LIMIT 1", (device_id, boot)
        ).fetchone()
        if last is not None:
            registers = RegisterMark(boot, last[0], Measurements.model_validate_json(last[1]))
    return DeviceContext(profile, registers)


#: The row counts of the multi-row INSERTs (``… SELECT … FROM (VALUES (…), (…), …)``) that a
#: group commit uses instead of ``executemany``. The sqlite3 module lets go of the GIL around
#: every ``sqlite3_step``; ``executemany`` steps once per row, so each row had to win the GIL
#: back from the busy event loop thread before the next. Here a table's rows go in with one step
#: per 1,024, padded up to the next of these sizes with NULLs that a ``LIMIT`` leaves out:
#: SQLite does the work without the GIL, on the other core, and a few statements serve every
#: group size from the sqlite3 module's statement cache (ADR 0015). 1,024 rows of 9 values stay
#: far below SQLite's limit of 32,766 bound variables.
INSERT_SIZES: Final = (1, 4, 16, 64, 256, 1024)


class _Insert:
    """A multi-row INSERT of rows of *columns*, in statements of :data:`INSERT_SIZES` rows.

    The last value bound is the number of real rows (the rest is padding). With *offset*, the
    ``"first"`` or ``"last"`` value of each row is a number added to a base, bound first: a raw
    message's id, which the writer learns only inside the transaction (``max(id)``), while the
    rows are built before it."""

    def __init__(
        self, head: str, columns: Sequence[str], *, offset: Literal["first", "last"] | None = None, tail: str = ""
    ) -> None:
        self.width = len(columns)
        self._sql: dict[int, str] = {}
        self._head, self._columns, self._offset, self._tail = head, columns, offset, tail

    def _statement(self, rows: int) -> str:
        sql = self._sql.get(rows)
        if sql is None:
            one = "(" + ",".join("?" * self.width) + ")"
            values = ",".join([one] * rows)
            cols = [f"column{i + 1}" for i in range(self.width)]
            if self._offset:
                cols[-1 if self._offset == "last" else 0] += " + ?"
            # Plain ? only, numbered in the order they are written: the base (in the column
            # list), the rows, the row count (in the LIMIT). SQLite looks numbered ones (?NNN)
            # up by a linear scan on every bind: a 1,024-row statement with them took 100 ms.
            # VALUES yields its rows in order, so the LIMIT keeps the real ones. "WHERE true"
            # keeps an upsert's ON CONFLICT from being parsed as a join's.
            select = f"SELECT {', '.join(cols)} FROM (VALUES {values}) WHERE true LIMIT ?"  # noqa: S608
            sql = f"{self._head} ({', '.join(self._columns)}) {select}{self._tail}"
            self._sql[rows] = sql
        return sql

    def run(self, conn: sqlite3.Connection, flat: list[object], base: int = 0) -> None:
        """Insert the rows of *flat*, their values one after the other."""
        width = self.width
        largest = INSERT_SIZES[-1]
        start, rows = 0, len(flat) // width
        while rows:
            size = next(n for n in INSERT_SIZES if n >= rows) if rows < largest else largest
            take = min(rows, size)
            end = start + take * width
            args: list[object] = [base] if self._offset else []
            args += flat[start:end]
            if take < size:
                args += [None] * ((size - take) * width)
            args.append(take)
            conn.execute(self._statement(size), args)
            start, rows = end, rows - take


_RAW = _Insert("INSERT INTO raw_messages", ("id", "device_id", "topic", "received_at", "payload"), offset="first")
# OR IGNORE backs up the tracker: even a bug there cannot store a (device, boot, seq) twice.
_TELEMETRY = _Insert(
    "INSERT OR IGNORE INTO telemetry", ("device_id", "boot", "seq", "ts_ms", "m", "loc", "raw_id"), offset="last"
)
_QUARANTINE = _Insert(
    "INSERT INTO quarantine", ("device_id", "topic", "received_at", "reason", "detail", "raw_id"), offset="last"
)
_EVENT = _Insert("INSERT INTO device_events", ("device_id", "at", "event", "detail"))
_STATE = _Insert(
    "INSERT INTO device_state",
    ("device_id", "boot", "low", "high", "gaps", "counters", "last_seen", "online", "connected_since"),
    tail="""
    ON CONFLICT (device_id) DO UPDATE SET
        boot = excluded.boot, low = excluded.low, high = excluded.high, gaps = excluded.gaps,
        counters = excluded.counters, last_seen = excluded.last_seen, online = excluded.online,
        connected_since = excluded.connected_since
    """,
)

#: ``json.dumps(..., separators=(",", ":"))`` without building a new encoder per call (which
#: ``json.dumps`` does whenever it gets an argument): two per device per commit.
_compact_json = json.JSONEncoder(separators=(",", ":")).encode


class _GroupRows:
    """A group commit's rows, each table's flat (value after value), raw message ids counted
    from 1: the transaction adds the table's ``max(id)`` to them."""

    __slots__ = ("events", "quarantine", "raws", "states", "telemetry")

    def __init__(self) -> None:
        self.raws: list[object] = []
        self.telemetry: list[object] = []
        self.quarantine: list[object] = []
        self.events: list[object] = []
        self.states: list[object] = []

    @classmethod
    def of(cls, batches: Sequence[DeviceBatch]) -> _GroupRows:
        rows = cls()
        # The latest state per device wins: batches of one device arrive in order.
        states: dict[str, DeviceStateRecord] = {}
        raws, telemetry, quarantine, events = rows.raws, rows.telemetry, rows.quarantine, rows.events
        # Plain loops and bound methods: this runs for every message of the group (a generator
        # per message cost ~1 µs more).
        add_raw, add_row, add_quarantine = raws.extend, telemetry.extend, quarantine.extend
        raw_id = 0
        for batch in batches:
            device_id = batch.device_id
            states[device_id] = batch.state
            for e in batch.events:
                events += (device_id, e.at, e.event, e.detail)
            for msg in batch.messages:
                raw_id += 1
                add_raw((raw_id, device_id, msg.topic, msg.received_at, msg.payload))
                for r in msg.telemetry:
                    add_row((device_id, r.boot, r.seq, r.ts_ms, r.m_json, r.loc_json, raw_id))
                for q in msg.quarantine:
                    add_quarantine((device_id, msg.topic, msg.received_at, q.reason.value, q.detail, raw_id))
        for st in states.values():
            rows.states += (
                st.device_id,
                st.boot,
                st.low,
                st.high,
                _compact_json(st.gaps),
                _compact_json(st.counters),
                st.last_seen,
                int(st.online),
                st.connected_since,
            )
        return rows

    def write(self, conn: sqlite3.Connection) -> None:
        """Commit the rows in one transaction."""
        with transaction(conn):
            # This connection is the only writer of raw messages' ids (max() on the primary key
            # is a single seek).
            base: int = conn.execute("SELECT coalesce(max(id), 0) FROM raw_messages").fetchone()[0]
            _RAW.run(conn, self.raws, base)
            _TELEMETRY.run(conn, self.telemetry, base)
            _QUARANTINE.run(conn, self.quarantine, base)
            _EVENT.run(conn, self.events)
            _STATE.run(conn, self.states)


#: The columns of :class:`AlertRecord` in its field order, then the rowid (the reader's cursor).
SELECT_ALERTS = (
    "SELECT alert_id, device_id, rule, state, severity, detail, count, raised_at, last_seen_at,"
    " acked_at, acked_by, cleared_at, id FROM alerts"
)


def alert_from_row(row: Sequence[Any]) -> AlertRecord:
    """An :class:`AlertRecord` from a row of :data:`SELECT_ALERTS`."""
    return AlertRecord(*row[:12])


# Not an UPSERT: ON CONFLICT (alert_id) covers that constraint only, and inserting a repeat of
# an uncleared alert trips the partial unique index on (device_id, rule) first.
_UPDATE_ALERT = "UPDATE alerts SET detail = ?, count = ?, last_seen_at = ? WHERE alert_id = ?"
_INSERT_ALERT = (
    "INSERT INTO alerts (alert_id, device_id, rule, state, severity, detail, count, raised_at, last_seen_at)"
    " VALUES (?, ?, ?, 'open', ?, ?, ?, ?, ?)"
)
_ACK_ALERT = (
    "UPDATE alerts SET state = 'acknowledged', acked_at = ?, acked_by = ? WHERE alert_id = ? AND state = 'open'"
)
_CLEAR_ALERT = "UPDATE alerts SET state = 'cleared', cleared_at = ? WHERE alert_id = ? AND state != 'cleared'"


def _write_alerts(conn: sqlite3.Connection, writes: Sequence[AlertWrite]) -> None:
    # In order, one statement at a time: an alert cleared here must be cleared before the next
    # alert of its (device, rule) is inserted, or the partial unique index refuses the insert.
    with transaction(conn):
        for w in writes:
            if conn.execute(_UPDATE_ALERT, (w.detail, w.count, w.last_seen_at, w.alert_id)).rowcount == 0:
                conn.execute(
                    _INSERT_ALERT,
                    (w.alert_id, w.device_id, w.rule, w.severity, w.detail, w.count, w.raised_at, w.last_seen_at),
                )
            if w.cleared_at is not None:
                conn.execute(_CLEAR_ALERT, (w.cleared_at, w.alert_id))


def _active_devices(c: sqlite3.Connection) -> int:
    (count,) = c.execute("SELECT count(*) FROM devices WHERE revoked_at IS NULL").fetchone()
    return int(count)
