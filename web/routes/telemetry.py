"""``/api/v1/devices/{id}/telemetry``: a device's stored readings, oldest first.

``from`` and ``to`` select by device time (``from <= ts < to``). Pages are keyset cursors over
``(ts, row id)``, so readings committed while a client pages through (late ones included, as
long as they sort after the page it is on) neither repeat nor shift the pages.
"""

from __future__ import annotations

from http import HTTPStatus

from quart import Blueprint
from quart_schema import tag_blueprint, validate_querystring, validate_response

from web.auth import requires
from web.context import services
from web.models import TelemetryPage, TelemetryQuery, TelemetryReading, ts_to_ms_ceil
from web.openapi import documents_problems
from web.paging import page_limit
from web.routes.devices import find_device

bp = Blueprint("telemetry", __name__, url_prefix="/api/v1/devices")
tag_blueprint(bp, ["telemetry"])


@bp.get("/<device_id>/telemetry")
@requires("viewer")
@validate_querystring(TelemetryQuery)
@validate_response(TelemetryPage)
@documents_problems(HTTPStatus.BAD_REQUEST, HTTPStatus.NOT_FOUND, HTTPStatus.UNPROCESSABLE_CONTENT)
async def list_telemetry(device_id: str, query_args: TelemetryQuery) -> TelemetryPage:
    """A device's readings with `from <= ts < to` (device time), oldest first."""
    await find_device(device_id)
    svc = services()
    page = await svc.reader.telemetry(
        device_id,
        None if query_args.from_ is None else ts_to_ms_ceil(query_args.from_),
        None if query_args.to is None else ts_to_ms_ceil(query_args.to),
        page_limit(query_args.limit, svc.max_page),
        query_args.cursor,
    )
    return TelemetryPage(items=[TelemetryReading.from_item(item) for item in page.items], next_cursor=page.next_cursor)
