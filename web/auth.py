"""API-key authentication and role checks for the ``/api/...`` routes.

A client sends ``Authorization: Bearer dnk_<key id>_<secret>``. The key id is looked up (one
indexed read of an active key) and the whole key compared with the stored SHA-256 digest in
constant time (:func:`storage.secrets.api_key_matches`). Missing, malformed, unknown, revoked
and wrong keys all get the same 401, so a caller cannot tell which key ids exist.

Roles are ordered (:mod:`web.roles`): ``viewer`` reads, ``operator`` also acknowledges alerts
and sends commands, ``admin`` does everything, including devices and API keys. A valid key with
too low a role gets 403. Nothing here ever logs a key.

Each route declares its least role in one place, the :func:`requires` decorator on its view
function. The OpenAPI document shows it as ``x-required-role`` (``web.openapi``), and the
route-walking test (``tests/web/test_route_auth.py``) reads it from ``/openapi.json`` and checks
the answers of every route for every role; a route without a declaration fails that test
unless it is on the test's explicit list of public routes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import wraps
from http import HTTPStatus
from typing import Any, Final, cast

from quart import g, request
from quart_schema import security_scheme

from storage.audit import Actor
from storage.secrets import api_key_matches, parse_api_key
from web.context import services
from web.errors import ApiError
from web.openapi import documents_problems
from web.roles import SECURITY_SCHEME, Condition, Role, declare, has_role

__all__ = ["SECURITY_SCHEME", "Role", "authenticate", "caller", "caller_key_id", "has_role", "requires"]


_CHALLENGE: Final = 'Bearer realm="depot-node"'


def _unauthorized(detail: str, *, presented: bool) -> ApiError:
    # RFC 6750 §3: name the error only when a token was actually presented.
    challenge = f'{_CHALLENGE}, error="invalid_token"' if presented else _CHALLENGE
    return ApiError(HTTPStatus.UNAUTHORIZED, detail, headers={"WWW-Authenticate": challenge})


async def authenticate() -> tuple[str, str]:
    """The ``(key_id, role)`` of the request's API key; raises a 401 :class:`ApiError`."""
    header = request.headers.get("Authorization")
    if not header:
        raise _unauthorized("an API key is required: send 'Authorization: Bearer <key>'", presented=False)
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise _unauthorized("the Authorization header must be 'Bearer <key>'", presented=False)
    key_id = parse_api_key(key)
    found = None if key_id is None else await services().reader.api_key(key_id)
    if key_id is None or found is None or not api_key_matches(key, found[1]):
        raise _unauthorized("the API key is not valid", presented=True)
    return key_id, found[0]


def caller_key_id() -> str:
    """The id of the API key of the current request (inside a route guarded by :func:`requires`)."""
    key_id: str = g.api_key_id
    return key_id


def caller() -> Actor:
    """Who is making the current request, for the audit log (inside a guarded route)."""
    return Actor(caller_key_id(), g.api_role)


def requires[F: Callable[..., Awaitable[Any]]](needed: Role, *, only_if: Condition | None = None) -> Callable[[F], F]:
    """Let the route run only for an API key with role *needed* or higher.

    Put it directly under the route decorator: authentication comes before request
    validation, so an anonymous caller learns nothing about the request schema.
    The key id and role are left on ``g.api_key_id`` and ``g.api_role``.

    With *only_if*, the key is needed only on a node whose services satisfy it (a setting such
    as ``metrics_require_key``); the OpenAPI document then describes each node as configured.
    """

    def decorate(func: F) -> F:
        @wraps(func)
        async def guarded(*args: Any, **kwargs: Any) -> Any:
            if only_if is None or only_if(services()):
                key_id, role = await authenticate()
                if not has_role(role, needed):
                    raise ApiError(HTTPStatus.FORBIDDEN, f"this needs the {needed} role; the API key has {role}")
                g.api_key_id = key_id
                g.api_role = role
            return await func(*args, **kwargs)

        declare(guarded, needed, only_if)
        if only_if is not None:
            return cast("F", guarded)  # web.openapi documents it when the condition holds
        documented = documents_problems(HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN)(guarded)
        return cast("F", security_scheme([{SECURITY_SCHEME: []}])(documented))

    return decorate
