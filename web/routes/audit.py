"""``/api/v1/audit``: the audit log (admin), newest first.

Every change made through the API or the CLI is there with who made it (API key id and role, or
``cli``), when and what (:mod:`storage.audit`). Filters: ``action``, ``target`` (a device id,
key id or alert id) and ``since`` (an RFC 3339 time). Keyset pages like every list route.
"""

from __future__ import annotations

from http import HTTPStatus

from quart import Blueprint
from quart_schema import tag_blueprint, validate_querystring, validate_response

from web.auth import requires
from web.context import services
from web.models import AuditEntryOut, AuditPage, AuditQuery
from web.openapi import documents_problems
from web.paging import page_limit

bp = Blueprint("audit", __name__, url_prefix="/api/v1/audit")
tag_blueprint(bp, ["audit"])


@bp.get("")
@requires("admin")
@validate_querystring(AuditQuery)
@validate_response(AuditPage)
@documents_problems(HTTPStatus.BAD_REQUEST, HTTPStatus.UNPROCESSABLE_CONTENT)
async def list_audit(query_args: AuditQuery) -> AuditPage:
    """The audit log, newest first; filter by `action`, `target` and `since`."""
    svc = services()
    q = query_args
    page = await svc.reader.audit(
        None if q.action is None else q.action.value,
        q.target,
        None if q.since is None else q.since.timestamp(),
        page_limit(q.limit, svc.max_page),
        q.cursor,
    )
    return AuditPage(items=[AuditEntryOut.from_record(r) for r in page.items], next_cursor=page.next_cursor)
