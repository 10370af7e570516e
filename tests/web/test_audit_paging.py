"""Property: whatever the log holds, ``GET /api/v1/audit`` pages through exactly the entries
that match the filters, newest first, each once (the storage query and the keyset cursor)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import anyio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage.audit import Actor, AuditAction, AuditEntry
from storage.reader import Reader
from storage.sqlite import SqliteStore

# A handful of targets and times so that filters match some entries and miss others; up to 30
# entries and page sizes 1-7 give multi-page walks while each example stays one small file.
targets = st.sampled_from(["emu-1", "emu-2", "0123456789ab"])
times = st.integers(min_value=0, max_value=5).map(lambda t: 1_795_449_600.0 + t)
entries = st.lists(st.tuples(st.sampled_from(AuditAction), targets, times), max_size=30)
filters = st.tuples(st.none() | st.sampled_from(AuditAction), st.none() | targets, st.none() | times)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries, filters, st.integers(min_value=1, max_value=7))
def test_pages_are_the_filtered_log(
    log: list[tuple[AuditAction, str, float]],
    query: tuple[AuditAction | None, str | None, float | None],
    limit: int,
) -> None:
    action, target, since = query
    expected = [
        i + 1
        for i, (a, t, at) in enumerate(log)
        if (action is None or a == action) and (target is None or t == target) and (since is None or at >= since)
    ][::-1]

    async def walk(path: Path) -> list[int]:
        store = SqliteStore(path, synchronous="NORMAL")
        reader = Reader(path)
        try:
            for a, t, at in log:
                await store.record_audit(AuditEntry(a, t, Actor("cli"), {"n": 1}, at=at))
            seen: list[int] = []
            cursor = None
            while True:
                page = await reader.audit(None if action is None else action.value, target, since, limit, cursor)
                assert len(page.items) <= limit
                seen += [r.id for r in page.items]
                cursor = page.next_cursor
                if cursor is None:
                    return seen
                assert len(page.items) == limit  # only a full page has a next one
        finally:
            reader.close()
            store.close()

    with tempfile.TemporaryDirectory() as tmp:
        assert anyio.run(walk, Path(tmp) / "audit.sqlite3") == expected
