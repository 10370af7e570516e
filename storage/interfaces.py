"""The seams between the actors and storage, as :class:`typing.Protocol` classes.

Actors depend on these, never on SQLite: tests give them in-memory fakes, the node gives them
:class:`storage.sqlite.SqliteStore`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from storage.records import (
    AlertRecord,
    AlertWrite,
    DeviceBatch,
    DeviceStateRecord,
    EnergyInput,
    EnergyNeighbours,
    EnergyPeriod,
    EnergyReading,
)


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


class EnergyStore(Protocol):
    """What the energy aggregator (``actors.energy_aggregator``) reads and writes."""

    async def energy_cursor(self) -> int:
        """The last telemetry rowid already aggregated (0 before the first run)."""
        ...

    async def new_readings(self, after: int, limit: int) -> list[EnergyInput]:
        """Up to *limit* telemetry rows with a rowid above *after*, in rowid order."""
        ...

    async def neighbours(self, keys: Sequence[tuple[str, int, int]], old_until: int) -> list[EnergyNeighbours]:
        """For each ``(device_id, boot, seq)``: its neighbours now and among rowids <= *old_until*."""
        ...

    async def window_readings(self, windows: Sequence[tuple[str, int, int]]) -> list[list[EnergyReading]]:
        """For each ``(device_id, start_ms, end_ms)``: every reading an interval touching it needs."""
        ...

    async def save_energy(self, periods: Sequence[tuple[str, EnergyPeriod]], position: int) -> int:
        """Write the changed periods and move the cursor to *position*, in one transaction;
        returns how many periods changed. Raises :class:`storage.errors.StorageError`."""
        ...
