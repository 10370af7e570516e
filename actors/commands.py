"""The command actor: every command to a device, from ``queued`` to ``acked | failed | expired``.

It is the only writer of the commands (``storage.command_sql``). What comes in:

* :meth:`CommandActor.submit` (the API, an *ask*): create a command, or find the one an
  idempotency key made before, and answer with it once it is committed.
* :meth:`CommandActor.hint` (the broker bridge, never waits): a device connected or
  subscribed, so its waiting commands may be deliverable now.
* :meth:`CommandActor.ack_nowait`, or :meth:`CommandActor.ack` when the mailbox is full (the
  broker bridge's ``admit``, from the fast path's reader or amqtt's PUBLISH task): a device's
  acknowledgement. Its completion resolves once the state change it caused is committed, so
  the PUBACK goes out after that, as for telemetry.

Timing rules (``CommandConfig``, from the node's settings): a command is delivered as soon as
its device is connected *and* subscribed to its ``commands`` topic (:class:`Deliverer` says
whether that worked). A ``sent`` command with no ack after ``ack_timeout`` is sent again with
the same ``command_id``, up to ``max_attempts`` deliveries in all; a device that connects or
subscribes again gets its ``sent`` commands again too, because the last delivery may have gone
with its old connection. Past ``expires_at`` a command that is not final becomes ``expired``,
sent or not. A hint that finds no live session (amqtt reports a connect before the node lists
the session as live) is tried again after ``hint_retries``; queued commands are also offered
every ``sweep`` seconds, in case a hint was lost. A reconnect resends only what was sent before
it, so a subscribe right after a connect does not send everything twice.

Timers run on ``anyio.current_time()`` (tests use trio's autojump clock); times stored come
from the wall ``clock``. Changes of each drained batch are written in one transaction; when the
store fails they are kept and retried with backoff, and the acks that caused them are not
acknowledged meanwhile. After a crash, :meth:`CommandActor.run` writes what was left and reloads
the unfinished commands, so nothing depends on memory: commands survive a node restart in the
state they were in, and a ``sent`` one is sent again when its device is back.

This module must never import an I/O library, and never make the broker bridge wait on a hint.
"""

from __future__ import annotations

import enum
import heapq
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import anyio
from ulid import ULID

from actors.mailbox import Mailbox
from actors.messages import Completion, Outcome
from actors.stats import CommandStats
from storage.command_contract import Ack, AckStatus, CommandState, command_payload, decode_ack
from storage.contract import Rejection
from storage.errors import CommandConflict, NodeError, StorageError
from storage.interfaces import CommandStore
from storage.records import CommandChange, CommandRecord, NewCommand, QuarantinedAck

log = logging.getLogger(__name__)


class Delivery(enum.Enum):
    SENT = "sent"
    #: The device has no live connection.
    NOT_CONNECTED = "not_connected"
    #: Connected, but not (yet) subscribed to its ``commands`` topic.
    NOT_SUBSCRIBED = "not_subscribed"


class Deliverer(Protocol):
    def deliver(self, device_id: str, payload: bytes) -> Delivery:
        """Hand *payload* to *device_id*'s session for a QoS 1 PUBLISH on its ``commands``
        topic, without waiting for the device; say whether that was possible."""
        ...


class CommandsUnavailable(NodeError):  # noqa: N818 - reads as what happened
    """The command actor is not running (stopping, or down past its restart limit)."""


#: Why an ack was ignored (metric label values, a closed set).
IGNORED_UNKNOWN: Final = "unknown"
IGNORED_OTHER_DEVICE: Final = "other_device"
IGNORED_FINISHED: Final = "finished"


@dataclass(frozen=True, slots=True)
class CommandConfig:
    ack_timeout: float = 30.0
    max_attempts: int = 5
    #: How often queued commands are offered to the deliverer without a hint.
    sweep: float = 30.0
    #: Submits and acks wait for room (backpressure); hints are dropped and counted when full.
    capacity: int = 1024
    max_batch: int = 256
    #: Delays before a connect hint that found no live session is tried again.
    hint_retries: tuple[float, ...] = (0.2, 1.0, 3.0)
    retry_initial: float = 0.5
    retry_max: float = 30.0


@dataclass(frozen=True, slots=True)
class CommandRequest:
    name: str
    args: dict[str, Any]
    ttl_s: int
    idempotency_key: str | None = None

    def canonical(self) -> str:
        """What must match for a repeated idempotency key to mean the same command."""
        return json.dumps(
            {"name": self.name, "args": self.args, "ttl_s": self.ttl_s}, sort_keys=True, separators=(",", ":")
        )


