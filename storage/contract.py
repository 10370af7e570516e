"""The device contract (protocol v2) in one place: device ids, topics, payload model.

Everything that needs to know what a valid device id, topic or telemetry payload is imports
it from here: the broker's ACL plugin, the device actor, the API models and the tests.
This module must never do I/O.
"""

from __future__ import annotations

import enum
import io
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

import cbor2
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEVICE_ID_PATTERN: Final = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_DEVICE_ID_RE: Final = re.compile(DEVICE_ID_PATTERN)

PROTOCOL_VERSION: Final = 2
UINT32_MAX: Final = 2**32 - 1
DEFAULT_MAX_PAYLOAD_BYTES: Final = 16 * 1024
#: Most readings in one batched PUBLISH.
MAX_BATCH_READINGS: Final = 1000
#: Default limit of a batched payload: 1,000 AC readings with a position are ~350 KB of JSON.
DEFAULT_MAX_BATCH_PAYLOAD_BYTES: Final = 512 * 1024

DeviceType = Literal["dc_meter", "ac_meter"]
DEVICE_TYPES: Final[tuple[str, ...]] = ("dc_meter", "ac_meter")


def is_valid_device_id(value: str) -> bool:
    """True when *value* is a device id: safe inside a topic level and an ACL pattern."""
    # fullmatch, not match: "$" would also accept a trailing newline.
    return _DEVICE_ID_RE.fullmatch(value) is not None


class TopicKind(enum.StrEnum):
    """The device → node and node → device topics of one device."""

    TELEMETRY = "telemetry"
    TELEMETRY_CBOR = "telemetry/cbor"
    STATUS = "status"
    COMMANDS = "commands"
    COMMANDS_ACK = "commands/ack"


#: Topics a device may publish to (device → node).
PUBLISH_KINDS: Final = frozenset(
    {TopicKind.TELEMETRY, TopicKind.TELEMETRY_CBOR, TopicKind.STATUS, TopicKind.COMMANDS_ACK}
)
#: Topic filters a device may subscribe to (node → device).
SUBSCRIBE_KINDS: Final = frozenset({TopicKind.COMMANDS})

_TOPIC_PREFIX: Final = "iot/"


def topic_for(device_id: str, kind: TopicKind) -> str:
    """The topic of *kind* for *device_id*, e.g. ``iot/emu-1/telemetry``."""
    return f"{_TOPIC_PREFIX}{device_id}/{kind.value}"


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    device_id: str
    kind: TopicKind


_KINDS_BY_SUFFIX: Final = {k.value: k for k in TopicKind}


def parse_topic(topic: str) -> ParsedTopic | None:
    """Split ``iot/{id}/{kind}`` into its parts; None when it is not a device topic.

    Wildcards never parse: ``+`` and ``#`` are not allowed in a device id.
    """
    if not topic.startswith(_TOPIC_PREFIX):
        return None
    rest = topic[len(_TOPIC_PREFIX) :]
    device_id, sep, suffix = rest.partition("/")
    if not sep or not is_valid_device_id(device_id):
        return None
    kind = _KINDS_BY_SUFFIX.get(suffix)
    if kind is None:
        return None
    return ParsedTopic(device_id, kind)


def may_publish(identity: str, topic: str) -> bool:
    """ACL: a device publishes only to its own device → node topics."""
    parsed = parse_topic(topic)
    return parsed is not None and parsed.device_id == identity and parsed.kind in PUBLISH_KINDS


def may_subscribe(identity: str, topic_filter: str) -> bool:
    """ACL: a device subscribes only to its own ``commands`` topic (no wildcards)."""
    parsed = parse_topic(topic_filter)
    return parsed is not None and parsed.device_id == identity and parsed.kind in SUBSCRIBE_KINDS


class QuarantineReason(enum.StrEnum):
    """Machine-readable reasons a message is quarantined instead of stored."""

    PAYLOAD_TOO_LARGE = "payload_too_large"
    NOT_UTF8_JSON = "not_utf8_json"
    UNSUPPORTED_VERSION = "unsupported_version"
    SCHEMA = "schema"
    DEVICE_MISMATCH = "device_mismatch"
    STALE_BOOT = "stale_boot"
    #: No longer produced (CBOR is accepted since issue #6); kept for records stored before.
    UNSUPPORTED_ENCODING = "unsupported_encoding"
    NOT_CBOR = "not_cbor"
    # The validation rules that need the device's context (storage/validation.py):
    MISSING_TYPE_FIELD = "missing_type_field"
    IMPLAUSIBLE_VOLTAGE = "implausible_voltage"
    FUTURE_TIMESTAMP = "future_timestamp"
    REGISTER_DECREASED = "register_decreased"
    RATE_LIMITED = "rate_limited"


