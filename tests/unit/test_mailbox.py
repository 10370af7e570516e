"""The bounded mailbox: batch draining, backpressure, closing, FIFO order."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import closing
from typing import Any

import anyio
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from actors.mailbox import Mailbox

#: The ``new_mailbox`` fixture (conftest.py): mailboxes closed after the test.
type MailboxFactory = Callable[[int], Mailbox[Any]]


@pytest.mark.trio
async def test_receive_batch_takes_what_is_ready_up_to_the_limit(new_mailbox: MailboxFactory) -> None:
    mailbox: Mailbox[int] = new_mailbox(10)
    for i in range(5):
        mailbox.send_nowait(i)
    assert len(mailbox) == 5
    assert await mailbox.receive_batch(3) == [0, 1, 2]
    assert len(mailbox) == 2
    assert await mailbox.receive_batch(10) == [3, 4]
    assert len(mailbox) == 0


@pytest.mark.trio
async def test_receive_batch_waits_for_the_first_item(
    new_mailbox: MailboxFactory, autojump_clock: trio.testing.MockClock
) -> None:
    mailbox: Mailbox[str] = new_mailbox(4)

    async def later() -> None:
        await trio.sleep(5)
        await mailbox.send("a")
        await mailbox.send("b")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(later)
        # The first item wakes the receiver; "b" is sent in the same step, before it runs.
        assert await mailbox.receive_batch(10) == ["a", "b"]
        assert trio.current_time() == pytest.approx(5)


@pytest.mark.trio
async def test_drain_nowait_never_waits(new_mailbox: MailboxFactory) -> None:
    mailbox: Mailbox[int] = new_mailbox(10)
    assert mailbox.drain_nowait(5) == []
    for i in range(4):
        mailbox.send_nowait(i)
    assert mailbox.drain_nowait(3) == [0, 1, 2]
    assert mailbox.drain_nowait(3) == [3]
    assert mailbox.drain_nowait(3) == []


@pytest.mark.trio
async def test_send_blocks_while_full_and_resumes_when_there_is_room(new_mailbox: MailboxFactory) -> None:
    mailbox: Mailbox[int] = new_mailbox(2)
    await mailbox.send(1)
    await mailbox.send(2)
    with pytest.raises(anyio.WouldBlock):
        mailbox.send_nowait(99)
    sent = trio.Event()

    async def sender() -> None:
        await mailbox.send(3)
        sent.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await trio.testing.wait_all_tasks_blocked()
        assert not sent.is_set()  # backpressure: nothing dropped, the sender waits
        assert len(mailbox) == 2
        assert await mailbox.receive_batch(1) == [1]
        await trio.testing.wait_all_tasks_blocked()
        assert sent.is_set()
    assert mailbox.drain_nowait(10) == [2, 3]


@pytest.mark.trio
async def test_blocked_senders_keep_their_order(new_mailbox: MailboxFactory) -> None:
    mailbox: Mailbox[int] = new_mailbox(1)
    mailbox.send_nowait(0)
    async with trio.open_nursery() as nursery:
        for i in range(1, 6):
            nursery.start_soon(mailbox.send, i)
            # Let each sender block before the next one starts: trio does not promise to run
            # newly started tasks in the order they were started.
            await trio.testing.wait_all_tasks_blocked()
        received: list[int] = []
        while len(received) < 6:
            received += await mailbox.receive_batch(100)
    assert received == [0, 1, 2, 3, 4, 5]


@pytest.mark.trio
async def test_close_sending_lets_the_receiver_drain_then_end(new_mailbox: MailboxFactory) -> None:
    mailbox: Mailbox[int] = new_mailbox(10)
    for i in range(3):
        await mailbox.send(i)
    mailbox.close_sending()
    with pytest.raises(anyio.ClosedResourceError):
        await mailbox.send(3)
    assert await mailbox.receive_batch(2) == [0, 1]
    assert await mailbox.receive_batch(2) == [2]
    with pytest.raises(anyio.EndOfStream):
        await mailbox.receive_batch(2)
    assert mailbox.drain_nowait(2) == []


@pytest.mark.trio
async def test_close_sending_wakes_a_waiting_receiver(new_mailbox: MailboxFactory) -> None:
    mailbox: Mailbox[int] = new_mailbox(10)
    with pytest.RaisesGroup(anyio.EndOfStream):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mailbox.receive_batch, 10)
            await trio.testing.wait_all_tasks_blocked()
            mailbox.close_sending()


@pytest.mark.trio
async def test_close_sending_withdraws_a_blocked_send(new_mailbox: MailboxFactory) -> None:
    """A send waiting for room fails with ClosedResourceError: the sender still holds the item.

    The router relies on this: a ``deliver`` that waited when the mailbox closed retries, finds
    the router closing, and fails the completion instead of losing the message.
    """
    mailbox: Mailbox[int] = new_mailbox(1)
    await mailbox.send(1)
    with pytest.RaisesGroup(anyio.ClosedResourceError):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mailbox.send, 2)
            await trio.testing.wait_all_tasks_blocked()
            mailbox.close_sending()
    assert await mailbox.receive_batch(10) == [1]
    with pytest.raises(anyio.EndOfStream):
        await mailbox.receive_batch(10)


@pytest.mark.trio
async def test_close_closes_both_ends(new_mailbox: MailboxFactory) -> None:
    mailbox: Mailbox[int] = new_mailbox(10)
    mailbox.send_nowait(1)
    mailbox.close()
    with pytest.raises(anyio.ClosedResourceError):
        await mailbox.send(2)
    with pytest.raises(anyio.ClosedResourceError):
        mailbox.send_nowait(2)
    with pytest.raises(anyio.ClosedResourceError):
        await mailbox.receive_batch(10)


# Up to 200 items through a mailbox of capacity 1..8 in batches of 1..10: small capacities
# make the sender block often, so order across blocked sends and batch boundaries is tested.
@pytest.mark.trio
@given(
    items=st.lists(st.integers(), max_size=200),
    capacity=st.integers(1, 8),
    max_items=st.integers(1, 10),
)
async def test_fifo_through_any_capacity_and_batch_size(items: list[int], capacity: int, max_items: int) -> None:
    mailbox: Mailbox[int] = Mailbox(capacity)
    received: list[int] = []
    # Not the new_mailbox fixture: hypothesis runs many examples per function-scoped fixture.
    with closing(mailbox):
        await pump(mailbox, items, max_items, received)
    assert received == items


async def pump(mailbox: Mailbox[int], items: list[int], max_items: int, received: list[int]) -> None:
    async def produce() -> None:
        for item in items:
            await mailbox.send(item)
        mailbox.close_sending()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        while True:
            try:
                batch = await mailbox.receive_batch(max_items)
            except anyio.EndOfStream:
                break
            assert 1 <= len(batch) <= max_items
            received += batch
