"""The command contract (protocol v2, "Commands"): states, the node → device payload, the ack.

One place for what a command and an acknowledgement look like on the wire, shared by the
command actor (``actors.commands``), the API (``web``), the store and the fleet simulator.
The same rules as ``storage.contract``: strict types, and decoding never raises for bad
input but returns a :class:`~storage.contract.Rejection` with a quarantine reason.
This module must never do I/O.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from storage.contract import QuarantineReason, Rejection, format_ts

#: A command name: lower case, digits and ``_``, like a function name (``set_interval``).
COMMAND_NAME_PATTERN: Final = r"^[a-z][a-z0-9_]{0,63}$"
#: A ULID in Crockford base32, as the node issues command ids.
COMMAND_ID_PATTERN: Final = r"^[0-9A-HJKMNP-TV-Z]{26}$"
_COMMAND_ID_RE: Final = re.compile(COMMAND_ID_PATTERN)

#: An ack is a short JSON object; anything larger is not one (quarantined as too large).
MAX_ACK_BYTES: Final = 4096
#: The ``detail`` of an ack is kept in the command's history, cut to this many characters.
MAX_ACK_DETAIL: Final = 500
#: ``args`` of one command, encoded as compact JSON, at most this many bytes.
MAX_ARGS_BYTES: Final = 4096


class CommandState(enum.StrEnum):
    """``queued → sent → acked | failed | expired``; the last three are final."""

    QUEUED = "queued"
    SENT = "sent"
    ACKED = "acked"
    FAILED = "failed"
    EXPIRED = "expired"

    @property
    def final(self) -> bool:
        return self in _FINAL


_FINAL: Final = frozenset({CommandState.ACKED, CommandState.FAILED, CommandState.EXPIRED})


class AckStatus(enum.StrEnum):
    OK = "ok"
    ERROR = "error"
    REJECTED = "rejected"


def is_command_id(value: str) -> bool:
    return _COMMAND_ID_RE.fullmatch(value) is not None


def command_payload(command_id: str, name: str, args: dict[str, Any], expires_at: float) -> bytes:
    """What the node publishes on ``iot/{id}/commands`` (compact JSON, UTF-8)."""
    doc = {
        "command_id": command_id,
        "name": name,
        "args": args,
        "expires_at": format_ts(datetime.fromtimestamp(expires_at, UTC)),
    }
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class _AckModel(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    command_id: str = Field(pattern=COMMAND_ID_PATTERN)
    status: AckStatus
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Ack:
    """A device's acknowledgement of one command."""

    command_id: str
    status: AckStatus
    detail: str


def decode_ack(payload: bytes) -> Ack | Rejection:
    """Decode an acknowledgement published on ``iot/{id}/commands/ack``; never raises."""
    if len(payload) > MAX_ACK_BYTES:
        return Rejection(
            QuarantineReason.PAYLOAD_TOO_LARGE, f"command ack is {len(payload)} bytes, the limit is {MAX_ACK_BYTES}"
        )
    try:
        doc: Any = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        return Rejection(QuarantineReason.NOT_UTF8_JSON, f"command ack: {str(exc)[:200]}")
    if not isinstance(doc, dict):
        return Rejection(QuarantineReason.SCHEMA, "command ack must be a JSON object")
    try:
        # Strict mode takes the enum only as an instance; the wire carries its value.
        model = _AckModel.model_validate(doc, strict=False) if _plain_types(doc) else None
    except ValidationError as exc:
        parts = [
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False)[:3]
        ]
        return Rejection(QuarantineReason.SCHEMA, "command ack: " + "; ".join(parts))
    if model is None:
        return Rejection(QuarantineReason.SCHEMA, "command ack: command_id, status and detail must be strings")
    return Ack(model.command_id, model.status, model.detail[:MAX_ACK_DETAIL])


def _plain_types(doc: dict[str, Any]) -> bool:
    """Every field of an ack is a JSON string when present (no numbers or nulls in disguise)."""
    return all(isinstance(doc[k], str) for k in ("command_id", "status", "detail") if k in doc)
