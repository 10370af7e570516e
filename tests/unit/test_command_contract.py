"""The command contract: the ack decoder (every rule, and never an exception) and the payload.

Strategies: any JSON object with any of the ack's fields, of any JSON type, plus arbitrary
bytes; the decoder must accept exactly the well-typed ones and give every other a reason.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from ulid import ULID

from storage.command_contract import (
    MAX_ACK_BYTES,
    MAX_ACK_DETAIL,
    Ack,
    AckStatus,
    command_payload,
    decode_ack,
    is_command_id,
)
from storage.contract import QuarantineReason, Rejection, parse_rfc3339

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
ulids = st.builds(lambda t, r: str(ULID.from_timestamp(t)), st.floats(0, 2**40 / 1000), st.integers())
statuses = st.sampled_from([s.value for s in AckStatus])


@given(command_id=ulids, status=statuses, detail=st.text(max_size=2 * MAX_ACK_DETAIL) | st.none())
def test_a_well_formed_ack_is_decoded(command_id: str, status: str, detail: str | None) -> None:
    doc: dict[str, Any] = {"command_id": command_id, "status": status}
    if detail is not None:
        doc["detail"] = detail
    payload = json.dumps(doc).encode()
    result = decode_ack(payload)
    if len(payload) > MAX_ACK_BYTES:
        assert isinstance(result, Rejection)
        assert result.reason is QuarantineReason.PAYLOAD_TOO_LARGE
        return
    assert result == Ack(command_id, AckStatus(status), (detail or "")[:MAX_ACK_DETAIL])


@given(
    fields=st.fixed_dictionaries(
        {}, optional={"command_id": json_values | ulids, "status": json_values | statuses, "detail": json_values}
    )
)
def test_anything_else_is_quarantined_as_schema(fields: dict[str, Any]) -> None:
    result = decode_ack(json.dumps(fields).encode())
    well_formed = (
        isinstance(fields.get("command_id"), str)
        and is_command_id(fields["command_id"])
        and fields.get("status") in ["ok", "error", "rejected"]
        and isinstance(fields.get("detail", ""), str)
    )
    if well_formed:
        assert isinstance(result, Ack)
    else:
        assert isinstance(result, Rejection)
        assert result.reason is QuarantineReason.SCHEMA
        assert result.detail.startswith("command ack")


@given(payload=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_the_decoder_never_raises(payload: bytes) -> None:
    result = decode_ack(payload)
    assert isinstance(result, Ack | Rejection)


@given(
    command_id=ulids,
    name=st.from_regex(r"[a-z][a-z0-9_]{0,20}", fullmatch=True),
    args=st.dictionaries(st.text(max_size=5), json_values, max_size=3),
    expires=st.floats(0, 4e9),
)
def test_the_command_payload_says_what_the_protocol_says(
    command_id: str, name: str, args: dict[str, Any], expires: float
) -> None:
    doc = json.loads(command_payload(command_id, name, args, expires))
    assert list(doc) == ["command_id", "name", "args", "expires_at"]
    assert (doc["command_id"], doc["name"], doc["args"]) == (command_id, name, args)
    assert abs(parse_rfc3339(doc["expires_at"]).timestamp() - expires) < 0.001
