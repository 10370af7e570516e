"""The seams between the actors and storage, as :class:`typing.Protocol` classes.

Actors depend on these, never on SQLite: tests give them in-memory fakes, the node gives them
:class:`storage.sqlite.SqliteStore`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from storage.records import AlertRecord, AlertWrite, DeviceBatch, DeviceStateRecord
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
