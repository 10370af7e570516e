"""``/api/v1/quarantine``: messages the node refused to store, with the reason and the payload."""

from __future__ import annotations

from http import HTTPStatus

from quart import Blueprint
from quart_schema import tag_blueprint, validate_querystring, validate_response

from web.auth import requires
from web.context import services
from web.models import QuarantinedMessage, QuarantinePage, QuarantineQuery
from web.openapi import documents_problems
from web.paging import page_limit

bp = Blueprint("quarantine", __name__, url_prefix="/api/v1/quarantine")
tag_blueprint(bp, ["quarantine"])


@bp.get("")
@requires("viewer")
@validate_querystring(QuarantineQuery)
@validate_response(QuarantinePage)
@documents_problems(HTTPStatus.BAD_REQUEST, HTTPStatus.UNPROCESSABLE_CONTENT)
async def list_quarantine(query_args: QuarantineQuery) -> QuarantinePage:
    """Quarantined messages, newest first, of one device or all."""
    svc = services()
    page = await svc.reader.quarantine(
        query_args.device_id, page_limit(query_args.limit, svc.max_page), query_args.cursor
    )
    return QuarantinePage(
        items=[QuarantinedMessage.from_item(item) for item in page.items], next_cursor=page.next_cursor
    )
