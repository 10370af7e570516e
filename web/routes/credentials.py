"""``/api/v1/devices/{id}/secret``, ``…/disable``, ``…/enable``: a device's credential lifecycle.

Each change is committed with its audit row first (:mod:`storage.credentials`), and only then
does :attr:`web.services.WebServices.on_credentials_changed` make it bite: the node's device
gate forgets the device's cached verification (and restarts any check in flight), and the
device's live MQTT session is closed. From the response on, the old secret (or a disabled
device) is refused at CONNECT.

Revocation (``DELETE /api/v1/devices/{id}``) is final: a revoked device cannot be rotated,
disabled or enabled (409).
"""

from __future__ import annotations

import time
from http import HTTPStatus

import anyio
from quart import Blueprint
from quart_schema import tag_blueprint, validate_response

from storage.contract import is_valid_device_id
from storage.credentials import Change
from storage.secrets import hash_device_secret, new_device_secret
from web.auth import caller, requires
from web.context import services
from web.errors import DEVICE_REVOKED, ApiError
from web.models import Device, DeviceSecret, epoch_to_ts
from web.openapi import documents_problems
from web.routes.devices import find_device, not_found

bp = Blueprint("credentials", __name__, url_prefix="/api/v1/devices")
tag_blueprint(bp, ["devices"])


def _refused(device_id: str, change: Change) -> ApiError | None:
    if change is Change.MISSING:
        return not_found(device_id)
    if change is Change.REVOKED:
        return ApiError(HTTPStatus.CONFLICT, f"device {device_id!r} is revoked", type_=DEVICE_REVOKED)
    return None


@bp.post("/<device_id>/secret")
@requires("admin")
@validate_response(DeviceSecret)
@documents_problems(HTTPStatus.NOT_FOUND, HTTPStatus.CONFLICT)
async def rotate_secret(device_id: str) -> DeviceSecret:
    """Give a device a new MQTT password, shown this once.

    The old password stops working at once, and the device's open session is closed: it
    reconnects with the new one. A disabled device stays disabled.
    """
    if not is_valid_device_id(device_id):
        raise not_found(device_id)
    secret = new_device_secret()
    # Argon2 costs ~20 ms of CPU: a worker thread, so the event loop keeps serving meters.
    secret_hash = await anyio.to_thread.run_sync(hash_device_secret, secret)
    svc = services()
    change = await svc.store.rotate_device_secret(device_id, secret_hash, by=caller())
    if (error := _refused(device_id, change)) is not None:
        raise error
    await svc.on_credentials_changed(device_id, "secret_rotated")
    return DeviceSecret(device_id=device_id, secret=secret, rotated_at=epoch_to_ts(time.time()))


async def _set_disabled(device_id: str, disabled: bool) -> Device:
    if not is_valid_device_id(device_id):
        raise not_found(device_id)
    svc = services()
    change = await svc.store.set_device_disabled(device_id, disabled, by=caller())
    if (error := _refused(device_id, change)) is not None:
        raise error
    if disabled:
        # Also when it was disabled already: a retry closes a session a failed first call left.
        await svc.on_credentials_changed(device_id, "disabled")
    row, _ = await find_device(device_id)
    return Device.from_row(row)


@bp.post("/<device_id>/disable")
@requires("admin")
@validate_response(Device)
@documents_problems(HTTPStatus.NOT_FOUND, HTTPStatus.CONFLICT)
async def disable_device(device_id: str) -> Device:
    """Disable a device: it is refused at CONNECT and its open session is closed.

    Its secret, data and alerts stay; enabling it lets it back in with the same secret.
    Idempotent.
    """
    return await _set_disabled(device_id, disabled=True)


@bp.post("/<device_id>/enable")
@requires("admin")
@validate_response(Device)
@documents_problems(HTTPStatus.NOT_FOUND, HTTPStatus.CONFLICT)
async def enable_device(device_id: str) -> Device:
    """Enable a disabled device: it may connect again with its secret. Idempotent."""
    return await _set_disabled(device_id, disabled=False)
