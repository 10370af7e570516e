"""The OpenAPI document, where quart-schema's defaults would describe the API wrongly or not at all.

* Problems are raised as exceptions and answered by ``web.errors``, so quart-schema's response
  validation never sees them; :func:`documents_problems` only records their schema per status.
* quart-schema documents every response as ``application/json``: problems are sent as
  ``application/problem+json``, a 204 has no body and ``/metrics`` is text, so
  :class:`NodeOpenAPIProvider` says so. It also marks request bodies required and documents
  the 400 (not JSON, not UTF-8) and 413 (too large) that every body can get, and the 429 of
  every rate-limited route (:mod:`web.limits`).
* Every operation that needs an API key carries ``x-required-role``, its least role as declared
  by :func:`web.auth.requires` (:mod:`web.roles`). A route whose key depends on a setting
  (``/metrics``) is documented as this node is configured: security and 401/403 only when on.
"""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus
from typing import Any, Final, cast

from quart import Quart
from quart_schema import OpenAPIProvider
from quart_schema.typing import Model
from quart_schema.validation import QUART_SCHEMA_RESPONSE_ATTRIBUTE
from werkzeug.routing import Rule

from web.context import app_services
from web.errors import PROBLEM_CONTENT_TYPE
from web.models import MetricsText, NoContent, Problem, RateLimited, ValidationProblem
from web.roles import SECURITY_SCHEME, is_conditional, required_role

#: The OpenAPI extension naming an operation's least role.
REQUIRED_ROLE_EXTENSION = "x-required-role"


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


#: ``app.config`` key set by web.limits when HTTP rate limits are on: the endpoints without them.
RATE_LIMIT_EXEMPT: Final = "DEPOT_NODE_RATE_LIMIT_EXEMPT"
_RETRY_AFTER: Final = {"description": "seconds to wait before the next request", "schema": {"type": "integer"}}


class NodeOpenAPIProvider(OpenAPIProvider):
    def build_paths(self, rule: Rule) -> tuple[dict[str, Any], dict[str, Any]]:
        paths, components = super().build_paths(rule)
        view = self._app.view_functions[rule.endpoint]
        role = required_role(view, app_services(cast("Quart", self._app)))  # a weakref proxy of it
        exempt = self._app.config.get(RATE_LIMIT_EXEMPT)
        for operations in paths.values():
            for operation in operations.values():
                if role is not None:
                    self._document_role(operation, components, role, conditional=is_conditional(view))
                if exempt is not None and rule.endpoint not in exempt:
                    response, extra = self.build_response_object(RateLimited, None)
                    operation["responses"][int(HTTPStatus.TOO_MANY_REQUESTS)] = response
                    components.update(extra)
                if "requestBody" not in operation:
                    continue
                # Every body of this API is required, and before it is validated (422) it must
                # be JSON (400 from web.errors) no larger than web.app.MAX_BODY_BYTES (413).
                operation["requestBody"]["required"] = True
                for status in (HTTPStatus.BAD_REQUEST, HTTPStatus.REQUEST_ENTITY_TOO_LARGE):
                    if str(int(status)) not in operation["responses"] and int(status) not in operation["responses"]:
                        response, extra = self.build_response_object(Problem, None)
                        operation["responses"][int(status)] = response
                        components.update(extra)
        return paths, components

    def _document_role(
        self, operation: dict[str, Any], components: dict[str, Any], role: str, *, conditional: bool
    ) -> None:
        operation[REQUIRED_ROLE_EXTENSION] = role
        if conditional:
            # Static routes got these from web.auth.requires already.
            operation["security"] = [{SECURITY_SCHEME: []}]
            responses = dict(operation["responses"])
            for status in (HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN):
                response, definitions = self.build_response_object(Problem, None)
                responses[int(status)] = response
                components.update(definitions)
            operation["responses"] = responses

    def build_response_object(
        self, model: type[Model], headers_model: type[Model] | None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        response, components = super().build_response_object(model, headers_model)
        if isinstance(model, type) and issubclass(model, NoContent):
            response.pop("content", None)
        elif isinstance(model, type) and issubclass(model, MetricsText):
            text = {"schema": {"type": "string"}}
            response["content"] = {"text/plain": text, "application/openmetrics-text": text}
        elif isinstance(model, type) and issubclass(model, Problem):
            response["content"] = {PROBLEM_CONTENT_TYPE: response["content"].pop("application/json")}
        if isinstance(model, type) and issubclass(model, RateLimited):
            response["headers"] = {"Retry-After": _RETRY_AFTER}
        return response, components