class Measurements(BaseModel):
    """The ``m`` object. Instantaneous values plus cumulative energy registers.

    Strict: numbers must be JSON numbers (an int is a float), never strings or booleans.
    """

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    voltage_v: float = Field(allow_inf_nan=False)
    current_a: float = Field(allow_inf_nan=False)
    power_kw: float = Field(allow_inf_nan=False)
    energy_import_kwh: float = Field(ge=0, allow_inf_nan=False)
    energy_export_kwh: float = Field(ge=0, allow_inf_nan=False)
    frequency_hz: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    power_factor: float | None = Field(default=None, ge=-1, le=1, allow_inf_nan=False)
    reactive_import_kvarh: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    reactive_export_kvarh: float | None = Field(default=None, ge=0, allow_inf_nan=False)


class Location(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    lat: float = Field(ge=-90, le=90, allow_inf_nan=False)
    lon: float = Field(ge=-180, le=180, allow_inf_nan=False)


class ReadingV2(BaseModel):
    """One reading: the fields a single message and every element of a batch share.

    This is the one model definition of a reading; JSON, CBOR and batches all validate
    through it (a single message is :class:`TelemetryV2`, which adds the envelope).
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    boot: int = Field(ge=0, le=UINT32_MAX, strict=True)
    seq: int = Field(ge=0, le=UINT32_MAX, strict=True)
    ts: datetime
    m: Measurements
    loc: Location | None = None

    @field_validator("ts", mode="before")
    @classmethod
    def _rfc3339(cls, value: object) -> datetime:
        # An aware datetime can only come from CBOR (tag 0 or 1): JSON has no such type.
        if isinstance(value, datetime) and value.tzinfo is not None:
            return _utc(value)
        return parse_rfc3339(value)

    @property
    def measurements(self) -> Measurements:
        return self.m


class Envelope(BaseModel):
    """What a single message and a batch carry around their reading(s)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    v: Literal[2]  # checked for its type first: 2.0 or true is not 2
    device_id: str = Field(strict=True)

    @field_validator("v", mode="before")
    @classmethod
    def _integer_version(cls, value: object) -> object:
        if type(value) is not int:  # 2.0 and true are not the version 2
            msg = "v must be the integer 2"
            raise ValueError(msg)
        return value


class TelemetryV2(Envelope, ReadingV2):
    """One telemetry message of protocol v2 (the single-reading form)."""


class TelemetryBatchV2(Envelope):
    """A batched telemetry message: up to :data:`MAX_BATCH_READINGS` readings, oldest first."""

    readings: list[ReadingV2] = Field(min_length=1, max_length=MAX_BATCH_READINGS)


# RFC 3339 date-time: full date, full time, optional fraction, and a mandatory offset.
_RFC3339_RE: Final = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:[Zz]|[+-]\d{2}:\d{2})")


def parse_rfc3339(value: object) -> datetime:
    """An RFC 3339 date-time string → an aware UTC datetime; ValueError for anything else.

    Stricter than pydantic's datetime parsing on purpose: no Unix numbers, no dates without a
    time, no local times without an offset — a meter's clock must say what it means.
    """
    if not isinstance(value, str) or _RFC3339_RE.fullmatch(value) is None:
        msg = "must be an RFC 3339 date-time string with an offset, e.g. 2026-11-23T16:05:00.000Z"
        raise ValueError(msg)
    try:
        # The common case, once the pattern has matched: Python 3.11+ reads "Z" and any number
        # of fraction digits (truncating past 6). Six times faster than the general path below.
        parsed = datetime.fromisoformat(value)
    except ValueError:
        pass
    else:
        return parsed if parsed.tzinfo is UTC else _utc(parsed)
    text = value.upper().replace("Z", "+00:00")
    if "." in text:
        # fromisoformat takes at most 6 fraction digits; RFC 3339 allows more.
        head, _, rest = text.partition(".")
        digits = rest[: len(rest) - 6]
        text = f"{head}.{(digits + '000000')[:6]}{rest[len(digits) :]}"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        msg = f"not a valid date-time: {exc}"
        raise ValueError(msg) from None
    return _utc(parsed)


def _utc(value: datetime) -> datetime:
    """*value* in UTC; ValueError (not OverflowError) when that is before year 1 or after 9999."""
    try:
        return value.astimezone(UTC)
    except OverflowError:
        msg = "is outside the years 0001 to 9999 once converted to UTC"
        raise ValueError(msg) from None


#: A validated reading, as the sequence tracker and the store see it: the model itself (a
#: single message is a :class:`TelemetryV2`, a subclass). Copying each into a second object cost
#: ~5 % of the node's time on the batch path.
Reading = ReadingV2


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: QuarantineReason
    detail: str


