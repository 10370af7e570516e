"""Bounded mailboxes drained in batches.

A mailbox is a bounded FIFO queue with one receiver. Senders inside the node use
``await send`` and so feel backpressure when an actor falls behind; nothing is ever dropped.
Receivers take everything that is already waiting after one awaited wake-up: a plain
``send``/``receive`` hop costs ~13 µs on asyncio, draining a ready batch costs <1 µs per
message, and the storage writer turns a batch into one transaction.

It is its own small queue rather than an anyio memory object stream (which it was until
issue #7's CPU trims): the stream's ``receive`` always passes a checkpoint (one more trip
through the event loop for a task that already has its item), raises and catches
``WouldBlock`` to find the buffer empty, and registers each waiting receiver in two
collections. Every device actor wakes once per batch, so that was a few µs per batch on the
ingest path. The semantics are the stream's, as far as the node uses them (and
``tests/unit/test_mailbox.py`` pins them): FIFO across blocked senders, ``send_nowait``
raising :class:`anyio.WouldBlock` while senders wait for room, :meth:`close_sending` ending
the stream after the receiver drained it and withdrawing blocked sends
(:class:`anyio.ClosedResourceError`), :meth:`close` closing both ends (a blocked send gets
:class:`anyio.BrokenResourceError`, as from a stream whose receiver closed). Waiting uses
:class:`anyio.Event`, so it runs on asyncio and trio alike.
"""

from __future__ import annotations

import collections

import anyio


class _Blocked[T]:
    """A sender waiting for room; the receiver moves its item in when it makes room."""

    __slots__ = ("event", "item", "taken")

    def __init__(self, item: T) -> None:
        self.event = anyio.Event()
        self.item = item
        self.taken = False


class Mailbox[T]:
    """A bounded, multi-sender, single-receiver queue of ``T``.

    ``capacity`` bounds memory per actor; the default suits a device actor (a meter's QoS 1
    in-flight window is small, 20 for most clients, and a batched upload is one message).
    """

    __slots__ = ("_blocked", "_items", "_receive_closed", "_receiver", "_send_closed", "capacity")

    def __init__(self, capacity: int = 1024) -> None:
        if capacity < 1:
            msg = f"a mailbox needs a capacity of at least 1, got {capacity}"
            raise ValueError(msg)
        self.capacity = capacity
        # Memory per idle device actor counts (issue #7: <= 25 KB per connected device): an
        # empty list is 56 bytes where a deque is ~760, and most mailboxes never block a sender.
        self._items: list[T] = []
        #: Senders waiting for room, in the order they blocked (created when one first blocks).
        self._blocked: collections.deque[_Blocked[T]] | None = None
        #: The receiver's wake-up while it waits for the first item of a batch.
        self._receiver: anyio.Event | None = None
        self._send_closed = False
        self._receive_closed = False

    def __repr__(self) -> str:
        return f"Mailbox(capacity={self.capacity}, queued={len(self._items)})"

    async def send(self, item: T) -> None:
        """Enqueue *item*, waiting while the mailbox is full.

        Without waiting when there is room: no checkpoint, which keeps messages from one
        connection in arrival order.
        """
        try:
            self.send_nowait(item)
        except anyio.WouldBlock:
            pass
        else:
            return
        blocked = _Blocked(item)
        waiting = self._blocked
        if waiting is None:
            waiting = self._blocked = collections.deque()
        waiting.append(blocked)
        try:
            await blocked.event.wait()
        finally:
            if not blocked.taken and blocked in waiting:
                waiting.remove(blocked)
        if not blocked.taken:
            # Woken by a close, not by room.
            if self._receive_closed:
                raise anyio.BrokenResourceError
            raise anyio.ClosedResourceError

    def send_nowait(self, item: T) -> None:
        """Enqueue *item* or raise :class:`anyio.WouldBlock` when full (or while blocked
        senders wait for room: they come first)."""
        if self._send_closed:
            raise anyio.ClosedResourceError
        if self._receive_closed:
            raise anyio.BrokenResourceError
        if self._blocked or len(self._items) >= self.capacity:
            raise anyio.WouldBlock
        self._items.append(item)
        receiver = self._receiver
        if receiver is not None:
            self._receiver = None
            receiver.set()

    async def receive_batch(self, max_items: int) -> list[T]:
        """Wait for one item, then take up to *max_items* - 1 more that are ready.

        Raises :class:`anyio.EndOfStream` only when nothing is left: after :meth:`close_sending`
        the last items still come out as a (short) batch, and the next call ends the stream.
        """
        while not self._items:
            if self._receive_closed:
                raise anyio.ClosedResourceError
            if self._send_closed:
                raise anyio.EndOfStream
            event = self._receiver = anyio.Event()
            try:
                await event.wait()
            finally:
                if self._receiver is event:
                    self._receiver = None
        if self._receive_closed:
            raise anyio.ClosedResourceError
        return self._take(max_items)

    def drain_nowait(self, max_items: int) -> list[T]:
        """Take up to *max_items* that are ready, without waiting (nothing once closed)."""
        if self._receive_closed:
            return []
        return self._take(max_items)

    def _take(self, max_items: int) -> list[T]:
        items = self._items
        if len(items) <= max_items:
            batch = items
            self._items = items = []
        else:
            batch = items[:max_items]
            del items[:max_items]
        blocked = self._blocked
        while blocked and len(items) < self.capacity:
            sender = blocked.popleft()
            sender.taken = True
            items.append(sender.item)
            sender.event.set()
        return batch

    def __len__(self) -> int:
        return len(self._items)

    def close_sending(self) -> None:
        """No more sends; the receiver drains what is queued, then gets :class:`anyio.EndOfStream`.

        Sends still waiting for room are withdrawn (:class:`anyio.ClosedResourceError`): their
        senders still hold the items.
        """
        if self._send_closed:
            return
        self._send_closed = True
        self._wake_all()

    def close(self) -> None:
        """Close both ends; a later send raises :class:`anyio.ClosedResourceError`."""
        self._send_closed = True
        self._receive_closed = True
        self._wake_all()

    def _wake_all(self) -> None:
        receiver = self._receiver
        if receiver is not None:
            self._receiver = None
            receiver.set()
        blocked = self._blocked
        while blocked:
            blocked.popleft().event.set()
