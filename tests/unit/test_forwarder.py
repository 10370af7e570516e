"""The forwarder's logic against an in-memory source and sink, on trio's autojump clock:
the cursor moves only after the sink confirmed, retries back off (with jitter) and honour
Retry-After, and the disk budget raises, drops and clears exactly as configured."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from actors.alerts import AlertRule, AlertSignal
from actors.forwarder import Forwarder, ForwarderConfig
from actors.stats import ForwarderStats
from storage.errors import SinkError
from storage.records import Backlog

WALL0 = 1_795_449_600.0
ROW_BYTES = 100


def wall() -> float:
    return WALL0 + trio.current_time()


@dataclass(frozen=True)
class Row:
    id: int


@dataclass
class MemorySource:
    """Rows 1..n, a persisted cursor and its marks, as :class:`storage.outbox.CursorSource` keeps them."""

    rows: int = 0
    cursor: int = 0
    marks: list[tuple[int, float]] = field(default_factory=list)
    reads: int = 0

    async def position(self) -> int:
        return self.cursor

    async def next_batch(self, after: int, limit: int) -> list[Row]:
        self.reads += 1
        return [Row(i) for i in range(after + 1, min(self.rows, after + limit) + 1)]

    async def confirm(self, position: int, at: float | None) -> int:
        self.cursor = max(self.cursor, position)
        if at is not None:
            self.marks.append((position, at))
        return self.cursor

    async def backlog(self, after: int) -> Backlog:
        behind = max(0, self.rows - after)
        return Backlog(rows=behind, bytes=behind * ROW_BYTES, oldest_at=WALL0 if behind else None, newest_id=self.rows)

    async def drop_oldest(self, after: int, rows: int) -> int:
        return await self.confirm(min(self.rows, after + rows), 0.0)


@dataclass
class MemorySink:
    received: list[int] = field(default_factory=list)
    #: Errors to raise on the next sends, in order.
    errors: list[SinkError] = field(default_factory=list)
    attempts: list[float] = field(default_factory=list)

    async def send(self, rows: Sequence[Row]) -> None:
        self.attempts.append(trio.current_time())
        if self.errors:
            raise self.errors.pop(0)
        self.received.extend(r.id for r in rows)


def make(
    source: MemorySource, sink: MemorySink, signals: list[AlertSignal] | None = None, **overrides: object
) -> tuple[Forwarder[Row], ForwarderStats]:
    base: dict[str, object] = {"name": "influxdb", "batch_rows": 10, "retry_initial": 1.0, "retry_max": 8.0}
    stats = ForwarderStats()
    config = ForwarderConfig(**(base | overrides))  # type: ignore[arg-type]
    alerts = None if signals is None else signals.append
    return Forwarder(source, sink, config, stats, alerts=alerts, clock=wall), stats


async def run_for(forwarder: Forwarder[Row], seconds: float) -> None:
    with trio.move_on_after(seconds):
        await forwarder.run()


@pytest.mark.trio
async def test_cursor_moves_only_after_the_sink_confirmed(autojump_clock: trio.testing.MockClock) -> None:
    source, sink = MemorySource(rows=25), MemorySink(errors=[SinkError("influxdb", "HTTP 500 down")] * 3)
    forwarder, stats = make(source, sink)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(forwarder.run)
        await trio.sleep(0.5)  # inside the first backoff: nothing confirmed, nothing persisted
        assert source.cursor == 0
        assert stats.failures == 1
        assert stats.last_error == "influxdb: HTTP 500 down"
        await trio.sleep(60)
        nursery.cancel_scope.cancel()
    assert sink.received == list(range(1, 26))
    assert source.cursor == 25
    # One mark per minute at most: the three batches went within seconds of each other.
    assert [m[0] for m in source.marks] == [10]
    assert source.marks[0][1] >= WALL0
    assert stats.rows == 25
    assert stats.batches == 3
    assert stats.failures == 3
    assert stats.last_error is None


@pytest.mark.trio
async def test_backoff_grows_with_jitter_and_caps(autojump_clock: trio.testing.MockClock) -> None:
    source, sink = MemorySource(rows=1), MemorySink(errors=[SinkError("s3", "down")] * 7)
    forwarder, _ = make(source, sink)
    await run_for(forwarder, 200)
    gaps = [b - a for a, b in zip(sink.attempts, sink.attempts[1:], strict=False)]
    assert len(gaps) == 7
    # Exponential from 1 s plus up to 1 s of jitter, the whole wait capped at retry_max (8 s).
    bases = [min(1.0 * 2**n, 8.0) for n in range(7)]
    for n, (base, gap) in enumerate(zip(bases, gaps, strict=True)):
        assert base - 1e-6 <= gap <= min(base + 1.0, 8.0) + 1e-6, (n, gap)
    # Jittered: the three waits below the cap are not all exactly their base (chance ~1e-6).
    assert any(gap - base > 0.01 for base, gap in zip(bases[:3], gaps[:3], strict=True))
    assert sink.received == [1]


@pytest.mark.trio
async def test_retry_after_is_honoured(autojump_clock: trio.testing.MockClock) -> None:
    source = MemorySource(rows=1)
    sink = MemorySink(errors=[SinkError("influxdb", "HTTP 429", retry_after=42.0)])
    forwarder, _ = make(source, sink)
    await run_for(forwarder, 100)
    assert sink.attempts[1] - sink.attempts[0] == pytest.approx(42.0, abs=1e-6)


@pytest.mark.trio
async def test_resumes_from_the_persisted_cursor(autojump_clock: trio.testing.MockClock) -> None:
    source, sink = MemorySource(rows=30, cursor=12), MemorySink()
    forwarder, _ = make(source, sink)
    await run_for(forwarder, 10)
    assert sink.received == list(range(13, 31))


@pytest.mark.trio
async def test_an_unexpected_error_is_a_crash_not_a_retry(autojump_clock: trio.testing.MockClock) -> None:
    class Broken(MemorySink):
        async def send(self, rows: Sequence[Row]) -> None:
            raise ValueError("bug")

    forwarder, stats = make(MemorySource(rows=3), Broken())
    with pytest.raises(ExceptionGroup) as info:
        await run_for(forwarder, 10)
    assert info.group_contains(ValueError)
    assert stats.failures == 0


@pytest.mark.trio
async def test_budget_warns_then_clears(autojump_clock: trio.testing.MockClock) -> None:
    # 50 rows of 100 bytes = 5000 bytes against a budget of 6000: past the 80 % warning level.
    source = MemorySource(rows=50)
    sink = MemorySink(errors=[SinkError("influxdb", "down")] * 3)
    signals: list[AlertSignal] = []
    forwarder, stats = make(source, sink, signals, budget_bytes=6000, monitor_interval=5.0, retry_initial=10.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(forwarder.run)
        await trio.sleep(1)
        assert stats.rows_behind == 50
        assert stats.backlog_bytes == 5000
        assert [(s.rule, s.raised, s.device_id) for s in signals] == [(AlertRule.FORWARDER_BACKLOG, True, "influxdb")]
        assert "50 rows" in signals[0].detail
        await trio.sleep(200)
        nursery.cancel_scope.cancel()
    assert source.cursor == 50
    assert stats.rows_behind == 0
    cleared = [(s.rule, s.raised) for s in signals if not s.raised]
    assert cleared == [(AlertRule.FORWARDER_BACKLOG, False), (AlertRule.FORWARDER_DROPPED, False)]
    assert stats.rows_dropped == 0


@pytest.mark.trio
async def test_drop_policy_skips_the_oldest_down_to_the_warning_level(autojump_clock: trio.testing.MockClock) -> None:
    source = MemorySource(rows=100)  # 10,000 bytes against a budget of 5,000
    sink = MemorySink(errors=[SinkError("s3", "down")] * 100)
    signals: list[AlertSignal] = []
    forwarder, stats = make(source, sink, signals, budget_bytes=5000, drop_oldest=True, retry_initial=30.0)
    await run_for(forwarder, 1)
    # Down to 80 % of the budget: 40 rows stay, the oldest 60 are skipped (cursor, mark at 0).
    assert stats.rows_dropped == 60
    assert source.cursor == 60
    assert (60, 0.0) in source.marks
    assert stats.rows_behind == 40
    dropped = [s for s in signals if s.rule is AlertRule.FORWARDER_DROPPED]
    assert [(s.raised, s.count) for s in dropped] == [(True, 60)]


@pytest.mark.trio
async def test_without_the_drop_policy_nothing_is_dropped(autojump_clock: trio.testing.MockClock) -> None:
    source = MemorySource(rows=100)
    sink = MemorySink(errors=[SinkError("s3", "down")] * 100)
    signals: list[AlertSignal] = []
    forwarder, stats = make(source, sink, signals, budget_bytes=5000, retry_initial=30.0)
    await run_for(forwarder, 20)
    assert stats.rows_dropped == 0
    assert source.cursor == 0
    assert {s.rule for s in signals} == {AlertRule.FORWARDER_BACKLOG}