class _Reply:
    """The answer to one :meth:`CommandActor.submit`: a result or an exception, set once."""

    __slots__ = ("_event", "error", "result")

    def __init__(self) -> None:
        self._event = anyio.Event()
        self.result: tuple[CommandRecord, bool] | None = None
        self.error: Exception | None = None

    def set(self, result: tuple[CommandRecord, bool] | None = None, error: Exception | None = None) -> None:
        if not self._event.is_set():
            self.result, self.error = result, error
            self._event.set()

    async def wait(self) -> tuple[CommandRecord, bool]:
        await self._event.wait()
        if self.error is not None:
            raise self.error
        assert self.result is not None  # noqa: S101 - set together with the event
        return self.result


@dataclass(slots=True)
class _Submit:
    device_id: str
    request: CommandRequest
    key_id: str | None
    reply: _Reply


@dataclass(slots=True)
class _Hint:
    device_id: str
    #: Wall time of the connect or subscribe: what was sent before it goes again.
    at: float


@dataclass(slots=True)
class _AckIn:
    device_id: str
    topic: str
    payload: bytes
    received_at: float
    done: Completion | None


type _Message = _Submit | _Hint | _AckIn


@dataclass(slots=True)
class _Pending:
    command_id: str
    device_id: str
    state: CommandState
    expires_at: float
    payload: bytes
    attempts: int = 0
    last_sent_at: float | None = None
    #: Anyio time at which a ``sent`` command is sent again (inf: not before a hint).
    resend_at: float = math.inf


_SWEEP: Final = "@sweep"
#: Timer keys of hint retries: this prefix and the device id (command ids never start so).
_HINT: Final = "@hint:"


