"""``/api/v1/devices/{id}/commands``: send a command to a device and follow what became of it.

Creating a command is an *ask* to the command actor (:mod:`actors.commands`), its only writer:
the 202 answer comes once the command is committed as ``queued``, and delivery goes on without
the caller. Lists and single commands are read through the read connection, with their history.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Final

import anyio
from quart import Blueprint
from quart_schema import tag_blueprint, validate_querystring, validate_request, validate_response

from actors.commands import CommandRequest, CommandsUnavailable
from storage.audit import AuditAction, AuditEntry
from storage.command_contract import is_command_id
from storage.errors import CommandConflict, StorageError
from storage.records import CommandRecord
from web.auth import caller, caller_key_id, requires
from web.command_models import Command, CommandCreate, CommandPage, CommandQuery
from web.context import services
from web.errors import DEVICE_REVOKED, IDEMPOTENCY_CONFLICT, ApiError
from web.openapi import documents_problems
from web.paging import above_maximum, page_limit
from web.routes.devices import find_device

bp = Blueprint("commands", __name__, url_prefix="/api/v1/devices")
tag_blueprint(bp, ["commands"])

#: A client should not wait longer than this for the actor to take a command.
SUBMIT_TIMEOUT_S: Final = 10.0

log = logging.getLogger(__name__)


async def _audit_command_issued(record: CommandRecord) -> None:
    """Record "command *record* sent to its device by the calling API key" in the audit log
    (ADR 0006). Called once per command created, not for an idempotent repeat. The command is
    queued already: if the audit write fails, that is logged, and the command still goes."""
    entry = AuditEntry(
        AuditAction.COMMAND_SENT,
        record.device_id,
        caller(),
        {"command_id": record.command_id, "name": record.name},
        record.created_at,
    )
    try:
        await services().store.record_audit(entry)
    except StorageError:
        log.exception("command %s: the audit log could not be written", record.command_id)


@bp.post("/<device_id>/commands")
@requires("operator")
@validate_request(CommandCreate)
@validate_response(Command, HTTPStatus.ACCEPTED)
@documents_problems(
    HTTPStatus.NOT_FOUND, HTTPStatus.CONFLICT, HTTPStatus.UNPROCESSABLE_CONTENT, HTTPStatus.SERVICE_UNAVAILABLE
)
async def create_command(device_id: str, data: CommandCreate) -> tuple[Command, int, dict[str, str]]:
    """Send a command to a device: 202 once it is queued. It is delivered when the device is
    connected and subscribed, resent with the same `command_id` until acknowledged, and
    expires after `ttl_s` seconds. Repeating an `idempotency_key` with the same request
    returns the same command; with a different request it is a 409.
    """
    svc = services()
    row, _ = await find_device(device_id)
    if row.revoked_at is not None:
        raise ApiError(HTTPStatus.CONFLICT, f"device {device_id!r} is revoked", type_=DEVICE_REVOKED)
    if data.ttl_s > svc.command_max_ttl_s:
        raise above_maximum("body", "ttl_s", svc.command_max_ttl_s)
    if svc.commands is None:
        raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, "commands are not available on this node")
    request = CommandRequest(data.name, data.args, data.ttl_s, data.idempotency_key)
    key_id = caller_key_id()
    try:
        with anyio.fail_after(SUBMIT_TIMEOUT_S):
            record, created = await svc.commands.submit(device_id, request, key_id)
    except CommandConflict as exc:
        raise ApiError(
            HTTPStatus.CONFLICT,
            f"idempotency key {exc.idempotency_key!r} was used for a different command ({exc.command_id})",
            type_=IDEMPOTENCY_CONFLICT,
            extra={"command_id": exc.command_id},
        ) from exc
    except (CommandsUnavailable, StorageError, TimeoutError) as exc:
        # After a timeout the command may still be created: a retry with the same
        # idempotency key finds it instead of creating a second one.
        raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, "the node cannot take commands right now") from exc
    if created:
        await _audit_command_issued(record)
    stored = await svc.reader.command(device_id, record.command_id)
    body = Command.from_record(stored if stored is not None else record)
    return body, HTTPStatus.ACCEPTED, {"Location": f"{bp.url_prefix}/{device_id}/commands/{record.command_id}"}


@bp.get("/<device_id>/commands")
@requires("viewer")
@validate_querystring(CommandQuery)
@validate_response(CommandPage)
@documents_problems(HTTPStatus.BAD_REQUEST, HTTPStatus.NOT_FOUND, HTTPStatus.UNPROCESSABLE_CONTENT)
async def list_commands(device_id: str, query_args: CommandQuery) -> CommandPage:
    """A device's commands, newest first, each with its history; `?state=` filters."""
    await find_device(device_id)
    svc = services()
    q = query_args
    state = None if q.state is None else q.state.value
    page = await svc.reader.commands(device_id, state, page_limit(q.limit, svc.max_page), q.cursor)
    return CommandPage(items=[Command.from_record(r) for r in page.items], next_cursor=page.next_cursor)


@bp.get("/<device_id>/commands/<command_id>")
@requires("viewer")
@validate_response(Command)
@documents_problems(HTTPStatus.NOT_FOUND)
async def get_command(device_id: str, command_id: str) -> Command:
    """One command with every state it went through."""
    await find_device(device_id)
    record = await services().reader.command(device_id, command_id) if is_command_id(command_id) else None
    if record is None:
        raise ApiError(HTTPStatus.NOT_FOUND, f"device {device_id!r} has no command {command_id[:40]!r}")
    return Command.from_record(record)
