"""Fault injection for tests: make a device actor or the storage writer fail on purpose.

Only tests pass :class:`FaultHooks` to :func:`node.app.run_node`; a node started from the CLI
never has any. They exist so that the supervision and durability guarantees can be shown on
the real node, with real sockets and a real SQLite file, rather than asserted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from actors.messages import DeviceMessage
from storage.interfaces import IngestStore
from storage.records import DeviceBatch, DeviceStateRecord
from storage.validation import DeviceContext


@dataclass(frozen=True, slots=True)
class FaultHooks:
    #: Called by a device actor for every message it handles; raising crashes the actor.
    device: Callable[[str, DeviceMessage], None] | None = None
    #: Called before every group commit; raising ``StorageError`` fails the commit.
    commit: Callable[[], None] | None = None


class FaultyStore:
    """An :class:`IngestStore` that runs a hook before each commit of the store it wraps."""

    def __init__(self, inner: IngestStore, before_commit: Callable[[], None]) -> None:
        self._inner = inner
        self._before_commit = before_commit

    async def load_device_state(self, device_id: str) -> DeviceStateRecord | None:
        return await self._inner.load_device_state(device_id)

    async def load_device_context(self, device_id: str, boot: int | None) -> DeviceContext:
        return await self._inner.load_device_context(device_id, boot)

    async def commit(self, batches: Sequence[DeviceBatch]) -> None:
        self._before_commit()
        await self._inner.commit(batches)
