"""What the energy aggregator keeps in memory per device, so that readings in order cost no SQL.

For each device :class:`DeviceEnergy` holds the device's latest reading in ``(boot, seq)`` order
among the telemetry rows aggregated (its *tip*) and the accumulators of the periods from the
tip's period on (the *open* periods: one that is not held has no interval in it yet). A meter's
readings usually arrive in order, and a reading after the tip makes exactly one new interval,
tip → reading, and splits none. :meth:`DeviceEnergy.extend` adds that interval to the open
periods the way :func:`actors.energy.compute_window` adds it, after every interval before it, so
the sums are added in the same ``(boot, seq)`` order and come out bit for bit the same as the
computation from scratch (ADR 0013).

Anything else it refuses, and the aggregator recomputes the affected periods from the table and
builds the state again (:meth:`DeviceEnergy.build`): a reading at or below the tip (late, or out
of order), an interval that reaches a period before the open ones (a clock that went back), and
a span out of time order in an open period (two boots claiming the same time). A refused state
may be half changed and must be thrown away.

This module never does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from actors.energy import PERIOD_MS, Window, intervals, period_of
from storage.records import EnergyPeriod, EnergyReading

#: The open periods have no end: a reading may be any time after the tip.
_NO_END: Final = 1 << 62


@dataclass(slots=True)
class DeviceEnergy:
    """One device's tip and open periods (see the module docstring)."""

    tip: EnergyReading
    #: Every period from ``start_ms`` (the tip's period, or earlier) on, spans not kept.
    open: Window

    @classmethod
    def build(
        cls, tip: EnergyReading, readings: Iterable[EnergyReading], end_ms: int, max_interval_ms: int
    ) -> DeviceEnergy:
        """The state at *tip* (the device's last reading in ``(boot, seq)`` order) from *readings*:
        every reading that an interval touching ``[period_of(tip.ts_ms), end_ms)`` needs, where no
        reading of the device is at or after *end_ms* (``storage.energy.window_readings``)."""
        start = period_of(tip.ts_ms)
        window = Window(start, max(end_ms, start + PERIOD_MS))
        for a, b in intervals(readings):
            window.add(a, b, max_interval_ms)
        accs = window.accumulators()
        for acc in accs.values():
            if not acc.disordered:
                acc.spans = None  # in time order: the union is kept as they come
        return cls(tip, Window(start, _NO_END, accs, keep_spans=False))

    def extend(self, readings: Iterable[EnergyReading], max_interval_ms: int) -> list[EnergyPeriod] | None:
        """Take *readings* (this device's new rows) in, and return every open period they
        changed; None when one of them needs the table (the state is then spoiled).

        They are taken in ``(boot, seq)`` order (a reading held back for a moment that still
        comes after the tip stays on this path): the final state depends only on the set.
        """
        window = self.open
        window.track()
        add, tip, opened = window.add, self.tip, window.start_ms
        # Written out flat, in locals: it runs once per reading. Named tuples sort by
        # (boot, seq) first, which are unique per device, so no key function is needed.
        for r in sorted(readings):
            if r.boot == tip.boot:
                if r.seq <= tip.seq:
                    return None  # late or out of order: it may split an interval
                first = r.ts_ms if r.ts_ms < tip.ts_ms else tip.ts_ms
                if first - first % PERIOD_MS < opened:
                    return None  # reaches a period that is not open
                if not add(tip, r, max_interval_ms):
                    return None
            elif r.boot < tip.boot:
                return None
            # A reading of a newer boot makes no interval: it only becomes the tip.
            tip = r
            floor = r.ts_ms - r.ts_ms % PERIOD_MS
            if floor > opened:
                # Periods before the tip's are final for readings in order: forget them.
                opened = window.start_ms = floor
                accs = window.accumulators()
                for start in [s for s in accs if s < floor]:
                    del accs[start]
        self.tip = tip
        return window.changed()
