"""The per-device token buckets (actors/limits.py) against their two promises, with made-up
times: never more than ``capacity + rate * T`` (plus one oversize message's overshoot) in any
interval of T seconds, and never a refusal for a sender that keeps to the rate."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.limits import DeviceLimiter, DeviceLimits, LimitKind, TokenBucket

# Rates and bursts span a meter's (1 msg/s) to a flood's (10,000/s); times are offsets in
# seconds between messages, from back-to-back (0) to a pause that refills any bucket here.
rates = st.floats(min_value=0.5, max_value=10_000, allow_nan=False)
bursts = st.integers(min_value=1, max_value=5_000)
gaps = st.floats(min_value=0, max_value=5, allow_nan=False)
costs = st.integers(min_value=1, max_value=8_000)


@given(rate=rates, capacity=bursts, steps=st.lists(st.tuples(gaps, costs), min_size=1, max_size=200))
def test_admitted_never_exceeds_burst_plus_rate(rate: float, capacity: int, steps: list[tuple[float, int]]) -> None:
    bucket = TokenBucket(rate, capacity, now=0.0)
    now, admitted = 0.0, []
    for gap, cost in steps:
        now += gap
        if bucket.take(cost, now):
            admitted.append((now, cost))
    overshoot = max((cost - capacity for _, cost in admitted), default=0)
    # Every window that starts and ends at an admitted message.
    for i, (start, _) in enumerate(admitted):
        total = 0
        for at, cost in admitted[i:]:
            total += cost
            bound = capacity + rate * (at - start) + max(0, overshoot)
            assert total <= bound * (1 + 1e-9) + 1e-6, (total, bound)


@given(rate=rates, capacity=bursts, n=st.integers(min_value=1, max_value=300), cost=st.integers(1, 100))
def test_a_sender_within_the_rate_is_never_refused(rate: float, capacity: int, n: int, cost: int) -> None:
    cost = min(cost, capacity)
    bucket = TokenBucket(rate, capacity, now=0.0)
    interval = cost / rate
    for i in range(n):
        # A hair later than the rate allows, so float rounding cannot make it early.
        assert bucket.take(cost, i * interval * (1 + 1e-9)), f"message {i} refused"


@given(capacity=bursts)
def test_a_full_burst_passes_at_once_and_the_next_message_waits(capacity: int) -> None:
    bucket = TokenBucket(1.0, capacity, now=100.0)
    assert all(bucket.take(1, 100.0) for _ in range(capacity))
    assert not bucket.take(1, 100.0)
    assert bucket.take(1, 101.0)


def test_a_message_larger_than_the_bucket_passes_from_a_full_bucket_and_leaves_debt() -> None:
    bucket = TokenBucket(100.0, 1000, now=0.0)
    assert bucket.take(3000, 0.0)  # never refused for good
    assert not bucket.take(1, 0.0)
    assert not bucket.take(1, 19.9)  # 2000 of debt + 1 take 20 s at 100/s
    assert bucket.take(1, 20.1)


def test_a_clock_going_backwards_adds_no_tokens() -> None:
    bucket = TokenBucket(10.0, 10, now=50.0)
    assert all(bucket.take(1, 50.0) for _ in range(10))
    assert not bucket.take(1, 10.0)
    assert not bucket.take(1, 50.0)


@pytest.mark.parametrize(("rate", "capacity"), [(0, 1), (1, 0), (-1, 5)])
def test_a_bucket_needs_a_positive_rate_and_capacity(rate: float, capacity: int) -> None:
    with pytest.raises(ValueError, match="positive rate and capacity"):
        TokenBucket(rate, capacity, now=0.0)


def test_the_limiter_says_which_limit_and_spends_nothing_on_a_refusal() -> None:
    limiter = DeviceLimiter(DeviceLimits(messages_per_s=10, messages_burst=2, bytes_per_s=1000, bytes_burst=1000))
    assert limiter.admit("a", 600, 0.0) is None
    assert limiter.admit("a", 600, 0.0) is LimitKind.BYTES  # 400 bytes left
    assert limiter.admit("a", 400, 0.0) is None  # the refusal spent nothing
    assert limiter.admit("a", 0, 0.0) is LimitKind.MESSAGES  # the burst of 2 is spent: 600 and 400
    assert limiter.admit("b", 600, 0.0) is None  # another device has its own buckets


def test_limits_off_admit_everything_and_keep_no_state() -> None:
    limiter = DeviceLimiter(DeviceLimits())
    assert all(limiter.admit("a", 10**9, 0.0) is None for _ in range(10_000))
    assert len(limiter) == 0


@given(st.lists(st.tuples(st.sampled_from("abcd"), gaps, costs), max_size=100))
def test_release_forgets_only_buckets_that_are_full_again(events: list[tuple[str, float, int]]) -> None:
    limits = DeviceLimits(messages_per_s=2, messages_burst=4, bytes_per_s=5000, bytes_burst=9000)
    limiter = DeviceLimiter(limits)
    now = 0.0
    for device, gap, cost in events:
        now += gap
        limiter.admit(device, cost, now)
        limiter.release(device, now)
    # Whatever was forgotten, a device right after its release behaves like a new one: a
    # fresh limiter and this one agree from here on.
    fresh = DeviceLimiter(limits)
    later = now + 1_000.0  # every bucket full again
    for device in "abcd":
        limiter.release(device, later)
    assert len(limiter) == 0
    assert [limiter.admit(d, 100, later) for d in "abcd"] == [fresh.admit(d, 100, later) for d in "abcd"]
