"""Property tests of CBOR and batched telemetry: one model, the same rules, the same rows."""

from __future__ import annotations

import json
import struct
from datetime import UTC, datetime
from typing import Any

import cbor2
from hypothesis import given
from hypothesis import strategies as st

from actors.device import _row
from storage.contract import (
    MAX_BATCH_READINGS,
    Batch,
    Encoding,
    QuarantineReason,
    Reading,
    Rejection,
    decode_telemetry,
    format_ts,
)
from tests.payloads import reading
from tests.unit.test_contract import device_ids, valid_payloads

CBOR = Encoding.CBOR


def as_cbor(doc: dict[str, Any], ts_form: str = "text") -> bytes:
    """*doc* in CBOR, with ``ts`` as RFC 3339 text, a tag 0 date-time or a tag 1 epoch number."""
    doc = json.loads(json.dumps(doc))
    if ts_form != "text" and "ts" in doc:
        instant = datetime.fromisoformat(doc["ts"].replace("Z", "+00:00"))
        doc["ts"] = instant  # cbor2 writes an aware datetime as tag 0, or tag 1 with timestamps
        return cbor2.dumps(doc, datetime_as_timestamp=ts_form == "tag1")
    return cbor2.dumps(doc)


def strip(doc: dict[str, Any]) -> dict[str, Any]:
    """A reading of a batch: the single message without its envelope."""
    return {k: v for k, v in doc.items() if k not in ("v", "device_id")}


@given(valid_payloads(), st.sampled_from(["text", "tag0", "tag1"]))
def test_the_same_reading_gives_the_same_row_in_json_and_cbor(case: tuple[str, dict[str, Any]], ts_form: str) -> None:
    """What the node stores (the telemetry row) does not depend on the encoding or ts form."""
    device_id, doc = case
    from_json = decode_telemetry(json.dumps(doc).encode(), device_id=device_id)
    from_cbor = decode_telemetry(as_cbor(doc, ts_form), device_id=device_id, encoding=CBOR)
    assert isinstance(from_json, Reading), from_json
    assert isinstance(from_cbor, Reading), from_cbor
    assert _row(from_cbor) == _row(from_json)
    assert from_cbor == from_json


@given(valid_payloads(), st.data())
def test_cbor_breaks_the_same_rules_as_json(case: tuple[str, dict[str, Any]], data: st.DataObject) -> None:
    """A field broken the same way is refused for the same reason in both encodings."""
    device_id, doc = case
    field = data.draw(st.sampled_from(["v", "device_id", "boot", "seq", "ts", "m"]))
    doc[field] = data.draw(st.sampled_from([None, 1.5, True, "x", -1, []]))
    from_json = decode_telemetry(json.dumps(doc).encode(), device_id=device_id)
    from_cbor = decode_telemetry(cbor2.dumps(doc), device_id=device_id, encoding=CBOR)
    assert type(from_json) is type(from_cbor)
    if isinstance(from_json, Rejection):
        assert isinstance(from_cbor, Rejection)
        assert from_cbor.reason is from_json.reason


@given(st.binary(max_size=512), device_ids)
def test_arbitrary_bytes_as_cbor_never_raise(payload: bytes, device_id: str) -> None:
    result = decode_telemetry(payload, device_id=device_id, encoding=CBOR)
    assert isinstance(result, Reading | Rejection | Batch)


def test_cbor_specific_refusals() -> None:
    doc = reading("m-1", 1, 0)
    good = cbor2.dumps(doc)
    cases = {
        good + b"\x00": QuarantineReason.NOT_CBOR,  # bytes after the data item
        b"\xff": QuarantineReason.NOT_CBOR,
        good[:-3]: QuarantineReason.NOT_CBOR,  # truncated
        cbor2.dumps([doc]): QuarantineReason.SCHEMA,  # not a map
        cbor2.dumps({**doc, "boot": 1.0}): QuarantineReason.SCHEMA,  # a float is not an integer
        cbor2.dumps({**doc, "device_id": b"m-1"}): QuarantineReason.DEVICE_MISMATCH,  # bytes, not text
        cbor2.dumps({**doc, "v": 2.0}): QuarantineReason.UNSUPPORTED_VERSION,
        # tag 0 with a local time (no offset) is not RFC 3339; cbor2 refuses it while decoding
        b"\xc0" + cbor2.dumps("2026-11-23T16:05:00")[0:1] + b"2026-11-23T16:05:00": QuarantineReason.NOT_CBOR,
    }
    for payload, reason in cases.items():
        result = decode_telemetry(payload, device_id="m-1", encoding=CBOR)
        assert isinstance(result, Rejection), payload
        assert result.reason is reason, (payload, result)


def test_cbor_tag1_epoch_numbers_int_and_float() -> None:
    doc = reading("m-1", 1, 0)
    expected = datetime(2026, 11, 23, 16, 5, tzinfo=UTC)
    for epoch in (b"\x1a" + struct.pack(">I", int(expected.timestamp())), cbor2.dumps(expected.timestamp())):
        payload = cbor2.dumps({**doc, "ts": None}).replace(b"\xf6", b"\xc1" + epoch)
        result = decode_telemetry(payload, device_id="m-1", encoding=CBOR)
        assert isinstance(result, Reading), result
        assert result.ts == expected


