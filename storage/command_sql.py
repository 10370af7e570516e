"""SQL of the commands (migration 7): the command actor's writes and the API's reads.

Plain functions of a :class:`sqlite3.Connection`; :class:`storage.sqlite.SqliteStore` runs the
writes on its single writer connection and :class:`storage.reader.Reader` the reads on its
read-only ones. A command row holds its current state; ``command_history`` keeps every state
it entered, in order, so the two are always written in the same transaction.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from storage.errors import CommandConflict
from storage.records import CommandChange, CommandHistoryEntry, CommandRecord, NewCommand, QuarantinedAck

_COLUMNS = (
    "command_id, device_id, name, args, state, created_at, expires_at, attempts, last_sent_at,"
    " created_by, idempotency_key"
)
SELECT_COMMANDS = f"SELECT {_COLUMNS}, id FROM commands"  # noqa: S608 - constant column list
_SELECT_WITH_REQUEST = f"SELECT {_COLUMNS}, request FROM commands"  # noqa: S608

_INSERT_HISTORY = "INSERT INTO command_history (command_id, state, at, detail) VALUES (?, ?, ?, ?)"


def command_from_row(row: Sequence[Any], history: tuple[CommandHistoryEntry, ...] = ()) -> CommandRecord:
    """A :class:`CommandRecord` from a row of :data:`SELECT_COMMANDS`."""
    return CommandRecord(
        command_id=row[0],
        device_id=row[1],
        name=row[2],
        args=json.loads(row[3]),
        state=row[4],
        created_at=row[5],
        expires_at=row[6],
        attempts=row[7],
        last_sent_at=row[8],
        created_by=row[9],
        idempotency_key=row[10],
        history=history,
    )


def create_command(conn: sqlite3.Connection, new: NewCommand) -> tuple[CommandRecord, bool]:
    """Insert *new* as ``queued``, or find the command its idempotency key made before.

    Returns ``(command, created)``. Raises :class:`CommandConflict` when the key was used for
    this device with a different request. The look-up and the insert are one transaction.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        existing = None
        if new.idempotency_key is not None:
            existing = conn.execute(
                _SELECT_WITH_REQUEST + " WHERE device_id = ? AND idempotency_key = ?",
                (new.device_id, new.idempotency_key),
            ).fetchone()
        if existing is None:
            _insert(conn, new)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    if existing is not None:
        if existing[-1] != new.request:
            raise CommandConflict(new.device_id, existing[10], existing[0])
        return command_from_row(existing), False
    record = CommandRecord(
        command_id=new.command_id,
        device_id=new.device_id,
        name=new.name,
        args=new.args,
        state="queued",
        created_at=new.created_at,
        expires_at=new.expires_at,
        created_by=new.created_by,
        idempotency_key=new.idempotency_key,
    )
    return record, True


def _insert(conn: sqlite3.Connection, new: NewCommand) -> None:
    conn.execute(
        "INSERT INTO commands (command_id, device_id, name, args, state, created_at, expires_at, created_by,"
        " idempotency_key, request) VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?)",
        (
            new.command_id,
            new.device_id,
            new.name,
            json.dumps(new.args, separators=(",", ":"), ensure_ascii=False),
            new.created_at,
            new.expires_at,
            new.created_by,
            new.idempotency_key,
            new.request,
        ),
    )
    conn.execute(_INSERT_HISTORY, (new.command_id, "queued", new.created_at, None))


def unfinished_commands(conn: sqlite3.Connection) -> list[CommandRecord]:
    """Every command still ``queued`` or ``sent``, oldest first (the actor's state at start)."""
    rows = conn.execute(SELECT_COMMANDS + " WHERE state IN ('queued', 'sent') ORDER BY id").fetchall()
    return [command_from_row(r) for r in rows]


def command_owner(conn: sqlite3.Connection, command_id: str) -> tuple[str, str] | None:
    """``(device_id, state)`` of *command_id*, or None when there is no such command."""
    row = conn.execute("SELECT device_id, state FROM commands WHERE command_id = ?", (command_id,)).fetchone()
    return None if row is None else (row[0], row[1])


def write_command_changes(
    conn: sqlite3.Connection, changes: Sequence[CommandChange], quarantined: Sequence[QuarantinedAck]
) -> None:
    """Apply *changes* in order and keep *quarantined* acks with their raw payloads, atomically."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany(
            "UPDATE commands SET state = ?, attempts = ?, last_sent_at = ? WHERE command_id = ?",
            [(c.state, c.attempts, c.last_sent_at, c.command_id) for c in changes],
        )
        conn.executemany(_INSERT_HISTORY, [(c.command_id, c.state, c.at, c.detail) for c in changes])
        for q in quarantined:
            raw_id = conn.execute(
                "INSERT INTO raw_messages (device_id, topic, received_at, payload) VALUES (?, ?, ?, ?)",
                (q.device_id, q.topic, q.received_at, q.payload),
            ).lastrowid
            conn.execute(
                "INSERT INTO quarantine (device_id, topic, received_at, reason, detail, raw_id)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (q.device_id, q.topic, q.received_at, q.reason.value, q.detail, raw_id),
            )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _histories(conn: sqlite3.Connection, command_ids: list[str]) -> dict[str, list[CommandHistoryEntry]]:
    found: dict[str, list[CommandHistoryEntry]] = {c: [] for c in command_ids}
    if not command_ids:
        return found
    marks = ",".join("?" * len(command_ids))
    rows = conn.execute(
        f"SELECT command_id, state, at, detail FROM command_history WHERE command_id IN ({marks})"  # noqa: S608
        " ORDER BY id",
        command_ids,
    )
    for command_id, state, at, detail in rows:
        found[command_id].append(CommandHistoryEntry(state, at, detail))
    return found


def read_commands(
    conn: sqlite3.Connection, device_id: str, state: str | None, limit: int, before: int
) -> tuple[list[CommandRecord], int | None]:
    """A page of *device_id*'s commands, newest first, each with its history; and the cursor
    (the last row's id) when there are more."""
    sql = SELECT_COMMANDS + " WHERE device_id = ? AND id < ?"
    args: list[object] = [device_id, before]
    if state is not None:
        sql += " AND state = ?"
        args.append(state)
    sql += " ORDER BY id DESC LIMIT ?"
    args.append(limit + 1)
    rows = conn.execute(sql, args).fetchall()[: limit + 1]
    page = rows[:limit]
    histories = _histories(conn, [r[0] for r in page])
    items = [command_from_row(r, tuple(histories[r[0]])) for r in page]
    return items, (page[-1][-1] if len(rows) > limit else None)


def read_command(conn: sqlite3.Connection, device_id: str, command_id: str) -> CommandRecord | None:
    row = conn.execute(SELECT_COMMANDS + " WHERE device_id = ? AND command_id = ?", (device_id, command_id)).fetchone()
    if row is None:
        return None
    return command_from_row(row, tuple(_histories(conn, [command_id])[command_id]))
