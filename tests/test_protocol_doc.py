"""The examples in ``docs/protocol.md`` are checked against the node's own decoder.

Every fenced block tagged ``json`` must decode to a :class:`~storage.contract.Reading` (or a
:class:`~storage.contract.Batch` of readings only); every block tagged ``json invalid`` must be
a :class:`~storage.contract.Rejection`, or a batch with a rejected reading, and when the tag
names a reason (``json invalid schema``), that reason. The publishing device is the example's
own ``device_id``, as it would be for a device publishing its own telemetry.

A block may also name the device's registration, ``type=ac_meter`` and ``supply=dc_750v``:
then the validation rules that need the device (:mod:`storage.validation`) are applied too,
with the node's clock at the time of the test and its default skew.
So the published contract cannot drift from what the node does without this test failing.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from storage.contract import Batch, Decoded, QuarantineReason, Reading, Rejection, decode_telemetry
from storage.validation import DEFAULT_MAX_FUTURE_SKEW_S, DeviceProfile, SupplySystem, check_reading

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

_FENCE = re.compile(
    r"""
    ^\ {0,3}(?P<fence>`{3,})(?P<info>[^`\n]*)\n   # opening fence (CommonMark allows 3 spaces)
    (?P<body>.*?)                                 # the block, as written
    ^\ {0,3}(?P=fence)`*[\ \t]*$                   # closing fence: as long or longer
    """,
    re.MULTILINE | re.DOTALL | re.VERBOSE,
)


@dataclass(frozen=True)
class Example:
    line: int
    valid: bool
    reason: QuarantineReason | None
    body: str
    profile: DeviceProfile | None = None

    def __str__(self) -> str:
        return f"protocol.md:{self.line}"


def _examples() -> list[Example]:
    text = DOC.read_text(encoding="utf-8")
    found: list[Example] = []
    for match in _FENCE.finditer(text):
        words = match["info"].split()
        if not words or words[0] != "json":
            continue
        line = text.count("\n", 0, match.start()) + 1
        tags = [w for w in words[1:] if "=" not in w]
        settings = dict(w.split("=", 1) for w in words[1:] if "=" in w)
        if set(settings) - {"type", "supply"}:
            pytest.fail(f"protocol.md:{line}: only type= and supply= may follow the tags, not {settings}")
        profile = None
        if settings:
            supply = SupplySystem(settings["supply"]) if "supply" in settings else None
            profile = DeviceProfile(settings.get("type", "dc_meter"), supply)
        if tags and tags[0] in ("command", "ack"):
            continue  # command payloads: tests/test_protocol_doc_commands.py
        if not tags:
            found.append(Example(line, valid=True, reason=None, body=match["body"], profile=profile))
            continue
        if tags[0] != "invalid" or len(tags) > 2:
            pytest.fail(f"protocol.md:{line}: a json block is tagged 'json' or 'json invalid [reason]', not {words}")
        reason = QuarantineReason(tags[1]) if len(tags) == 2 else None
        found.append(Example(line, valid=False, reason=reason, body=match["body"], profile=profile))
    return found


EXAMPLES = _examples()


def test_the_doc_has_valid_and_invalid_examples() -> None:
    assert sum(e.valid for e in EXAMPLES) >= 3
    assert sum(not e.valid for e in EXAMPLES) >= 1


def results(example: Example, device_id: str) -> list[Reading | Rejection]:
    """The example as the node would judge it: one result per reading (one for the whole
    message when it is refused as a whole), with the device's rules when it names a profile."""
    decoded: Decoded = decode_telemetry(example.body.encode("utf-8"), device_id=device_id)
    items = decoded.items if isinstance(decoded, Batch) else [decoded]
    if example.profile is None:
        return items
    now = time.time()
    checked: list[Reading | Rejection] = []
    for item in items:
        rejection = None
        if isinstance(item, Reading):
            rejection = check_reading(
                item,
                profile=example.profile,
                voltages=example.profile.voltages,
                received_at=now,
                max_future_skew=DEFAULT_MAX_FUTURE_SKEW_S,
                registers=None,
            )
        checked.append(rejection or item)
    return checked


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.valid], ids=str)
def test_valid_example_is_accepted(example: Example) -> None:
    doc = json.loads(example.body)
    items = results(example, doc["device_id"])
    assert all(isinstance(i, Reading) for i in items), f"{example} is documented as valid but rejected: {items}"
    sent = doc.get("readings", [doc])
    assert [(i.boot, i.seq) for i in items if isinstance(i, Reading)] == [(r["boot"], r["seq"]) for r in sent]


@pytest.mark.parametrize("example", [e for e in EXAMPLES if not e.valid], ids=str)
def test_invalid_example_is_rejected(example: Example) -> None:
    # An invalid example may be broken JSON on purpose; then any well-formed id will do.
    try:
        doc = json.loads(example.body)
    except json.JSONDecodeError:
        doc = {}
    device_id = doc.get("device_id") if isinstance(doc, dict) else None
    if not isinstance(device_id, str):
        device_id = "emu-4021-m1"
    rejected = [i for i in results(example, device_id) if isinstance(i, Rejection)]
    assert rejected, f"{example} is documented as invalid but accepted"
    if example.reason is not None:
        assert any(r.reason is example.reason for r in rejected), f"{example}: {rejected}"
