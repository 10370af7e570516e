"""The alert actor: rules over what the device actors and the broker bridge observe.

Sources (``actors.device``, ``node.bridge``) call :meth:`AlertActor.signal` with an
:class:`AlertSignal`; the actor applies the rule, keeps at most one uncleared alert per
``(device, rule)`` and writes every change through an :class:`~storage.interfaces.AlertStore`.
An alert moves ``open → acknowledged`` (an operator, through the API, straight in the store)
and ``open | acknowledged → cleared`` (the rule, here). A repeat of an uncleared alert adds to
its ``count`` and moves its ``last_seen_at``; it does not reopen an acknowledged one.

The rules (:class:`AlertRule`, a closed set so that it can label metrics) and their thresholds
(:class:`AlertConfig`, from the node's settings):

``device_offline``
    raised when a device disconnects for a reason in :data:`OFFLINE_REASONS` and has not
    reconnected ``offline_grace`` seconds later (at once when that is 0); cleared when it
    connects again. A ``clean``, ``revoked`` or ``node_stopping`` disconnect raises nothing.
``sequence_gap``
    raised when the readings missing in the open gaps of the device's current boot reach
    ``gap_min_missing``; each later batch that opens more adds 1 to ``count``. Cleared when
    nothing is missing in the current boot any more, or when the device reboots (the old
    boot's gaps can never be filled; a gap in the new boot raises a new alert).
``stale_boot``
    raised when a reading from a lower boot than the current one is quarantined; ``count``
    is stale readings. Cleared after ``stale_boot_clear_after`` seconds without one (0, the
    default: never).
``acl_denial``
    raised when the device publishes or subscribes where its ACL forbids; ``count`` is
    denials. Cleared after ``acl_clear_after`` seconds without one (0: never).
``forwarder_backlog`` / ``forwarder_dropped`` (``device_id`` is the forwarder's name)
    raised by a forwarder whose unforwarded backlog passed the warning fraction of its disk
    budget / whose drop policy skipped rows (``count``: rows dropped); both cleared by the
    forwarder when the backlog is back under the warning fraction (``actors.forwarder``).
``quarantine_burst``
    raised when ``quarantine_burst`` messages of the device were quarantined within
    ``quarantine_window`` seconds; ``count`` is the messages quarantined in the burst.
    Cleared after a whole ``quarantine_window`` without a quarantined message.
``implausible_value``
    raised when a reading is quarantined as physically implausible: a voltage outside its
    supply system's EN 50163 range, or an energy register that went down within a boot
    (:mod:`storage.validation`); ``count`` is such readings. Cleared after
    ``implausible_clear_after`` seconds without one (0: never).

Timers (offline grace, quiet periods, sliding windows) run on ``anyio.current_time()``, so the
tests drive them with trio's autojump clock; the times stored come from the wall ``clock``.

Sources never wait for this actor (see :meth:`AlertActor.signal`). The actor writes each
drained batch of changes in one transaction; when the store fails it keeps the changes (they
are absolute values, so rewriting them is harmless), retries with backoff and keeps applying
new signals meanwhile. After a crash its supervisor restarts :meth:`AlertActor.run`, which
writes what was left unsaved and then reloads the uncleared alerts from the store.

This module must never import an I/O library, and never make a source wait.
"""

from __future__ import annotations

import enum
import heapq
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import anyio
from ulid import ULID

from actors.mailbox import Mailbox
from actors.stats import AlertStats
from storage.contract import format_ts
from storage.errors import StorageError
from storage.interfaces import AlertStore
from storage.records import AlertRecord, AlertWrite

log = logging.getLogger(__name__)


class AlertRule(enum.StrEnum):
    DEVICE_OFFLINE = "device_offline"
    SEQUENCE_GAP = "sequence_gap"
    STALE_BOOT = "stale_boot"
    ACL_DENIAL = "acl_denial"
    QUARANTINE_BURST = "quarantine_burst"
    #: The device's actor crashed past its restart limit; its messages are refused until the
    #: node restarts (which clears this alert).
    DEVICE_PARKED = "device_parked"
    #: A reading was quarantined as physically implausible (voltage range, falling register).
    IMPLAUSIBLE_VALUE = "implausible_value"
    #: A forwarder's unforwarded backlog passed the warning fraction of its disk budget. The
    #: alert's ``device_id`` is the forwarder's name (``influxdb``, ``s3``).
    FORWARDER_BACKLOG = "forwarder_backlog"
    #: The disk budget's drop policy skipped unforwarded rows; ``count`` is rows dropped.
    FORWARDER_DROPPED = "forwarder_dropped"


class AlertState(enum.StrEnum):
    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    CLEARED = "cleared"


class Severity(enum.StrEnum):
    WARNING = "warning"
    CRITICAL = "critical"


