"""``/api/v1/alerts``: what the alert rules raised, and acknowledging it.

The alert actor (:mod:`actors.alerts`) raises and clears alerts; this blueprint only lists them
(through the read connection) and records an operator's acknowledgement (through the writer
connection, :meth:`storage.sqlite.SqliteStore.ack_alert`), which never clears an alert.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Final

from quart import Blueprint
from quart_schema import tag_blueprint, validate_querystring, validate_response

from actors.alerts import AlertState
from web.auth import caller, caller_key_id, requires
from web.context import services
from web.errors import ALERT_CLEARED, ApiError
from web.models import Alert, AlertPage, AlertQuery
from web.openapi import documents_problems
from web.paging import page_limit

bp = Blueprint("alerts", __name__, url_prefix="/api/v1/alerts")
tag_blueprint(bp, ["alerts"])

# A ULID in Crockford base32, as the node writes them; anything else cannot be an alert here.
_ALERT_ID: Final = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")


@bp.get("")
@requires("viewer")
@validate_querystring(AlertQuery)
@validate_response(AlertPage)
@documents_problems(HTTPStatus.BAD_REQUEST, HTTPStatus.UNPROCESSABLE_CONTENT)
async def list_alerts(query_args: AlertQuery) -> AlertPage:
    """Alerts, newest first; filter by `state`, `device_id` and `rule`."""
    svc = services()
    q = query_args
    page = await svc.reader.alerts(
        None if q.state is None else q.state.value,
        q.device_id,
        None if q.rule is None else q.rule.value,
        page_limit(q.limit, svc.max_page),
        q.cursor,
    )
    return AlertPage(items=[Alert.from_record(r) for r in page.items], next_cursor=page.next_cursor)


@bp.post("/<alert_id>/ack")
@requires("operator")
@validate_response(Alert)
@documents_problems(HTTPStatus.NOT_FOUND, HTTPStatus.CONFLICT)
async def ack_alert(alert_id: str) -> Alert:
    """Acknowledge an open alert: someone is on it. It stays until its rule clears it.

    Idempotent: acknowledging an acknowledged alert answers 200 with the first
    acknowledgement kept. A cleared alert cannot be acknowledged (409).
    """
    record = None
    if _ALERT_ID.fullmatch(alert_id):
        record = await services().store.ack_alert(alert_id, caller_key_id(), by=caller())
    if record is None:
        raise ApiError(HTTPStatus.NOT_FOUND, f"no alert {alert_id[:40]!r}")
    if record.state == AlertState.CLEARED:
        raise ApiError(HTTPStatus.CONFLICT, f"alert {alert_id!r} is cleared already", type_=ALERT_CLEARED)
    return Alert.from_record(record)
