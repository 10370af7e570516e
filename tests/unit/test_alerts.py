"""The alert actor's rules, and the signals the device actor and the bridge send it.

:class:`FakeAlertStore` keeps alerts the way SQLite does (``storage.sqlite._write_alerts``): an
upsert that never touches state or acknowledgement, then an optional clear, and at most one
uncleared alert per (device, rule), which it asserts as the partial unique index would.

Everything runs on trio's autojump clock: offline grace, quiet periods, burst windows and
retry backoff take virtual time only. The wall clock given to the actor is the same virtual
time shifted to a plausible epoch, so stored times can be compared with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from actors.alerts import AlertActor, AlertConfig, AlertRule, AlertSignal
from actors.device import DeviceActorConfig
from actors.messages import Link, LinkEvent, Publish
from actors.router import Router, RouterConfig
from actors.stats import AlertStats, IngestStats
from actors.writer import StorageWriter
from node.bridge import Bridge
from storage.errors import StorageError
from storage.records import AlertRecord, AlertWrite
from tests.unit.test_actors import STUCK_AFTER, FakeStore, publish

#: Wall-clock time at virtual time 0 (2026-11-23T16:00:00Z).
WALL0 = 1_795_449_600.0

OFFLINE = AlertRule.DEVICE_OFFLINE
GAP = AlertRule.SEQUENCE_GAP
STALE = AlertRule.STALE_BOOT
ACL = AlertRule.ACL_DENIAL
BURST = AlertRule.QUARANTINE_BURST


def wall() -> float:
    return WALL0 + trio.current_time()


def sig(
    rule: AlertRule, *, raised: bool = True, device: str = "emu-1", detail: str = "", count: int = 1, level: int = 0
) -> AlertSignal:
    return AlertSignal(device, rule, raised=raised, detail=detail, at=wall(), count=count, level=level)


# -- the in-memory store ----------------------------------------------------------------------


@dataclass
class FakeAlertStore:
    rows: dict[str, AlertRecord] = field(default_factory=dict)
    #: Every successful write, one list per transaction.
    writes: list[list[AlertWrite]] = field(default_factory=list)
    fail_next: int = 0

    async def uncleared_alerts(self) -> list[AlertRecord]:
        await trio.lowlevel.checkpoint()
        return [r for r in self.rows.values() if r.state != "cleared"]

    async def write_alerts(self, writes: Sequence[AlertWrite]) -> None:
        await trio.lowlevel.checkpoint()
        if self.fail_next > 0:
            self.fail_next -= 1
            raise StorageError("disk I/O error (injected)")
        rows = dict(self.rows)  # one transaction: all or nothing
        for w in writes:
            old = rows.get(w.alert_id)
            if old is None:
                rows[w.alert_id] = AlertRecord(
                    w.alert_id, w.device_id, w.rule, "open", w.severity, w.detail, w.count, w.raised_at, w.last_seen_at
                )
            else:
                rows[w.alert_id] = dataclasses.replace(old, detail=w.detail, count=w.count, last_seen_at=w.last_seen_at)
            if w.cleared_at is not None and rows[w.alert_id].state != "cleared":
                rows[w.alert_id] = dataclasses.replace(rows[w.alert_id], state="cleared", cleared_at=w.cleared_at)
            uncleared = [(r.device_id, r.rule) for r in rows.values() if r.state != "cleared"]
            assert len(uncleared) == len(set(uncleared)), "two uncleared alerts for one (device, rule)"
        self.rows = rows
        self.writes.append(list(writes))

    def ack(self, alert_id: str, key_id: str) -> None:
        row = self.rows[alert_id]
        if row.state == "open":
            self.rows[alert_id] = dataclasses.replace(row, state="acknowledged", acked_at=wall(), acked_by=key_id)

    def of(self, rule: AlertRule, device: str = "emu-1") -> list[AlertRecord]:
        """The alerts of *device* and *rule*, oldest first."""
        return [r for r in self.rows.values() if r.rule == rule.value and r.device_id == device]

    def one(self, rule: AlertRule, device: str = "emu-1") -> AlertRecord:
        (row,) = self.of(rule, device)
        return row


@dataclass
class Alerts:
    actor: AlertActor
    store: FakeAlertStore
    stats: AlertStats

    async def send(self, *signals: AlertSignal) -> None:
        """Signal, then let the actor apply and save everything."""
        for s in signals:
            self.actor.signal(s)
        await trio.testing.wait_all_tasks_blocked()


@asynccontextmanager
async def running_alerts(store: FakeAlertStore | None = None, **config: object) -> AsyncIterator[Alerts]:
    store = store if store is not None else FakeAlertStore()
    stats = AlertStats()
    actor = AlertActor(store, stats, AlertConfig(**config), clock=wall)  # type: ignore[arg-type]
    try:
        with trio.fail_after(STUCK_AFTER):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(actor.run, name="alerts")
                await trio.testing.wait_all_tasks_blocked()
                yield Alerts(actor, store, stats)
                actor.mailbox.close_sending()
    finally:
        actor.mailbox.close()


async def sleep_until(t: float) -> None:
    await trio.sleep_until(t)
    await trio.testing.wait_all_tasks_blocked()


# -- device_offline -----------------------------------------------------------------------------


@pytest.mark.trio
async def test_offline_is_raised_after_the_grace_and_cleared_on_reconnect(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_alerts(offline_grace=60.0) as a:
        await a.send(sig(OFFLINE, detail="connection_lost"))
        await sleep_until(59.9)
        assert a.store.rows == {}
        await sleep_until(60.1)
        alert = a.store.one(OFFLINE)
        assert (alert.state, alert.severity, alert.count) == ("open", "warning", 1)
        assert alert.detail == "disconnected (connection_lost) at 2026-11-23T16:00:00.000Z; not back within 60 s"
        assert alert.raised_at == pytest.approx(WALL0 + 60.0)
        assert a.stats.open == {"device_offline": 1}
        assert a.stats.raised == {"device_offline": 1}

        await sleep_until(500.0)
        await a.send(sig(OFFLINE, raised=False, detail="127.0.0.1:50000"))
        alert = a.store.one(OFFLINE)
        assert alert.state == "cleared"
        assert alert.cleared_at == pytest.approx(WALL0 + 500.0)
        assert a.stats.open == {"device_offline": 0}


@pytest.mark.trio
async def test_a_reconnect_within_the_grace_raises_nothing(autojump_clock: trio.testing.MockClock) -> None:
    async with running_alerts(offline_grace=60.0) as a:
        await a.send(sig(OFFLINE, detail="keepalive_expired"))
        await sleep_until(30.0)
        await a.send(sig(OFFLINE, raised=False))
        await sleep_until(3600.0)
        assert a.store.rows == {}
        assert a.stats.raised == {}


@pytest.mark.trio
async def test_offline_without_grace_is_raised_at_once(autojump_clock: trio.testing.MockClock) -> None:
    async with running_alerts(offline_grace=0.0) as a:
        await a.send(sig(OFFLINE, detail="inactive"))
        assert a.store.one(OFFLINE).detail == "disconnected (inactive) at 2026-11-23T16:00:00.000Z"


# -- sequence_gap -------------------------------------------------------------------------------


@pytest.mark.trio
async def test_gap_is_raised_at_the_threshold_and_cleared_when_filled(autojump_clock: trio.testing.MockClock) -> None:
    async with running_alerts(gap_min_missing=3) as a:
        await a.send(sig(GAP, level=2, detail="2 missing"))
        assert a.store.rows == {}  # below the threshold
        await a.send(sig(GAP, level=4, detail="4 missing"))
        assert (a.store.one(GAP).count, a.store.one(GAP).detail) == (1, "4 missing")
        await sleep_until(10.0)
        await a.send(sig(GAP, level=6, detail="6 missing"))  # a new gap: a repeat
        await sleep_until(20.0)
        await a.send(sig(GAP, level=2, detail="2 missing", count=0))  # late readings: no occurrence
        alert = a.store.one(GAP)
        # Hysteresis: below the threshold it stays open until nothing is missing.
        assert (alert.state, alert.count, alert.detail) == ("open", 2, "2 missing")
        assert alert.last_seen_at == pytest.approx(WALL0 + 10.0)
        await a.send(sig(GAP, raised=False, detail="every gap filled"))
        assert a.store.one(GAP).state == "cleared"
        assert a.stats.open == {"sequence_gap": 0}


@pytest.mark.trio
async def test_a_reboot_clears_the_gap_alert_and_a_new_gap_raises_a_new_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_alerts() as a:
        await a.send(sig(GAP, level=3, detail="3 readings missing in boot 1"))
        # One batch: the reboot, then a gap at the start of the new boot.
        await a.send(
            sig(GAP, raised=False, detail="boot 2 started"), sig(GAP, level=5, detail="5 readings missing in boot 2")
        )
        old, new = a.store.of(GAP)
        assert (old.state, old.detail) == ("cleared", "3 readings missing in boot 1")
        assert (new.state, new.detail) == ("open", "5 readings missing in boot 2")
        assert old.alert_id < new.alert_id  # ULIDs sort by time of raising
        assert a.stats.raised == {"sequence_gap": 2}
        assert a.stats.open == {"sequence_gap": 1}


# -- stale_boot, acl_denial ---------------------------------------------------------------------


@pytest.mark.trio
async def test_stale_boot_is_not_cleared_by_default(autojump_clock: trio.testing.MockClock) -> None:
    async with running_alerts() as a:
        await a.send(sig(STALE, count=3, detail="boot 1 is lower than the current boot 2"))
        await sleep_until(100.0)
        await a.send(sig(STALE, count=2, detail="boot 1 is lower than the current boot 2"))
        await sleep_until(20 * 3600.0)  # within STUCK_AFTER
        alert = a.store.one(STALE)
        assert (alert.state, alert.severity, alert.count) == ("open", "critical", 5)
        assert alert.last_seen_at == pytest.approx(WALL0 + 100.0)


@pytest.mark.trio
async def test_stale_boot_clears_after_a_configured_quiet_period(autojump_clock: trio.testing.MockClock) -> None:
    async with running_alerts(stale_boot_clear_after=600.0) as a:
        await a.send(sig(STALE))
        await sleep_until(599.0)
        assert a.store.one(STALE).state == "open"
        await sleep_until(601.0)
        assert a.store.one(STALE).state == "cleared"


@pytest.mark.trio
async def test_acl_denial_repeats_then_clears_after_quiet(autojump_clock: trio.testing.MockClock) -> None:
    async with running_alerts(acl_clear_after=100.0) as a:
        await a.send(sig(ACL, detail="may not publish 'iot/emu-2/telemetry'"))
        await sleep_until(50.0)
        await a.send(sig(ACL, detail="may not subscribe 'iot/#'"))
        await sleep_until(149.0)  # 99 s after the last denial
        alert = a.store.one(ACL)
        assert (alert.state, alert.count, alert.detail) == ("open", 2, "may not subscribe 'iot/#'")
        await sleep_until(151.0)
        assert a.store.one(ACL).state == "cleared"
        assert a.store.one(ACL).cleared_at == pytest.approx(WALL0 + 150.0)


@pytest.mark.trio
async def test_a_repeat_keeps_an_acknowledged_alert_acknowledged(autojump_clock: trio.testing.MockClock) -> None:
    async with running_alerts(acl_clear_after=100.0) as a:
        await a.send(sig(ACL))
        alert_id = a.store.one(ACL).alert_id
        a.store.ack(alert_id, "k1")
        await sleep_until(10.0)
        await a.send(sig(ACL))
        alert = a.store.one(ACL)
        assert (alert.alert_id, alert.state, alert.acked_by, alert.count) == (alert_id, "acknowledged", "k1", 2)
        assert a.stats.open == {"acl_denial": 1}  # acknowledged is not cleared
        await sleep_until(111.0)
        assert a.store.one(ACL).state == "cleared"  # the rule clears acknowledged alerts too


# -- quarantine_burst ---------------------------------------------------------------------------


@pytest.mark.trio
async def test_burst_within_the_window_raises_and_quiet_clears(autojump_clock: trio.testing.MockClock) -> None:
    async with running_alerts(quarantine_burst=10, quarantine_window=60.0) as a:
        for i in range(9):
            await sleep_until(i * 5.0)
            await a.send(sig(BURST, detail="schema"))
        assert a.store.rows == {}
        await sleep_until(50.0)  # the 10th within 50 s
        await a.send(sig(BURST, detail="not_utf8_json"))
        alert = a.store.one(BURST)
        assert (alert.count, alert.detail) == (10, "10 messages quarantined within 60 s; last: not_utf8_json")
        await sleep_until(100.0)
        await a.send(sig(BURST, count=3, detail="schema"))
        assert a.store.one(BURST).count == 13
        await sleep_until(159.0)
        assert a.store.one(BURST).state == "open"
        await sleep_until(161.0)  # a whole window without one
        assert a.store.one(BURST).state == "cleared"


@pytest.mark.trio
async def test_quarantines_spread_wider_than_the_window_raise_nothing(autojump_clock: trio.testing.MockClock) -> None:
    async with running_alerts(quarantine_burst=10, quarantine_window=60.0) as a:
        for i in range(30):
            await sleep_until(i * 10.0)  # 6 or 7 per window
            await a.send(sig(BURST))
        assert a.store.rows == {}


@pytest.mark.trio
async def test_one_big_batch_is_a_burst(autojump_clock: trio.testing.MockClock) -> None:
    async with running_alerts(quarantine_burst=10) as a:
        await a.send(sig(BURST, count=12, device="emu-2"))
        assert a.store.one(BURST, "emu-2").count == 12
        assert a.store.of(BURST, "emu-1") == []


# -- the actor ----------------------------------------------------------------------------------


@pytest.mark.trio
async def test_signals_are_dropped_and_counted_when_the_mailbox_is_full() -> None:
    stats = AlertStats()
    actor = AlertActor(FakeAlertStore(), stats, AlertConfig(capacity=2))
    for _ in range(3):
        actor.signal(sig(ACL))  # never blocks, never raises
    assert (len(actor.mailbox), stats.signals_dropped) == (2, 1)
    actor.mailbox.close()
    actor.signal(sig(ACL))
    assert stats.signals_dropped == 2


@pytest.mark.trio
async def test_a_disabled_rule_raises_nothing_and_its_old_alerts_clear(autojump_clock: trio.testing.MockClock) -> None:
    store = FakeAlertStore()
    async with running_alerts(store) as a:
        await a.send(sig(ACL))
    async with running_alerts(store, disabled=frozenset({ACL})) as a:
        assert a.store.one(ACL).state == "cleared"
        await a.send(sig(ACL, device="emu-2"), sig(STALE, device="emu-2"))
        assert a.store.of(ACL, "emu-2") == []
        assert a.store.one(STALE, "emu-2").state == "open"


@pytest.mark.trio
async def test_a_restart_resumes_from_the_stored_alerts(autojump_clock: trio.testing.MockClock) -> None:
    store = FakeAlertStore()
    async with running_alerts(store, offline_grace=0.0, acl_clear_after=100.0) as a:
        await a.send(sig(OFFLINE, detail="connection_lost"), sig(ACL, device="emu-2"))
    await sleep_until(40.0)
    # A new actor (a node restart): the stats come from the store, a reconnect clears the old
    # alert, and the quiet period of the ACL alert ends when it would have without the restart.
    async with running_alerts(store, offline_grace=0.0, acl_clear_after=100.0) as a:
        assert a.stats.open == {"device_offline": 1, "acl_denial": 1}
        await a.send(sig(OFFLINE, detail="connection_lost"))  # a repeat, not a second alert
        assert a.store.one(OFFLINE).count == 2
        await sleep_until(99.0)
        assert a.store.one(ACL, "emu-2").state == "open"
        await sleep_until(101.0)
        assert a.store.one(ACL, "emu-2").state == "cleared"
        await a.send(sig(OFFLINE, raised=False))
        assert a.store.one(OFFLINE).state == "cleared"
        assert a.stats.open == {"device_offline": 0, "acl_denial": 0}


@pytest.mark.trio
async def test_a_failing_store_is_retried_and_nothing_is_lost(autojump_clock: trio.testing.MockClock) -> None:
    store = FakeAlertStore(fail_next=3)
    async with running_alerts(store, retry_initial=1.0) as a:
        await a.send(sig(STALE, count=2))
        assert store.rows == {}
        # Signals keep being applied while the store is down.
        await sleep_until(0.5)
        await a.send(sig(STALE, count=3), sig(ACL))
        await sleep_until(10.0)  # retries after 1, 2 and 4 s
        assert a.store.one(STALE).count == 5
        assert a.store.one(ACL).state == "open"
        assert len(store.writes) == 1  # everything pending went in one transaction


@pytest.mark.trio
async def test_the_last_changes_are_saved_at_shutdown(autojump_clock: trio.testing.MockClock) -> None:
    store = FakeAlertStore()
    async with running_alerts(store) as a:
        for _ in range(5):
            a.actor.signal(sig(STALE))
        # No settling: the context closes the mailbox with the signals still queued.
    assert store.one(STALE).count == 5


# -- the sources --------------------------------------------------------------------------------


@asynccontextmanager
async def device_router(signals: list[AlertSignal]) -> AsyncIterator[Router]:
    store = FakeStore()
    stats = IngestStats()
    writer = StorageWriter(store, stats)
    router = Router(store, writer, stats, RouterConfig(actor=DeviceActorConfig()), alerts=signals.append)
    try:
        with trio.fail_after(STUCK_AFTER):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.run)
                await nursery.start(router.run)
                yield router
                await router.close()
                writer.mailbox.close_sending()
    finally:
        writer.mailbox.close()


def brief(signals: list[AlertSignal]) -> list[tuple[str, bool, str, int, int]]:
    out = [(s.rule.value, s.raised, s.detail, s.count, s.level) for s in signals]
    signals.clear()
    return out


@pytest.mark.trio
async def test_the_device_actor_signals_only_what_changed(autojump_clock: trio.testing.MockClock) -> None:
    signals: list[AlertSignal] = []
    async with device_router(signals) as router:

        async def send(*msgs: Publish | Link) -> None:
            for m in msgs:
                await router.deliver(m)
            for m in msgs:
                if isinstance(m, Publish) and m.done is not None:
                    await m.done.wait()
            await trio.testing.wait_all_tasks_blocked()

        await send(publish("emu-1", 1, 0), publish("emu-1", 1, 1))
        assert signals == []  # in order: nothing to say
        await send(publish("emu-1", 1, 4))
        assert brief(signals) == [("sequence_gap", True, "missing readings in boot 1: 2", 1, 2)]
        await send(publish("emu-1", 1, 2))
        assert brief(signals) == [("sequence_gap", True, "missing readings in boot 1: 1", 0, 1)]
        await send(publish("emu-1", 1, 3))
        assert brief(signals) == [("sequence_gap", False, "every gap filled", 1, 0)]
        await send(publish("emu-1", 1, 7))
        signals.clear()
        await send(publish("emu-1", 2, 0))
        assert brief(signals) == [("sequence_gap", False, "boot 2 started", 1, 0)]
        await send(publish("emu-1", 1, 8), publish("emu-1", 1, 9), publish("emu-1", 2, 1, payload=b"{"))
        assert brief(signals) == [
            ("quarantine_burst", True, "not_utf8_json", 3, 0),
            ("stale_boot", True, "boot 1 is lower than the current boot 2", 2, 0),
        ]
        await send(
            Link("emu-1", LinkEvent.DISCONNECTED, 1.0, "clean"),
            Link("emu-1", LinkEvent.CONNECTED, 2.0, "127.0.0.1:1"),
            Link("emu-1", LinkEvent.DISCONNECTED, 3.0, "keepalive_expired"),
            Link("emu-1", LinkEvent.CONNECTED, 4.0, "127.0.0.1:2"),
            Link("emu-1", LinkEvent.DISCONNECTED, 5.0, "revoked"),
        )
        assert [(s.raised, s.detail, s.at) for s in signals] == [
            (False, "127.0.0.1:1", 2.0),
            (True, "keepalive_expired", 3.0),
            (False, "127.0.0.1:2", 4.0),
        ]
        assert {s.rule for s in signals} == {OFFLINE}


def test_the_bridge_signals_denials_a_device_asked_for() -> None:
    signals: list[AlertSignal] = []
    bridge = Bridge(None, None, IngestStats(), disconnect_on_denial=False, alerts=signals.append)  # type: ignore[arg-type]
    bridge.denied("emu-1", "publish", "iot/emu-2/telemetry")
    bridge.denied("emu-1", "subscribe", "iot/#")
    bridge.denied("emu-1", "receive", "iot/emu-2/commands")  # the node's own delivery
    bridge.denied("", "publish", "x")  # no identity: nobody to blame
    assert [(s.device_id, s.rule, s.detail) for s in signals] == [
        ("emu-1", ACL, "may not publish 'iot/emu-2/telemetry'"),
        ("emu-1", ACL, "may not subscribe 'iot/#'"),
    ]
