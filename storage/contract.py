"""The device contract (protocol v2) in one place: device ids, topics, payload model.

Everything that needs to know what a valid device id, topic or telemetry payload is imports
it from here: the broker's ACL plugin, the device actor, the API models and the tests.
This module must never do I/O.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEVICE_ID_PATTERN: Final = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_DEVICE_ID_RE: Final = re.compile(DEVICE_ID_PATTERN)

PROTOCOL_VERSION: Final = 2
UINT32_MAX: Final = 2**32 - 1
DEFAULT_MAX_PAYLOAD_BYTES: Final = 16 * 1024

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
    UNSUPPORTED_ENCODING = "unsupported_encoding"
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


class TelemetryV2(BaseModel):
    """One telemetry message of protocol v2 (the single-reading form)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    v: Literal[2]  # decode_telemetry checks the type first: 2.0 or true is not 2
    device_id: str = Field(strict=True)
    boot: int = Field(ge=0, le=UINT32_MAX, strict=True)
    seq: int = Field(ge=0, le=UINT32_MAX, strict=True)
    ts: datetime
    m: Measurements
    loc: Location | None = None

    @field_validator("v", mode="before")
    @classmethod
    def _integer_version(cls, value: object) -> object:
        if type(value) is not int:  # 2.0 and true are not the version 2
            msg = "v must be the integer 2"
            raise ValueError(msg)
        return value

    @field_validator("ts", mode="before")
    @classmethod
    def _rfc3339(cls, value: object) -> datetime:
        return parse_rfc3339(value)


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
    return parsed.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class Reading:
    """A validated reading, as the sequence tracker and the store see it."""

    boot: int
    seq: int
    ts: datetime
    measurements: Measurements
    loc: Location | None


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: QuarantineReason
    detail: str


def format_ts(value: datetime) -> str:
    """RFC 3339 UTC with milliseconds and a ``Z``, the form the node writes everywhere."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def decode_telemetry(
    payload: bytes,
    *,
    device_id: str,
    max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> Reading | Rejection:
    """Decode and validate one JSON telemetry payload published by *device_id*.

    Never raises for bad input: every failure is a :class:`Rejection` with a reason.
    """
    if len(payload) > max_bytes:
        return Rejection(
            QuarantineReason.PAYLOAD_TOO_LARGE, f"payload is {len(payload)} bytes, the limit is {max_bytes}"
        )
    # Fast path: pydantic-core parses and validates the bytes in one pass. Only a payload it
    # refuses takes the slow path below, which works out the reason to quarantine it with.
    try:
        fast = TelemetryV2.model_validate_json(payload)
    except ValidationError:
        pass
    else:
        if fast.device_id == device_id:
            return Reading(boot=fast.boot, seq=fast.seq, ts=fast.ts, measurements=fast.m, loc=fast.loc)
    try:
        doc: Any = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        return Rejection(QuarantineReason.NOT_UTF8_JSON, _short(str(exc)))
    if not isinstance(doc, dict):
        return Rejection(QuarantineReason.SCHEMA, "payload must be a JSON object")
    version = doc.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        return Rejection(QuarantineReason.UNSUPPORTED_VERSION, f"unsupported protocol version {_short(repr(version))}")
    claimed = doc.get("device_id")
    if claimed != device_id:
        return Rejection(
            QuarantineReason.DEVICE_MISMATCH,
            f"device_id {_short(repr(claimed))} does not match the publishing device {device_id!r}",
        )
    try:
        msg = TelemetryV2.model_validate(doc)
    except ValidationError as exc:
        return Rejection(QuarantineReason.SCHEMA, _schema_detail(exc))
    return Reading(boot=msg.boot, seq=msg.seq, ts=msg.ts, measurements=msg.m, loc=msg.loc)


def _schema_detail(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False)[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{loc}: {err['msg']}")
    return _short("; ".join(parts))


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
