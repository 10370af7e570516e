"""What flows into the actors from the broker bridge, and how the bridge learns the outcome."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import anyio

from storage.contract import TopicKind


class Outcome(enum.Enum):
    #: Committed to SQLite (stored, quarantined, or a counted duplicate): acknowledge it.
    DURABLE = "durable"
    #: Could not be made durable (node stopping): do not acknowledge; the device resends.
    FAILED = "failed"


@dataclass(slots=True)
class Completion:
    """Set once, when the message's fate is durable (or definitely not)."""

    _event: anyio.Event = field(default_factory=anyio.Event)
    outcome: Outcome | None = None

    def resolve(self, outcome: Outcome) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self._event.set()

    async def wait(self) -> Outcome:
        await self._event.wait()
        assert self.outcome is not None  # noqa: S101 - set together with the event
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


type DeviceMessage = Publish | Link