#: Fixed per rule. Critical: the device's readings are not being stored (stale boot), or it
#: tries to reach what is not its own (ACL). The others usually heal by themselves.
SEVERITY: Final[dict[AlertRule, Severity]] = {
    AlertRule.DEVICE_OFFLINE: Severity.WARNING,
    AlertRule.SEQUENCE_GAP: Severity.WARNING,
    AlertRule.STALE_BOOT: Severity.CRITICAL,
    AlertRule.ACL_DENIAL: Severity.CRITICAL,
    AlertRule.QUARANTINE_BURST: Severity.WARNING,
    AlertRule.DEVICE_PARKED: Severity.CRITICAL,
    # A meter or its wiring is broken, and billing data is being withheld from the store.
    AlertRule.IMPLAUSIBLE_VALUE: Severity.CRITICAL,
    AlertRule.FORWARDER_BACKLOG: Severity.WARNING,
    AlertRule.FORWARDER_DROPPED: Severity.CRITICAL,
}

#: Disconnect reasons that mean the link died. ``clean`` (the device said goodbye), ``revoked``,
#: ``taken_over``, ``closed_by_node`` and ``node_stopping`` are ended on purpose by someone.
OFFLINE_REASONS: Final = frozenset({"connection_lost", "keepalive_expired", "inactive"})


@dataclass(frozen=True, slots=True)
class AlertSignal:
    """One observation of a source, for one device and rule."""

    device_id: str
    rule: AlertRule
    #: True: the rule's condition was observed (an occurrence, or a gap level above 0).
    #: False: it ended (a reconnect; a gap filled, or given up by a reboot).
    raised: bool
    #: For the alert's ``detail``: the disconnect reason, the gap, the stale boot, the denied
    #: topic, the last quarantine reason.
    detail: str
    #: Wall-clock time at the source, epoch seconds.
    at: float
    #: Occurrences this signal stands for (quarantined messages of one batch…); 0 for a level
    #: update that is no new occurrence (a gap that shrank).
    count: int = 1
    #: ``sequence_gap`` only: readings missing in the open gaps of the current boot.
    level: int = 0


#: What a source is given: :meth:`AlertActor.signal`. Never blocks, never raises.
type AlertSink = Callable[[AlertSignal], None]


@dataclass(frozen=True, slots=True)
class AlertConfig:
    offline_grace: float = 60.0
    gap_min_missing: int = 1
    quarantine_burst: int = 10
    quarantine_window: float = 60.0
    #: Quiet periods that clear occurrence alerts; 0 means never (an operator can acknowledge
    #: such an alert, and a repeat adds to it, but it stays in the open-alerts gauge).
    acl_clear_after: float = 3600.0
    stale_boot_clear_after: float = 0.0
    implausible_clear_after: float = 3600.0
    disabled: frozenset[AlertRule] = frozenset()
    #: Signals are a few per batch of a device at most; 4096 rides out a reconnect storm of
    #: thousands of meters while a write is in progress. Drops are counted (never silent).
    capacity: int = 4096
    max_batch: int = 512
    retry_initial: float = 0.5
    retry_max: float = 30.0


@dataclass(slots=True)
class _Alert:
    alert_id: str
    device_id: str
    rule: AlertRule
    detail: str
    count: int
    raised_at: float
    last_seen_at: float


type _Key = tuple[str, AlertRule]


