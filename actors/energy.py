"""Energy per 5-minute period from cumulative registers: the algorithm, pure and exact.

The rules are specified in ``docs/energy.md`` and decided in ADR 0008; in short:

* An *interval* is two readings of one boot that are neighbours in ``seq`` among the stored
  readings. Its energy is the register difference, known exactly whatever happened between.
* A *counted* interval (``0 <= duration <= max_interval`` and no register decreased) spreads
  that energy over its time span linearly (the EN 50463 way of bringing readings that miss a
  boundary onto it) and covers that span. It is *exact* when the two readings are consecutive
  (``seq`` + 1), at most one period apart and agree on having reactive registers; otherwise
  every period it touches is flagged incomplete.
* Any other interval is not counted: its periods are flagged incomplete (the whole span when
  it is at most ``max_interval`` long, else the two periods of its readings; the span between
  is uncovered anyway). Readings of different boots never form an interval: a reboot resets
  the registers, and the energy between the two boots is unknown.
* A period is complete when counted intervals cover all of it and none of them flagged it.

Every period is recomputed from scratch from the intervals that touch it, in ``(boot, seq)``
order, so the result depends only on the set of stored readings, never on the order in which
they arrived: a late reading just makes the aggregator recompute the periods it affects.

This module does no I/O and never raises for odd data; it only classifies it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import groupby, pairwise
from typing import Final

from storage.records import EnergyPeriod, EnergyReading

#: The base period: 5 minutes, aligned to UTC (epoch milliseconds are UTC).
PERIOD_MS: Final = 300_000
#: The aggregate periods the API offers, by name.
PERIODS: Final[dict[str, int]] = {"5m": PERIOD_MS, "1h": 3_600_000, "1d": 86_400_000}
#: Intervals longer than this are not counted by default (``energy_max_interval_s``).
DEFAULT_MAX_INTERVAL_MS: Final = 3_600_000


def period_of(ts_ms: int, size_ms: int = PERIOD_MS) -> int:
    """The start of the period (of *size_ms*) that holds *ts_ms*."""
    return ts_ms - ts_ms % size_ms


@dataclass(slots=True)
class _Acc:
    consumed: float = 0.0
    regenerated: float = 0.0
    reactive_import: float | None = None
    reactive_export: float | None = None
    covered: int = 0
    flagged: bool = False
    #: The stretches counted intervals cover, for the union (only the window's periods keep them).
    spans: list[tuple[int, int]] = field(default_factory=list)

    def freeze(self, start_ms: int) -> EnergyPeriod:
        covered = self.covered
        flagged = self.flagged
        if self.spans:
            covered = _union(self.spans)
            # Time covered twice: two boots (or a clock that went back) claim the same stretch,
            # and the energy of one of them belongs elsewhere.
            flagged |= covered < sum(hi - lo for lo, hi in self.spans)
        return EnergyPeriod(
            start_ms=start_ms,
            consumed_kwh=self.consumed,
            regenerated_kwh=self.regenerated,
            reactive_import_kvarh=self.reactive_import,
            reactive_export_kvarh=self.reactive_export,
            covered_ms=covered,
            complete=covered == PERIOD_MS and not flagged,
        )


def _union(spans: list[tuple[int, int]]) -> int:
    total, end = 0, None
    for lo, hi in sorted(spans):
        if end is None or lo >= end:
            total += hi - lo
            end = hi
        elif hi > end:
            total += hi - end
            end = hi
    return total


@dataclass(frozen=True, slots=True)
class _Deltas:
    active: tuple[float, float]
    #: None: neither reading has reactive registers.
    reactive: tuple[float, float] | None
    #: One reading has reactive registers, the other does not.
    reactive_mismatch: bool

    @property
    def decreasing(self) -> bool:
        return min(self.active) < 0 or (self.reactive is not None and min(self.reactive) < 0)


def _deltas(a: EnergyReading, b: EnergyReading) -> _Deltas:
    active = (b.import_kwh - a.import_kwh, b.export_kwh - a.export_kwh)
    ai, ae, bi, be = a.reactive_import_kvarh, a.reactive_export_kvarh, b.reactive_import_kvarh, b.reactive_export_kvarh
    if ai is not None and ae is not None and bi is not None and be is not None:
        return _Deltas(active, (bi - ai, be - ae), reactive_mismatch=False)
    has_a, has_b = ai is not None and ae is not None, bi is not None and be is not None
    return _Deltas(active, None, reactive_mismatch=has_a != has_b)


def intervals(readings: Iterable[EnergyReading]) -> Iterator[tuple[EnergyReading, EnergyReading]]:
    """Neighbouring readings of each boot, in ``(boot, seq)`` order (duplicates are ignored)."""
    ordered = sorted({(r.boot, r.seq): r for r in readings}.values(), key=lambda r: (r.boot, r.seq))
    for _, boot in groupby(ordered, key=lambda r: r.boot):
        yield from pairwise(boot)


def effect_span(a: EnergyReading, b: EnergyReading, max_interval_ms: int) -> list[tuple[int, int]]:
    """The periods the interval ``a → b`` can change, as inclusive ranges of period starts."""
    lo, hi = sorted((a.ts_ms, b.ts_ms))
    if hi - lo <= max_interval_ms:
        return [(period_of(lo), period_of(hi))]
    return [(period_of(lo), period_of(lo)), (period_of(hi), period_of(hi))]


@dataclass(slots=True)
class Window:
    """Periods ``[start_ms, end_ms)`` of one device being recomputed."""

    start_ms: int
    end_ms: int
    _acc: dict[int, _Acc] = field(default_factory=dict)

    def _at(self, start: int) -> _Acc | None:
        if not self.start_ms <= start < self.end_ms:
            return None
        return self._acc.setdefault(start, _Acc())

    def _flag(self, lo: int, hi: int) -> None:
        for start in range(max(period_of(lo), self.start_ms), min(period_of(hi), self.end_ms - 1) + 1, PERIOD_MS):
            acc = self._at(start)
            if acc is not None:
                acc.flagged = True

    def add(self, a: EnergyReading, b: EnergyReading, max_interval_ms: int) -> None:
        """Apply the interval ``a → b`` (neighbours of one boot) to the periods in this window."""
        duration = b.ts_ms - a.ts_ms
        d = _deltas(a, b)
        if not 0 <= duration <= max_interval_ms or d.decreasing:
            for lo, hi in effect_span(a, b, max_interval_ms):
                self._flag(lo, hi)
            return
        exact = b.seq == a.seq + 1 and duration <= PERIOD_MS and not d.reactive_mismatch
        if duration == 0:
            # Two readings at the same millisecond: whatever energy lies between is in that period.
            acc = self._at(period_of(a.ts_ms))
            if acc is not None:
                _credit(acc, d, 1.0)
                acc.flagged |= not exact
            return
        start = period_of(a.ts_ms)
        while start < b.ts_ms:
            acc = self._at(start)
            if acc is not None:
                overlap = min(b.ts_ms, start + PERIOD_MS) - max(a.ts_ms, start)
                _credit(acc, d, overlap / duration)
                acc.spans.append((max(a.ts_ms, start), min(b.ts_ms, start + PERIOD_MS)))
                acc.flagged |= not exact
            start += PERIOD_MS

    def periods(self) -> list[EnergyPeriod]:
        """Every period of the window, oldest first (untouched ones empty and incomplete)."""
        return [
            (self._acc.get(start) or _Acc()).freeze(start) for start in range(self.start_ms, self.end_ms, PERIOD_MS)
        ]


def _credit(acc: _Acc, d: _Deltas, fraction: float) -> None:
    acc.consumed += d.active[0] * fraction
    acc.regenerated += d.active[1] * fraction
    if d.reactive is not None:
        acc.reactive_import = (acc.reactive_import or 0.0) + d.reactive[0] * fraction
        acc.reactive_export = (acc.reactive_export or 0.0) + d.reactive[1] * fraction


def compute_window(
    readings: Iterable[EnergyReading], start_ms: int, end_ms: int, max_interval_ms: int = DEFAULT_MAX_INTERVAL_MS
) -> list[EnergyPeriod]:
    """The periods ``[start_ms, end_ms)`` (aligned) computed from *readings*.

    *readings* must hold every interval that touches the window: the readings in it, and
    their ``seq`` neighbours on either side (``storage.energy.window_readings`` fetches that).
    """
    window = Window(start_ms, end_ms)
    for a, b in intervals(readings):
        window.add(a, b, max_interval_ms)
    return window.periods()


def merge_runs(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Inclusive ranges of period starts → disjoint windows ``[start, end)``, oldest first."""
    windows: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if windows and lo <= windows[-1][1]:
            windows[-1] = (windows[-1][0], max(windows[-1][1], hi + PERIOD_MS))
        else:
            windows.append((lo, hi + PERIOD_MS))
    return windows