def format_ts(value: datetime) -> str:
    """RFC 3339 UTC with milliseconds and a ``Z``, the form the node writes everywhere."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


@dataclass(frozen=True, slots=True)
class Batch:
    """A decoded batched message: one result per reading, in the payload's order.

    A :class:`Rejection` here is for that reading alone; its detail begins with
    ``readings[i]:``, *i* its index in the payload (from 0).
    """

    items: list[Reading | Rejection]


type Decoded = Reading | Rejection | Batch


class Encoding(enum.Enum):
    JSON = "json"
    CBOR = "cbor"


def decode_telemetry(
    payload: bytes,
    *,
    device_id: str,
    max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_PAYLOAD_BYTES,
    encoding: Encoding = Encoding.JSON,
) -> Decoded:
    """Decode and validate one telemetry payload (JSON or CBOR, single or batched) of *device_id*.

    A single message may be *max_bytes* long, a batch (a document with ``readings``)
    *max_batch_bytes*. Never raises for bad input: every failure is a :class:`Rejection` with
    a reason, for the whole payload or, inside a :class:`Batch`, for one reading.
    """
    size = len(payload)
    # The batch marker is the key's own bytes in both encodings (CBOR text is UTF-8 as is).
    marked = (b'"readings"' if encoding is Encoding.JSON else b"readings") in payload
    limit = max_batch_bytes if marked else max_bytes
    if size > limit:
        return _too_large(size, limit)
    if encoding is Encoding.CBOR:
        try:
            doc = _cbor_document(payload)
        except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError, MemoryError) as exc:
            return Rejection(QuarantineReason.NOT_CBOR, _short(str(exc) or type(exc).__name__))
        return _from_document(doc, device_id, size, max_bytes)
    # Fast path: pydantic-core parses and validates the bytes in one pass. Only a payload it
    # refuses takes the slow path below, which works out the reason to quarantine it with.
    try:
        if marked:
            batch = TelemetryBatchV2.model_validate_json(payload)
            if batch.device_id == device_id:
                return Batch(list(batch.readings))
        else:
            fast = TelemetryV2.model_validate_json(payload)
            if fast.device_id == device_id:
                return fast
    except ValidationError:
        pass
    try:
        doc = json.loads(payload.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad UTF-8, bad JSON and an integer too long to convert (CPython
        # refuses more than 4,300 digits, which fit easily in 16 KiB).
        return Rejection(QuarantineReason.NOT_UTF8_JSON, _short(str(exc)))
    return _from_document(doc, device_id, size, max_bytes)


def _cbor_document(payload: bytes) -> Any:
    """The one CBOR data item of *payload*; ValueError when bytes follow it."""
    fp = io.BytesIO(payload)
    doc = cbor2.CBORDecoder(fp).decode()
    if fp.tell() != len(payload):
        msg = f"{len(payload) - fp.tell()} bytes after the CBOR data item"
        raise ValueError(msg)
    return doc


def _from_document(doc: Any, device_id: str, size: int, max_bytes: int) -> Decoded:
    """Validate a decoded document (JSON or CBOR) and say exactly what is wrong with it."""
    if not isinstance(doc, dict):
        return Rejection(QuarantineReason.SCHEMA, "payload must be an object (a JSON object or a CBOR map)")
    version = doc.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        return Rejection(QuarantineReason.UNSUPPORTED_VERSION, f"unsupported protocol version {_describe(version)}")
    claimed = doc.get("device_id")
    if claimed != device_id:
        return Rejection(
            QuarantineReason.DEVICE_MISMATCH,
            f"device_id {_describe(claimed)} does not match the publishing device {device_id!r}",
        )
    if "readings" in doc:
        return _batch(doc)
    if size > max_bytes:
        return _too_large(size, max_bytes)
    try:
        msg = TelemetryV2.model_validate(doc)
    except ValidationError as exc:
        return Rejection(QuarantineReason.SCHEMA, _schema_detail(exc))
    return msg


def _batch(doc: dict[Any, Any]) -> Batch | Rejection:
    try:
        return Batch(list(TelemetryBatchV2.model_validate(doc).readings))
    except ValidationError as exc:
        readings = doc["readings"]
        if not isinstance(readings, list) or not 1 <= len(readings) <= MAX_BATCH_READINGS:
            # The envelope itself is wrong: the whole message is quarantined, as one.
            return Rejection(QuarantineReason.SCHEMA, _schema_detail(exc))
    items: list[Reading | Rejection] = []
    for index, item in enumerate(readings):
        try:
            items.append(ReadingV2.model_validate(item))
        except ValidationError as exc:
            items.append(Rejection(QuarantineReason.SCHEMA, _short(f"readings[{index}]: {_schema_detail(exc)}")))
    return Batch(items)


def _too_large(size: int, limit: int) -> Rejection:
    return Rejection(QuarantineReason.PAYLOAD_TOO_LARGE, f"payload is {size} bytes, the limit is {limit}")


def _schema_detail(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False)[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{loc}: {err['msg']}")
    return _short("; ".join(parts))


def _describe(value: object) -> str:
    """A short repr of a value from a payload, whatever it is (an integer of 10,000 digits has
    no repr, a list nested 10,000 deep overflows it)."""
    if isinstance(value, int) and value.bit_length() > 64:  # noqa: PLR2004 - wider than any field
        return f"an integer of {value.bit_length()} bits"
    try:
        return _short(repr(value))
    except (ValueError, RecursionError):
        return f"a {type(value).__name__}"


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