# -- batches ---------------------------------------------------------------------------------------


@st.composite
def batches(draw: st.DrawFn) -> tuple[str, list[dict[str, Any]], set[int]]:
    """A device, up to 60 readings (each a valid payload of its own), and which of them to break.

    60, not 1,000: the rules are per reading, so the batch length adds nothing but time; the
    limit itself is tested below.
    """
    device_id = draw(device_ids)
    n = draw(st.integers(1, 60))
    docs = []
    for _ in range(n):
        _, doc = draw(valid_payloads())
        docs.append(strip(doc))
    broken = draw(st.sets(st.integers(0, n - 1), max_size=n))
    return device_id, docs, broken


BREAKS = [("seq", "7"), ("ts", "yesterday"), ("m", None), ("boot", -1), ("loc", {"lat": 91, "lon": 0})]


@given(batches(), st.sampled_from(BREAKS), st.sampled_from(["json", "cbor"]))
def test_a_bad_reading_is_refused_alone_with_its_index(
    case: tuple[str, list[dict[str, Any]], set[int]], brk: tuple[str, Any], encoding: str
) -> None:
    device_id, docs, broken = case
    field, value = brk
    for i in broken:
        docs[i][field] = value
    doc = {"v": 2, "device_id": device_id, "readings": docs}
    if encoding == "json":
        result = decode_telemetry(json.dumps(doc).encode(), device_id=device_id, max_batch_bytes=1 << 20)
    else:
        result = decode_telemetry(cbor2.dumps(doc), device_id=device_id, max_batch_bytes=1 << 20, encoding=CBOR)
    assert isinstance(result, Batch), result
    assert len(result.items) == len(docs)
    for i, (item, sent) in enumerate(zip(result.items, docs, strict=True)):
        if i in broken:
            assert isinstance(item, Rejection)
            assert item.reason is QuarantineReason.SCHEMA
            assert item.detail.startswith(f"readings[{i}]: {field}")
        else:
            assert isinstance(item, Reading), item
            assert (item.boot, item.seq, format_ts(item.ts)) == (sent["boot"], sent["seq"], sent["ts"])


@given(batches())
def test_a_batch_gives_the_rows_its_readings_give_one_by_one(case: tuple[str, list[dict[str, Any]], set[int]]) -> None:
    device_id, docs, _ = case
    batch = decode_telemetry(
        json.dumps({"v": 2, "device_id": device_id, "readings": docs}).encode(),
        device_id=device_id,
        max_batch_bytes=1 << 20,
    )
    assert isinstance(batch, Batch)
    for item, doc in zip(batch.items, docs, strict=True):
        single = decode_telemetry(json.dumps({"v": 2, "device_id": device_id, **doc}).encode(), device_id=device_id)
        assert isinstance(item, Reading)
        assert isinstance(single, Reading)
        assert _row(item) == _row(single)


def test_the_envelope_of_a_batch_is_all_or_nothing() -> None:
    one = strip(reading("m-1", 1, 0))
    cases = [
        ({"v": 2, "device_id": "m-1", "readings": []}, QuarantineReason.SCHEMA),
        ({"v": 2, "device_id": "m-1", "readings": [one] * (MAX_BATCH_READINGS + 1)}, QuarantineReason.SCHEMA),
        ({"v": 2, "device_id": "m-1", "readings": {"0": one}}, QuarantineReason.SCHEMA),
        ({"v": 2, "device_id": "m-1", "readings": None}, QuarantineReason.SCHEMA),
        ({"v": 1, "device_id": "m-1", "readings": [one]}, QuarantineReason.UNSUPPORTED_VERSION),
        ({"v": 2, "device_id": "m-2", "readings": [one]}, QuarantineReason.DEVICE_MISMATCH),
        ({"device_id": "m-1", "readings": [one]}, QuarantineReason.UNSUPPORTED_VERSION),
    ]
    for doc, reason in cases:
        for payload, enc in ((json.dumps(doc).encode(), Encoding.JSON), (cbor2.dumps(doc), CBOR)):
            result = decode_telemetry(payload, device_id="m-1", max_batch_bytes=1 << 20, encoding=enc)
            assert isinstance(result, Rejection), (doc, enc)
            assert result.reason is reason, (doc, enc, result)
    full = {"v": 2, "device_id": "m-1", "readings": [one] * MAX_BATCH_READINGS}
    result = decode_telemetry(json.dumps(full).encode(), device_id="m-1", max_batch_bytes=1 << 20)
    assert isinstance(result, Batch)
    assert len(result.items) == MAX_BATCH_READINGS