def aggregate(periods: Iterable[EnergyPeriod], start_ms: int, end_ms: int, size_ms: int) -> list[EnergyPeriod]:
    """5-minute periods → periods of *size_ms* (a multiple of 5 minutes) over ``[start_ms, end_ms)``.

    Sums of the 5-minute values; complete when all of its 5-minute periods are present and
    complete. A missing 5-minute period counts as empty and incomplete. This is the reference
    for the SQL the API runs (``storage.energy.energy_series``).
    """
    per = size_ms // PERIOD_MS
    acc: dict[int, tuple[_Acc, list[bool]]] = {}
    for p in periods:
        if not start_ms <= p.start_ms < end_ms:
            continue
        a, flags = acc.setdefault(period_of(p.start_ms, size_ms), (_Acc(), []))
        a.consumed += p.consumed_kwh
        a.regenerated += p.regenerated_kwh
        if p.reactive_import_kvarh is not None and p.reactive_export_kvarh is not None:
            a.reactive_import = (a.reactive_import or 0.0) + p.reactive_import_kvarh
            a.reactive_export = (a.reactive_export or 0.0) + p.reactive_export_kvarh
        a.covered += p.covered_ms
        flags.append(p.complete)
    out = []
    for start in range(start_ms, end_ms, size_ms):
        a, flags = acc.get(start, (_Acc(), []))
        out.append(
            EnergyPeriod(
                start_ms=start,
                consumed_kwh=a.consumed,
                regenerated_kwh=a.regenerated,
                reactive_import_kvarh=a.reactive_import,
                reactive_export_kvarh=a.reactive_export,
                covered_ms=a.covered,
                complete=len(flags) == per and all(flags),
            )
        )
    return out
