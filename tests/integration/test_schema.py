"""The shared ``cursors`` table: the forwarders' migration (5) and the energy migration (6) both
create it, with the same ``IF NOT EXISTS`` statement, so either may run first (the branches were
built apart; the final numbering interleaves other migrations between them)."""

from __future__ import annotations

import contextlib
import re
import sqlite3
from pathlib import Path

import pytest

from storage.schema import MIGRATIONS, _statements, migrate

CURSORS = re.compile(r"CREATE TABLE IF NOT EXISTS cursors \(.*?\)", re.S)


def migration_with(text: str) -> int:
    (index,) = [i for i, script in enumerate(MIGRATIONS) if text in script]
    return index


FORWARD = migration_with("CREATE TABLE IF NOT EXISTS cursor_marks")
ENERGY = migration_with("CREATE TABLE energy_periods")


def cursors_statement(script: str) -> str:
    match = CURSORS.search(script)
    assert match is not None
    return " ".join(match.group(0).split())


def test_both_migrations_create_cursors_with_the_same_statement() -> None:
    assert cursors_statement(MIGRATIONS[FORWARD]) == cursors_statement(MIGRATIONS[ENERGY])


@pytest.mark.parametrize("order", [(FORWARD, ENERGY), (ENERGY, FORWARD)], ids=["forward-first", "energy-first"])
def test_either_migration_may_run_first(tmp_path: Path, order: tuple[int, int]) -> None:
    with contextlib.closing(sqlite3.connect(tmp_path / "node.sqlite3", isolation_level=None)) as conn:
        for index in range(min(FORWARD, ENERGY)):
            for statement in _statements(MIGRATIONS[index]):
                conn.execute(statement)
        for index in order:
            for statement in _statements(MIGRATIONS[index]):
                conn.execute(statement)
        conn.execute("INSERT INTO cursors (name, source, position, updated_at) VALUES ('energy', 'telemetry', 3, 'x')")
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"cursors", "cursor_marks", "energy_periods"} <= tables


def test_a_fresh_database_gets_every_migration(tmp_path: Path) -> None:
    with contextlib.closing(sqlite3.connect(tmp_path / "node.sqlite3", isolation_level=None)) as conn:
        assert migrate(conn) == len(MIGRATIONS)
        assert migrate(conn) == len(MIGRATIONS)  # idempotent: nothing runs twice
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        assert version == len(MIGRATIONS)
