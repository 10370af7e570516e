"""The OpenAPI document, where quart-schema's defaults would describe the API wrongly or not at all.

* Problems are raised as exceptions and answered by ``web.errors``, so quart-schema's response
  validation never sees them; :func:`documents_problems` only records their schema per status.
* quart-schema documents every response as ``application/json``: problems are sent as
  ``application/problem+json`` and a 204 has no body, so :class:`NodeOpenAPIProvider` says so.
* Every operation that needs an API key carries ``x-required-role``, its least role as declared
  by :func:`web.auth.requires` (:mod:`web.roles`). A route whose key depends on a setting
  (``/metrics``) is documented as this node is configured: security and 401/403 only when on.
"""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus
from typing import Any, cast

from quart import Quart
from quart_schema import OpenAPIProvider
from quart_schema.typing import Model
from quart_schema.validation import QUART_SCHEMA_RESPONSE_ATTRIBUTE
from werkzeug.routing import Rule

from web.context import app_services
from web.errors import PROBLEM_CONTENT_TYPE
from web.models import NoContent, Problem, ValidationProblem
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


class NodeOpenAPIProvider(OpenAPIProvider):
    def build_paths(self, rule: Rule) -> tuple[dict[str, Any], dict[str, Any]]:
        paths, components = super().build_paths(rule)
        view = self._app.view_functions[rule.endpoint]
        role = required_role(view, app_services(cast("Quart", self._app)))  # a weakref proxy of it
        if role is None:
            return paths, components
        for item in paths.values():
            for operation in item.values():
                operation[REQUIRED_ROLE_EXTENSION] = role
                if is_conditional(view):
                    # Static routes got these from web.auth.requires already.
                    operation["security"] = [{SECURITY_SCHEME: []}]
                    responses = dict(operation["responses"])
                    for status in (HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN):
                        response, definitions = self.build_response_object(Problem, None)
                        responses[int(status)] = response
                        components.update(definitions)
                    operation["responses"] = responses
        return paths, components

    def build_response_object(
        self, model: type[Model], headers_model: type[Model] | None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        response, components = super().build_response_object(model, headers_model)
        if isinstance(model, type) and issubclass(model, NoContent):
            response.pop("content", None)
        elif isinstance(model, type) and issubclass(model, Problem):
            response["content"] = {PROBLEM_CONTENT_TYPE: response["content"].pop("application/json")}
        return response, components
