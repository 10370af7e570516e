"""The OpenAPI document, where quart-schema's defaults would describe the API wrongly or not at all.

* Problems are raised as exceptions and answered by ``web.errors``, so quart-schema's response
  validation never sees them; :func:`documents_problems` only records their schema per status.
* quart-schema documents every response as ``application/json``: problems are sent as
  ``application/problem+json`` and a 204 has no body, so :class:`NodeOpenAPIProvider` says so.
"""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus
from typing import Any, Final

from quart_schema import OpenAPIProvider
from quart_schema.typing import Model
from quart_schema.validation import QUART_SCHEMA_RESPONSE_ATTRIBUTE

from web.errors import PROBLEM_CONTENT_TYPE
from web.models import NoContent, Problem, ValidationProblem


def documents[F: Callable[..., Any]](model: type[Model], *statuses: int) -> Callable[[F], F]:
    """Record *model* as the response of *statuses* in the OpenAPI schema; no run-time effect.

    For responses that ``validate_response`` cannot check: problems (raised, not returned)
    and 204 (no body to validate).
    """

    def decorate(func: F) -> F:
        # The same attribute validate_response fills; functools.wraps carries it outwards.
        schemas: dict[int, tuple[type[Model], None]] = getattr(func, QUART_SCHEMA_RESPONSE_ATTRIBUTE, {})
        for status in statuses:
            schemas.setdefault(int(status), (model, None))
        setattr(func, QUART_SCHEMA_RESPONSE_ATTRIBUTE, schemas)
        return func

    return decorate


def documents_problems[F: Callable[..., Any]](*statuses: int) -> Callable[[F], F]:
    """Record the problem responses of a route (422 with its field ``errors``)."""

    def decorate(func: F) -> F:
        for status in statuses:
            model = ValidationProblem if status == HTTPStatus.UNPROCESSABLE_CONTENT else Problem
            func = documents(model, status)(func)
        return func

    return decorate


_RETRY_AFTER: Final = {"description": "seconds to wait before the next request", "schema": {"type": "integer"}}


class NodeOpenAPIProvider(OpenAPIProvider):
    def build_response_object(
        self, model: type[Model], headers_model: type[Model] | None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        response, components = super().build_response_object(model, headers_model)
        if isinstance(model, type) and issubclass(model, NoContent):
            response.pop("content", None)
        elif isinstance(model, type) and issubclass(model, Problem):
            response["content"] = {PROBLEM_CONTENT_TYPE: response["content"].pop("application/json")}
        if getattr(model, "retry_after", False):  # web.limits.RateLimited
            response["headers"] = {"Retry-After": _RETRY_AFTER}
        return response, components
