"""``/api/v1/devices/{id}/events``: a device's connection history (connects and disconnects).

Every change of a device's connection state is kept with its reason, so an operator can tell
a meter that said goodbye (``clean``) from one whose link died (``connection_lost``,
``keepalive_expired``) or one the node cut off (``revoked``).
"""

from __future__ import annotations

from http import HTTPStatus

from quart import Blueprint
from quart_schema import tag_blueprint, validate_querystring, validate_response

from web.auth import requires
from web.context import services
from web.models import DeviceEventOut, DeviceEventPage, PageQuery
from web.openapi import documents_problems
from web.paging import page_limit
from web.routes.devices import find_device

bp = Blueprint("events", __name__, url_prefix="/api/v1/devices")
tag_blueprint(bp, ["devices"])


@bp.get("/<device_id>/events")
@requires("viewer")
@validate_querystring(PageQuery)
@validate_response(DeviceEventPage)
@documents_problems(HTTPStatus.BAD_REQUEST, HTTPStatus.NOT_FOUND, HTTPStatus.UNPROCESSABLE_CONTENT)
async def list_events(device_id: str, query_args: PageQuery) -> DeviceEventPage:
    """A device's connection history, newest first."""
    await find_device(device_id)
    svc = services()
    page = await svc.reader.events(device_id, page_limit(query_args.limit, svc.max_page), query_args.cursor)
    return DeviceEventPage(items=[DeviceEventOut.from_item(item) for item in page.items], next_cursor=page.next_cursor)