class AlertActor:
    def __init__(
        self,
        store: AlertStore,
        stats: AlertStats,
        config: AlertConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._stats = stats
        self._config = config or AlertConfig()
        self._clock = clock
        self.mailbox: Mailbox[AlertSignal] = Mailbox(self._config.capacity)
        self._open: dict[_Key, _Alert] = {}
        #: alert_id → its latest write, in the order of each alert's first change since the
        #: last save (an alert cleared comes before its successor; see storage.sqlite).
        self._unsaved: dict[str, AlertWrite] = {}
        self._retry_at = -math.inf
        self._retry_delay = self._config.retry_initial
        #: One deadline per key: offline grace (raises) or a quiet period (clears).
        self._timers: dict[_Key, float] = {}
        self._heap: list[tuple[float, _Key]] = []
        #: device → (disconnect reason, when): waiting out the grace.
        self._offline: dict[str, tuple[str, float]] = {}
        #: device → (anyio time, messages) of its quarantines within the window.
        self._bursts: dict[str, deque[tuple[float, int]]] = {}

    def signal(self, signal: AlertSignal) -> None:
        """Enqueue *signal* without waiting; count it as dropped when the mailbox is full.

        Sources call this on the ingest path (a device actor between its batches, the bridge
        in amqtt's packet handling), so it must not wait: this actor writes to SQLite, and an
        ``await send`` here would let a slow or failing alert write hold up PUBACKs. An alert
        is a notification, not data the node has promised to keep, so under overload losing a
        signal is the lesser harm; ``depot_node_alert_signals_dropped_total`` shows it. The
        gap rule carries its level in every signal, so the next one repairs a lost one.
        """
        if signal.rule in self._config.disabled:
            return
        try:
            self.mailbox.send_nowait(signal)
        except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._stats.signals_dropped += 1

    async def run(self) -> None:
        """Apply signals and timers until the mailbox is closed and drained, then save."""
        if self._unsaved:
            await self._store.write_alerts(list(self._unsaved.values()))
            self._unsaved.clear()
        self._load(await self._store.uncleared_alerts())
        while True:
            batch: list[AlertSignal] = []
            with anyio.move_on_after(max(self._next_wakeup() - anyio.current_time(), 0.0)):
                try:
                    batch = await self.mailbox.receive_batch(self._config.max_batch)
                except anyio.EndOfStream:
                    await self._save(final=True)
                    return
            now = anyio.current_time()
            for signal in batch:
                self._apply(signal, now)
            self._fire_due(now)
            await self._save()

    # -- rules ----------------------------------------------------------------------------------

    def _apply(self, s: AlertSignal, now: float) -> None:
        key = (s.device_id, s.rule)
        cfg = self._config
        match s.rule:
            case AlertRule.DEVICE_OFFLINE:
                if not s.raised:
                    self._offline.pop(s.device_id, None)
                    self._timers.pop(key, None)
                    self._clear(key, s.at)
                elif cfg.offline_grace <= 0:
                    self._occurred(key, _offline_detail(s.detail, s.at, 0.0), s.at, 1)
                else:
                    self._offline[s.device_id] = (s.detail, s.at)
                    self._set_timer(key, now + cfg.offline_grace)
            case AlertRule.SEQUENCE_GAP:
                alert = self._open.get(key)
                if not s.raised:
                    self._clear(key, s.at)
                elif alert is not None:
                    alert.detail = s.detail
                    if s.count:
                        alert.count += s.count
                        alert.last_seen_at = max(alert.last_seen_at, s.at)
                    self._mark(alert)
                elif s.level >= cfg.gap_min_missing:
                    self._raise(key, s.detail, s.at, 1)
            case AlertRule.STALE_BOOT | AlertRule.ACL_DENIAL | AlertRule.IMPLAUSIBLE_VALUE:
                self._occurred(key, s.detail, s.at, s.count)
                quiet = self._quiet_period(s.rule)
                if quiet > 0:
                    self._set_timer(key, now + quiet)
            case AlertRule.QUARANTINE_BURST:
                self._quarantined(key, s, now)
            case AlertRule.DEVICE_PARKED:
                self._occurred(key, s.detail, s.at, 1)
            case AlertRule.FORWARDER_BACKLOG | AlertRule.FORWARDER_DROPPED:
                if s.raised:
                    self._occurred(key, s.detail, s.at, s.count)
                else:
                    self._clear(key, s.at)

    def _quarantined(self, key: _Key, s: AlertSignal, now: float) -> None:
        cfg = self._config
        window = self._bursts.setdefault(s.device_id, deque())
        window.append((now, s.count))
        while window[0][0] < now - cfg.quarantine_window:
            window.popleft()
        # The same timer ends the burst and forgets the window: memory only for devices that
        # quarantined something within the last window.
        self._set_timer(key, now + cfg.quarantine_window)
        alert = self._open.get(key)
        if alert is not None:
            detail = f"{alert.count + s.count} messages quarantined in this burst; last: {s.detail}"
            self._repeat(alert, detail, s.at, s.count)
            return
        total = sum(n for _, n in window)
        if total >= cfg.quarantine_burst:
            detail = f"{total} messages quarantined within {cfg.quarantine_window:g} s; last: {s.detail}"
            self._raise(key, detail, s.at, total)

    def _on_timer(self, key: _Key) -> None:
        device_id, rule = key
        if rule is AlertRule.DEVICE_OFFLINE:
            pending = self._offline.pop(device_id, None)
            if pending is not None:
                reason, since = pending
                self._occurred(key, _offline_detail(reason, since, self._config.offline_grace), self._clock(), 1)
            return
        if rule is AlertRule.QUARANTINE_BURST:
            self._bursts.pop(device_id, None)
        self._clear(key, self._clock())

    # -- alert records --------------------------------------------------------------------------

    def _occurred(self, key: _Key, detail: str, at: float, count: int) -> None:
        alert = self._open.get(key)
        if alert is None:
            self._raise(key, detail, at, count)
        else:
            self._repeat(alert, detail, at, count)

    def _raise(self, key: _Key, detail: str, at: float, count: int) -> None:
        device_id, rule = key
        alert = _Alert(str(ULID.from_timestamp(at)), device_id, rule, detail, max(count, 1), at, at)
        self._open[key] = alert
        self._bump(self._stats.open, rule, 1)
        self._bump(self._stats.raised, rule, 1)
        log.warning("alert %s raised for %s: %s", rule.value, device_id, detail)
        self._mark(alert)

    def _repeat(self, alert: _Alert, detail: str, at: float, count: int) -> None:
        alert.detail = detail
        alert.count += count
        alert.last_seen_at = max(alert.last_seen_at, at)
        self._mark(alert)

    def _clear(self, key: _Key, at: float) -> None:
        alert = self._open.pop(key, None)
        if alert is None:
            return
        self._bump(self._stats.open, alert.rule, -1)
        log.info("alert %s cleared for %s", alert.rule.value, alert.device_id)
        self._mark(alert, cleared_at=at)

    def _mark(self, alert: _Alert, *, cleared_at: float | None = None) -> None:
        self._unsaved[alert.alert_id] = AlertWrite(
            alert_id=alert.alert_id,
            device_id=alert.device_id,
            rule=alert.rule.value,
            severity=SEVERITY[alert.rule].value,
            detail=alert.detail,
            count=alert.count,
            raised_at=alert.raised_at,
            last_seen_at=alert.last_seen_at,
            cleared_at=cleared_at,
        )

    @staticmethod
    def _bump(counts: dict[str, int], rule: AlertRule, by: int) -> None:
        counts[rule.value] = counts.get(rule.value, 0) + by

    def _load(self, records: list[AlertRecord]) -> None:
        """Take the uncleared alerts of the store as the truth (at start and after a crash)."""
        self._open.clear()
        self._stats.open.clear()
        now, wall = anyio.current_time(), self._clock()
        for r in records:
            try:
                rule = AlertRule(r.rule)
            except ValueError:
                log.warning("ignoring alert %s of unknown rule %r", r.alert_id, r.rule)
                continue
            key = (r.device_id, rule)
            alert = _Alert(r.alert_id, r.device_id, rule, r.detail, r.count, r.raised_at, r.last_seen_at)
            self._open[key] = alert
            self._bump(self._stats.open, rule, 1)
            if rule in self._config.disabled or rule is AlertRule.DEVICE_PARKED:
                # Parking lasts as long as the process that parked: a restart unparks.
                self._clear(key, wall)
                continue
            # A quiet period that began before a restart still ends when it would have.
            quiet = self._quiet_period(rule)
            if quiet > 0 and key not in self._timers:
                self._set_timer(key, now + max(0.0, r.last_seen_at + quiet - wall))

    def _quiet_period(self, rule: AlertRule) -> float:
        """Seconds without an occurrence after which *rule*'s alert clears (0: never)."""
        cfg = self._config
        return {
            AlertRule.ACL_DENIAL: cfg.acl_clear_after,
            AlertRule.STALE_BOOT: cfg.stale_boot_clear_after,
            AlertRule.QUARANTINE_BURST: cfg.quarantine_window,
            AlertRule.IMPLAUSIBLE_VALUE: cfg.implausible_clear_after,
        }.get(rule, 0.0)

    # -- timers and saving ----------------------------------------------------------------------

    def _set_timer(self, key: _Key, when: float) -> None:
        # Superseded heap entries stay until they reach the top and are skipped there.
        self._timers[key] = when
        heapq.heappush(self._heap, (when, key))

    def _next_wakeup(self) -> float:
        heap = self._heap
        while heap and self._timers.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        wakeup = heap[0][0] if heap else math.inf
        return min(wakeup, self._retry_at) if self._unsaved else wakeup

    def _fire_due(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, key = heapq.heappop(heap)
            if self._timers.get(key) == when:
                del self._timers[key]
                self._on_timer(key)

    async def _save(self, *, final: bool = False) -> None:
        if not self._unsaved or (not final and anyio.current_time() < self._retry_at):
            return
        try:
            await self._store.write_alerts(list(self._unsaved.values()))
        except StorageError:
            if final:
                log.exception("%d alert changes could not be saved at shutdown", len(self._unsaved))
                return
            log.exception("saving %d alert changes failed, retrying in %.1f s", len(self._unsaved), self._retry_delay)
            self._retry_at = anyio.current_time() + self._retry_delay
            self._retry_delay = min(self._retry_delay * 2, self._config.retry_max)
            return
        # Nothing else touches _unsaved while the write is awaited: signals only enqueue.
        self._unsaved.clear()
        self._retry_at = -math.inf
        self._retry_delay = self._config.retry_initial


def _offline_detail(reason: str, since: float, grace: float) -> str:
    back = f"; not back within {grace:g} s" if grace > 0 else ""
    return f"disconnected ({reason}) at {format_ts(datetime.fromtimestamp(since, UTC))}{back}"
