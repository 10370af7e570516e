"""The read side: what the API and the broker's auth plugin ask of the database.

Reads go through their own read-only connections (one per worker thread), never the writer's,
so a slow API query cannot delay a commit, and WAL lets them see the last committed state.
Pagination uses opaque keyset cursors (no OFFSET): stable while rows are being added.
"""

from __future__ import annotations

import base64
import binascii
import json
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from storage import command_sql
from storage.audit import AuditRecord, select_audit
from storage.credentials import ApiKeyRow, select_api_keys
from storage.energy import energy_series
from storage.errors import StorageError
from storage.records import AlertRecord, CommandRecord, DeviceStateRecord, EnergyPeriod
from storage.sqlite import SELECT_ALERTS, alert_from_row, load_device_state


class BadCursor(ValueError):  # noqa: N818 - reads as what happened
    """A pagination cursor that this node did not issue."""


def encode_cursor(*values: int | str) -> str:
    return base64.urlsafe_b64encode(json.dumps(values, separators=(",", ":")).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, *types: type) -> tuple[Any, ...]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        values = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise BadCursor(cursor) from exc
    if (
        not isinstance(values, list)
        or len(values) != len(types)
        or not all(type(v) is t for v, t in zip(values, types, strict=True))
    ):
        raise BadCursor(cursor)
    return tuple(values)


@dataclass(frozen=True, slots=True)
class DeviceRow:
    device_id: str
    type: str
    name: str | None
    created_at: float
    revoked_at: float | None
    disabled_at: float | None = None
    secret_rotated_at: float | None = None
    #: A :class:`storage.validation.SupplySystem` value; None when registered without one.
    supply: str | None = None


#: The columns of :class:`DeviceRow`, in its field order.
_SELECT_DEVICES = (
    "SELECT device_id, type, name, created_at, revoked_at, disabled_at, secret_rotated_at, supply FROM devices"
)


@dataclass(frozen=True, slots=True)
class Credentials:
    secret_hash: str
    revoked: bool
    disabled: bool = False


@dataclass(frozen=True, slots=True)
class TelemetryItem:
    boot: int
    seq: int
    ts_ms: int
    m: dict[str, float]
    loc: dict[str, float] | None


@dataclass(frozen=True, slots=True)
class QuarantineItem:
    id: int
    device_id: str
    topic: str
    received_at: float
    reason: str
    detail: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class EventItem:
    id: int
    at: float
    event: str
    detail: str


@dataclass(frozen=True, slots=True)
class Page[T]:
    items: list[T]
    next_cursor: str | None


