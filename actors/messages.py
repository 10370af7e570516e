"""What flows into the actors from the broker bridge, and how the bridge learns the outcome."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import anyio

from storage.contract import TopicKind


class Outcome(enum.Enum):
    #: Committed to SQLite (stored, quarantined, or a counted duplicate): acknowledge it.
    DURABLE = "durable"
    #: Could not be made durable (node stopping): do not acknowledge; the device resends.
    FAILED = "failed"


class Completion:
    """Set once, when the message's fate is durable (or definitely not).

    Two ways to learn the outcome: pass *notify* (called once with the outcome, from the
    resolving task; the broker bridge uses a plain asyncio future, the cheapest thing to
    await on the PUBLISH path), or ``await wait()``, whose event is only created when someone
    waits.
    """

    __slots__ = ("_event", "_notify", "outcome")

    def __init__(self, notify: Callable[[Outcome], object] | None = None) -> None:
        self.outcome: Outcome | None = None
        self._notify = notify
        self._event: anyio.Event | None = None

    def resolve(self, outcome: Outcome) -> None:
        if self.outcome is not None:
            return
        self.outcome = outcome
        if self._notify is not None:
            self._notify(outcome)
        if self._event is not None:
            self._event.set()

    async def wait(self) -> Outcome:
        if self.outcome is None:
            if self._event is None:
                self._event = anyio.Event()
            await self._event.wait()
        assert self.outcome is not None  # noqa: S101 - set before the event
        return self.outcome


class LinkEvent(enum.Enum):
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"


@dataclass(slots=True)
class Publish:
    """A PUBLISH a device sent on one of its own topics (the ACL was checked already)."""

    device_id: str
    kind: TopicKind
    topic: str
    payload: bytes
    received_at: float
    done: Completion | None
    #: Set by the bridge when the message exceeded its device's rate limits and the node is
    #: configured to quarantine the excess: the detail of the ``rate_limited`` quarantine.
    over_limit: str | None = None


@dataclass(slots=True)
class Link:
    """A device's connection went up or down (from amqtt's event hooks, which only enqueue)."""

    device_id: str
    event: LinkEvent
    at: float
    #: Why (see :class:`storage.records.DeviceEvent`).
    detail: str = ""
    #: For a disconnect whose will the broker published: ``topic: payload``.
    will: str | None = None
    #: A disconnect of an older connection while a newer one is live (a takeover): it goes
    #: into the history but leaves the device online.
    superseded: bool = False


type DeviceMessage = Publish | Link
