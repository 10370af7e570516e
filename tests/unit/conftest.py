"""Fixtures shared by the unit tests.

Trio tests are marked ``@pytest.mark.trio`` one by one: ``trio_mode`` stays off because the
integration tests run on asyncio through anyio's plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from actors.mailbox import Mailbox

type MailboxFactory = Callable[[int], Mailbox[Any]]


@pytest.fixture
def new_mailbox() -> Iterator[MailboxFactory]:
    """Make mailboxes that are closed after the test.

    anyio warns (``ResourceWarning``) about a memory stream garbage-collected while open, and
    the suite turns warnings into errors.
    """
    made: list[Mailbox[Any]] = []

    def make(capacity: int) -> Mailbox[Any]:
        mailbox: Mailbox[Any] = Mailbox(capacity)
        made.append(mailbox)
        return mailbox

    yield make
    for mailbox in made:
        mailbox.close()
