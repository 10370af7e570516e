"""The storage writer actor: the only writer of the SQLite file, committing in groups.

Every device actor sends one :class:`WriteRequest` per drained batch. The writer takes all
requests that are waiting (up to ``max_group``), commits them in one transaction, and only
then resolves their completions, which is when the broker sends the PUBACKs.

When a commit fails, the writer keeps the group and retries it with backoff for as long as it
takes: nothing is acknowledged meanwhile, the bounded mailboxes fill, and the meters' own
in-flight windows stop them. Nothing is dropped. On shutdown the writer commits what is
queued before it returns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import anyio

from actors.mailbox import Mailbox
from actors.messages import Completion, Outcome
from actors.stats import IngestStats
from storage.errors import StorageError
from storage.interfaces import IngestStore
from storage.records import DeviceBatch

log = logging.getLogger(__name__)


@dataclass(slots=True)
class WriteRequest:
    batch: DeviceBatch | None
    completions: list[Completion] = field(default_factory=list)


class StorageWriter:
    def __init__(
        self,
        store: IngestStore,
        stats: IngestStats,
        *,
        capacity: int = 4096,
        max_group: int = 512,
        retry_initial: float = 0.05,
        retry_max: float = 5.0,
    ) -> None:
        self._store = store
        self._stats = stats
        self.mailbox: Mailbox[WriteRequest] = Mailbox(capacity)
        self._max_group = max_group
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        #: The group being committed: kept across a crash of :meth:`run` so a restart retries it.
        self._pending: list[WriteRequest] = []

    async def submit(self, request: WriteRequest) -> None:
        await self.mailbox.send(request)

    async def barrier(self) -> None:
        """Return once everything submitted before this call is committed."""
        done = Completion()
        await self.mailbox.send(WriteRequest(None, [done]))
        await done.wait()

    async def run(self) -> None:
        """Commit groups until the mailbox is closed and drained."""
        while True:
            if not self._pending:
                try:
                    self._pending = await self.mailbox.receive_batch(self._max_group)
                except anyio.EndOfStream:
                    return
            await self._commit_with_retry(self._pending)
            for request in self._pending:
                for completion in request.completions:
                    completion.resolve(Outcome.DURABLE)
            self._pending = []

    def fail_pending(self) -> None:
        """Resolve everything still held as FAILED and close the mailbox (the node has stopped)."""
        for request in self._pending:
            for completion in request.completions:
                completion.resolve(Outcome.FAILED)
        self._pending = []
        for request in self.mailbox.drain_nowait(1 << 30):
            for completion in request.completions:
                completion.resolve(Outcome.FAILED)
        self.mailbox.close()

    async def _commit_with_retry(self, group: list[WriteRequest]) -> None:
        batches = [r.batch for r in group if r.batch is not None]
        if not batches:
            return
        delay = self._retry_initial
        while True:
            started = anyio.current_time()
            try:
                await self._store.commit(batches)
            except StorageError:
                self._stats.commit_failures += 1
                log.exception("commit of %d batches failed, retrying in %.2f s", len(batches), delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, self._retry_max)
                continue
            self._stats.commits += 1
            self._stats.commit_rows += sum(len(b.messages) for b in batches)
            self._stats.commit_seconds += anyio.current_time() - started
            return
