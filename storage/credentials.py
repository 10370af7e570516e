"""Credential lifecycle on the writer connection: device secrets, disabling, API keys.

Each function changes one credential and appends its audit row (:mod:`storage.audit`) in one
transaction. They are plain functions of a ``sqlite3.Connection`` so that the node
(:class:`storage.sqlite.SqliteStore`, in its writer thread) and the ``depot-node`` CLI (its own
short-lived connection) run the same statements.

What a change means for live sessions and cached verifications is the caller's business: the
node forgets the device in its gate and closes its MQTT session after the commit.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum

from storage.audit import Actor, AuditAction, AuditEntry, DetailValue, insert_audit


class Change(StrEnum):
    """What a lifecycle write did."""

    DONE = "done"
    #: The credential was in that state already (disable a disabled device…): nothing written.
    UNCHANGED = "unchanged"
    MISSING = "missing"
    #: The device is revoked; revocation is final, so nothing else may change it.
    REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class ApiKeyRow:
    """An API key as listed: never its hash."""

    key_id: str
    role: str
    name: str | None
    created_at: float
    revoked_at: float | None


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, or ``ROLLBACK`` on any error (autocommit connections)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


#: What a write returns: its result, and the action to audit with its details (None: no change).
type Written[T] = tuple[T, AuditAction | None, dict[str, DetailValue]]


def audited[T](conn: sqlite3.Connection, target: str, by: Actor | None, write: Callable[[], Written[T]]) -> T:
    """Run *write* in a transaction and append the audit row for what it did (when *by* is known)."""
    with transaction(conn):
        result, action, details = write()
        if action is not None and by is not None:
            insert_audit(conn, AuditEntry(action, target, by, details))
    return result


def _device_status(conn: sqlite3.Connection, device_id: str) -> tuple[float | None, float | None] | None:
    """``(revoked_at, disabled_at)`` of *device_id*, None when there is no such device."""
    row = conn.execute("SELECT revoked_at, disabled_at FROM devices WHERE device_id = ?", (device_id,)).fetchone()
    return None if row is None else (row[0], row[1])


def rotate_device_secret(conn: sqlite3.Connection, device_id: str, secret_hash: str, by: Actor | None) -> Change:
    """Replace the secret hash of a registered, unrevoked device (disabled ones included)."""

    def write() -> Written[Change]:
        status = _device_status(conn, device_id)
        if status is None:
            return Change.MISSING, None, {}
        if status[0] is not None:
            return Change.REVOKED, None, {}
        conn.execute(
            "UPDATE devices SET secret_hash = ?, secret_rotated_at = ? WHERE device_id = ?",
            (secret_hash, time.time(), device_id),
        )
        return Change.DONE, AuditAction.DEVICE_ROTATED, {}

    return audited(conn, device_id, by, write)


def set_device_disabled(conn: sqlite3.Connection, device_id: str, disabled: bool, by: Actor | None) -> Change:
    """Disable (refused at CONNECT, its secret kept) or enable a registered, unrevoked device."""

    def write() -> Written[Change]:
        status = _device_status(conn, device_id)
        if status is None:
            return Change.MISSING, None, {}
        if status[0] is not None:
            return Change.REVOKED, None, {}
        if (status[1] is not None) == disabled:
            return Change.UNCHANGED, None, {}
        conn.execute(
            "UPDATE devices SET disabled_at = ? WHERE device_id = ?", (time.time() if disabled else None, device_id)
        )
        action = AuditAction.DEVICE_DISABLED if disabled else AuditAction.DEVICE_ENABLED
        return Change.DONE, action, {}

    return audited(conn, device_id, by, write)


def insert_api_key(
    conn: sqlite3.Connection,
    key_id: str,
    role: str,
    key_hash: str,
    *,
    name: str | None = None,
    by: Actor | None = None,
) -> float:
    """Store a new API key (its hash only); returns its creation time."""

    def write() -> Written[float]:
        created = time.time()
        conn.execute(
            "INSERT INTO api_keys (key_id, role, key_hash, created_at, name) VALUES (?, ?, ?, ?, ?)",
            (key_id, role, key_hash, created, name),
        )
        return created, AuditAction.KEY_CREATED, {"role": role, "name": name}

    return audited(conn, key_id, by, write)


def revoke_api_key(conn: sqlite3.Connection, key_id: str, by: Actor | None) -> Change:
    """Revoke (delete) an API key: every request with it is refused from the next one on.

    The row stays (revoked) so that the audit log's key ids keep meaning something.
    """

    def write() -> Written[Change]:
        row = conn.execute("SELECT role, revoked_at FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
        if row is None:
            return Change.MISSING, None, {}
        if row[1] is not None:
            return Change.UNCHANGED, None, {}
        conn.execute("UPDATE api_keys SET revoked_at = ? WHERE key_id = ?", (time.time(), key_id))
        return Change.DONE, AuditAction.KEY_DELETED, {"role": row[0]}

    return audited(conn, key_id, by, write)


def select_api_keys(conn: sqlite3.Connection, after: str, limit: int) -> list[ApiKeyRow]:
    """Up to *limit* keys with ``key_id > after``, ordered by id, revoked ones included."""
    rows = conn.execute(
        "SELECT key_id, role, name, created_at, revoked_at FROM api_keys WHERE key_id > ? ORDER BY key_id LIMIT ?",
        (after, limit),
    )
    return [ApiKeyRow(*r) for r in rows]