def test_size_limits_of_single_and_batched_messages() -> None:
    one = strip(reading("m-1", 1, 0))
    batch = json.dumps({"v": 2, "device_id": "m-1", "readings": [one] * 200}).encode()
    assert 16 * 1024 < len(batch) < 512 * 1024
    assert isinstance(decode_telemetry(batch, device_id="m-1"), Batch)  # the batch limit applies
    small = decode_telemetry(batch, device_id="m-1", max_batch_bytes=len(batch) - 1)
    assert isinstance(small, Rejection)
    assert small.reason is QuarantineReason.PAYLOAD_TOO_LARGE
    # A single reading padded past max_bytes is too large whatever the batch limit says.
    padded = json.dumps({**reading("m-1", 1, 0), "pad": "x" * 20_000}).encode()
    for payload, enc in ((padded, Encoding.JSON), (cbor2.dumps(json.loads(padded)), CBOR)):
        result = decode_telemetry(payload, device_id="m-1", encoding=enc)
        assert isinstance(result, Rejection)
        assert result.reason is QuarantineReason.PAYLOAD_TOO_LARGE
    # A single message that says "readings" somewhere is still held to max_bytes once decoded.
    sneaky = json.dumps({**reading("m-1", 1, 0), "note": "readings", "pad": "x" * 20_000}).encode()
    result = decode_telemetry(sneaky, device_id="m-1")
    assert isinstance(result, Rejection)
    assert result.reason is QuarantineReason.PAYLOAD_TOO_LARGE


# Any CBOR value: the leaves include integers far wider than any field (CPython refuses to
# print more than 4,300 digits) and every scalar type; containers nest up to ~6 levels.
cbor_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=2**64).map(lambda n: n**40),
        st.floats(),
        st.text(max_size=20),
        st.binary(max_size=20),
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20,
)


@given(st.sampled_from(["v", "device_id", "boot", "seq", "ts", "m", "loc", "readings"]), cbor_values, st.booleans())
def test_any_value_in_any_field_is_quarantined_or_accepted_never_raised(field: str, value: Any, batch: bool) -> None:
    doc: dict[str, Any] = reading("m-1", 1, 0)
    if batch:
        doc = {"v": 2, "device_id": "m-1", "readings": [strip(doc)]}
        target = doc if field in ("v", "device_id", "readings") else doc["readings"][0]
    else:
        target = doc
    target[field] = value
    for payload, enc in ((cbor2.dumps(doc), CBOR), (_json_or_none(doc), Encoding.JSON)):
        if payload is None:
            continue
        result = decode_telemetry(payload, device_id="m-1", max_batch_bytes=1 << 20, encoding=enc)
        assert isinstance(result, Reading | Rejection | Batch)


def _json_or_none(doc: dict[str, Any]) -> bytes | None:
    try:
        return json.dumps(doc).encode()
    except (TypeError, ValueError):  # bytes, or an integer too long to write: not JSON-able
        return None


def test_integers_too_long_to_print_are_quarantined() -> None:
    """CPython refuses to convert integers of more than 4,300 digits to text: a payload with
    one must be quarantined, not crash the device's actor."""
    huge = b"1" * 5000
    cases = [
        (b'{"v": ' + huge + b"}", Encoding.JSON, QuarantineReason.NOT_UTF8_JSON),
        (b'{"v": 2, "device_id": "m-1", "boot": ' + huge + b"}", Encoding.JSON, QuarantineReason.NOT_UTF8_JSON),
        (cbor2.dumps({"v": 10**5000, "device_id": "m-1"}), CBOR, QuarantineReason.UNSUPPORTED_VERSION),
        (cbor2.dumps({"v": 2, "device_id": 10**5000}), CBOR, QuarantineReason.DEVICE_MISMATCH),
        (cbor2.dumps({**reading("m-1", 1, 0), "seq": 10**5000}), CBOR, QuarantineReason.SCHEMA),
    ]
    for payload, enc, reason in cases:
        result = decode_telemetry(payload, device_id="m-1", encoding=enc)
        assert isinstance(result, Rejection)
        assert result.reason is reason, result
        assert len(result.detail) <= 300


@given(
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)),  # noqa: DTZ001
    st.integers(min_value=-23 * 60 - 59, max_value=23 * 60 + 59),
    st.sampled_from(["json", "cbor-text", "cbor-tag0"]),
)
def test_any_date_time_with_any_offset_is_stored_or_quarantined(local: datetime, offset_min: int, form: str) -> None:
    """The whole range of RFC 3339 (years 0001-9999, offsets up to ±23:59): a time whose UTC
    equivalent falls outside years 0001-9999 is refused as `schema`, never raised."""
    sign = "+" if offset_min >= 0 else "-"
    text = local.isoformat() + f"{sign}{abs(offset_min) // 60:02d}:{abs(offset_min) % 60:02d}"
    doc = reading("m-1", 1, 0, ts=text)
    if form == "json":
        result = decode_telemetry(json.dumps(doc).encode(), device_id="m-1")
    else:
        payload = cbor2.dumps(doc) if form == "cbor-text" else cbor2.dumps({**doc, "ts": datetime.fromisoformat(text)})
        result = decode_telemetry(payload, device_id="m-1", encoding=CBOR)
    try:
        expected = datetime.fromisoformat(text).astimezone(UTC)
    except OverflowError:
        assert isinstance(result, Rejection), result
        assert result.reason in (QuarantineReason.SCHEMA, QuarantineReason.NOT_CBOR)
    else:
        assert isinstance(result, Reading), result
        assert result.ts == expected
