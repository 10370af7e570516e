"""The command actor: delivery, resends, expiry, acks and restarts, on trio's autojump clock.

:class:`FakeCommandStore` keeps commands the way ``storage.command_sql`` does (one row per
command, a history entry per change, idempotency keys per device, all-or-nothing writes);
:class:`FakeDeliverer` plays the broker: a device is reachable once the test says it is.
Ack timeouts, resends and expiry take virtual time only; the actor's wall clock is that
virtual time shifted to a plausible epoch.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

from actors.commands import CommandActor, CommandConfig, CommandRequest, CommandsUnavailable, Delivery
from actors.messages import Completion, Outcome
from actors.stats import CommandStats
from actors.supervisor import RestartPolicy, supervise
from storage.errors import CommandConflict, StorageError
from storage.records import CommandChange, CommandHistoryEntry, CommandRecord, NewCommand, QuarantinedAck
from tests.unit.test_actors import STUCK_AFTER

WALL0 = 1_795_449_600.0


def wall() -> float:
    return WALL0 + trio.current_time()


@dataclass
class FakeCommandStore:
    rows: dict[str, CommandRecord] = field(default_factory=dict)
    requests: dict[str, str] = field(default_factory=dict)
    quarantined: list[QuarantinedAck] = field(default_factory=list)
    fail_next: int = 0

    async def unfinished_commands(self) -> list[CommandRecord]:
        await trio.lowlevel.checkpoint()
        return [r for r in self.rows.values() if r.state in ("queued", "sent")]

    async def create_command(self, new: NewCommand) -> tuple[CommandRecord, bool]:
        await trio.lowlevel.checkpoint()
        for r in self.rows.values():
            if new.idempotency_key is not None and (r.device_id, r.idempotency_key) == (
                new.device_id,
                new.idempotency_key,
            ):
                if self.requests[r.command_id] != new.request:
                    raise CommandConflict(new.device_id, new.idempotency_key, r.command_id)
                return r, False
        record = CommandRecord(
            new.command_id,
            new.device_id,
            new.name,
            new.args,
            "queued",
            new.created_at,
            new.expires_at,
            created_by=new.created_by,
            idempotency_key=new.idempotency_key,
            history=(CommandHistoryEntry("queued", new.created_at),),
        )
        self.rows[new.command_id] = record
        self.requests[new.command_id] = new.request
        return record, True

    async def command_owner(self, command_id: str) -> tuple[str, str] | None:
        await trio.lowlevel.checkpoint()
        r = self.rows.get(command_id)
        return None if r is None else (r.device_id, r.state)

    async def write_command_changes(
        self, changes: Sequence[CommandChange], quarantined: Sequence[QuarantinedAck]
    ) -> None:
        await trio.lowlevel.checkpoint()
        if self.fail_next > 0:
            self.fail_next -= 1
            raise StorageError("disk I/O error (injected)")
        for c in changes:
            r = self.rows[c.command_id]
            entry = CommandHistoryEntry(c.state, c.at, c.detail)
            self.rows[c.command_id] = dataclasses.replace(
                r, state=c.state, attempts=c.attempts, last_sent_at=c.last_sent_at, history=(*r.history, entry)
            )
        self.quarantined.extend(quarantined)

    def states(self, command_id: str) -> list[str]:
        return [h.state for h in self.rows[command_id].history]


@dataclass
class FakeDeliverer:
    reachable: dict[str, Delivery] = field(default_factory=dict)
    sent: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def deliver(self, device_id: str, payload: bytes) -> Delivery:
        result = self.reachable.get(device_id, Delivery.NOT_CONNECTED)
        if result is Delivery.SENT:
            self.sent.append((device_id, json.loads(payload)))
        return result

    def to(self, device_id: str) -> list[dict[str, Any]]:
        return [doc for d, doc in self.sent if d == device_id]


@dataclass
class Commands:
    actor: CommandActor
    store: FakeCommandStore
    deliverer: FakeDeliverer
    stats: CommandStats

    async def submit(self, device_id: str = "emu-1", name: str = "ping", ttl_s: int = 600, **kw: Any) -> str:
        record, _ = await self.actor.submit(device_id, CommandRequest(name, kw.pop("args", {}), ttl_s, **kw), "key1")
        await trio.testing.wait_all_tasks_blocked()
        return record.command_id

    async def connect(self, device_id: str = "emu-1") -> None:
        self.deliverer.reachable[device_id] = Delivery.SENT
        self.actor.hint(device_id)
        await trio.testing.wait_all_tasks_blocked()

    async def ack(self, payload: dict[str, Any] | bytes, device_id: str = "emu-1") -> Completion:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        done = Completion()
        await self.actor.ack(device_id, f"iot/{device_id}/commands/ack", raw, wall(), done)
        await trio.testing.wait_all_tasks_blocked()
        return done


@asynccontextmanager
async def running_commands(store: FakeCommandStore | None = None, **config: Any) -> AsyncIterator[Commands]:
    store = store if store is not None else FakeCommandStore()
    deliverer = FakeDeliverer()
    stats = CommandStats()
    actor = CommandActor(store, deliverer, stats, CommandConfig(**config), clock=wall)
    try:
        with trio.fail_after(STUCK_AFTER):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(actor.run, name="commands")
                await trio.testing.wait_all_tasks_blocked()
                yield Commands(actor, store, deliverer, stats)
                actor.mailbox.close_sending()
    finally:
        actor.mailbox.close()


async def sleep_until(t: float) -> None:
    await trio.sleep_until(t)
    await trio.testing.wait_all_tasks_blocked()


@pytest.mark.trio
async def test_a_command_waits_for_its_device_and_is_acked(autojump_clock: trio.testing.MockClock) -> None:
    async with running_commands(ack_timeout=30.0) as c:
        command_id = await c.submit(args={"x": 1})
        assert c.deliverer.sent == []
        assert c.stats.pending == {"queued": 1}
        await sleep_until(100.0)
        c.deliverer.reachable["emu-1"] = Delivery.NOT_SUBSCRIBED
        c.actor.hint("emu-1")  # connected, not subscribed yet: still waiting
        await trio.testing.wait_all_tasks_blocked()
        assert c.deliverer.sent == []
        await c.connect()
        (doc,) = c.deliverer.to("emu-1")
        assert doc == {
            "command_id": command_id,
            "name": "ping",
            "args": {"x": 1},
            "expires_at": "2026-11-23T16:10:00.000Z",
        }
        assert c.store.rows[command_id].state == "sent"
        done = await c.ack({"command_id": command_id, "status": "ok", "detail": "pong"})
        assert done.outcome is Outcome.DURABLE
        row = c.store.rows[command_id]
        assert [(h.state, h.detail) for h in row.history] == [
            ("queued", None),
            ("sent", "attempt 1"),
            ("acked", "ok: pong"),
        ]
        assert row.history[1].at == pytest.approx(WALL0 + 100.0)
        assert c.stats.pending == {"queued": 0, "sent": 0}
        assert c.stats.transitions == {"queued": 1, "sent": 1, "acked": 1}


@pytest.mark.trio
async def test_no_ack_means_resends_with_the_same_id_then_expiry(autojump_clock: trio.testing.MockClock) -> None:
    async with running_commands(ack_timeout=30.0, max_attempts=3) as c:
        await c.connect()
        command_id = await c.submit(ttl_s=600)
        await sleep_until(29.0)
        assert len(c.deliverer.to("emu-1")) == 1
        await sleep_until(31.0)
        assert len(c.deliverer.to("emu-1")) == 2
        await sleep_until(500.0)
        sent = c.deliverer.to("emu-1")
        assert len(sent) == 3  # the limit: no fourth delivery
        assert {d["command_id"] for d in sent} == {command_id}
        assert c.store.rows[command_id].state == "sent"
        await sleep_until(600.5)
        row = c.store.rows[command_id]
        assert c.store.states(command_id) == ["queued", "sent", "sent", "sent", "expired"]
        assert row.history[-1].detail == "no ack before it expired (3 attempts)"
        assert row.history[-1].at == pytest.approx(WALL0 + 600.0, abs=0.01)
        assert (c.stats.resends, c.stats.expirations) == (2, 1)


@pytest.mark.trio
async def test_a_command_for_a_device_that_never_comes_expires_unsent(autojump_clock: trio.testing.MockClock) -> None:
    async with running_commands() as c:
        command_id = await c.submit(ttl_s=60)
        await sleep_until(61.0)
        assert c.store.states(command_id) == ["queued", "expired"]
        assert c.store.rows[command_id].history[-1].detail.startswith("expired before it could be sent")
        await c.connect()
        assert c.deliverer.sent == []


@pytest.mark.trio
@pytest.mark.parametrize("status", ["error", "rejected"])
async def test_error_and_rejected_acks_fail_the_command(autojump_clock: trio.testing.MockClock, status: str) -> None:
    async with running_commands() as c:
        await c.connect()
        command_id = await c.submit(name="self_destruct")
        await c.ack({"command_id": command_id, "status": status, "detail": "unknown command"})
        assert c.store.states(command_id) == ["queued", "sent", "failed"]
        assert c.store.rows[command_id].history[-1].detail == f"{status}: unknown command"
        await sleep_until(1000.0)
        assert len(c.deliverer.sent) == 1  # a failed command is never resent


@pytest.mark.trio
async def test_stray_acks_are_ignored_and_counted(autojump_clock: trio.testing.MockClock) -> None:
    async with running_commands() as c:
        await c.connect("emu-1")
        await c.connect("emu-2")
        mine = await c.submit("emu-1")
        theirs = await c.submit("emu-2")
        unknown = "01JD0000000000000000000000"
        for payload in (
            {"command_id": unknown, "status": "ok"},
            {"command_id": theirs, "status": "ok"},  # emu-2's command, acked by emu-1
        ):
            assert (await c.ack(payload)).outcome is Outcome.DURABLE
        await c.ack({"command_id": mine, "status": "ok"})
        done = await c.ack({"command_id": mine, "status": "error"})  # a late repeat
        assert done.outcome is Outcome.DURABLE
        assert c.store.rows[mine].state == "acked"
        assert c.store.rows[theirs].state == "sent"
        assert c.stats.acks_ignored == {"unknown": 1, "other_device": 1, "finished": 1}


@pytest.mark.trio
async def test_a_bad_ack_is_quarantined_with_a_reason(autojump_clock: trio.testing.MockClock) -> None:
    async with running_commands() as c:
        await c.connect()
        command_id = await c.submit()
        for raw in (b"\xff\xfe", b"[1, 2]", json.dumps({"command_id": command_id, "status": "maybe"}).encode()):
            assert (await c.ack(raw)).outcome is Outcome.DURABLE
        assert [q.reason.value for q in c.store.quarantined] == ["not_utf8_json", "schema", "schema"]
        assert c.store.quarantined[0].payload == b"\xff\xfe"
        assert "status" in c.store.quarantined[2].detail
        assert c.store.rows[command_id].state == "sent"  # nothing else changed
        assert c.stats.acks_quarantined == {"not_utf8_json": 1, "schema": 2}


@pytest.mark.trio
async def test_an_idempotency_key_returns_the_same_command_or_conflicts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_commands() as c:
        first, created = await c.actor.submit("emu-1", CommandRequest("ping", {}, 60, "k1"))
        again, created_again = await c.actor.submit("emu-1", CommandRequest("ping", {}, 60, "k1"))
        assert (created, created_again) == (True, False)
        assert again.command_id == first.command_id
        other, _ = await c.actor.submit("emu-2", CommandRequest("ping", {}, 60, "k1"))  # keys are per device
        assert other.command_id != first.command_id
        with pytest.raises(CommandConflict):
            await c.actor.submit("emu-1", CommandRequest("ping", {}, 61, "k1"))
        assert len(c.store.rows) == 2
        assert c.stats.transitions == {"queued": 2}


@pytest.mark.trio
async def test_a_sent_command_is_sent_again_after_a_restart(autojump_clock: trio.testing.MockClock) -> None:
    store = FakeCommandStore()
    async with running_commands(store, ack_timeout=30.0) as c:
        await c.connect()
        command_id = await c.submit(ttl_s=600)
        queued_id = await c.submit("emu-9", ttl_s=600)
    assert store.rows[command_id].state == "sent"
    async with running_commands(store, ack_timeout=30.0) as c2:
        assert c2.stats.pending == {"sent": 1, "queued": 1}
        await sleep_until(5.0)
        assert c2.deliverer.sent == []  # nobody is connected to the new node yet
        await c2.connect()
        (doc,) = c2.deliverer.to("emu-1")
        assert doc["command_id"] == command_id
        await c2.ack({"command_id": command_id, "status": "ok"})
        await c2.connect("emu-9")
        assert c2.deliverer.to("emu-9")[0]["command_id"] == queued_id
    assert store.states(command_id) == ["queued", "sent", "sent", "acked"]
    assert store.rows[command_id].attempts == 2


@pytest.mark.trio
async def test_an_ack_is_acknowledged_only_once_its_change_is_committed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FakeCommandStore()
    async with running_commands(store, retry_initial=1.0) as c:
        await c.connect()
        command_id = await c.submit()
        store.fail_next = 2
        done = await c.ack({"command_id": command_id, "status": "ok"})
        assert done.outcome is None
        assert store.rows[command_id].state == "sent"
        await sleep_until(trio.current_time() + 0.9)
        assert done.outcome is None
        await sleep_until(trio.current_time() + 5.0)
        assert done.outcome is Outcome.DURABLE
        assert store.states(command_id) == ["queued", "sent", "acked"]


@pytest.mark.trio
async def test_the_sweep_delivers_when_a_hint_was_lost(autojump_clock: trio.testing.MockClock) -> None:
    async with running_commands(sweep=10.0) as c:
        command_id = await c.submit()
        c.deliverer.reachable["emu-1"] = Delivery.SENT  # connected, but no hint arrives
        await sleep_until(10.5)
        assert [d["command_id"] for d in c.deliverer.to("emu-1")] == [command_id]


@pytest.mark.trio
async def test_a_crash_answers_what_it_abandoned_and_the_restart_goes_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class BuggyStore(FakeCommandStore):
        bug = True

        async def create_command(self, new: NewCommand) -> tuple[CommandRecord, bool]:
            if self.bug:
                self.bug = False
                raise RuntimeError("a bug in the store")
            return await super().create_command(new)

    store = BuggyStore()
    deliverer = FakeDeliverer({"emu-1": Delivery.SENT})
    stats = CommandStats()
    actor = CommandActor(store, deliverer, stats, CommandConfig(), clock=wall)
    restarts: list[BaseException] = []
    policy = RestartPolicy(max_restarts=3, backoff_initial=1.0)
    with trio.fail_after(STUCK_AFTER):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(supervise, "commands", actor.run, policy, on_restart=lambda _, e: restarts.append(e))
            )
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(CommandsUnavailable):
                await actor.submit("emu-1", CommandRequest("ping", {}, 60))
            assert [type(e) for e in restarts] == [RuntimeError]
            record, created = await actor.submit("emu-1", CommandRequest("ping", {}, 60))
            assert created
            await trio.testing.wait_all_tasks_blocked()
            assert [d["command_id"] for d in deliverer.to("emu-1")] == [record.command_id]
            actor.mailbox.close_sending()
    actor.mailbox.close()


@pytest.mark.trio
async def test_a_connect_hint_that_came_too_early_is_tried_again(autojump_clock: trio.testing.MockClock) -> None:
    """amqtt reports a connect before the node lists the session as live: the hint finds the
    device not connected, and a retry a moment later delivers, well before the sweep."""
    async with running_commands(sweep=600.0, hint_retries=(0.2, 1.0)) as c:
        command_id = await c.submit()
        c.actor.hint("emu-1")  # not connected yet, as far as the deliverer knows
        await trio.testing.wait_all_tasks_blocked()
        c.deliverer.reachable["emu-1"] = Delivery.SENT
        await sleep_until(0.3)
        assert [d["command_id"] for d in c.deliverer.to("emu-1")] == [command_id]
        await sleep_until(5.0)
        assert len(c.deliverer.sent) == 1  # the later retries found nothing left to do


@pytest.mark.trio
async def test_a_reconnect_resends_only_what_was_sent_before_it(autojump_clock: trio.testing.MockClock) -> None:
    async with running_commands(ack_timeout=600.0) as c:
        await c.connect()
        old = await c.submit()
        await sleep_until(10.0)
        await c.connect()  # a new connection: the old delivery may be lost
        new = await c.submit()
        c.actor.hint("emu-1")  # e.g. the subscribe right after it: nothing was sent before it
        await trio.testing.wait_all_tasks_blocked()
        assert [d["command_id"] for d in c.deliverer.to("emu-1")] == [old, old, new]


@pytest.mark.trio
async def test_ack_nowait_takes_an_ack_or_says_the_mailbox_is_full(autojump_clock: trio.testing.MockClock) -> None:
    """The broker's synchronous way in (Bridge.admit): an ack is taken without waiting; with
    the mailbox full it is refused (False, completion untouched) and the caller awaits ack();
    once the actor stopped, the ack fails (it is not acknowledged, the device resends)."""
    actor = CommandActor(FakeCommandStore(), FakeDeliverer(), CommandStats(), CommandConfig(capacity=1), clock=wall)
    topic = "iot/emu-1/commands/ack"
    first, second = Completion(), Completion()
    assert actor.ack_nowait("emu-1", topic, b"{}", wall(), first)
    assert not actor.ack_nowait("emu-1", topic, b"{}", wall(), second)
    assert second.outcome is None
    actor.mailbox.close()
    third = Completion()
    assert actor.ack_nowait("emu-1", topic, b"{}", wall(), third)
    assert third.outcome is Outcome.FAILED
