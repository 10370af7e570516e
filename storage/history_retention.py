"""History retention: deleting old rows of the node's history tables, a small batch at a time.

The rules (ADR 0007), each by age against a cutoff of its own (:class:`HistoryCutoffs`; None
keeps that table whole):

- ``audit_log``: a row older than ``audit_before`` (its ``at``).
- ``device_events``: an event older than ``history_before`` (its ``at``).
- ``alerts``: a **cleared** alert cleared before ``history_before``. An open or acknowledged
  alert is never deleted, however old: it is still somebody's problem.
- ``commands``: a **finished** command (``acked``, ``failed``, ``expired``) whose last state
  change (the newest ``command_history.at``) is older than ``history_before``, together with its
  ``command_history`` rows, in the same transaction: a command never loses part of its history.
  A ``queued`` or ``sent`` command is never deleted.
- ``energy_periods``: a period that started before ``energy_before_ms``, whose ``rev`` is at or
  below the cursor of every enabled forwarder of the periods (``influxdb-energy``: a period it
  has not sent, or an enabled forwarder without a cursor yet, keeps it), and that is not the
  period with the highest ``rev``: new revs are numbered max + 1, so deleting that one would
  hand its ``rev`` out again, at or below the forwarder's cursor, and the change would never
  be sent.

Each :func:`history_step` is one short transaction that deletes at most ``limit`` rows of one
table (a single finished command with more history rows than ``limit`` still goes whole, or it
would stay forever). Old rows are found through the indexes of migration 9, so a step stops
after its batch instead of scanning the table while it holds the write lock; finished commands
(few, and no index says when they finished) are looked up before the write transaction and
checked again inside it.
"""

from __future__ import annotations

import sqlite3
from typing import Final

from storage.credentials import transaction
from storage.records import HistoryCutoffs, PruneResult, RetentionPolicy

#: The final command states (storage.command_contract.CommandState.final); a finished command
#: never changes again.
FINISHED_COMMANDS: Final = ("acked", "failed", "expired")
_FINISHED_SQL: Final = ", ".join(f"'{s}'" for s in FINISHED_COMMANDS)

_DELETE_AUDIT: Final = "DELETE FROM audit_log WHERE id IN (SELECT id FROM audit_log WHERE at < ? LIMIT ?)"
_DELETE_EVENTS: Final = "DELETE FROM device_events WHERE id IN (SELECT id FROM device_events WHERE at < ? LIMIT ?)"
_DELETE_ALERTS: Final = (
    "DELETE FROM alerts WHERE id IN (SELECT id FROM alerts WHERE state = 'cleared' AND cleared_at < ? LIMIT ?)"
)
_OLD_COMMANDS: Final = f"""
    SELECT c.command_id, count(h.id) FROM commands c JOIN command_history h ON h.command_id = c.command_id
    WHERE c.state IN ({_FINISHED_SQL}) GROUP BY c.id HAVING max(h.at) < ? ORDER BY c.id LIMIT ?
"""  # noqa: S608 - constant states
_DELETE_COMMAND: Final = f"DELETE FROM commands WHERE command_id = ? AND state IN ({_FINISHED_SQL})"  # noqa: S608
_DELETE_COMMAND_HISTORY: Final = f"""
    DELETE FROM command_history WHERE command_id = ?
    AND EXISTS (SELECT 1 FROM commands WHERE command_id = ? AND state IN ({_FINISHED_SQL}))
"""  # noqa: S608
_DELETE_ENERGY: Final = """
    DELETE FROM energy_periods WHERE (device_id, start_ms) IN (
        SELECT device_id, start_ms FROM energy_periods WHERE start_ms < ? AND rev <= ? AND rev < ? LIMIT ?)
"""


def history_step(c: sqlite3.Connection, policy: RetentionPolicy, cutoffs: HistoryCutoffs, limit: int) -> PruneResult:
    """Delete at most *limit* rows of the first history table that has old rows (module docs).

    *c* is in autocommit mode; the deletes run in one ``BEGIN IMMEDIATE`` transaction.
    """
    result = PruneResult()
    commands = [] if cutoffs.history_before is None else _old_commands(c, cutoffs.history_before, limit)
    with transaction(c):
        _step(c, policy, cutoffs, limit, commands=commands, result=result)
    return result


def _step(
    c: sqlite3.Connection,
    policy: RetentionPolicy,
    cutoffs: HistoryCutoffs,
    limit: int,
    *,
    commands: list[str],
    result: PruneResult,
) -> None:
    if cutoffs.audit_before is not None and _delete(c, result, "audit_log", _DELETE_AUDIT, cutoffs.audit_before, limit):
        return
    if cutoffs.history_before is not None:
        before = cutoffs.history_before
        if _delete(c, result, "device_events", _DELETE_EVENTS, before, limit):
            return
        if _delete(c, result, "alerts", _DELETE_ALERTS, before, limit):
            return
        if commands:
            _delete_commands(c, commands, result)
            return
    if cutoffs.energy_before_ms is not None:
        guard, newest = energy_bound(c, policy)
        _delete(c, result, "energy_periods", _DELETE_ENERGY, cutoffs.energy_before_ms, guard, newest, limit)


def _delete(c: sqlite3.Connection, result: PruneResult, table: str, sql: str, *params: float) -> int:
    rows = int(c.execute(sql, params).rowcount)
    if rows:
        result.changed[table] = rows
    return rows


def _old_commands(c: sqlite3.Connection, before: float, limit: int) -> list[str]:
    """Finished commands last changed before *before*, oldest first, as many as fit *limit* rows
    with their history (at least one). Read outside the write transaction: finished is final."""
    chosen: list[str] = []
    rows = 0
    # fetchall: a half-read SELECT would keep its read transaction open into BEGIN IMMEDIATE.
    for command_id, history in c.execute(_OLD_COMMANDS, (before, limit)).fetchall():
        if chosen and rows + 1 + history > limit:
            break
        chosen.append(command_id)
        rows += 1 + history
    return chosen


def _delete_commands(c: sqlite3.Connection, command_ids: list[str], result: PruneResult) -> None:
    # Checked again inside the transaction (a finished command cannot have changed since); the
    # history goes first, while its command still says it is finished.
    history = c.executemany(_DELETE_COMMAND_HISTORY, [(i, i) for i in command_ids])
    commands = c.executemany(_DELETE_COMMAND, [(i,) for i in command_ids])
    if commands.rowcount:
        result.changed["commands"] = int(commands.rowcount)
    if history.rowcount:
        result.changed["command_history"] = int(history.rowcount)


def energy_bound(c: sqlite3.Connection, policy: RetentionPolicy) -> tuple[int, int]:
    """``(guard, newest)``: a period may go only with ``rev <= guard`` and ``rev < newest``."""
    newest = int(c.execute("SELECT coalesce(max(rev), 0) FROM energy_periods").fetchone()[0])
    guard = newest
    for name in policy.energy_forwarders:
        row = c.execute("SELECT position FROM cursors WHERE name = ?", (name,)).fetchone()
        guard = min(guard, 0 if row is None else int(row[0]))
    return guard, newest
