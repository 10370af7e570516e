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

Every period is computed from the intervals that touch it, in ``(boot, seq)`` order, so the
result depends only on the set of stored readings, never on the order in which they arrived:
a late reading just makes the aggregator recompute the periods it affects. :meth:`Window.add`
is the one place that applies an interval, both from scratch and when the aggregator extends a
meter's open periods with a reading in order (``actors.energy_state``, ADR 0013).

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
    #: Time covered: the union of the spans below while they come in time order (the usual
    #: case, each one starting where or after the last ended), so no union is ever sorted.
    covered: int = 0
    flagged: bool = False
    #: Where the latest span ends.
    end: int = -(1 << 62)
    #: The spans counted intervals cover, for the union once one comes out of time order.
    #: None when they are not kept (the incremental state once its spans are in order).
    spans: list[tuple[int, int]] | None = None
    #: A span came out of time order: ``covered`` is worked out from ``spans`` at freeze.
    disordered: bool = False

    def cover(self, lo: int, hi: int) -> bool:
        """Add the stretch ``[lo, hi)``; False when it is out of time order and the spans are
        not kept (nothing changed then)."""
        if lo >= self.end:
            self.covered += hi - lo
            self.end = hi
            if self.spans is not None:
                self.spans.append((lo, hi))
            return True
        if self.spans is None:
            return False
        self.spans.append((lo, hi))
        self.disordered = True
        self.end = max(self.end, hi)
        return True

    def credit(self, imp: float, exp: float, rimp: float | None, rexp: float | None, fraction: float) -> None:
        """Add *fraction* of an interval's register differences (reactive ones None: not known)."""
        self.consumed += imp * fraction
        self.regenerated += exp * fraction
        if rimp is not None and rexp is not None:
            self.reactive_import = (self.reactive_import or 0.0) + rimp * fraction
            self.reactive_export = (self.reactive_export or 0.0) + rexp * fraction

    def freeze(self, start_ms: int) -> EnergyPeriod:
        covered = self.covered
        flagged = self.flagged
        if self.disordered and self.spans is not None:
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
    #: Keep every span (a window computed from scratch); the incremental state does not.
    keep_spans: bool = True
    #: When set, every period an :meth:`add` reaches is recorded here (what a batch changed).
    touched: dict[int, _Acc] | None = None

    def _at(self, start: int) -> _Acc | None:
        if not self.start_ms <= start < self.end_ms:
            return None
        acc = self._acc.get(start)
        if acc is None:
            acc = self._acc[start] = _Acc(spans=[] if self.keep_spans else None)
        if self.touched is not None:
            self.touched[start] = acc
        return acc

    def _flag(self, lo: int, hi: int) -> None:
        for start in range(max(period_of(lo), self.start_ms), min(period_of(hi), self.end_ms - 1) + 1, PERIOD_MS):
            acc = self._at(start)
            if acc is not None:
                acc.flagged = True

    def add(self, a: EnergyReading, b: EnergyReading, max_interval_ms: int) -> bool:
        """Apply the interval ``a → b`` (neighbours of one boot) to the periods in this window.

        False only without ``keep_spans``, when a span comes out of time order: the periods
        are then partly applied and the window must be thrown away (computed from scratch).
        Written out flat: it runs once per reading.
        """
        _, a_seq, a_ts, a_imp, a_exp, ai, ae = a
        _, b_seq, b_ts, b_imp, b_exp, bi, be = b
        duration = b_ts - a_ts
        imp, exp = b_imp - a_imp, b_exp - a_exp
        rimp = rexp = None
        has_a, has_b = ai is not None and ae is not None, bi is not None and be is not None
        decreasing = imp < 0 or exp < 0
        if ai is not None and ae is not None and bi is not None and be is not None:
            rimp, rexp = bi - ai, be - ae
            decreasing = decreasing or rimp < 0 or rexp < 0
        if not 0 <= duration <= max_interval_ms or decreasing:
            for lo, hi in effect_span(a, b, max_interval_ms):
                self._flag(lo, hi)
            return True
        # One reading has reactive registers and the other not: the reactive energy is unknown.
        exact = b_seq == a_seq + 1 and duration <= PERIOD_MS and has_a == has_b
        start = a_ts - a_ts % PERIOD_MS
        if duration == 0:
            # Two readings at the same millisecond: whatever energy lies between is in that period.
            acc = self._at(start)
            if acc is not None:
                acc.credit(imp, exp, rimp, rexp, 1.0)
                acc.flagged |= not exact
            return True
        while start < b_ts:
            acc = self._at(start)
            if acc is not None:
                end = start + PERIOD_MS
                lo, hi = (a_ts if a_ts > start else start), (b_ts if b_ts < end else end)
                if not acc.cover(lo, hi):
                    return False
                acc.credit(imp, exp, rimp, rexp, (hi - lo) / duration)
                acc.flagged |= not exact
            start += PERIOD_MS
        return True

    def periods(self) -> list[EnergyPeriod]:
        """Every period of the window, oldest first (untouched ones empty and incomplete)."""
        return [
            (self._acc.get(start) or _Acc()).freeze(start) for start in range(self.start_ms, self.end_ms, PERIOD_MS)
        ]

    def track(self) -> None:
        """Record the periods that :meth:`add` reaches from now on."""
        self.touched = {}

    def changed(self) -> list[EnergyPeriod]:
        """The periods :meth:`add` reached since :meth:`track`, as they are now; stops recording."""
        touched, self.touched = self.touched or {}, None
        return [acc.freeze(start) for start, acc in touched.items()]

    def accumulators(self) -> dict[int, _Acc]:
        """The periods that intervals reached, by start (the incremental state starts from them)."""
        return self._acc


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