class CommandActor:
    def __init__(
        self,
        store: CommandStore,
        deliverer: Deliverer,
        stats: CommandStats,
        config: CommandConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._deliverer = deliverer
        self._stats = stats
        self._config = config or CommandConfig()
        self._clock = clock
        self.mailbox: Mailbox[_Message] = Mailbox(self._config.capacity)
        self._pending: dict[str, _Pending] = {}
        #: device → its unfinished commands, oldest first (dicts keep insertion order).
        self._by_device: dict[str, dict[str, _Pending]] = {}
        #: One timer per command (resend or expiry, whichever is first) and the sweep.
        self._timers: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        #: device → (time of its last connect or subscribe, retries made) while retrying.
        self._hint_retry: dict[str, tuple[float, int]] = {}
        self._changes: list[CommandChange] = []
        self._quarantined: list[QuarantinedAck] = []
        #: Completions of acks whose state change is not committed yet.
        self._waiting: list[Completion] = []
        self._retry_at = -math.inf
        self._retry_delay = self._config.retry_initial

    # -- what others call ------------------------------------------------------------------------

    async def submit(
        self, device_id: str, request: CommandRequest, key_id: str | None = None
    ) -> tuple[CommandRecord, bool]:
        """Create a command (or find its idempotent twin) once committed: ``(command, created)``.

        Raises :class:`~storage.errors.CommandConflict`, :class:`~storage.errors.StorageError`
        or :class:`CommandsUnavailable`.
        """
        reply = _Reply()
        try:
            await self.mailbox.send(_Submit(device_id, request, key_id, reply))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError) as exc:
            raise CommandsUnavailable("the command actor is not running") from exc
        return await reply.wait()

    def hint(self, device_id: str) -> None:
        """*device_id* connected or subscribed: try its waiting commands. Never waits; a hint
        lost to a full mailbox is counted, and the periodic sweep makes up for it."""
        try:
            self.mailbox.send_nowait(_Hint(device_id, self._clock()))
        except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._stats.hints_dropped += 1

    def ack_nowait(
        self, device_id: str, topic: str, payload: bytes, received_at: float, done: Completion | None
    ) -> bool:
        """Hand over an ack PUBLISH without waiting (the broker's synchronous way in,
        ``Bridge.admit``); *done* resolves once its outcome is committed. False when the
        mailbox is full: the caller then awaits :meth:`ack` (the backpressure)."""
        try:
            self.mailbox.send_nowait(_AckIn(device_id, topic, payload, received_at, done))
        except anyio.WouldBlock:
            return False
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            if done is not None:
                done.resolve(Outcome.FAILED)
        return True

    async def ack(
        self, device_id: str, topic: str, payload: bytes, received_at: float, done: Completion | None
    ) -> None:
        """Hand over an ack PUBLISH, waiting for room; *done* resolves once its outcome is committed."""
        try:
            await self.mailbox.send(_AckIn(device_id, topic, payload, received_at, done))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            if done is not None:
                done.resolve(Outcome.FAILED)

    # -- the loop --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Apply messages and timers until the mailbox is closed and drained, then save."""
        if self._changes or self._quarantined:
            await self._write()
        self._load(await self._store.unfinished_commands())
        while True:
            batch: list[_Message] = []
            with anyio.move_on_after(max(self._next_wakeup() - anyio.current_time(), 0.0)):
                try:
                    batch = await self.mailbox.receive_batch(self._config.max_batch)
                except anyio.EndOfStream:
                    await self._save(final=True)
                    return
            for i, msg in enumerate(batch):
                try:
                    await self._apply(msg)
                except BaseException:
                    # The rest of the batch left the mailbox too: nobody else would answer it.
                    # Acks already applied wait in `_waiting`; the restarted run() saves them.
                    _abandon(batch[i:])
                    raise
            self._fire_due(anyio.current_time())
            await self._save()

    def fail_waiting(self) -> None:
        """The actor has stopped for good: its unsaved acks are not acknowledged."""
        for done in self._waiting:
            done.resolve(Outcome.FAILED)
        self._waiting.clear()
        _abandon(self.mailbox.drain_nowait(1 << 30))

    async def _apply(self, msg: _Message) -> None:
        if isinstance(msg, _Submit):
            await self._submit(msg)
        elif isinstance(msg, _Hint):
            self._hinted(msg.device_id, msg.at, 0)
        else:
            await self._ack(msg)

    def _load(self, records: list[CommandRecord]) -> None:
        """Take the unfinished commands of the store as the truth (at start and after a crash)."""
        self._pending.clear()
        self._by_device.clear()
        self._timers.clear()
        self._heap.clear()
        self._hint_retry.clear()
        self._stats.pending.clear()
        for r in records:
            p = _Pending(
                r.command_id,
                r.device_id,
                CommandState(r.state),
                r.expires_at,
                command_payload(r.command_id, r.name, r.args, r.expires_at),
                r.attempts,
                r.last_sent_at,
            )
            self._track(p)
        self._set_timer(_SWEEP, anyio.current_time() + self._config.sweep)
        # Whatever was sent before a restart goes again once its device is back (a hint); the
        # ones whose devices are connected already (an actor crash, not a node restart) now.
        now = self._clock()
        for device_id in list(self._by_device):
            self._offer(device_id, resend_before=now)

    # -- commands --------------------------------------------------------------------------------

    async def _submit(self, msg: _Submit) -> None:
        req = msg.request
        now = self._clock()
        command_id = str(ULID.from_timestamp(now))
        new = NewCommand(
            command_id=command_id,
            device_id=msg.device_id,
            name=req.name,
            args=req.args,
            created_at=now,
            expires_at=now + req.ttl_s,
            request=req.canonical(),
            created_by=msg.key_id,
            idempotency_key=req.idempotency_key,
        )
        try:
            record, created = await self._store.create_command(new)
        except (CommandConflict, StorageError) as exc:
            msg.reply.set(error=exc)
            return
        msg.reply.set((record, created))
        if not created:
            return
        self._stats.count(CommandState.QUEUED)
        p = _Pending(command_id, msg.device_id, CommandState.QUEUED, new.expires_at, b"")
        p.payload = command_payload(command_id, req.name, req.args, new.expires_at)
        self._track(p)
        self._offer(msg.device_id)

    def _track(self, p: _Pending) -> None:
        self._pending[p.command_id] = p
        self._by_device.setdefault(p.device_id, {})[p.command_id] = p
        self._stats.pending[p.state.value] = self._stats.pending.get(p.state.value, 0) + 1
        self._schedule(p)

    def _hinted(self, device_id: str, at: float, retry: int) -> None:
        """A connect or subscribe at *at*. amqtt reports a connect before the node has the
        session among its live ones, so a hint that finds the device not connected is tried
        again a few times (``hint_retries``) before the sweep is left to it."""
        retries = self._config.hint_retries
        if self._offer(device_id, resend_before=at) is Delivery.NOT_CONNECTED and retry < len(retries):
            self._hint_retry[device_id] = (at, retry + 1)
            self._set_timer(_HINT + device_id, anyio.current_time() + retries[retry])

    def _offer(self, device_id: str, *, resend_before: float | None = None) -> Delivery:
        """Deliver what *device_id* is waiting for: queued commands, sent ones whose resend is
        due, and after a (re)connect at *resend_before* also the sent ones last sent before
        it, whose delivery may have gone with the old link. Returns why it stopped, if it did."""
        commands = self._by_device.get(device_id)
        if not commands:
            return Delivery.SENT
        now = anyio.current_time()
        max_attempts = self._config.max_attempts
        for p in list(commands.values()):
            reconnected = (
                resend_before is not None and p.attempts < max_attempts and (p.last_sent_at or 0.0) < resend_before
            )
            due = p.state is CommandState.QUEUED or reconnected or p.resend_at <= now
            if due and (result := self._send(p)) is not Delivery.SENT:
                return result  # the device is not reachable: the rest would not be either
        return Delivery.SENT

    def _send(self, p: _Pending) -> Delivery:
        if self._clock() >= p.expires_at:
            self._finish(p, CommandState.EXPIRED, self._expiry_detail(p))
            return Delivery.SENT
        result = self._deliverer.deliver(p.device_id, p.payload)
        if result is not Delivery.SENT:
            if p.state is CommandState.SENT:
                p.resend_at = math.inf  # again at the next hint or sweep
                self._schedule(p)
            return result
        resend = p.state is CommandState.SENT
        p.attempts += 1
        p.last_sent_at = self._clock()
        self._move(p, CommandState.SENT)
        if resend:
            self._stats.resends += 1
        detail = f"attempt {p.attempts}" + (" (resent, no ack yet)" if resend else "")
        self._changes.append(
            CommandChange(p.command_id, CommandState.SENT.value, p.last_sent_at, p.attempts, p.last_sent_at, detail)
        )
        more = p.attempts < self._config.max_attempts
        p.resend_at = anyio.current_time() + self._config.ack_timeout if more else math.inf
        self._schedule(p)
        return Delivery.SENT

    def _move(self, p: _Pending, state: CommandState) -> None:
        if p.state is not state:
            self._stats.pending[p.state.value] -= 1
            if not state.final:
                self._stats.pending[state.value] = self._stats.pending.get(state.value, 0) + 1
            self._stats.count(state)
            p.state = state

    def _finish(self, p: _Pending, state: CommandState, detail: str) -> None:
        self._move(p, state)
        self._changes.append(
            CommandChange(p.command_id, state.value, self._clock(), p.attempts, p.last_sent_at, detail)
        )
        del self._pending[p.command_id]
        commands = self._by_device[p.device_id]
        del commands[p.command_id]
        if not commands:
            del self._by_device[p.device_id]
        self._timers.pop(p.command_id, None)
        if state is CommandState.EXPIRED:
            self._stats.expirations += 1
        log.info("command %s to %s %s: %s", p.command_id, p.device_id, state.value, detail)

    def _expiry_detail(self, p: _Pending) -> str:
        if p.attempts == 0:
            return "expired before it could be sent (device not connected and subscribed)"
        return f"no ack before it expired ({p.attempts} attempts)"

    # -- acks ------------------------------------------------------------------------------------

    async def _ack(self, msg: _AckIn) -> None:
        decoded = decode_ack(msg.payload)
        if isinstance(decoded, Rejection):
            self._stats.count_quarantined(decoded.reason.value)
            self._quarantined.append(
                QuarantinedAck(msg.device_id, msg.topic, msg.received_at, msg.payload, decoded.reason, decoded.detail)
            )
            log.warning("command ack from %s quarantined (%s): %s", msg.device_id, decoded.reason, decoded.detail)
            self._wait_for_save(msg.done)
            return
        p = self._pending.get(decoded.command_id)
        if p is None or p.device_id != msg.device_id:
            await self._ignore(msg, decoded, p)
            return
        state = CommandState.ACKED if decoded.status is AckStatus.OK else CommandState.FAILED
        detail = decoded.status.value + (f": {decoded.detail}" if decoded.detail else "")
        self._finish(p, state, detail)
        self._wait_for_save(msg.done)

    async def _ignore(self, msg: _AckIn, ack: Ack, pending: _Pending | None) -> None:
        if pending is not None:
            reason = IGNORED_OTHER_DEVICE
        else:
            try:
                owner = await self._store.command_owner(ack.command_id)
            except StorageError:
                log.exception("looking up the command of an ack failed; not acknowledging it")
                if msg.done is not None:
                    msg.done.resolve(Outcome.FAILED)
                return
            if owner is None:
                reason = IGNORED_UNKNOWN
            else:
                reason = IGNORED_OTHER_DEVICE if owner[0] != msg.device_id else IGNORED_FINISHED
        self._stats.acks_ignored[reason] = self._stats.acks_ignored.get(reason, 0) + 1
        log.warning("ignored an ack from %s for command %s: %s", msg.device_id, ack.command_id, reason)
        # Nothing to commit: acknowledge it at once (a resend would be ignored the same way).
        if msg.done is not None:
            msg.done.resolve(Outcome.DURABLE)

    def _wait_for_save(self, done: Completion | None) -> None:
        if done is not None:
            self._waiting.append(done)

    # -- timers and saving -----------------------------------------------------------------------

    def _schedule(self, p: _Pending) -> None:
        expiry = anyio.current_time() + max(0.0, p.expires_at - self._clock())
        self._set_timer(p.command_id, min(expiry, p.resend_at))

    def _set_timer(self, key: str, when: float) -> None:
        # Superseded heap entries stay until they reach the top and are skipped there.
        self._timers[key] = when
        heapq.heappush(self._heap, (when, key))

    def _next_wakeup(self) -> float:
        heap = self._heap
        while heap and self._timers.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        wakeup = heap[0][0] if heap else math.inf
        unsaved = self._changes or self._quarantined
        return min(wakeup, self._retry_at) if unsaved else wakeup

    def _fire_due(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, key = heapq.heappop(heap)
            if self._timers.get(key) != when:
                continue
            del self._timers[key]
            if key == _SWEEP:
                self._set_timer(_SWEEP, now + self._config.sweep)
                for device_id in [d for d, cs in self._by_device.items() if _has_queued(cs)]:
                    self._offer(device_id)
                continue
            if key.startswith(_HINT):
                device_id = key.removeprefix(_HINT)
                at, retry = self._hint_retry.pop(device_id, (0.0, 0))
                self._hinted(device_id, at, retry)
                continue
            p = self._pending.get(key)
            if p is None:
                continue
            if self._clock() >= p.expires_at:
                self._finish(p, CommandState.EXPIRED, self._expiry_detail(p))
            elif p.resend_at <= now:
                self._send(p)
            else:
                self._schedule(p)

    async def _save(self, *, final: bool = False) -> None:
        if not (self._changes or self._quarantined) or (not final and anyio.current_time() < self._retry_at):
            self._release()
            return
        try:
            await self._write()
        except StorageError:
            if final:
                log.exception("%d command changes could not be saved at shutdown", len(self._changes))
                self.fail_waiting()
                return
            log.exception("saving %d command changes failed, retrying in %.1f s", len(self._changes), self._retry_delay)
            self._retry_at = anyio.current_time() + self._retry_delay
            self._retry_delay = min(self._retry_delay * 2, self._config.retry_max)
            return
        self._retry_at = -math.inf
        self._retry_delay = self._config.retry_initial
        self._release()

    async def _write(self) -> None:
        changes, quarantined = list(self._changes), list(self._quarantined)
        await self._store.write_command_changes(changes, quarantined)
        # Only this task appends to these lists, and not while the write is awaited.
        del self._changes[: len(changes)]
        del self._quarantined[: len(quarantined)]

    def _release(self) -> None:
        """Acknowledge the acks whose changes are committed (all, when nothing is unsaved)."""
        if self._changes or self._quarantined:
            return
        for done in self._waiting:
            done.resolve(Outcome.DURABLE)
        self._waiting.clear()


def _abandon(messages: list[_Message]) -> None:
    """Answer messages that will not be handled: acks are not acknowledged (the device sends
    them again), submits fail (the API answers 503; a retry with the idempotency key is safe)."""
    for msg in messages:
        if isinstance(msg, _AckIn) and msg.done is not None:
            msg.done.resolve(Outcome.FAILED)
        elif isinstance(msg, _Submit):
            msg.reply.set(error=CommandsUnavailable("the command actor stopped"))


def _has_queued(commands: dict[str, _Pending]) -> bool:
    return any(p.state is CommandState.QUEUED for p in commands.values())
