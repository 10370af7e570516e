"""The SQLite schema as numbered migrations, applied in order at start-up.

``PRAGMA user_version`` holds the number of migrations applied. A migration is never edited
once released: a change is a new entry at the end of :data:`MIGRATIONS`.
"""

from __future__ import annotations

import sqlite3
from typing import Final

from storage.errors import MigrationError

MIGRATIONS: Final[tuple[str, ...]] = (
    # 1: devices, keys, telemetry, raw archive, quarantine, device state.
    """
    CREATE TABLE devices (
        device_id   TEXT PRIMARY KEY,
        type        TEXT NOT NULL CHECK (type IN ('dc_meter', 'ac_meter')),
        name        TEXT,
        created_at  REAL NOT NULL,
        revoked_at  REAL,
        secret_hash TEXT NOT NULL
    ) STRICT;

    CREATE TABLE api_keys (
        key_id     TEXT PRIMARY KEY,
        role       TEXT NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
        key_hash   TEXT NOT NULL,
        created_at REAL NOT NULL,
        revoked_at REAL
    ) STRICT;

    -- Every accepted or quarantined PUBLISH as received (duplicates are counted, not kept).
    CREATE TABLE raw_messages (
        id          INTEGER PRIMARY KEY,
        device_id   TEXT NOT NULL,
        topic       TEXT NOT NULL,
        received_at REAL NOT NULL,
        payload     BLOB NOT NULL
    ) STRICT;

    CREATE TABLE telemetry (
        id        INTEGER PRIMARY KEY,
        device_id TEXT NOT NULL,
        boot      INTEGER NOT NULL,
        seq       INTEGER NOT NULL,
        ts_ms     INTEGER NOT NULL,
        m         TEXT NOT NULL,
        loc       TEXT,
        raw_id    INTEGER NOT NULL REFERENCES raw_messages (id),
        UNIQUE (device_id, boot, seq)
    ) STRICT;
    CREATE INDEX telemetry_by_device_time ON telemetry (device_id, ts_ms, id);

    CREATE TABLE quarantine (
        id          INTEGER PRIMARY KEY,
        device_id   TEXT NOT NULL,
        topic       TEXT NOT NULL,
        received_at REAL NOT NULL,
        reason      TEXT NOT NULL,
        detail      TEXT NOT NULL,
        raw_id      INTEGER NOT NULL REFERENCES raw_messages (id)
    ) STRICT;
    CREATE INDEX quarantine_by_device ON quarantine (device_id, id);

    CREATE TABLE device_state (
        device_id TEXT PRIMARY KEY,
        boot      INTEGER,
        low       INTEGER NOT NULL,
        high      INTEGER NOT NULL,
        gaps      TEXT NOT NULL,
        counters  TEXT NOT NULL,
        last_seen REAL,
        online    INTEGER NOT NULL
    ) STRICT;
    """,
    # 2: connection history and when the current connection began.
    """
    ALTER TABLE device_state ADD COLUMN connected_since REAL;

    CREATE TABLE device_events (
        id        INTEGER PRIMARY KEY,
        device_id TEXT NOT NULL,
        at        REAL NOT NULL,
        event     TEXT NOT NULL,
        detail    TEXT NOT NULL
    ) STRICT;
    CREATE INDEX device_events_by_device ON device_events (device_id, id);
    """,
    # 3: alerts. At most one alert per (device, rule) is not cleared; the partial unique index
    # holds the alert actor to that. `rule` has no CHECK: a new rule must not need a migration.
    """
    CREATE TABLE alerts (
        id           INTEGER PRIMARY KEY,
        alert_id     TEXT NOT NULL UNIQUE,
        device_id    TEXT NOT NULL,
        rule         TEXT NOT NULL,
        state        TEXT NOT NULL CHECK (state IN ('open', 'acknowledged', 'cleared')),
        severity     TEXT NOT NULL,
        detail       TEXT NOT NULL,
        count        INTEGER NOT NULL,
        raised_at    REAL NOT NULL,
        last_seen_at REAL NOT NULL,
        acked_at     REAL,
        acked_by     TEXT,
        cleared_at   REAL
    ) STRICT;
    CREATE UNIQUE INDEX alerts_one_uncleared ON alerts (device_id, rule) WHERE state != 'cleared';
    CREATE INDEX alerts_by_state ON alerts (state, id);
    CREATE INDEX alerts_by_device ON alerts (device_id, id);
    """,
    # 4: credential lifecycle (disable/enable, when a secret was last rotated), API key names,
    # and the audit log (storage/audit.py). `action` has no CHECK: a new action must not need
    # a migration. Rows are only ever appended.
    """
    ALTER TABLE devices ADD COLUMN disabled_at REAL;
    ALTER TABLE devices ADD COLUMN secret_rotated_at REAL;
    ALTER TABLE api_keys ADD COLUMN name TEXT;

    CREATE TABLE audit_log (
        id      INTEGER PRIMARY KEY,
        at      REAL NOT NULL,
        action  TEXT NOT NULL,
        target  TEXT NOT NULL,
        actor   TEXT NOT NULL,
        role    TEXT,
        details TEXT NOT NULL
    ) STRICT;
    CREATE INDEX audit_by_action ON audit_log (action, id);
    CREATE INDEX audit_by_target ON audit_log (target, id);
    """,
    # 5: forwarder cursors and marks.
    # `cursors` is shared with the energy aggregator, whose migration creates the same table with
    # IF NOT EXISTS, so either may come first. `position` is the last rowid of `source` consumed.
    # `cursor_marks` keeps when a forwarder's position was reached: retention counts its days
    # from there (storage/retention.py). `quarantine_by_raw` lets the S3 archive find the
    # quarantine reasons of the raw messages it sends.
    """
    CREATE TABLE IF NOT EXISTS cursors (name TEXT PRIMARY KEY, source TEXT NOT NULL,
        position INTEGER NOT NULL DEFAULT 0, updated_at TEXT NOT NULL);

    CREATE TABLE IF NOT EXISTS cursor_marks (
        name     TEXT NOT NULL,
        position INTEGER NOT NULL,
        at       REAL NOT NULL,
        PRIMARY KEY (name, position)
    ) STRICT;

    CREATE INDEX IF NOT EXISTS quarantine_by_raw ON quarantine (raw_id);
    """,
    # 6: energy per 5-minute period
    # (ADR 0008) and the shared cursor table. The cursors statement is the same in the
    # forwarders' migration (5), so either may create it first.
    """
    CREATE TABLE IF NOT EXISTS cursors (name TEXT PRIMARY KEY, source TEXT NOT NULL,
        position INTEGER NOT NULL DEFAULT 0, updated_at TEXT NOT NULL);

    -- One row per device and period that has energy or coverage. A missing row is an empty,
    -- incomplete period. `rev` grows with every change, for whoever forwards the periods.
    CREATE TABLE energy_periods (
        device_id             TEXT NOT NULL,
        start_ms              INTEGER NOT NULL,
        consumed_kwh          REAL NOT NULL,
        regenerated_kwh       REAL NOT NULL,
        reactive_import_kvarh REAL,
        reactive_export_kvarh REAL,
        covered_ms            INTEGER NOT NULL,
        complete              INTEGER NOT NULL,
        rev                   INTEGER NOT NULL,
        PRIMARY KEY (device_id, start_ms)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX energy_periods_by_rev ON energy_periods (rev);
    """,
    # 7: commands to devices and every state each one passed through (`queued → sent → acked
    # | failed | expired`). At most one command per (device, idempotency key). `request` is the
    # canonical JSON of what was asked (name, args, ttl_s), to tell a repeat from a conflict.
    """
    CREATE TABLE commands (
        id              INTEGER PRIMARY KEY,
        command_id      TEXT NOT NULL UNIQUE,
        device_id       TEXT NOT NULL,
        name            TEXT NOT NULL,
        args            TEXT NOT NULL,
        state           TEXT NOT NULL CHECK (state IN ('queued', 'sent', 'acked', 'failed', 'expired')),
        created_at      REAL NOT NULL,
        expires_at      REAL NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        last_sent_at    REAL,
        created_by      TEXT,
        idempotency_key TEXT,
        request         TEXT NOT NULL
    ) STRICT;
    CREATE UNIQUE INDEX commands_idempotency ON commands (device_id, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE INDEX commands_by_device ON commands (device_id, id);
    CREATE INDEX commands_unfinished ON commands (state) WHERE state IN ('queued', 'sent');

    CREATE TABLE command_history (
        id         INTEGER PRIMARY KEY,
        command_id TEXT NOT NULL REFERENCES commands (command_id),
        state      TEXT NOT NULL,
        at         REAL NOT NULL,
        detail     TEXT
    ) STRICT;
    CREATE INDEX command_history_by_command ON command_history (command_id, id);
    """,
    # 8 (issue #6, validation rules): a device's supply system (storage.validation.SupplySystem).
    # NULL for devices registered before it, and for new ones registered without it: their
    # voltage is checked against the widest range of their type.
    """
    ALTER TABLE devices ADD COLUMN supply TEXT CHECK (
        supply IS NULL
        OR supply IN ('dc_600v', 'dc_750v', 'dc_1500v', 'dc_3000v', 'ac_15kv_16.7hz', 'ac_25kv_50hz')
    );
    """,
    # 9 (history retention, storage/history_retention.py): what retention finds old rows of the
    # history tables by, so that a step stops after its batch instead of scanning a whole table
    # while it holds the write lock.
    """
    CREATE INDEX IF NOT EXISTS audit_by_time ON audit_log (at);
    CREATE INDEX IF NOT EXISTS device_events_by_time ON device_events (at);
    CREATE INDEX IF NOT EXISTS alerts_cleared_by_time ON alerts (cleared_at) WHERE state = 'cleared';
    CREATE INDEX IF NOT EXISTS energy_periods_by_start ON energy_periods (start_ms);
    """,
)


def migrate(conn: sqlite3.Connection) -> int:
    """Bring *conn*'s database to the latest schema; returns the version it is at."""
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > len(MIGRATIONS):
        msg = f"database schema version {version} is newer than this node ({len(MIGRATIONS)})"
        raise MigrationError(msg)
    for number in range(version, len(MIGRATIONS)):
        try:
            conn.execute("BEGIN IMMEDIATE")
            for statement in _statements(MIGRATIONS[number]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number + 1}")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            conn.execute("ROLLBACK")
            msg = f"migration {number + 1} failed: {exc}"
            raise MigrationError(msg) from exc
    return len(MIGRATIONS)


def _statements(script: str) -> list[str]:
    # executescript() would COMMIT the open transaction first; split instead so each
    # migration is atomic. Our migrations contain no ';' inside literals or triggers.
    return [s.strip() for s in script.split(";") if s.strip() and not _only_comments(s)]


def _only_comments(sql: str) -> bool:
    return all(not line.strip() or line.strip().startswith("--") for line in sql.splitlines())
