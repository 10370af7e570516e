"""The router: one supervised device actor per device, started on first contact.

:meth:`Router.deliver` finds (or starts) the device's actor and awaits room in its mailbox,
which is the backpressure the broker bridge feels. An actor that has been idle for its
``idle_timeout`` retires when its mailbox is empty; the next message starts a new one, which
reloads the state from SQLite. A device actor that crashes is restarted with backoff; past its
restart-intensity limit the device is *parked*: its messages are refused (not acknowledged)
while every other device goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup, TaskStatus

from actors.alerts import AlertRule, AlertSignal, AlertSink
from actors.device import DeviceActor, DeviceActorConfig
from actors.mailbox import Mailbox
from actors.messages import DeviceMessage, Outcome, Publish
from actors.stats import IngestStats
from actors.supervisor import RestartIntensityExceeded, RestartPolicy, supervise
from actors.writer import StorageWriter
from storage.interfaces import IngestStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RouterConfig:
    mailbox_capacity: int = 1024
    actor: DeviceActorConfig = field(default_factory=DeviceActorConfig)
    restart: RestartPolicy = field(default_factory=RestartPolicy)


@dataclass(slots=True)
class _Slot:
    mailbox: Mailbox[DeviceMessage]
    actor: DeviceActor


class Router:
    def __init__(
        self,
        store: IngestStore,
        writer: StorageWriter,
        stats: IngestStats,
        config: RouterConfig | None = None,
        *,
        fault_hook: Callable[[str, DeviceMessage], None] | None = None,
        alerts: AlertSink | None = None,
    ) -> None:
        self._store = store
        self._writer = writer
        self._stats = stats
        self._config = config or RouterConfig()
        self._fault_hook = fault_hook
        self._alerts = alerts
        self._slots: dict[str, _Slot] = {}
        self.parked: set[str] = set()
        self._tg: TaskGroup | None = None
        self._closing = False
        self._all_ended = anyio.Event()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Host the device actors until cancelled or :meth:`close` drained them."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            await anyio.sleep_forever()

    def __contains__(self, device_id: str) -> bool:
        return device_id in self._slots

    async def deliver(self, msg: DeviceMessage) -> None:
        """Hand *msg* to its device's actor, starting one if needed; waits while it is full."""
        while not self.deliver_nowait(msg):
            slot = self._slots.get(msg.device_id)
            if slot is None:
                continue  # retired meanwhile: deliver_nowait starts a fresh one
            try:
                await slot.mailbox.send(msg)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                continue  # the actor retired while we waited: start a fresh one
            return

    def deliver_nowait(self, msg: DeviceMessage) -> bool:
        """:meth:`deliver` without waiting: False when the actor's mailbox is full (then the
        caller awaits :meth:`deliver`). Saves the broker's hot path a coroutine per message."""
        while True:
            if msg.device_id in self.parked or self._closing:
                if isinstance(msg, Publish) and msg.done is not None:
                    msg.done.resolve(Outcome.FAILED)
                return True
            slot = self._slots.get(msg.device_id) or self._start(msg.device_id)
            try:
                slot.mailbox.send_nowait(msg)
            except anyio.WouldBlock:
                return False
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                continue  # the actor retired between lookup and send: start a fresh one
            return True

    def device_changed(self, device_id: str) -> None:
        """The device's registration changed: its running actor reloads its profile before its
        next batch (an actor started later loads the new one anyway)."""
        slot = self._slots.get(device_id)
        if slot is not None:
            slot.actor.reload_profile()

    async def close(self) -> None:
        """Stop taking messages, let every actor drain its mailbox, and return once all ended
        and what they handed to the writer is committed (the writer must still be running)."""
        self._closing = True
        for slot in list(self._slots.values()):
            slot.mailbox.close_sending()
        if self._slots:
            await self._all_ended.wait()
        # An actor ends right after submitting its last batch: wait for that commit too, so
        # every message delivered before close() has its outcome when close() returns.
        await self._writer.barrier()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    def _start(self, device_id: str) -> _Slot:
        assert self._tg is not None, "Router.run() is not running"  # noqa: S101
        mailbox: Mailbox[DeviceMessage] = Mailbox(self._config.mailbox_capacity)

        def may_retire() -> bool:
            # Called from the actor with no await in between: if the mailbox is empty now,
            # no message can slip in before the slot is gone (see Mailbox.send).
            if len(mailbox) or self._slots.get(device_id) is not slot:
                return False
            del self._slots[device_id]
            mailbox.close()
            self._stats.actors_retired += 1
            return True

        actor = DeviceActor(
            device_id,
            mailbox,
            store=self._store,
            writer=self._writer,
            stats=self._stats,
            config=self._config.actor,
            may_retire=may_retire,
            fault_hook=self._fault_hook,
            alerts=self._alerts,
        )
        slot = _Slot(mailbox, actor)
        self._slots[device_id] = slot
        self._stats.actors_started += 1
        self._tg.start_soon(self._run_slot, device_id, slot, name=f"device[{device_id}]")
        return slot

    async def _run_slot(self, device_id: str, slot: _Slot) -> None:
        self._stats.active_actors += 1
        try:
            await supervise(
                f"device[{device_id}]",
                slot.actor.run,
                self._config.restart,
                on_restart=self._on_restart,
            )
        except RestartIntensityExceeded as exc:
            log.exception("device %s parked after too many crashes", device_id)
            self.parked.add(device_id)
            self._stats.devices_parked += 1
            if self._alerts is not None:
                detail = f"{exc.restarts} crashes within {exc.period:g} s; last: {exc.last!r}"[:300]
                self._alerts(
                    AlertSignal(device_id, AlertRule.DEVICE_PARKED, raised=True, detail=detail, at=time.time())
                )
            for msg in slot.mailbox.drain_nowait(1 << 30):
                if isinstance(msg, Publish) and msg.done is not None:
                    msg.done.resolve(Outcome.FAILED)
        finally:
            self._stats.active_actors -= 1
            if self._slots.get(device_id) is slot:
                del self._slots[device_id]
            slot.mailbox.close()
            if self._closing and not self._slots:
                self._all_ended.set()

    def _on_restart(self, name: str, exc: BaseException) -> None:
        self._stats.actor_restarts += 1
