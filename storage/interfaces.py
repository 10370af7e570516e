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
    CommandChange,
    CommandRecord,
    DeviceBatch,
    DeviceStateRecord,
    NewCommand,
    QuarantinedAck,
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
        ...
