"""The sequence tracker: each rule on its own, then the tracker against a plain model.

The model in :class:`Model` knows nothing of windows or gap intervals: it keeps the set of
``seq`` stored per boot and recomputes ``missing`` from first principles (every sequence number
inside a boot's window that was never stored). The state machine drives both with any
interleaving of in-order, duplicated, reordered, dropped and reboot deliveries, and restarts
the tracker from its persisted state now and then, as a node restart does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from actors import sequence
from actors.sequence import Counters, SequenceState, SequenceTracker, Verdict


def restarted(tracker: SequenceTracker) -> SequenceTracker:
    """A fresh tracker built from *tracker*'s state as the store persists and reloads it.

    Copies everything (the store keeps gaps as JSON pairs and counters as a JSON object), so
    the two trackers share no mutable state.
    """
    st_ = tracker.state
    return SequenceTracker(
        SequenceState(
            boot=st_.boot,
            low=st_.low,
            high=st_.high,
            gaps=[(int(a), int(b)) for a, b in st_.gaps],
            counters=Counters(**st_.counters.as_dict()),
        )
    )


# -- each rule on its own -------------------------------------------------------------------


def test_first_message_ever_starts_the_window_at_its_seq() -> None:
    t = SequenceTracker()
    assert t.observe(7, 18231) is Verdict.STORE
    assert (t.state.boot, t.state.low, t.state.high) == (7, 18231, 18231)
    assert t.state.gaps == []
    # A meter older than the node is not missing its whole past, and this is no reset.
    assert t.counters == Counters(stored=1)


def test_in_order_messages_are_stored() -> None:
    t = SequenceTracker()
    assert [t.observe(1, seq) for seq in range(5)] == [Verdict.STORE] * 5
    assert (t.state.low, t.state.high, t.state.gaps) == (0, 4, [])
    assert t.counters == Counters(stored=5)


@pytest.mark.parametrize("again", [0, 2, 4])
def test_a_redelivery_is_a_duplicate_and_not_stored(again: int) -> None:
    t = SequenceTracker()
    for seq in range(5):
        t.observe(1, seq)
    assert t.observe(1, again) is Verdict.DUPLICATE
    assert t.observe(1, again) is Verdict.DUPLICATE
    assert t.counters == Counters(stored=5, duplicates=2)
    assert (t.state.low, t.state.high, t.state.gaps) == (0, 4, [])


def test_a_jump_opens_a_gap_of_the_skipped_messages() -> None:
    t = SequenceTracker()
    t.observe(1, 10)
    assert t.observe(1, 14) is Verdict.STORE
    assert t.state.gaps == [(11, 13)]
    assert t.state.high == 14
    assert t.counters == Counters(stored=2, missing=3)
    # A jump of one is no gap.
    assert t.observe(1, 15) is Verdict.STORE
    assert t.counters.missing == 3


def test_late_messages_fill_the_gap_and_then_are_duplicates() -> None:
    t = SequenceTracker()
    t.observe(1, 0)
    t.observe(1, 6)  # gap 1..5
    assert t.observe(1, 3) is Verdict.LATE
    assert t.state.gaps == [(1, 2), (4, 5)]
    assert t.observe(1, 1) is Verdict.LATE
    assert t.observe(1, 5) is Verdict.LATE
    assert t.state.gaps == [(2, 2), (4, 4)]
    assert t.counters == Counters(stored=5, missing=2, late=3)
    assert t.observe(1, 3) is Verdict.DUPLICATE
    assert t.observe(1, 2) is Verdict.LATE
    assert t.observe(1, 4) is Verdict.LATE
    assert t.state.gaps == []
    assert t.counters == Counters(stored=7, missing=0, late=5, duplicates=1)


def test_a_higher_boot_resets_and_its_window_starts_at_zero() -> None:
    t = SequenceTracker()
    t.observe(1, 0)
    t.observe(1, 3)  # boot 1 misses 1 and 2
    assert t.observe(2, 4) is Verdict.STORE
    assert (t.state.boot, t.state.low, t.state.high) == (2, 0, 4)
    # A device starts every boot at 0: the first message of the new boot at 4 misses 0..3.
    assert t.state.gaps == [(0, 3)]
    # The old boot's gaps are gone from the window but stay counted.
    assert t.counters == Counters(stored=3, missing=2 + 4, resets=1)
    assert t.observe(2, 0) is Verdict.LATE
    assert t.counters.missing == 5


def test_a_reset_to_seq_zero_opens_no_gap() -> None:
    t = SequenceTracker()
    t.observe(4, 100)
    assert t.observe(9, 0) is Verdict.STORE  # boots may jump by more than one
    assert (t.state.boot, t.state.low, t.state.high, t.state.gaps) == (9, 0, 0, [])
    assert t.counters == Counters(stored=2, resets=1)


def test_a_lower_boot_is_stale_even_when_it_was_stored_before() -> None:
    t = SequenceTracker()
    t.observe(3, 0)
    t.observe(3, 1)
    t.observe(4, 0)
    before = (t.state.boot, t.state.low, t.state.high, list(t.state.gaps))
    assert t.observe(3, 1) is Verdict.STALE  # a redelivery from the old boot
    assert t.observe(3, 2) is Verdict.STALE  # never seen, still stale
    assert t.observe(0, 0) is Verdict.STALE
    assert (t.state.boot, t.state.low, t.state.high, list(t.state.gaps)) == before
    assert t.counters == Counters(stored=3, resets=1, quarantined=3)


def test_a_message_below_low_is_late_and_widens_the_window() -> None:
    t = SequenceTracker()
    t.observe(1, 10)
    assert t.observe(1, 7) is Verdict.LATE
    assert (t.state.low, t.state.high, t.state.gaps) == (7, 10, [(8, 9)])
    assert t.counters == Counters(stored=2, missing=2, late=1)
    assert t.observe(1, 6) is Verdict.LATE  # right below low: no new gap
    assert (t.state.low, t.state.gaps) == (6, [(8, 9)])
    assert t.observe(1, 9) is Verdict.LATE
    assert t.observe(1, 6) is Verdict.DUPLICATE
    assert t.counters == Counters(stored=4, missing=1, late=3, duplicates=1)


def test_received_and_quarantined_are_counted_for_the_caller() -> None:
    t = SequenceTracker()
    t.count_received()
    t.count_received()
    t.count_quarantined()  # e.g. a payload that failed the schema
    assert t.counters == Counters(received=2, quarantined=1)
    # observe() never counts `received`: the device actor counts each PUBLISH once.
    t.observe(1, 0)
    assert t.counters.received == 2


def test_only_store_and_late_store() -> None:
    assert {v for v in Verdict if v.stores} == {Verdict.STORE, Verdict.LATE}


def test_the_oldest_gap_is_given_up_past_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sequence, "MAX_OPEN_GAPS", 2)
    t = SequenceTracker()
    for seq in (0, 2, 4, 6):  # gaps at 1, 3 and 5
        t.observe(1, seq)
    assert t.state.gaps == [(3, 3), (5, 5)]
    # The given-up message stays counted as missing; when it turns up it counts as a duplicate.
    assert t.counters.missing == 3
    assert t.observe(1, 1) is Verdict.DUPLICATE
    assert t.observe(1, 3) is Verdict.LATE
    assert t.counters == Counters(stored=5, missing=2, late=1, duplicates=1)


def test_state_given_to_a_new_tracker_is_used_as_is_with_gaps_sorted() -> None:
    state = SequenceState(boot=2, low=0, high=10, gaps=[(7, 8), (2, 3)], counters=Counters(stored=7, missing=4))
    t = SequenceTracker(state)
    assert t.state is state
    assert state.gaps == [(2, 3), (7, 8)]
    assert t.observe(2, 8) is Verdict.LATE
    assert t.observe(2, 2) is Verdict.LATE
    assert t.observe(2, 5) is Verdict.DUPLICATE
    assert state.gaps == [(3, 3), (7, 7)]
    assert t.counters == Counters(stored=9, missing=2, late=2, duplicates=1)


# -- restart from persisted state --------------------------------------------------------------

# Boots 0..3 and seqs 0..30 keep collisions frequent: in 60 deliveries most rules fire
# (duplicates, gaps, late fills, below-low, resets and stale boots).
deliveries = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 30)), max_size=60)


@given(deliveries=deliveries, data=st.data())
def test_a_tracker_restarted_from_its_state_continues_identically(
    deliveries: list[tuple[int, int]], data: st.DataObject
) -> None:
    split = data.draw(st.integers(0, len(deliveries)), label="restart after")
    uninterrupted = SequenceTracker()
    expected = [uninterrupted.observe(boot, seq) for boot, seq in deliveries]

    first = SequenceTracker()
    verdicts = [first.observe(boot, seq) for boot, seq in deliveries[:split]]
    second = restarted(first)
    verdicts += [second.observe(boot, seq) for boot, seq in deliveries[split:]]

    assert verdicts == expected
    assert second.state == uninterrupted.state


@given(deliveries=deliveries, data=st.data())
def test_a_rejected_reading_moves_the_window_but_counts_as_quarantined(
    deliveries: list[tuple[int, int]], data: st.DataObject
) -> None:
    """``observe(accept=False)``: a reading that broke a validation rule is seen (no gap, a
    redelivery is a duplicate) but counted as quarantined instead of stored (or late)."""
    rejected = data.draw(st.sets(st.integers(0, max(len(deliveries) - 1, 0))), label="rejected")
    plain, checked = SequenceTracker(), SequenceTracker()
    stored_rejected = late_rejected = 0
    for i, (boot, seq) in enumerate(deliveries):
        verdict = plain.observe(boot, seq)
        assert checked.observe(boot, seq, accept=i not in rejected) is verdict
        if i in rejected and verdict.stores:
            stored_rejected += 1
            late_rejected += verdict is Verdict.LATE
    p, c = plain.state, checked.state
    assert (c.boot, c.low, c.high, c.gaps) == (p.boot, p.low, p.high, p.gaps)
    expected = p.counters.as_dict()
    expected["stored"] -= stored_rejected
    expected["late"] -= late_rejected
    expected["quarantined"] += stored_rejected
    assert c.counters.as_dict() == expected


# -- the tracker against a plain model ------------------------------------------------------------


@dataclass
class Model:
    """What the node must have done, from first principles: sets of stored ``(boot, seq)``."""

    stored: dict[int, set[int]] = field(default_factory=dict)
    first_boot: int | None = None
    boot: int | None = None
    duplicates: int = 0
    late: int = 0
    resets: int = 0
    quarantined: int = 0
    received: int = 0

    def observe(self, boot: int, seq: int) -> Verdict:
        if self.boot is None:
            self.first_boot = self.boot = boot
        elif boot < self.boot:
            self.quarantined += 1
            return Verdict.STALE
        elif boot > self.boot:
            self.resets += 1
            self.boot = boot
        seen = self.stored.setdefault(boot, set())
        if seq in seen:
            self.duplicates += 1
            return Verdict.DUPLICATE
        # Anything below the highest seq stored in this boot arrived late.
        late = bool(seen) and seq < max(seen)
        seen.add(seq)
        if late:
            self.late += 1
            return Verdict.LATE
        return Verdict.STORE

    def low(self, boot: int) -> int:
        # Only the very first boot the node saw starts where the node came in; every later
        # boot starts at 0, as the device does.
        return min(self.stored[boot]) if boot == self.first_boot else 0

    def missing_in(self, boot: int) -> set[int]:
        seen = self.stored[boot]
        return set(range(self.low(boot), max(seen) + 1)) - seen

    def counters(self) -> Counters:
        return Counters(
            received=self.received,
            stored=sum(len(seqs) for seqs in self.stored.values()),
            duplicates=self.duplicates,
            missing=sum(len(self.missing_in(boot)) for boot in self.stored),
            late=self.late,
            resets=self.resets,
            quarantined=self.quarantined,
        )

    def stored_pairs(self) -> set[tuple[int, int]]:
        return {(boot, seq) for boot, seqs in self.stored.items() for seq in seqs}


def intervals(values: set[int]) -> list[tuple[int, int]]:
    """Sorted, disjoint, inclusive ``(start, end)`` runs of *values*."""
    runs: list[tuple[int, int]] = []
    for v in sorted(values):
        if runs and runs[-1][1] == v - 1:
            runs[-1] = (runs[-1][0], v)
        else:
            runs.append((v, v))
    return runs


# Strategy bounds: a device comes in at boot 0..3 and seq 0..40 (a meter older than the node);
# reboots step the boot by 1..3; stragglers (messages from before the node knew the device, or
# held back for long) carry seq 0..60 of any boot up to the device's current one. Small numbers
# keep duplicates, fills, below-low and stale deliveries frequent, and the default 50 steps stay
# far below MAX_OPEN_GAPS (4096), so the model need not give gaps up (tested on its own above).
class DeviceDeliveries(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tracker = SequenceTracker()
        self.model = Model()
        self.boot = 0
        self.next_seq = 0
        #: Every (boot, seq) handed to the node at least once: redelivery picks from here.
        self.delivered: list[tuple[int, int]] = []
        #: Sent by the device but held back by the network: delivered later (reordered) or never.
        self.held: list[tuple[int, int]] = []
        #: What the tracker said to store, in order.
        self.stored: list[tuple[int, int]] = []

    def deliver(self, boot: int, seq: int) -> None:
        self.tracker.count_received()
        self.model.received += 1
        peeked = self.tracker.peek(boot, seq)
        verdict = self.tracker.observe(boot, seq)
        assert verdict is self.model.observe(boot, seq), (boot, seq)
        assert peeked is verdict, (boot, seq)  # peek foretells observe and changes nothing
        if verdict.stores:
            self.stored.append((boot, seq))
        self.delivered.append((boot, seq))

    def emit(self) -> tuple[int, int]:
        message = (self.boot, self.next_seq)
        self.next_seq += 1
        return message

    @initialize(boot=st.integers(0, 3), seq=st.integers(0, 40))
    def device_is_already_running(self, boot: int, seq: int) -> None:
        self.boot, self.next_seq = boot, seq

    @rule()
    def in_order(self) -> None:
        self.deliver(*self.emit())

    @rule()
    def dropped(self) -> None:
        self.emit()

    @rule()
    def held_back(self) -> None:
        self.held.append(self.emit())

    @precondition(lambda self: bool(self.held))
    @rule(pick=st.integers(0, 1000))
    def reordered(self, pick: int) -> None:
        self.deliver(*self.held.pop(pick % len(self.held)))

    @precondition(lambda self: bool(self.delivered))
    @rule(pick=st.integers(0, 1000))
    def duplicated(self, pick: int) -> None:
        self.deliver(*self.delivered[pick % len(self.delivered)])

    @rule(step=st.integers(1, 3))
    def reboot(self, step: int) -> None:
        self.boot += step
        self.next_seq = 0

    @rule(data=st.data())
    def straggler(self, data: st.DataObject) -> None:
        boot = data.draw(st.integers(0, self.boot), label="boot")
        seq = data.draw(st.integers(0, 60), label="seq")
        self.deliver(boot, seq)

    @rule()
    def bad_payload(self) -> None:
        self.tracker.count_received()
        self.tracker.count_quarantined()
        self.model.received += 1
        self.model.quarantined += 1

    @rule()
    def node_restart(self) -> None:
        self.tracker = restarted(self.tracker)

    @invariant()
    def counters_match_the_model(self) -> None:
        assert self.tracker.counters == self.model.counters()

    @invariant()
    def stored_exactly_once(self) -> None:
        assert len(self.stored) == len(set(self.stored))
        assert set(self.stored) == self.model.stored_pairs()

    @invariant()
    def window_and_gaps_match_the_model(self) -> None:
        boot = self.model.boot
        state = self.tracker.state
        assert state.boot == boot
        if boot is None:
            return
        assert state.low == self.model.low(boot)
        assert state.high == max(self.model.stored[boot])
        assert state.gaps == intervals(self.model.missing_in(boot))


TestDeviceDeliveries = DeviceDeliveries.TestCase
