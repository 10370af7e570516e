"""Request and response models of ``/api/v1/devices/{id}/commands`` (pydantic, for OpenAPI too).

The command name rule, the states and the size limit of ``args`` are the contract's
(:mod:`storage.command_contract`), not copies. This module does no I/O.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_serializer

from storage.command_contract import COMMAND_NAME_PATTERN, MAX_ARGS_BYTES, CommandState
from storage.records import CommandHistoryEntry, CommandRecord
from web.models import PageQuery, Timestamp, epoch_to_ts

CommandName = Annotated[str, Field(pattern=COMMAND_NAME_PATTERN, max_length=64, examples=["set_interval"])]


def _whole_number(value: object) -> object:
    """JSON Schema's ``integer``: any number without a fraction (``600`` or ``600.0``), but
    not a string or a boolean (pydantic's lax int would take ``"600"``, its strict one refuses
    ``600.0``, which the published schema allows)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a whole number")  # noqa: TRY004 - pydantic wants ValueError
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be a whole number")
        return int(value)
    return value


WholeSeconds = Annotated[int, BeforeValidator(_whole_number)]


class CommandCreate(BaseModel):
    """A command for the device. ``ttl_s`` is how long it may wait to be delivered and
    acknowledged; a repeated ``idempotency_key`` with the same request returns the first command."""

    model_config = ConfigDict(extra="forbid")

    name: CommandName
    args: dict[str, Any] = Field(default_factory=dict, examples=[{"seconds": 10}])
    ttl_s: WholeSeconds = Field(ge=1, examples=[600], description="seconds, at most the node's command_max_ttl_s")
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)

    @field_validator("args")
    @classmethod
    def _small_json(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            size = len(json.dumps(value, separators=(",", ":"), allow_nan=False).encode())
        except ValueError:
            msg = "args must be plain JSON (no NaN or Infinity)"
            raise ValueError(msg) from None
        if size > MAX_ARGS_BYTES:
            msg = f"args must be at most {MAX_ARGS_BYTES} bytes of JSON, not {size}"
            raise ValueError(msg)
        return value


class CommandHistoryOut(BaseModel):
    state: CommandState
    at: Timestamp
    #: Why, when there is more to say: the attempt number, the device's ack detail, the expiry.
    detail: str | None = None

    @model_serializer(mode="wrap")
    def _without_empty_detail(self, handler: Any) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("detail") is None:
            data.pop("detail", None)
        return data

    @classmethod
    def from_entry(cls, entry: CommandHistoryEntry) -> Self:
        return cls(state=CommandState(entry.state), at=epoch_to_ts(entry.at), detail=entry.detail)


class Command(BaseModel):
    """A command and every state it went through, oldest first."""

    #: A ULID: sortable by when the command was created. The device sees the same id.
    command_id: str
    device_id: str
    name: str
    args: dict[str, Any]
    #: ``queued`` → ``sent`` → ``acked`` | ``failed`` | ``expired``.
    state: CommandState
    created_at: Timestamp
    expires_at: Timestamp
    #: Deliveries so far (a resend after no ack counts again).
    attempts: int
    #: The id of the API key that created it.
    created_by: str | None
    idempotency_key: str | None
    history: list[CommandHistoryOut]

    @classmethod
    def from_record(cls, r: CommandRecord) -> Self:
        return cls(
            command_id=r.command_id,
            device_id=r.device_id,
            name=r.name,
            args=r.args,
            state=CommandState(r.state),
            created_at=epoch_to_ts(r.created_at),
            expires_at=epoch_to_ts(r.expires_at),
            attempts=r.attempts,
            created_by=r.created_by,
            idempotency_key=r.idempotency_key,
            history=[CommandHistoryOut.from_entry(h) for h in r.history],
        )


class CommandPage(BaseModel):
    """Commands, newest first; ``next_cursor`` is null on the last page."""

    items: list[Command]
    next_cursor: str | None


class CommandQuery(PageQuery):
    state: CommandState | None = None
