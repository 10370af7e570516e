"""The seams between the actors and storage, as :class:`typing.Protocol` classes.

Actors depend on these, never on SQLite: tests give them in-memory fakes, the node gives them
:class:`storage.sqlite.SqliteStore`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from storage.audit import AuditEntry
from storage.records import AlertRecord, AlertWrite, DeviceBatch, DeviceStateRecord


class IngestStore(Protocol):
    async def load_device_state(self, device_id: str) -> DeviceStateRecord | None:
        """The last committed state of *device_id*, or None for a device never heard from."""
        ...

    async def commit(self, batches: Sequence[DeviceBatch]) -> None:
        """Write all *batches* in one transaction; raise :class:`storage.errors.StorageError` on failure."""
        ...


class AlertStore(Protocol):
    async def uncleared_alerts(self) -> list[AlertRecord]:
        """Every alert whose state is ``open`` or ``acknowledged``."""
        ...

    async def write_alerts(self, writes: Sequence[AlertWrite]) -> None:
        """Apply *writes* in order, in one transaction; raise :class:`storage.errors.StorageError` on failure."""
        ...


class AuditSink(Protocol):
    async def record_audit(self, entry: AuditEntry) -> None:
        """Append *entry* to the audit log (e.g. ``command_sent``); raise
        :class:`storage.errors.StorageError` on failure. :class:`storage.sqlite.SqliteStore`
        implements it on its writer connection."""
        ...
