"""A forwarder: drains one source table into one sink, oldest first, resuming from its cursor.

The loop (:meth:`Forwarder.run`): read the next batch after the cursor, wait for the drain-rate
limit, send it, and only when the sink confirmed it persist the cursor at the batch's last
rowid. A sink that fails is retried with exponential backoff and jitter (stamina), honouring a
``Retry-After`` it gave, for as long as it takes: nothing is skipped while it is down. A crash
between the sink's confirmation and the cursor write sends the batch again after a restart;
the sinks make that harmless (InfluxDB overwrites the same points, S3 the same objects).

Beside the loop, a monitor measures the backlog every ``monitor_interval`` seconds (rows
behind, estimated bytes, oldest unforwarded row) even while the sink is down, and applies the
disk budget: past ``warn_fraction`` of ``budget_bytes`` it raises ``forwarder_backlog``; past
the budget, and only with ``drop_oldest`` configured, it skips the oldest rows down to the
warning level, counts them and raises ``forwarder_dropped``. Both alerts clear when the backlog
is back under the warning level.

Ingest never waits on this actor: it only reads committed rows and writes its cursor in a short
transaction of its own (:mod:`storage.outbox`). This module must never import an I/O library.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anyio
import stamina

from actors.alerts import AlertRule, AlertSignal, AlertSink
from actors.stats import ForwarderStats
from storage.errors import SinkError
from storage.interfaces import Forwardable, ForwardSink, ForwardSource
from storage.records import Backlog

log = logging.getLogger(__name__)

#: A ``Retry-After`` longer than this is taken as this: a sink must not park the forwarder for hours.
MAX_RETRY_AFTER_S = 300.0
#: At most one cursor mark (when a position was reached, for retention) per this many seconds:
#: a mark per batch would be ~86,000 rows a day. A row forwarded between two marks counts as
#: forwarded at the next one, so it is kept up to this much longer, never shorter.
MARK_EVERY_S = 60.0
#: How often a backlog measurement is taken again when a batch was confirmed meanwhile.
MEASURE_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class ForwarderConfig:
    #: ``influxdb`` / ``influxdb-energy`` / ``s3``: the cursor's name, the metric label, the alert's ``device_id``.
    name: str
    batch_rows: int = 5000
    #: How long to wait before looking again when there was nothing to send.
    poll_interval: float = 1.0
    #: Rows per second at most (0: no limit). Batches shrink to one second's worth.
    rate_limit: float = 0.0
    retry_initial: float = 1.0
    retry_max: float = 60.0
    monitor_interval: float = 5.0
    #: Disk budget of the unforwarded backlog (estimated bytes).
    budget_bytes: int = 1 << 30
    warn_fraction: float = 0.8
    #: Past the budget, skip the oldest unforwarded rows (off unless configured).
    drop_oldest: bool = False


class Forwarder[T: Forwardable]:
    def __init__(
        self,
        source: ForwardSource[T],
        sink: ForwardSink[T],
        config: ForwarderConfig,
        stats: ForwarderStats,
        *,
        alerts: AlertSink | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._source = source
        self._sink = sink
        self._config = config
        self._stats = stats
        self._alerts = alerts
        self._clock = clock
        self._position = 0
        #: Whether the backlog alerts are raised (so a clear is signalled once, on the way down).
        self._over_warning = False
        self._last_mark = -math.inf
        stats.enabled = True

    @property
    def name(self) -> str:
        return self._config.name

    async def run(self) -> None:
        """Forward until cancelled. Safe to cancel at any point: the cursor only moves after a
        confirmed batch, so a cancelled batch is sent again by the next run."""
        self._position = await self._source.position()
        self._stats.position = self._position
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._monitor, name=f"forwarder[{self.name}].monitor")
            await self._drain()

    async def _drain(self) -> None:
        cfg = self._config
        limit = cfg.batch_rows if cfg.rate_limit <= 0 else max(1, min(cfg.batch_rows, int(cfg.rate_limit)))
        while True:
            rows = await self._source.next_batch(self._position, limit)
            if not rows:
                await anyio.sleep(cfg.poll_interval)
                continue
            started = anyio.current_time()
            await self._send(rows)
            now = self._clock()
            mark = now if now - self._last_mark >= MARK_EVERY_S else None
            self._position = max(self._position, await self._source.confirm(rows[-1].id, mark))
            if mark is not None:
                self._last_mark = mark
            s = self._stats
            s.position = self._position
            s.batches += 1
            s.rows += len(rows)
            s.rows_behind = max(0, s.rows_behind - len(rows))
            s.last_success_at = self._clock()
            s.last_error = None
            if cfg.rate_limit > 0:
                await anyio.sleep_until(started + len(rows) / cfg.rate_limit)

    async def _send(self, rows: Sequence[T]) -> None:
        cfg = self._config
        async for attempt in stamina.retry_context(
            on=self._failed,
            attempts=None,
            timeout=None,
            wait_initial=cfg.retry_initial,
            wait_max=cfg.retry_max,
            wait_jitter=cfg.retry_initial,
        ):
            with attempt:
                await self._sink.send(rows)

    def _failed(self, exc: Exception) -> bool | float:
        """stamina's hook: count the failure; retry a :class:`SinkError`, after its Retry-After."""
        if not isinstance(exc, SinkError):
            return False
        s = self._stats
        s.failures += 1
        s.last_error = str(exc)
        s.last_error_at = self._clock()
        log.warning("forwarder %s: batch not confirmed, retrying: %s", self.name, exc)
        if exc.retry_after is not None:
            return min(max(exc.retry_after, 0.0), MAX_RETRY_AFTER_S)
        return True

    # -- backlog and disk budget ----------------------------------------------------------------

    async def _monitor(self) -> None:
        while True:
            await self.check_backlog()
            await anyio.sleep(self._config.monitor_interval)

    async def check_backlog(self) -> Backlog:
        """Measure the backlog, update the stats and apply the disk budget."""
        cfg = self._config
        backlog = await self._measure()
        self._report(backlog)
        warn_at = cfg.budget_bytes * cfg.warn_fraction
        if cfg.drop_oldest and backlog.bytes > cfg.budget_bytes and backlog.rows:
            per_row = backlog.bytes / backlog.rows
            rows = min(backlog.rows, math.ceil((backlog.bytes - warn_at) / per_row))
            before = self._position
            self._position = max(self._position, await self._source.drop_oldest(before, rows))
            dropped = self._position - before
            self._stats.rows_dropped += dropped
            log.error("forwarder %s: disk budget exceeded, dropped %d unforwarded rows", self.name, dropped)
            self._signal(
                AlertRule.FORWARDER_DROPPED,
                raised=True,
                count=dropped,
                detail=f"{dropped} unforwarded rows dropped: backlog {backlog.bytes} bytes over the budget of "
                f"{cfg.budget_bytes}",
            )
            self._over_warning = True
            backlog = await self._measure()
            self._report(backlog)
        if backlog.bytes >= warn_at:
            self._over_warning = True
            age = "" if backlog.oldest_at is None else f", oldest {max(0.0, self._clock() - backlog.oldest_at):.0f} s"
            self._signal(
                AlertRule.FORWARDER_BACKLOG,
                raised=True,
                count=0,
                detail=f"{backlog.rows} rows ({backlog.bytes} bytes, "
                f"{100 * backlog.bytes / cfg.budget_bytes:.0f} % of the budget) not forwarded{age}",
            )
        elif self._over_warning:
            self._over_warning = False
            for rule in (AlertRule.FORWARDER_BACKLOG, AlertRule.FORWARDER_DROPPED):
                self._signal(rule, raised=False, count=0, detail="backlog under the warning level")
        return backlog

    async def _measure(self) -> Backlog:
        """The backlog after the current position. A batch confirmed while it was being measured
        makes the figure stale (rows already sent would be reported behind a newer position,
        until the next measurement): measure again then, a few times at most."""
        for _ in range(MEASURE_ATTEMPTS - 1):
            after = self._position
            backlog = await self._source.backlog(after)
            if self._position == after:
                return backlog
        return await self._source.backlog(self._position)

    def _report(self, backlog: Backlog) -> None:
        s = self._stats
        s.position = self._position
        s.rows_behind = backlog.rows
        s.backlog_bytes = backlog.bytes
        s.oldest_unforwarded_at = backlog.oldest_at
        s.checked_at = self._clock()

    def _signal(self, rule: AlertRule, *, raised: bool, count: int, detail: str) -> None:
        if self._alerts is not None:
            self._alerts(AlertSignal(self.name, rule, raised, detail, self._clock(), count=count))
