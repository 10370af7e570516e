"""The device actor: one per device, the only place that decides what a device's data means.

It decodes and validates each PUBLISH (JSON or CBOR, one reading or a batch of them), runs
the sequence tracker and the validation rules that need the device (:mod:`storage.validation`:
fields by device type, the voltage range of its supply system, clock skew, registers never
decreasing within a boot) for every reading, keeps liveness (online,
last seen) and hands the result of every drained batch to the storage writer as one
:class:`~storage.records.DeviceBatch`, together with the completions the broker is waiting
on. It never acknowledges anything itself: a completion resolves when the writer committed.
It also tells the alert actor, without waiting, what a batch changed (gaps, stale boots,
quarantines) and when its link went down or up (see :mod:`actors.alerts`).

On start it first waits for the writer to commit everything already submitted (so a restarted
actor never reads state older than what is on its way to disk), then loads its state from
the store, with its profile (type, supply system) and the registers of the newest stored
reading of its current boot. An exception while handling a batch fails that batch's
completions (those messages are not acknowledged, so the device resends them) and propagates
to the supervisor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import anyio

from actors.alerts import OFFLINE_REASONS, AlertRule, AlertSignal, AlertSink
from actors.mailbox import Mailbox
from actors.messages import Completion, DeviceMessage, Link, LinkEvent, Outcome, Publish
from actors.sequence import Counters, SequenceState, SequenceTracker, Verdict
from actors.stats import IngestStats
from actors.writer import StorageWriter, WriteRequest
from storage.contract import (
    DEFAULT_MAX_BATCH_PAYLOAD_BYTES,
    DEFAULT_MAX_PAYLOAD_BYTES,
    Batch,
    Encoding,
    Location,
    Measurements,
    QuarantineReason,
    Reading,
    TopicKind,
    decode_telemetry,
)
from storage.interfaces import IngestStore
from storage.records import DeviceBatch, DeviceEvent, DeviceStateRecord, QuarantineRow, RawMessage, TelemetryRow
from storage.validation import (
    DEFAULT_MAX_FUTURE_SKEW_S,
    DeviceProfile,
    ReadingRules,
    RegisterMark,
    advance,
)

log = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_DUMP_M = Measurements.__pydantic_serializer__.to_json
_DUMP_LOC = Location.__pydantic_serializer__.to_json
_ENCODINGS = {TopicKind.TELEMETRY: Encoding.JSON, TopicKind.TELEMETRY_CBOR: Encoding.CBOR}
#: Rejections that are physically implausible values, which also raise ``implausible_value``.
_IMPLAUSIBLE = frozenset({QuarantineReason.IMPLAUSIBLE_VOLTAGE, QuarantineReason.REGISTER_DECREASED})


@dataclass(frozen=True, slots=True)
class DeviceActorConfig:
    max_batch: int = 256
    idle_timeout: float = 300.0
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    max_batch_payload_bytes: int = DEFAULT_MAX_BATCH_PAYLOAD_BYTES
    #: How far a reading's ``ts`` may be ahead of the node's clock.
    max_future_skew: float = DEFAULT_MAX_FUTURE_SKEW_S


class DeviceActor:
    def __init__(
        self,
        device_id: str,
        mailbox: Mailbox[DeviceMessage],
        *,
        store: IngestStore,
        writer: StorageWriter,
        stats: IngestStats,
        config: DeviceActorConfig,
        may_retire: Callable[[], bool],
        fault_hook: Callable[[str, DeviceMessage], None] | None = None,
        alerts: AlertSink | None = None,
    ) -> None:
        self.device_id = device_id
        self.mailbox = mailbox
        self._store = store
        self._writer = writer
        self._stats = stats
        self._config = config
        self._may_retire = may_retire
        self._fault_hook = fault_hook
        self._tracker = SequenceTracker()
        self._online = False
        self._last_seen: float | None = None
        self._connected_since: float | None = None
        self._events: list[DeviceEvent] = []
        self._alerts = alerts
        # For the alert signals of a batch: set while handling it, read once at its end.
        self._batch_at = 0.0
        self._stale = 0
        self._stale_detail = ""
        self._last_reason = QuarantineReason.SCHEMA
        self._implausible = 0
        self._implausible_detail = ""
        # The validation context, loaded in run().
        self._profile: DeviceProfile | None = None
        self._rules = ReadingRules(None, None, config.max_future_skew)
        self._registers: RegisterMark | None = None
        self._profile_stale = False

    async def run(self) -> None:
        await self._writer.barrier()
        record = await self._store.load_device_state(self.device_id)
        # Always start from what is committed: after a crash the in-memory tracker may hold
        # readings of the failed batch, which were never stored and which the device resends.
        self._tracker = SequenceTracker()
        self._online = False
        self._last_seen = None
        self._connected_since = None
        if record is not None:
            self._tracker = SequenceTracker(
                SequenceState(
                    boot=record.boot,
                    low=record.low,
                    high=record.high,
                    gaps=list(record.gaps),
                    counters=Counters(**record.counters),
                )
            )
            self._online = record.online
            self._last_seen = record.last_seen
            self._connected_since = record.connected_since
        context = await self._store.load_device_context(self.device_id, self._tracker.state.boot)
        self._set_profile(context.profile)
        self._registers = context.registers
        while True:
            with anyio.move_on_after(self._config.idle_timeout) as idle:
                try:
                    batch = await self.mailbox.receive_batch(self._config.max_batch)
                except anyio.EndOfStream:
                    return
            if idle.cancelled_caught:
                if self._may_retire():
                    return
                continue
            await self._handle_batch(batch)

    def reload_profile(self) -> None:
        """Take the device's registration from the store again before the next batch."""
        self._profile_stale = True

    def _set_profile(self, profile: DeviceProfile | None) -> None:
        self._profile = profile
        voltages = None if profile is None else profile.voltages
        self._rules = ReadingRules(profile, voltages, self._config.max_future_skew)

    async def _handle_batch(self, batch: list[DeviceMessage]) -> None:
        completions: list[Completion] = []
        self._events = []
        counters = self._tracker.counters
        missing, resets, quarantined = counters.missing, counters.resets, counters.quarantined
        self._stale = 0
        self._implausible = 0
        try:
            if self._profile_stale:
                # Inside the try: when the store fails, this batch's completions fail too.
                self._profile_stale = False
                self._set_profile((await self._store.load_device_context(self.device_id, None)).profile)
            messages: list[RawMessage] = []
            for item in batch:
                if self._fault_hook is not None:
                    self._fault_hook(self.device_id, item)
                if isinstance(item, Publish):
                    if item.done is not None:
                        completions.append(item.done)
                    raw = self._handle_publish(item)
                    if raw is not None:
                        messages.append(raw)
                else:
                    self._handle_link(item)
            request = WriteRequest(DeviceBatch(self.device_id, messages, self._snapshot(), self._events), completions)
            if self._alerts is not None:
                self._signal_batch(self._alerts, missing, resets, quarantined)
        except BaseException:
            # Fail every completion of the batch, not only those collected so far: the items
            # after the one that raised left the mailbox too, and nobody else will resolve them.
            for item in batch:
                if isinstance(item, Publish) and item.done is not None:
                    item.done.resolve(Outcome.FAILED)
            raise
        await self._writer.submit(request)

    def _handle_link(self, link: Link) -> None:
        connected = link.event is LinkEvent.CONNECTED
        if link.superseded:
            self._events.append(DeviceEvent(link.at, link.event.value, link.detail))
            return
        self._online = connected
        self._connected_since = link.at if connected else None
        self._last_seen = max(self._last_seen or 0.0, link.at)
        if link.will is not None:
            self._events.append(DeviceEvent(link.at, "will_published", link.will))
        self._events.append(DeviceEvent(link.at, link.event.value, link.detail))
        if self._alerts is not None and (connected or link.detail in OFFLINE_REASONS):
            rule = AlertRule.DEVICE_OFFLINE
            self._alerts(AlertSignal(self.device_id, rule, raised=not connected, detail=link.detail, at=link.at))

    def _signal_batch(self, alerts: AlertSink, missing: int, resets: int, quarantined: int) -> None:
        """Tell the alert actor what this batch changed: nothing is built when nothing did.

        *missing*, *resets* and *quarantined* are the counters before the batch.
        """
        c = self._tracker.counters
        dev, at = self.device_id, self._batch_at
        if c.quarantined != quarantined:
            n = c.quarantined - quarantined
            reason = self._last_reason.value
            alerts(AlertSignal(dev, AlertRule.QUARANTINE_BURST, raised=True, detail=reason, at=at, count=n))
        if self._stale:
            detail = self._stale_detail
            alerts(AlertSignal(dev, AlertRule.STALE_BOOT, raised=True, detail=detail, at=at, count=self._stale))
        if self._implausible:
            detail, n = self._implausible_detail, self._implausible
            alerts(AlertSignal(dev, AlertRule.IMPLAUSIBLE_VALUE, raised=True, detail=detail, at=at, count=n))
        if c.missing == missing and c.resets == resets:
            return
        st = self._tracker.state
        if c.resets != resets:
            # The old boot's gaps can never be filled now: its alert ends here.
            detail = f"boot {st.boot} started"
            alerts(AlertSignal(dev, AlertRule.SEQUENCE_GAP, raised=False, detail=detail, at=at))
        open_missing = sum(end - start + 1 for start, end in st.gaps)
        if open_missing:
            detail = f"missing readings in boot {st.boot}: {open_missing}"
            grew = int(c.missing > missing)
            alerts(
                AlertSignal(
                    dev, AlertRule.SEQUENCE_GAP, raised=True, detail=detail, at=at, count=grew, level=open_missing
                )
            )
        elif c.resets == resets:
            alerts(AlertSignal(dev, AlertRule.SEQUENCE_GAP, raised=False, detail="every gap filled", at=at))

    def _handle_publish(self, msg: Publish) -> RawMessage | None:
        self._stats.publishes += 1
        self._batch_at = msg.received_at
        # Liveness (online) comes from the connection events alone: a publish that waited in
        # the mailbox may be handled after its connection's DISCONNECTED event.
        self._last_seen = max(self._last_seen or 0.0, msg.received_at)
        encoding = _ENCODINGS.get(msg.kind)
        if encoding is None:
            # status and command acks change liveness only: acks are not telemetry, the command
            # actor handles them (node.bridge.Bridge.admit) and this is only their sign of life.
            return None
        if msg.over_limit is not None:
            # The bridge found the device over its messages/s or bytes/s limit (ADR 0011): the
            # payload is kept, never decoded (decoding is what the limit protects).
            raw = RawMessage(msg.topic, msg.received_at, msg.payload)
            self._tracker.count_received()
            self._tracker.count_quarantined()
            self._quarantine(raw, QuarantineReason.RATE_LIMITED, msg.over_limit)
            return raw
        cfg = self._config
        result = decode_telemetry(
            msg.payload,
            device_id=self.device_id,
            max_bytes=cfg.max_payload_bytes,
            max_batch_bytes=cfg.max_batch_payload_bytes,
            encoding=encoding,
        )
        raw = RawMessage(msg.topic, msg.received_at, msg.payload)
        if isinstance(result, Reading):
            self._tracker.count_received()
            self._sequence(raw, result, "")
        elif isinstance(result, Batch):
            # Every reading is a message of its own for the rules and the counters; the batch
            # shares one raw payload, archived once, and one transaction with the others.
            for index, item in enumerate(result.items):
                self._tracker.count_received()
                if isinstance(item, Reading):
                    self._sequence(raw, item, f"readings[{index}]: ")
                else:
                    self._tracker.count_quarantined()
                    self._quarantine(raw, item.reason, item.detail)
        else:
            self._tracker.count_received()
            self._tracker.count_quarantined()
            self._quarantine(raw, result.reason, result.detail)
        # A PUBLISH of duplicates only is neither stored nor archived again.
        return raw if raw.telemetry or raw.quarantine else None

    def _sequence(self, raw: RawMessage, reading: Reading, where: str) -> None:
        tracker = self._tracker
        verdict = tracker.peek(reading.boot, reading.seq)
        if verdict is Verdict.DUPLICATE:
            tracker.observe(reading.boot, reading.seq)
            self._stats.readings_duplicate += 1
            return
        if verdict is Verdict.STALE:
            tracker.observe(reading.boot, reading.seq)
            self._stale += 1
            self._stale_detail = f"boot {reading.boot} is lower than the current boot {tracker.state.boot}"
            self._quarantine(raw, QuarantineReason.STALE_BOOT, where + self._stale_detail)
            return
        rejection = self._rules.check(reading, raw.received_at, self._registers)
        tracker.observe(reading.boot, reading.seq, accept=rejection is None)
        if rejection is not None:
            detail = where + rejection.detail
            if rejection.reason in _IMPLAUSIBLE:
                self._implausible += 1
                self._implausible_detail = detail
            self._quarantine(raw, rejection.reason, detail)
            return
        raw.telemetry.append(_row(reading))
        self._registers = advance(self._registers, reading)
        self._stats.readings_stored += 1
        if verdict is Verdict.LATE:
            self._stats.readings_late += 1

    def _quarantine(self, raw: RawMessage, reason: QuarantineReason, detail: str) -> None:
        raw.quarantine.append(QuarantineRow(reason, detail))
        self._stats.count_quarantine(reason.value)
        self._last_reason = reason

    def _snapshot(self) -> DeviceStateRecord:
        st = self._tracker.state
        return DeviceStateRecord(
            device_id=self.device_id,
            boot=st.boot,
            low=st.low,
            high=st.high,
            gaps=tuple(st.gaps),
            counters=st.counters.as_dict(),
            last_seen=self._last_seen,
            online=self._online,
            connected_since=self._connected_since,
        )


def _row(reading: Reading) -> TelemetryRow:
    loc = reading.loc
    return TelemetryRow(
        reading.boot,
        reading.seq,
        (reading.ts - _EPOCH) // _MS,
        # The serializer itself: model_dump_json() is a Python wrapper around the same call.
        _DUMP_M(reading.m, exclude_none=True).decode(),
        None if loc is None else _DUMP_LOC(loc).decode(),
    )
