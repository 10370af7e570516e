"""The seams between the actors and storage, as :class:`typing.Protocol` classes.

Actors depend on these, never on SQLite: tests give them in-memory fakes, the node gives them
:class:`storage.sqlite.SqliteStore`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from storage.audit import AuditEntry
from storage.records import (
    AlertRecord,
    AlertWrite,
    Backlog,
    CommandChange,
    CommandRecord,
    DeviceBatch,
    DeviceStateRecord,
    EnergyHead,
    EnergyInput,
    EnergyNeighbours,
    EnergyPeriod,
    EnergyReading,
    HistoryCutoffs,
    NewCommand,
    PruneResult,
    QuarantinedAck,
    RetentionPolicy,
)
from storage.validation import DeviceContext


class IngestStore(Protocol):
    async def load_device_state(self, device_id: str) -> DeviceStateRecord | None:
        """The last committed state of *device_id*, or None for a device never heard from."""
        ...

    async def commit(self, batches: Sequence[DeviceBatch]) -> None:
        """Write all *batches* in one transaction; raise :class:`storage.errors.StorageError` on failure."""
        ...

    async def load_device_context(self, device_id: str, boot: int | None) -> DeviceContext:
        """What the validation rules need: the device's type and supply system, and the
        registers of its newest stored reading in *boot* (its current boot)."""
        ...


class AlertStore(Protocol):
    async def uncleared_alerts(self) -> list[AlertRecord]:
        """Every alert whose state is ``open`` or ``acknowledged``."""
        ...

    async def write_alerts(self, writes: Sequence[AlertWrite]) -> None:
        """Apply *writes* in order, in one transaction; raise :class:`storage.errors.StorageError` on failure."""
        ...


class CommandStore(Protocol):
    async def unfinished_commands(self) -> list[CommandRecord]:
        """Every command whose state is ``queued`` or ``sent``, oldest first."""
        ...

    async def create_command(self, new: NewCommand) -> tuple[CommandRecord, bool]:
        """Insert *new* as ``queued`` (``created`` True), or return the command its idempotency
        key made before (False); raise :class:`storage.errors.CommandConflict` when that one
        was a different request, :class:`storage.errors.StorageError` on failure."""
        ...

    async def command_owner(self, command_id: str) -> tuple[str, str] | None:
        """``(device_id, state)`` of *command_id*, None when unknown."""
        ...

    async def write_command_changes(
        self, changes: Sequence[CommandChange], quarantined: Sequence[QuarantinedAck]
    ) -> None:
        """Apply *changes* in order and keep *quarantined*, in one transaction; raise
        :class:`storage.errors.StorageError` on failure."""


class AuditSink(Protocol):
    async def record_audit(self, entry: AuditEntry) -> None:
        """Append *entry* to the audit log (e.g. ``command_sent``); raise
        :class:`storage.errors.StorageError` on failure. :class:`storage.sqlite.SqliteStore`
        implements it on its writer connection."""


class Forwardable(Protocol):
    """A row a forwarder sends: it carries its rowid in the source table."""

    @property
    def id(self) -> int: ...


class ForwardSource[T: Forwardable](Protocol):
    """A consumer's cursor over one source table (:class:`storage.outbox.CursorSource`)."""

    async def position(self) -> int:
        """The last rowid confirmed (0 when none)."""
        ...

    async def next_batch(self, after: int, limit: int) -> list[T]:
        """Up to *limit* rows after rowid *after*, oldest first, always a prefix of what follows."""
        ...

    async def confirm(self, position: int, at: float | None) -> int:
        """Persist the cursor at *position* (never backwards), with a mark at wall time *at*
        unless that is None; returns the cursor."""
        ...

    async def backlog(self, after: int) -> Backlog:
        """Rows, estimated bytes and oldest receipt time of what lies after *after*."""
        ...

    async def drop_oldest(self, after: int, rows: int) -> int:
        """Skip the oldest *rows* rows after *after* for good; returns the new position."""
        ...


class ForwardSink[T](Protocol):
    """Where a forwarder delivers: InfluxDB (:mod:`storage.influx_sink`), S3 (:mod:`storage.s3_sink`)."""

    async def send(self, rows: Sequence[T]) -> None:
        """Deliver *rows*; return only once the sink confirmed all of them. Sending the same rows
        again must leave the sink as one send did (replays after a restart). Raise
        :class:`storage.errors.SinkError` for anything worth retrying."""
        ...


class RetentionStore(Protocol):
    async def prune_step(self, policy: RetentionPolicy, forwarded_before: float, limit: int) -> PruneResult:
        """Delete at most *limit* rows of one table that retention allows (:mod:`storage.retention`)."""
        ...

    async def prune_history_step(self, policy: RetentionPolicy, cutoffs: HistoryCutoffs, limit: int) -> PruneResult:
        """Delete at most *limit* old rows of one history table (:mod:`storage.history_retention`)."""
        ...


class EnergyStore(Protocol):
    """What the energy aggregator (``actors.energy_aggregator``) reads and writes."""

    async def energy_cursor(self) -> int:
        """The last telemetry rowid already aggregated (0 before the first run)."""
        ...

    async def new_readings(self, after: int, limit: int) -> list[EnergyInput]:
        """Up to *limit* telemetry rows with a rowid above *after*, in rowid order."""
        ...

    async def neighbours(
        self, keys: Sequence[tuple[str, int, int]], old_until: int, until: int
    ) -> list[EnergyNeighbours]:
        """For each ``(device_id, boot, seq)``: its neighbours among rowids <= *until*, and among
        rowids <= *old_until*."""
        ...

    async def window_readings(self, windows: Sequence[tuple[str, int, int]], until: int) -> list[list[EnergyReading]]:
        """For each ``(device_id, start_ms, end_ms)``: every reading with a rowid <= *until* that an
        interval touching it needs."""
        ...

    async def heads(self, devices: Sequence[str], until: int) -> list[EnergyHead | None]:
        """For each device, where its readings with a rowid <= *until* end (None: it has none)."""
        ...

    async def save_energy(self, periods: Sequence[tuple[str, EnergyPeriod]], position: int) -> int:
        """Write the changed periods and move the cursor to *position*, in one transaction;
        returns how many periods changed. Raises :class:`storage.errors.StorageError`."""
        ...
