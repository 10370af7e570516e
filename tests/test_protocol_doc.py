"""The examples in ``docs/protocol.md`` are checked against the node's own decoder.

Every fenced block tagged ``json`` must decode to a :class:`~storage.contract.Reading`;
every block tagged ``json invalid`` must be a :class:`~storage.contract.Rejection`, and when
the tag names a reason (``json invalid schema``), that reason. The publishing device is the
example's own ``device_id``, as it would be for a device publishing its own telemetry.
So the published contract cannot drift from what the node does without this test failing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from storage.contract import QuarantineReason, Reading, Rejection, decode_telemetry

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
        tags = words[1:]
        if tags and tags[0] in ("command", "ack"):
            continue  # command payloads: tests/test_protocol_doc_commands.py
        if not tags:
            found.append(Example(line, valid=True, reason=None, body=match["body"]))
            continue
        if tags[0] != "invalid" or len(tags) > 2:
            pytest.fail(f"protocol.md:{line}: a json block is tagged 'json' or 'json invalid [reason]', not {words}")
        reason = QuarantineReason(tags[1]) if len(tags) == 2 else None
        found.append(Example(line, valid=False, reason=reason, body=match["body"]))
    return found


EXAMPLES = _examples()


def test_the_doc_has_valid_and_invalid_examples() -> None:
    assert sum(e.valid for e in EXAMPLES) >= 3
    assert sum(not e.valid for e in EXAMPLES) >= 1


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.valid], ids=str)
def test_valid_example_is_accepted(example: Example) -> None:
    doc = json.loads(example.body)
    result = decode_telemetry(example.body.encode("utf-8"), device_id=doc["device_id"])
    assert isinstance(result, Reading), f"{example} is documented as valid but rejected: {result}"
    assert (result.boot, result.seq) == (doc["boot"], doc["seq"])


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
    result = decode_telemetry(example.body.encode("utf-8"), device_id=device_id)
    assert isinstance(result, Rejection), f"{example} is documented as invalid but accepted: {result}"
    if example.reason is not None:
        assert result.reason is example.reason, f"{example}: {result.detail}"
