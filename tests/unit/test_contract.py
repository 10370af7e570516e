"""Property tests of the device contract: ids, topics, ACLs, payload decoding."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from storage.contract import (
    PUBLISH_KINDS,
    SUBSCRIBE_KINDS,
    QuarantineReason,
    Reading,
    Rejection,
    TopicKind,
    decode_telemetry,
    format_ts,
    is_valid_device_id,
    may_publish,
    may_subscribe,
    parse_rfc3339,
    parse_topic,
    topic_for,
)
from tests.payloads import reading

# Valid ids: the rule's own alphabet, 1..64 characters, first one alphanumeric.
ID_HEAD = "abcdefghijklmnopqrstuvwxyz0123456789"
device_ids = st.builds(
    lambda head, tail: head + tail,
    st.sampled_from(ID_HEAD),
    st.text(alphabet=ID_HEAD + "._-", max_size=63),
)
# Anything at all, including the characters that must never appear in an id: wildcards,
# separators, upper case, whitespace, unicode look-alikes.
any_text = st.text(max_size=80)
kinds = st.sampled_from(list(TopicKind))


@given(device_ids)
def test_valid_ids_are_valid(device_id: str) -> None:
    assert is_valid_device_id(device_id)


@given(any_text)
def test_an_id_never_holds_topic_or_acl_syntax(text: str) -> None:
    if is_valid_device_id(text):
        assert not set(text) & set("/+#$ \t\n\x00")
        assert text == text.lower()
        assert 1 <= len(text) <= 64


@given(device_ids, kinds)
def test_topics_round_trip(device_id: str, kind: TopicKind) -> None:
    parsed = parse_topic(topic_for(device_id, kind))
    assert parsed is not None
    assert (parsed.device_id, parsed.kind) == (device_id, kind)


@given(any_text)
def test_parse_topic_never_raises_and_only_accepts_the_grammar(topic: str) -> None:
    parsed = parse_topic(topic)
    if parsed is not None:
        assert topic == topic_for(parsed.device_id, parsed.kind)


@given(device_ids, device_ids, kinds)
def test_acl_own_topics_only(identity: str, owner: str, kind: TopicKind) -> None:
    topic = topic_for(owner, kind)
    assert may_publish(identity, topic) == (identity == owner and kind in PUBLISH_KINDS)
    assert may_subscribe(identity, topic) == (identity == owner and kind in SUBSCRIBE_KINDS)


@given(device_ids, any_text)
def test_acl_denies_everything_else(identity: str, topic: str) -> None:
    """Whatever the topic (wildcards, other devices, other trees), only the grammar passes."""
    if may_publish(identity, topic):
        assert topic in {topic_for(identity, k) for k in PUBLISH_KINDS}
    if may_subscribe(identity, topic):
        assert topic == topic_for(identity, TopicKind.COMMANDS)


@given(device_ids)
def test_wildcard_subscriptions_are_denied(identity: str) -> None:
    for pattern in ("#", "iot/#", f"iot/{identity}/#", "iot/+/commands", f"iot/{identity}/+", "+/+/+"):
        assert not may_subscribe(identity, pattern)
        assert not may_publish(identity, pattern)


# Device clocks: any instant between 2000 and 2100, at millisecond resolution.
instants = st.datetimes(
    min_value=datetime(2000, 1, 1),  # noqa: DTZ001 - hypothesis takes naive bounds
    max_value=datetime(2100, 1, 1),  # noqa: DTZ001
    timezones=st.just(UTC),
).map(lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000))
uint32 = st.integers(min_value=0, max_value=2**32 - 1)
# Physical values in a wide but finite range; the contract checks types and signs here,
# plausibility against the supply system comes with the validation rules.
finite = st.floats(min_value=-1e7, max_value=1e7, allow_nan=False, allow_infinity=False)
registers = st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False)


@st.composite
def valid_payloads(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    device_id = draw(device_ids)
    doc = reading(device_id, draw(uint32), draw(uint32), ts=format_ts(draw(instants)))
    doc["m"] = {
        "voltage_v": draw(finite),
        "current_a": draw(finite),
        "power_kw": draw(finite),
        "energy_import_kwh": draw(registers),
        "energy_export_kwh": draw(registers),
    }
    if draw(st.booleans()):
        doc["loc"] = {"lat": draw(st.floats(-90, 90)), "lon": draw(st.floats(-180, 180))}
    if draw(st.booleans()):
        doc["firmware"] = draw(any_text)  # unknown fields are ignored by the typed store
    return device_id, doc


@given(valid_payloads())
def test_valid_payloads_decode_to_their_values(case: tuple[str, dict[str, Any]]) -> None:
    device_id, doc = case
    result = decode_telemetry(json.dumps(doc).encode(), device_id=device_id)
    assert isinstance(result, Reading), result
    assert (result.boot, result.seq) == (doc["boot"], doc["seq"])
    assert format_ts(result.ts) == doc["ts"]
    for key, value in doc["m"].items():
        assert math.isclose(getattr(result.measurements, key), value)


@given(valid_payloads(), st.data())
def test_a_missing_or_mistyped_field_is_quarantined_never_raised(
    case: tuple[str, dict[str, Any]], data: st.DataObject
) -> None:
    device_id, doc = case
    field = data.draw(st.sampled_from(["v", "device_id", "boot", "seq", "ts", "m"]))
    mutation = data.draw(st.sampled_from(["drop", "string", "null", "float", "bool"]))
    if mutation == "drop":
        del doc[field]
    elif mutation == "string":
        doc[field] = str(doc[field])
    elif mutation == "null":
        doc[field] = None
    elif mutation == "float":
        doc[field] = 1.5
    else:
        doc[field] = True
    result = decode_telemetry(json.dumps(doc).encode(), device_id=device_id)
    if mutation == "string" and field in ("device_id", "ts"):
        assert isinstance(result, Reading)  # str() of a string field changes nothing
    else:
        assert isinstance(result, Rejection)


@given(valid_payloads(), st.sampled_from(["voltage_v", "current_a", "energy_import_kwh"]))
def test_numbers_as_strings_are_refused(case: tuple[str, dict[str, Any]], key: str) -> None:
    device_id, doc = case
    doc["m"][key] = str(doc["m"][key])
    result = decode_telemetry(json.dumps(doc).encode(), device_id=device_id)
    assert isinstance(result, Rejection)
    assert result.reason is QuarantineReason.SCHEMA


@given(st.binary(max_size=512), device_ids)
def test_arbitrary_bytes_never_raise(payload: bytes, device_id: str) -> None:
    assert isinstance(decode_telemetry(payload, device_id=device_id), Reading | Rejection)


@given(valid_payloads(), device_ids)
def test_spoofed_device_id_is_quarantined(case: tuple[str, dict[str, Any]], publisher: str) -> None:
    device_id, doc = case
    result = decode_telemetry(json.dumps(doc).encode(), device_id=publisher)
    if publisher == device_id:
        assert isinstance(result, Reading)
    else:
        assert isinstance(result, Rejection)
        assert result.reason is QuarantineReason.DEVICE_MISMATCH


@given(instants, st.integers(min_value=-14 * 60, max_value=14 * 60))
def test_rfc3339_with_any_offset_is_the_same_instant(instant: datetime, offset_min: int) -> None:
    local = instant.astimezone(timezone(timedelta(minutes=offset_min)))
    assert parse_rfc3339(local.isoformat()) == instant


@given(st.one_of(st.integers(), st.floats(), st.none(), st.text(max_size=40)))
def test_rfc3339_refuses_everything_else(value: object) -> None:
    if isinstance(value, str) and len(value) >= 20 and value[4] == "-":
        return  # may be a genuine date-time; covered above
    try:
        parse_rfc3339(value)
    except ValueError:
        return
    raise AssertionError(f"accepted {value!r}")


def test_limits() -> None:
    doc = reading("m-1", 0, 0)
    big = json.dumps(doc).encode() + b" " * 20_000
    result = decode_telemetry(big, device_id="m-1")
    assert isinstance(result, Rejection)
    assert result.reason is QuarantineReason.PAYLOAD_TOO_LARGE
    doc["v"] = 2.0
    result = decode_telemetry(json.dumps(doc).encode(), device_id="m-1")
    assert isinstance(result, Rejection)
    assert result.reason is QuarantineReason.UNSUPPORTED_VERSION
