"""Page sizes of the list endpoints: the default, and the node's configured maximum.

The maximum is a setting (:attr:`web.services.WebServices.max_page`), so it cannot live in the
static query models; a limit above it is refused here with the same 422 problem that the models
give for a limit below 1.
"""

from __future__ import annotations

from http import HTTPStatus

from web.errors import VALIDATION, ApiError
from web.models import DEFAULT_PAGE, FieldError


def page_limit(requested: int | None, max_page: int) -> int:
    """The page size to use: *requested*, or the default capped at *max_page*."""
    if requested is None:
        return min(DEFAULT_PAGE, max_page)
    if requested > max_page:
        raise above_maximum("query", "limit", max_page)
    return requested


def above_maximum(source: str, name: str, maximum: int) -> ApiError:
    """The 422 problem for a field above a maximum that comes from a setting, shaped like the
    models' own validation errors (for static bounds, pydantic reports the same)."""
    error = FieldError(
        loc=[source, name], msg=f"Input should be less than or equal to {maximum}", type="less_than_equal"
    )
    return ApiError(
        HTTPStatus.UNPROCESSABLE_CONTENT,
        f"the request {source} is not valid (1 error)",
        type_=VALIDATION,
        extra={"errors": [error.model_dump()]},
    )
