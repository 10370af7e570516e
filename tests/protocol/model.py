"""The expected behaviour of the node for one device, written from ``docs/protocol.md``.

Plain and deliberately independent of ``actors/``: the state machine in
``test_protocol_machine.py`` feeds it every message it sends and compares what the node
reports (counters, sequence state, stored rows, quarantine) with it after every step.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Final

UINT32_MAX: Final = 2**32 - 1

COUNTERS: Final = ("received", "stored", "duplicates", "missing", "late", "resets", "quarantined")


class Verdict(enum.Enum):
    STORED = "stored"
    LATE = "late"
    DUPLICATE = "duplicate"
    STALE = "stale"


@dataclass
class SequenceModel:
    """The sequence rules of docs/protocol.md ("Sequence semantics"), one device.

    The window of the current boot is ``[low, high]``; its open gaps are kept as sorted,
    disjoint, inclusive intervals (a first message may start anywhere in uint32, so a set of
    missing numbers could be huge).
    """

    boot: int | None = None
    low: int = 0
    high: int = -1
    gaps: list[tuple[int, int]] = field(default_factory=list)
    #: Only the first boot ever seen can have a message below ``low`` (a new boot starts at 0).
    first_boot: bool = True
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))

    def observe(self, boot: int, seq: int) -> Verdict:
        c = self.counters
        if self.boot is None:
            # The first message ever starts the window at its own seq.
            self.boot, self.low, self.high = boot, seq, seq
            c["stored"] += 1
            return Verdict.STORED
        if boot < self.boot:
            c["quarantined"] += 1
            return Verdict.STALE
        if boot > self.boot:
            # Reset: the old boot's gaps stay counted in `missing`; the new window starts at 0.
            c["resets"] += 1
            self.boot, self.low, self.high, self.gaps, self.first_boot = boot, 0, -1, [], False
        if seq > self.high:
            if seq > self.high + 1:
                self._open(self.high + 1, seq - 1)
            self.high = seq
            c["stored"] += 1
            return Verdict.STORED
        if seq < self.low:
            if seq < self.low - 1:
                self._open(seq + 1, self.low - 1)
            self.low = seq
            c["stored"] += 1
            c["late"] += 1
            return Verdict.LATE
        for i, (start, end) in enumerate(self.gaps):
            if start <= seq <= end:
                self.gaps[i : i + 1] = [g for g in ((start, seq - 1), (seq + 1, end)) if g[0] <= g[1]]
                c["missing"] -= 1
                c["stored"] += 1
                c["late"] += 1
                return Verdict.LATE
        c["duplicates"] += 1
        return Verdict.DUPLICATE

    def _open(self, start: int, end: int) -> None:
        self.counters["missing"] += end - start + 1
        self.gaps.append((start, end))
        self.gaps.sort()


@dataclass(frozen=True)
class Quarantined:
    topic: str
    payload: bytes
    reason: str


@dataclass
class DeviceModel:
    """What the node must show for one device: counters, state, rows and quarantine."""

    device_id: str
    seq: SequenceModel = field(default_factory=SequenceModel)
    #: (boot, seq) → the reading document that was stored first (later copies are duplicates).
    rows: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    quarantine: list[Quarantined] = field(default_factory=list)

    @property
    def counters(self) -> dict[str, int]:
        return self.seq.counters

    def quarantined(self, topic: str, payload: bytes, reason: str) -> None:
        """A message on a telemetry topic that fails validation: received and quarantined."""
        self.counters["received"] += 1
        self.counters["quarantined"] += 1
        self.quarantine.append(Quarantined(topic, payload, reason))

    def telemetry(self, topic: str, payload: bytes, doc: dict[str, Any]) -> Verdict | None:
        """A well-formed JSON reading on the telemetry topic; None when its numbers break uint32."""
        self.counters["received"] += 1
        boot, seq = doc["boot"], doc["seq"]
        if not (0 <= boot <= UINT32_MAX and 0 <= seq <= UINT32_MAX):
            self.counters["quarantined"] += 1
            self.quarantine.append(Quarantined(topic, payload, "schema"))
            return None
        verdict = self.seq.observe(boot, seq)
        if verdict in (Verdict.STORED, Verdict.LATE):
            assert (boot, seq) not in self.rows, "model: a stored (boot, seq) was stored again"
            self.rows[boot, seq] = doc
        elif verdict is Verdict.STALE:
            self.quarantine.append(Quarantined(topic, payload, "stale_boot"))
        return verdict
