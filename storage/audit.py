"""The audit log: who changed what, and when.

Every change an operator makes through the API or the CLI is kept as one row of the
``audit_log`` table (migration 4): the action, its target (a device id, an API key id, an
alert id), who did it (an API key id and its role, or ``cli``), when, and details. Details
never hold a secret: a rotated secret is recorded as "rotated", never as a value.

Rows are written on the writer connection, in the same transaction as the change they
describe (:class:`storage.sqlite.SqliteStore` takes a ``by=`` :class:`Actor` on each admin
write), so a change is never kept without its audit row, nor an audit row without its change.
Other code records events that are not a database change of their own (a command sent to a
device) with :meth:`storage.sqlite.SqliteStore.record_audit`.

This module holds the record types and the SQL; it does no I/O of its own.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final


class AuditAction(StrEnum):
    """What was done. A closed set: the API filters on it and documents it."""

    DEVICE_CREATED = "device_created"
    DEVICE_REVOKED = "device_revoked"
    DEVICE_ROTATED = "device_rotated"
    DEVICE_DISABLED = "device_disabled"
    DEVICE_ENABLED = "device_enabled"
    KEY_CREATED = "key_created"
    KEY_DELETED = "key_deleted"
    ALERT_ACKNOWLEDGED = "alert_acknowledged"
    COMMAND_SENT = "command_sent"


#: ``Actor.who`` of changes made with the ``depot-node`` command on the node's machine.
CLI: Final = "cli"

#: Values a detail may take: plain JSON scalars, so the log never nests or grows unbounded.
DetailValue = str | int | float | bool | None


@dataclass(frozen=True, slots=True)
class Actor:
    """Who made a change: an API key id and its role, or :data:`CLI` (role None)."""

    who: str
    role: str | None = None


CLI_ACTOR: Final = Actor(CLI)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    action: AuditAction
    #: The device id, API key id or alert id the action was on.
    target: str
    by: Actor
    #: Extra facts (a device's type, a key's role, a command's id). Never a secret.
    details: dict[str, DetailValue] = field(default_factory=dict)
    #: Epoch seconds; None means "when it is written".
    at: float | None = None


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One stored row; ``id`` orders the log and is the pagination key."""

    id: int
    at: float
    action: str
    target: str
    actor: str
    role: str | None
    details: dict[str, DetailValue]


_INSERT: Final = "INSERT INTO audit_log (at, action, target, actor, role, details) VALUES (?, ?, ?, ?, ?, ?)"
_SELECT: Final = "SELECT id, at, action, target, actor, role, details FROM audit_log"


def insert_audit(conn: sqlite3.Connection, entry: AuditEntry) -> None:
    """Append *entry* inside the caller's transaction (or on its own in autocommit mode)."""
    details = json.dumps(entry.details, separators=(",", ":"), sort_keys=True)
    at = entry.at if entry.at is not None else time.time()
    conn.execute(_INSERT, (at, entry.action.value, entry.target, entry.by.who, entry.by.role, details))


def select_audit(
    conn: sqlite3.Connection,
    *,
    action: str | None,
    target: str | None,
    since: float | None,
    before_id: int,
    limit: int,
) -> list[AuditRecord]:
    """Up to *limit* rows with ``id < before_id``, newest first, matching every given filter."""
    sql = _SELECT + " WHERE id < ?"
    args: list[object] = [before_id]
    if action is not None:
        sql += " AND action = ?"
        args.append(action)
    if target is not None:
        sql += " AND target = ?"
        args.append(target)
    if since is not None:
        sql += " AND at >= ?"
        args.append(since)
    sql += " ORDER BY id DESC LIMIT ?"
    args.append(limit)
    return [AuditRecord(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6])) for r in conn.execute(sql, args)]
