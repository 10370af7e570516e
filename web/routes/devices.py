"""``/api/v1/devices``: register, list, show and revoke devices.

Registering generates the device's MQTT password, stores only its Argon2 hash and shows the
password once, in the 201 response. Revoking keeps the device and its data (the id stays taken,
so an old meter cannot be impersonated under a re-registered id) and closes its live session
through :attr:`web.services.WebServices.on_revoked`.
"""

from __future__ import annotations

from http import HTTPStatus

import anyio
from quart import Blueprint, Response
from quart_schema import tag_blueprint, validate_querystring, validate_request, validate_response

from storage.contract import is_valid_device_id
from storage.errors import DeviceExists, DeviceLimitReached
from storage.reader import DeviceRow
from storage.records import DeviceStateRecord
from storage.secrets import hash_device_secret, new_device_secret
from storage.validation import SUPPLY_LIMITS
from web.auth import caller, requires
from web.context import services
from web.errors import DEVICE_EXISTS, ApiError
from web.limits import device_limit_problem
from web.models import (
    Device,
    DeviceCreate,
    DeviceCreated,
    DeviceDetail,
    DevicePage,
    DeviceUpdate,
    NoContent,
    PageQuery,
    epoch_to_ts,
)
from web.openapi import documents, documents_problems
from web.paging import page_limit

bp = Blueprint("devices", __name__, url_prefix="/api/v1/devices")
tag_blueprint(bp, ["devices"])


def not_found(device_id: str) -> ApiError:
    return ApiError(HTTPStatus.NOT_FOUND, f"no device {device_id!r}")


async def find_device(device_id: str) -> tuple[DeviceRow, DeviceStateRecord | None]:
    """The device and its state; a 404 :class:`ApiError` when there is no such device."""
    # An id that breaks the contract's rule cannot be registered: no need to ask the database.
    found = await services().reader.device(device_id) if is_valid_device_id(device_id) else None
    if found is None:
        raise not_found(device_id)
    return found


@bp.post("")
@requires("admin")
@validate_request(DeviceCreate)
@validate_response(DeviceCreated, HTTPStatus.CREATED)
@documents_problems(HTTPStatus.CONFLICT, HTTPStatus.UNPROCESSABLE_CONTENT)
async def create_device(data: DeviceCreate) -> tuple[DeviceCreated, int, dict[str, str]]:
    """Register a device.

    The response holds the device's MQTT password (`secret`); it is shown this once and
    cannot be recovered, only replaced (`POST /api/v1/devices/{device_id}/secret`).
    """
    secret = new_device_secret()
    # Argon2 costs ~20 ms of CPU: a worker thread, so the event loop keeps serving meters.
    secret_hash = await anyio.to_thread.run_sync(hash_device_secret, secret)
    svc = services()
    try:
        supply = None if data.supply is None else data.supply.value
        created = await svc.store.insert_device(
            data.device_id, data.type, data.name, secret_hash, supply, by=caller(), max_devices=svc.max_devices
        )
    except DeviceExists as exc:
        raise ApiError(HTTPStatus.CONFLICT, f"device {data.device_id!r} already exists", type_=DEVICE_EXISTS) from exc
    except DeviceLimitReached as exc:
        raise device_limit_problem(exc.limit) from exc
    body = DeviceCreated(
        device_id=data.device_id,
        type=data.type,
        name=data.name,
        created_at=epoch_to_ts(created),
        revoked=False,
        supply=data.supply,
        secret=secret,
    )
    return body, HTTPStatus.CREATED, {"Location": f"{bp.url_prefix}/{data.device_id}"}


@bp.get("")
@requires("viewer")
@validate_querystring(PageQuery)
@validate_response(DevicePage)
@documents_problems(HTTPStatus.BAD_REQUEST, HTTPStatus.UNPROCESSABLE_CONTENT)
async def list_devices(query_args: PageQuery) -> DevicePage:
    """List devices (revoked ones included), ordered by id."""
    svc = services()
    page = await svc.reader.devices(page_limit(query_args.limit, svc.max_page), query_args.cursor)
    return DevicePage(items=[Device.from_row(row) for row in page.items], next_cursor=page.next_cursor)


@bp.get("/<device_id>")
@requires("viewer")
@validate_response(DeviceDetail)
@documents_problems(HTTPStatus.NOT_FOUND)
async def get_device(device_id: str) -> DeviceDetail:
    """Show a device with its liveness, sequence state and counters."""
    row, record = await find_device(device_id)
    return DeviceDetail.from_records(row, record)


@bp.patch("/<device_id>")
@requires("admin")
@validate_request(DeviceUpdate)
@validate_response(DeviceDetail)
@documents_problems(HTTPStatus.NOT_FOUND, HTTPStatus.CONFLICT, HTTPStatus.UNPROCESSABLE_CONTENT)
async def update_device(device_id: str, data: DeviceUpdate) -> DeviceDetail:
    """Set a device's supply system, e.g. for a device registered before it had one.

    Its readings are checked against the new range from the next message on. `null` clears it
    (the widest range of the device's type).
    """
    row, _ = await find_device(device_id)
    if data.supply is not None and SUPPLY_LIMITS[data.supply].device_type != row.type:
        # The request is well-formed; it conflicts with the registered device's type.
        raise ApiError(HTTPStatus.CONFLICT, f"supply {data.supply.value!r} is not a supply of a {row.type}")
    svc = services()
    await svc.store.set_device_supply(device_id, None if data.supply is None else data.supply.value)
    await svc.on_device_changed(device_id)
    row, record = await find_device(device_id)
    return DeviceDetail.from_records(row, record)


@bp.delete("/<device_id>")
@requires("admin")
@documents(NoContent, HTTPStatus.NO_CONTENT)
@documents_problems(HTTPStatus.NOT_FOUND)
async def revoke_device(device_id: str) -> Response:
    """Revoke a device: it can no longer connect, and its open session is closed.

    Idempotent: revoking a revoked device answers 204 again (and closes any session again).
    The device and its data stay; its id cannot be registered again.
    """
    svc = services()
    if not await svc.store.revoke_device(device_id, by=caller()):
        await find_device(device_id)  # 404 unless it exists (and so was revoked already)
    # Also on a repeated DELETE: if closing the session failed the first time, a retry does it.
    await svc.on_revoked(device_id)
    return Response(status=HTTPStatus.NO_CONTENT)
