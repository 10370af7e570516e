"""The command examples in ``docs/protocol.md`` are checked against the node's own code.

A block tagged ``json command`` must be exactly what the node publishes for that command
(:func:`storage.command_contract.command_payload`); ``json ack`` must decode to an
:class:`~storage.command_contract.Ack`; ``json ack invalid <reason>`` must be refused with
that quarantine reason. So the published command contract cannot drift either.
"""

from __future__ import annotations

import json
import re

import pytest

from storage.command_contract import Ack, command_payload, decode_ack
from storage.contract import QuarantineReason, Rejection, parse_rfc3339
from tests.test_protocol_doc import _FENCE, DOC


def _blocks(kind: str) -> list[tuple[str, list[str], str]]:
    text = DOC.read_text(encoding="utf-8")
    found = []
    for match in _FENCE.finditer(text):
        words = match["info"].split()
        if words[:2] == ["json", kind]:
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"protocol.md:{line}", words[2:], match["body"]))
    return found


COMMANDS = _blocks("command")
ACKS = _blocks("ack")


def test_the_doc_shows_a_command_an_ack_and_a_bad_ack() -> None:
    assert COMMANDS
    assert any(not tags for _, tags, _ in ACKS)
    assert any(tags[:1] == ["invalid"] for _, tags, _ in ACKS)


@pytest.mark.parametrize(("where", "tags", "body"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_command_example_is_what_the_node_sends(where: str, tags: list[str], body: str) -> None:
    doc = json.loads(body)
    expires = parse_rfc3339(doc["expires_at"]).timestamp()
    sent = json.loads(command_payload(doc["command_id"], doc["name"], doc["args"], expires))
    assert sent == doc, where
    assert re.fullmatch(r"[a-z][a-z0-9_]{0,63}", doc["name"])


@pytest.mark.parametrize(("where", "tags", "body"), ACKS, ids=[a[0] for a in ACKS])
def test_ack_example(where: str, tags: list[str], body: str) -> None:
    result = decode_ack(body.encode("utf-8"))
    if not tags:
        assert isinstance(result, Ack), f"{where} is documented as valid but refused: {result}"
        return
    assert tags[0] == "invalid", f"{where}: an ack block is tagged 'json ack' or 'json ack invalid REASON'"
    assert isinstance(result, Rejection), f"{where} is documented as invalid but accepted"
    assert result.reason is QuarantineReason(tags[1])
