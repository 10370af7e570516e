"""API errors as RFC 9457 ``application/problem+json``, and the handlers that make them.

Every error response of the API has this shape (one handler per kind of failure, all here)::

    {"type": "...", "title": "Not Found", "status": 404, "detail": "no device 'emu-1'"}

* :class:`ApiError` is what routes raise on purpose; its ``detail`` is written for the client.
* Request validation errors from quart-schema become 422 with the field errors in ``errors``
  (location, message, pydantic's error type; never the rejected input, which may be a secret).
* Werkzeug's HTTP errors (unknown route, wrong method, malformed JSON, body too large) keep
  their status and headers (``Allow`` on 405) and get the problem body; a body that is not
  UTF-8 (which Quart lets escape as a ``UnicodeDecodeError``) is a 400 too.
* Anything else is a bug or an outage: it is logged with its traceback and answered with a
  generic 500. The client never sees a stack trace or an internal message.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, Final

from pydantic import ValidationError
from quart import Quart, Response, current_app
from quart_schema import RequestSchemaValidationError
from quart_schema.validation import QuerystringValidationError, RequestHeadersValidationError
from werkzeug.exceptions import HTTPException

from storage.reader import BadCursor
from web.models import FieldError

log = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE: Final = "application/problem+json"

# Problem types (RFC 9457 §3.1.1). "about:blank" means "nothing beyond the HTTP status"; the
# others are identifiers (tag URIs, RFC 4151), not links: clients compare them, never fetch them.
BLANK: Final = "about:blank"
_TAG: Final = "tag:depot-node,2026:problem/"
VALIDATION: Final = _TAG + "validation"
BAD_CURSOR: Final = _TAG + "bad-cursor"
DEVICE_EXISTS: Final = _TAG + "device-exists"
NOT_READY: Final = _TAG + "not-ready"
ALERT_CLEARED: Final = _TAG + "alert-cleared"
IDEMPOTENCY_CONFLICT: Final = _TAG + "idempotency-conflict"
DEVICE_REVOKED: Final = _TAG + "device-revoked"
RATE_LIMITED: Final = _TAG + "rate-limited"
DEVICE_LIMIT: Final = _TAG + "device-limit"
RANGE_TOO_LARGE: Final = _TAG + "range-too-large"


class ApiError(Exception):
    """An error answered as a problem; *detail* is shown to the client as it is."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        type_: str = BLANK,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.type = type_
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


def problem_response(
    status: int,
    detail: str,
    *,
    type_: str = BLANK,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Response:
    body: dict[str, Any] = {"type": type_, "title": _title(status), "status": status, "detail": detail}
    body.update(extra or {})
    response = Response(current_app.json.dumps(body), status=status, content_type=PROBLEM_CONTENT_TYPE)
    response.headers.update(headers or {})
    return response


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


async def _on_api_error(error: ApiError) -> Response:
    return problem_response(error.status, error.detail, type_=error.type, headers=error.headers, extra=error.extra)


async def _on_validation_error(error: RequestSchemaValidationError) -> Response:
    source = _source(error)
    errors = _field_errors(source, error.validation_error)
    noun = "error" if len(errors) == 1 else "errors"
    return problem_response(
        HTTPStatus.UNPROCESSABLE_CONTENT,
        f"the request {source} is not valid ({len(errors)} {noun})",
        type_=VALIDATION,
        extra={"errors": [e.model_dump() for e in errors]},
    )


def _source(error: RequestSchemaValidationError) -> str:
    if isinstance(error, QuerystringValidationError):
        return "query"
    if isinstance(error, RequestHeadersValidationError):
        return "header"
    return "body"


def _field_errors(source: str, exc: Exception) -> list[FieldError]:
    if not isinstance(exc, ValidationError):
        # quart-schema also wraps TypeError/ValueError from model construction; their text
        # may name internals, so it is not passed on.
        return [FieldError(loc=[source], msg="invalid value", type="invalid")]
    return [
        FieldError(loc=[source, *err["loc"]], msg=err["msg"], type=err["type"])
        for err in exc.errors(include_url=False, include_input=False, include_context=False)
    ]


async def _on_bad_cursor(error: BadCursor) -> Response:
    return problem_response(
        HTTPStatus.BAD_REQUEST, "the cursor is not one this node issued; start again without it", type_=BAD_CURSOR
    )


async def _on_http_exception(error: HTTPException) -> Response:
    status = error.code or HTTPStatus.INTERNAL_SERVER_ERROR
    if status >= HTTPStatus.INTERNAL_SERVER_ERROR:
        # Werkzeug's 5xx descriptions are generic already, but keep one wording for every 500.
        return problem_response(status, "the server failed to answer this request; the error has been logged")
    # Werkzeug's own headers carry meaning (Allow on 405); its Content-Type is replaced.
    headers = {k: v for k, v in error.get_headers() if k.lower() != "content-type"}
    return problem_response(status, _http_detail(error), headers=headers)


def _http_detail(error: HTTPException) -> str:
    match error.code:
        case HTTPStatus.NOT_FOUND:
            return "no such resource"
        case HTTPStatus.METHOD_NOT_ALLOWED:
            return "this resource does not accept that method"
        case _:
            # Werkzeug's descriptions are fixed texts written for clients.
            return (error.description or _title(error.code or 400)).strip()


async def _on_undecodable(error: UnicodeDecodeError) -> Response:
    # Quart decodes a JSON body as UTF-8 before parsing it and lets the error escape: a client
    # sending bytes that are not UTF-8 made a bad request, not a server error.
    return problem_response(HTTPStatus.BAD_REQUEST, "the request body is not valid UTF-8")


async def _on_unexpected(error: Exception) -> Response:
    log.error("unhandled error in an API request", exc_info=error)
    return problem_response(
        HTTPStatus.INTERNAL_SERVER_ERROR, "the server failed to answer this request; the error has been logged"
    )


def register_error_handlers(app: Quart) -> None:
    # Quart picks the handler of the most specific class in the exception's MRO, so the
    # catch-all Exception handler below never sees the kinds handled before it.
    app.register_error_handler(ApiError, _on_api_error)
    app.register_error_handler(RequestSchemaValidationError, _on_validation_error)
    app.register_error_handler(BadCursor, _on_bad_cursor)
    app.register_error_handler(HTTPException, _on_http_exception)
    app.register_error_handler(UnicodeDecodeError, _on_undecodable)
    app.register_error_handler(Exception, _on_unexpected)
