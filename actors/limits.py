"""Per-device MQTT limits: token buckets for messages/s and payload bytes/s.

Pure logic with no clock and no I/O of its own: the caller passes ``now`` (a monotonic time in
seconds), so the rules are tested exhaustively with hypothesis and made-up times. The broker
bridge (``node.bridge``) asks :meth:`DeviceLimiter.admit` once per PUBLISH on a device's own
topic and decides what the excess means (quarantine or disconnect; see ADR 0011).

A bucket holds at most ``capacity`` tokens and refills at ``rate`` tokens per second. A message
is admitted when the bucket holds at least its cost, or is full: a single message larger than
the whole bucket (a payload bigger than the byte burst) is admitted from a full bucket and
leaves it in debt, so it is not refused forever but still pays for every byte. Over any
interval of ``T`` seconds a bucket admits at most ``capacity + rate * T`` plus the overshoot
of one such oversize message.

Memory: one :class:`DeviceBuckets` per device that published, bounded by the number of
registered devices (``max_devices``); a device's buckets are dropped when it disconnects with
full buckets, which are the same as fresh ones.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class LimitKind(enum.StrEnum):
    """Which per-device limit a message exceeded; metric label values (a closed set)."""

    MESSAGES = "messages"
    BYTES = "bytes"


class TokenBucket:
    """``capacity`` tokens, refilled at ``rate`` per second, spent by :meth:`take`."""

    __slots__ = ("_last", "capacity", "rate", "tokens")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        if rate <= 0 or capacity <= 0:
            msg = f"a token bucket needs a positive rate and capacity, got {rate} and {capacity}"
            raise ValueError(msg)
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self._last = now

    def refill(self, now: float) -> None:
        # A clock that went backwards (it is monotonic in the node; tests may say otherwise)
        # adds nothing rather than removing tokens.
        if now > self._last:
            self.tokens = min(self.capacity, self.tokens + (now - self._last) * self.rate)
            self._last = now

    def can_take(self, cost: float, now: float) -> bool:
        # refill(), inlined: this runs for every PUBLISH.
        if now > self._last:
            self.tokens = min(self.capacity, self.tokens + (now - self._last) * self.rate)
            self._last = now
        return self.tokens >= cost or self.tokens >= self.capacity

    def take(self, cost: float, now: float) -> bool:
        """Spend *cost* tokens if the bucket allows it; False (and nothing spent) if not."""
        if not self.can_take(cost, now):
            return False
        self.tokens -= cost
        return True

    def is_full(self, now: float) -> bool:
        self.refill(now)
        return self.tokens >= self.capacity


@dataclass(frozen=True, slots=True)
class DeviceLimits:
    """The configured limits; a rate of 0 switches that limit off."""

    messages_per_s: float = 0.0
    messages_burst: int = 1
    bytes_per_s: float = 0.0
    bytes_burst: int = 1

    @property
    def enabled(self) -> bool:
        return self.messages_per_s > 0 or self.bytes_per_s > 0


class DeviceBuckets:
    """One device's buckets (``None`` where that limit is off)."""

    __slots__ = ("bytes", "messages")

    def __init__(self, limits: DeviceLimits, now: float) -> None:
        self.messages = (
            TokenBucket(limits.messages_per_s, limits.messages_burst, now) if limits.messages_per_s else None
        )
        self.bytes = TokenBucket(limits.bytes_per_s, limits.bytes_burst, now) if limits.bytes_per_s else None

    def admit(self, size: int, now: float) -> LimitKind | None:
        """Spend one message and *size* bytes, or nothing: the limit exceeded first, if any.

        A refused message spends nothing, so a device that slows down to the configured rate
        gets through again at once.
        """
        messages, bytes_ = self.messages, self.bytes
        if messages is not None and not messages.can_take(1, now):
            return LimitKind.MESSAGES
        if bytes_ is not None and not bytes_.can_take(size, now):
            return LimitKind.BYTES
        if messages is not None:
            messages.tokens -= 1
        if bytes_ is not None:
            bytes_.tokens -= size
        return None

    def is_full(self, now: float) -> bool:
        return all(b is None or b.is_full(now) for b in (self.messages, self.bytes))


class DeviceLimiter:
    """The buckets of every device that published recently."""

    def __init__(self, limits: DeviceLimits) -> None:
        self.limits = limits
        #: ``limits.enabled``, read once: :meth:`admit` runs for every PUBLISH.
        self.enabled = limits.enabled
        self._buckets: dict[str, DeviceBuckets] = {}

    def admit(self, device_id: str, size: int, now: float) -> LimitKind | None:
        """None when *device_id* may send a message of *size* payload bytes at *now*."""
        if not self.enabled:
            return None
        buckets = self._buckets.get(device_id)
        if buckets is None:
            buckets = self._buckets[device_id] = DeviceBuckets(self.limits, now)
        return buckets.admit(size, now)

    def release(self, device_id: str, now: float) -> None:
        """The device disconnected: forget its buckets if they hold nothing a new one would not."""
        buckets = self._buckets.get(device_id)
        if buckets is not None and buckets.is_full(now):
            del self._buckets[device_id]

    def __len__(self) -> int:
        return len(self._buckets)