class Reader:
    def __init__(self, path: Path) -> None:
        self._uri = f"file:{path}?mode=ro"
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._limiter = anyio.CapacityLimiter(4)

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self._uri, uri=True, check_same_thread=False, timeout=30.0)
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()

    async def _run[T](self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            return fn(self._conn())

        try:
            return await anyio.to_thread.run_sync(call, limiter=self._limiter)
        except sqlite3.Error as exc:
            raise StorageError(str(exc)) from exc

    async def credentials(self, device_id: str) -> Credentials | None:
        def q(c: sqlite3.Connection) -> Credentials | None:
            row = c.execute(
                "SELECT secret_hash, revoked_at, disabled_at FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
            return None if row is None else Credentials(row[0], row[1] is not None, row[2] is not None)

        return await self._run(q)

    async def api_key(self, key_id: str) -> tuple[str, str] | None:
        """``(role, key_hash)`` of an active API key."""

        def q(c: sqlite3.Connection) -> tuple[str, str] | None:
            row = c.execute(
                "SELECT role, key_hash FROM api_keys WHERE key_id = ? AND revoked_at IS NULL", (key_id,)
            ).fetchone()
            return None if row is None else (row[0], row[1])

        return await self._run(q)

    async def device(self, device_id: str) -> tuple[DeviceRow, DeviceStateRecord | None] | None:
        def q(c: sqlite3.Connection) -> tuple[DeviceRow, DeviceStateRecord | None] | None:
            row = c.execute(_SELECT_DEVICES + " WHERE device_id = ?", (device_id,)).fetchone()
            if row is None:
                return None
            return DeviceRow(*row), load_device_state(c, device_id)

        return await self._run(q)

    async def devices(self, limit: int, cursor: str | None) -> Page[DeviceRow]:
        after = decode_cursor(cursor, str)[0] if cursor else ""

        def q(c: sqlite3.Connection) -> Page[DeviceRow]:
            rows = c.execute(
                _SELECT_DEVICES + " WHERE device_id > ? ORDER BY device_id LIMIT ?",
                (after, limit + 1),
            ).fetchall()
            items = [DeviceRow(*r) for r in rows[:limit]]
            nxt = encode_cursor(items[-1].device_id) if len(rows) > limit else None
            return Page(items, nxt)

        return await self._run(q)

    async def telemetry(
        self, device_id: str, from_ms: int | None, to_ms: int | None, limit: int, cursor: str | None
    ) -> Page[TelemetryItem]:
        """Readings of *device_id* with ``from_ms <= ts < to_ms``, oldest (device time) first."""
        after_ts, after_id = decode_cursor(cursor, int, int) if cursor else (-(2**62), -1)
        lo = max(from_ms if from_ms is not None else -(2**62), after_ts)
        hi = to_ms if to_ms is not None else 2**62

        def q(c: sqlite3.Connection) -> Page[TelemetryItem]:
            rows = c.execute(
                "SELECT id, boot, seq, ts_ms, m, loc FROM telemetry"
                " WHERE device_id = ? AND ts_ms >= ? AND ts_ms < ? AND (ts_ms > ? OR id > ?)"
                " ORDER BY ts_ms, id LIMIT ?",
                (device_id, lo, hi, after_ts, after_id, limit + 1),
            ).fetchall()
            items = [
                TelemetryItem(r[1], r[2], r[3], json.loads(r[4]), json.loads(r[5]) if r[5] else None)
                for r in rows[:limit]
            ]
            nxt = encode_cursor(rows[limit - 1][3], rows[limit - 1][0]) if len(rows) > limit else None
            return Page(items, nxt)

        return await self._run(q)

    async def quarantine(self, device_id: str | None, limit: int, cursor: str | None) -> Page[QuarantineItem]:
        """Quarantined messages, newest first."""
        before = decode_cursor(cursor, int)[0] if cursor else 2**62

        def q(c: sqlite3.Connection) -> Page[QuarantineItem]:
            sql = (
                "SELECT q.id, q.device_id, q.topic, q.received_at, q.reason, q.detail, r.payload"
                " FROM quarantine q JOIN raw_messages r ON r.id = q.raw_id WHERE q.id < ?"
            )
            args: list[object] = [before]
            if device_id is not None:
                sql += " AND q.device_id = ?"
                args.append(device_id)
            sql += " ORDER BY q.id DESC LIMIT ?"
            args.append(limit + 1)
            rows = c.execute(sql, args).fetchall()
            items = [QuarantineItem(*r) for r in rows[:limit]]
            nxt = encode_cursor(items[-1].id) if len(rows) > limit else None
            return Page(items, nxt)

        return await self._run(q)

    async def events(self, device_id: str, limit: int, cursor: str | None) -> Page[EventItem]:
        """A device's connection history, newest first."""
        before = decode_cursor(cursor, int)[0] if cursor else 2**62

        def q(c: sqlite3.Connection) -> Page[EventItem]:
            rows = c.execute(
                "SELECT id, at, event, detail FROM device_events WHERE device_id = ? AND id < ?"
                " ORDER BY id DESC LIMIT ?",
                (device_id, before, limit + 1),
            ).fetchall()
            items = [EventItem(*r) for r in rows[:limit]]
            nxt = encode_cursor(items[-1].id) if len(rows) > limit else None
            return Page(items, nxt)

        return await self._run(q)

    async def alerts(
        self, state: str | None, device_id: str | None, rule: str | None, limit: int, cursor: str | None
    ) -> Page[AlertRecord]:
        """Alerts, newest (last raised) first, optionally of one state, device and rule."""
        before = decode_cursor(cursor, int)[0] if cursor else 2**62

        def q(c: sqlite3.Connection) -> Page[AlertRecord]:
            sql = SELECT_ALERTS + " WHERE id < ?"
            args: list[object] = [before]
            for column, value in (("state", state), ("device_id", device_id), ("rule", rule)):
                if value is not None:
                    sql += f" AND {column} = ?"
                    args.append(value)
            sql += " ORDER BY id DESC LIMIT ?"
            args.append(limit + 1)
            rows = c.execute(sql, args).fetchall()
            items = [alert_from_row(r) for r in rows[:limit]]
            nxt = encode_cursor(rows[limit - 1][-1]) if len(rows) > limit else None
            return Page(items, nxt)

        return await self._run(q)

    async def alert(self, alert_id: str) -> AlertRecord | None:
        def q(c: sqlite3.Connection) -> AlertRecord | None:
            row = c.execute(SELECT_ALERTS + " WHERE alert_id = ?", (alert_id,)).fetchone()
            return None if row is None else alert_from_row(row)

        return await self._run(q)

    async def commands(self, device_id: str, state: str | None, limit: int, cursor: str | None) -> Page[CommandRecord]:
        """*device_id*'s commands, newest first, each with its history; optionally of one state."""
        before = decode_cursor(cursor, int)[0] if cursor else 2**62

        def q(c: sqlite3.Connection) -> Page[CommandRecord]:
            items, last = command_sql.read_commands(c, device_id, state, limit, before)
            return Page(items, None if last is None else encode_cursor(last))

        return await self._run(q)

    async def command(self, device_id: str, command_id: str) -> CommandRecord | None:
        return await self._run(lambda c: command_sql.read_command(c, device_id, command_id))

    async def api_keys(self, limit: int, cursor: str | None) -> Page[ApiKeyRow]:
        """API keys ordered by id, revoked ones included; never their hashes."""
        after = decode_cursor(cursor, str)[0] if cursor else ""

        def q(c: sqlite3.Connection) -> Page[ApiKeyRow]:
            rows = select_api_keys(c, after, limit + 1)
            items = rows[:limit]
            return Page(items, encode_cursor(items[-1].key_id) if len(rows) > limit else None)

        return await self._run(q)

    async def audit(
        self, action: str | None, target: str | None, since: float | None, limit: int, cursor: str | None
    ) -> Page[AuditRecord]:
        """The audit log, newest first, optionally of one action and target, at or after *since*."""
        before = decode_cursor(cursor, int)[0] if cursor else 2**62

        def q(c: sqlite3.Connection) -> Page[AuditRecord]:
            rows = select_audit(c, action=action, target=target, since=since, before_id=before, limit=limit + 1)
            items = rows[:limit]
            return Page(items, encode_cursor(items[-1].id) if len(rows) > limit else None)

        return await self._run(q)

    async def energy(self, device_id: str, start_ms: int, end_ms: int, size_ms: int) -> list[EnergyPeriod]:
        """A device's energy per period of *size_ms* over ``[start_ms, end_ms)``, every period, oldest first."""
        return await self._run(lambda c: energy_series(c, device_id, start_ms, end_ms, size_ms))

    async def ping(self) -> bool:
        return await self._run(lambda c: c.execute("SELECT 1").fetchone() == (1,))
