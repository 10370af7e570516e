"""Per-device sequence tracking: exactly once, gaps, late arrivals, reboots, stale boots.

Pure logic with no I/O, so it is tested exhaustively against a plain model (see
``tests/unit/test_sequence.py``). The rules are those of ``docs/protocol.md``:

* The tracker knows the highest ``boot`` seen and, for that boot, the window of sequence
  numbers ``[low, high]`` it has seen, with the open gaps inside it.
* A higher ``boot`` is a reset: the gaps of the old boot stay counted in ``missing`` (they can
  never be filled, since the old boot is stale from now on) and the new boot's window starts at
  0, because a device starts every boot at ``seq = 0``: a first message with ``seq = 5`` opens a
  gap of 5.
* The very first message of a device the node has never heard of starts the window at its own
  ``seq``: a meter older than the node is not "missing" its whole past.
* ``seq > high + 1`` opens a gap of ``seq - high - 1``. A message inside an open gap is late: it
  is stored and shrinks the gap. A message below ``low`` (possible only in the first boot ever
  seen) is late as well and widens the window, opening a gap for anything between it and ``low``.
* Anything else at or below ``high`` was seen already: a duplicate, counted and not stored.
* A lower ``boot`` than the highest is stale: quarantined, never stored.

Memory per device is bounded: at most :data:`MAX_OPEN_GAPS` gap intervals are kept open; past
that the oldest interval is given up (it stays counted in ``missing`` but a late message falling
into it is counted as a duplicate). A meter that loses every other message for hours is the only
way to get there, and it raises far louder alarms first.
"""

from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass, field
from typing import Final

MAX_OPEN_GAPS: Final = 4096


class Verdict(enum.Enum):
    STORE = "store"
    LATE = "late"
    DUPLICATE = "duplicate"
    STALE = "stale"

    @property
    def stores(self) -> bool:
        return self is Verdict.STORE or self is Verdict.LATE


@dataclass(slots=True)
class Counters:
    """The per-device counters of PROTOCOL.md; they are persisted with the device state."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    missing: int = 0
    late: int = 0
    resets: int = 0
    quarantined: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "received": self.received,
            "stored": self.stored,
            "duplicates": self.duplicates,
            "missing": self.missing,
            "late": self.late,
            "resets": self.resets,
            "quarantined": self.quarantined,
        }


@dataclass(slots=True)
class SequenceState:
    """What the tracker persists: enough to resume exactly after a restart."""

    boot: int | None = None
    low: int = 0
    high: int = -1
    #: Open gaps of the current boot as sorted, disjoint, inclusive ``[start, end]`` pairs.
    gaps: list[tuple[int, int]] = field(default_factory=list)
    counters: Counters = field(default_factory=Counters)


class SequenceTracker:
    """Decides, for each ``(boot, seq)`` of one device, whether to store it.

    It also counts: callers report received and quarantined messages through
    :meth:`count_received` and :meth:`count_quarantined` so that every counter lives here.
    """

    __slots__ = ("_starts", "state")

    def __init__(self, state: SequenceState | None = None) -> None:
        self.state = state if state is not None else SequenceState()
        self.state.gaps.sort()
        self._starts = [g[0] for g in self.state.gaps]

    @property
    def counters(self) -> Counters:
        return self.state.counters

    def count_received(self) -> None:
        self.state.counters.received += 1

    def count_quarantined(self) -> None:
        self.state.counters.quarantined += 1

    def peek(self, boot: int, seq: int) -> Verdict:
        """What :meth:`observe` would say about ``(boot, seq)``, changing nothing."""
        st = self.state
        if st.boot is None or boot > st.boot:
            return Verdict.STORE
        if boot < st.boot:
            return Verdict.STALE
        if seq > st.high:
            return Verdict.STORE
        if seq < st.low:
            return Verdict.LATE
        i = bisect.bisect_right(self._starts, seq) - 1
        if i >= 0 and seq <= st.gaps[i][1]:
            return Verdict.LATE
        return Verdict.DUPLICATE

    def observe(self, boot: int, seq: int, *, accept: bool = True) -> Verdict:
        """Classify one reading and update the counters. Does not count ``received``.

        With ``accept=False`` a reading that would be stored is quarantined instead (it broke
        a validation rule): its ``(boot, seq)`` is still taken as seen, so it opens no gap and
        a redelivery of it is a duplicate, but it counts as ``quarantined``, not ``stored``.
        """
        verdict = self._observe(boot, seq)
        if not accept and verdict.stores:
            c = self.state.counters
            c.stored -= 1
            c.quarantined += 1
            if verdict is Verdict.LATE:
                c.late -= 1
        return verdict

    def _observe(self, boot: int, seq: int) -> Verdict:
        st = self.state
        c = st.counters
        if st.boot is None:
            st.boot, st.low, st.high = boot, seq, seq
            c.stored += 1
            return Verdict.STORE
        if boot < st.boot:
            c.quarantined += 1
            return Verdict.STALE
        if boot > st.boot:
            c.resets += 1
            # The old boot's gaps stay counted in `missing`; they just cannot be filled now.
            st.gaps.clear()
            self._starts.clear()
            st.boot, st.low, st.high = boot, 0, -1
        if seq > st.high:
            if seq > st.high + 1:
                self._open_gap(st.high + 1, seq - 1)
            st.high = seq
            c.stored += 1
            return Verdict.STORE
        if seq < st.low:
            if seq < st.low - 1:
                self._open_gap(seq + 1, st.low - 1)
            st.low = seq
            c.stored += 1
            c.late += 1
            return Verdict.LATE
        if self._fill(seq):
            c.missing -= 1
            c.stored += 1
            c.late += 1
            return Verdict.LATE
        c.duplicates += 1
        return Verdict.DUPLICATE

    def _open_gap(self, start: int, end: int) -> None:
        st = self.state
        st.counters.missing += end - start + 1
        i = bisect.bisect_left(self._starts, start)
        st.gaps.insert(i, (start, end))
        self._starts.insert(i, start)
        if len(st.gaps) > MAX_OPEN_GAPS:
            del st.gaps[0]
            del self._starts[0]

    def _fill(self, seq: int) -> bool:
        st = self.state
        i = bisect.bisect_right(self._starts, seq) - 1
        if i < 0:
            return False
        start, end = st.gaps[i]
        if seq > end:
            return False
        pieces = []
        if start < seq:
            pieces.append((start, seq - 1))
        if seq < end:
            pieces.append((seq + 1, end))
        st.gaps[i : i + 1] = pieces
        self._starts[i : i + 1] = [p[0] for p in pieces]
        return True
