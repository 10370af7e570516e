"""HTTP rate limits: per API key, and per remote address for requests without a valid key.

quart-rate-limiter does the counting (GCRA: a token bucket kept as one timestamp per caller).
What this module adds to it:

* **One bucket per caller, for the whole API.** The library keys every bucket by endpoint as
  well, which would give a client its allowance once per route. :class:`NodeRateLimiter`
  keys by caller only: ``key:<key id>`` for a request with a valid API key (checked by
  ``web.auth.authenticate``, against the database on every request: a key deleted through
  ``DELETE /api/v1/keys/{key_id}`` or ``depot-node keys delete`` is refused at once, and its
  requests then count against their address), ``addr:<peer address>`` for anything else. The peer is the
  socket's address, never ``X-Forwarded-For``, which any client can write.
* **Two limits**, :class:`HttpRateLimits`: a generous one per key and a tight one per address,
  so guessing keys or flooding ``/api`` without one is slowed down per address.
* **Bounded memory.** :class:`BoundedMemoryStore` forgets callers whose bucket is full again
  (their timestamp is in the past, so they are the same as new) once it holds
  :data:`MAX_CALLERS` of them.
* **Errors as problems.** Over the limit is a 429 ``application/problem+json`` with
  ``Retry-After`` (whole seconds), documented on every limited route of the OpenAPI document
  (``web.openapi``).

``/healthz`` and ``/readyz`` are never limited: a probe answered 429 would get a healthy node
restarted by its orchestrator.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import Final

from quart import Quart, Response, g, request
from quart_rate_limiter import RateLimit, RateLimiter, RateLimitExceeded
from quart_rate_limiter.store import MemoryStore

from web.auth import authenticate
from web.errors import DEVICE_LIMIT, RATE_LIMITED, ApiError, problem_response
from web.openapi import RATE_LIMIT_EXEMPT

#: Endpoints no limit applies to (orchestrator probes).
EXEMPT: Final = frozenset({"operations.healthz", "operations.readyz"})
#: Callers remembered at most before full buckets are forgotten (~200 bytes each).
MAX_CALLERS: Final = 100_000

_KEY_PREFIX: Final = "key:"
_ADDR_PREFIX: Final = "addr:"


@dataclass(frozen=True, slots=True)
class HttpRateLimits:
    """Sustained requests per second and how many may come at once; a rate of 0 is no limit."""

    per_key_per_s: float = 100.0
    per_key_burst: int = 1000
    anonymous_per_s: float = 10.0
    anonymous_burst: int = 100


def device_limit_problem(limit: int) -> ApiError:
    return ApiError(
        HTTPStatus.CONFLICT,
        f"the node already holds its maximum of {limit} devices (max_devices); revoke one or raise the limit",
        type_=DEVICE_LIMIT,
    )


async def rate_limit_caller() -> str:
    """``key:<key id>`` for a request with a valid API key, else ``addr:<peer address>``."""
    found: str | None = g.get("rate_limit_caller")
    if found is not None:
        return found
    try:
        key_id, _role = await authenticate()
    except ApiError:
        found = _ADDR_PREFIX + (request.remote_addr or "unknown")
    else:
        found = _KEY_PREFIX + key_id
    g.rate_limit_caller = found
    return found


async def _skip_keyed() -> bool:
    return request.endpoint in EXEMPT or not (await rate_limit_caller()).startswith(_KEY_PREFIX)


async def _skip_anonymous() -> bool:
    return request.endpoint in EXEMPT or not (await rate_limit_caller()).startswith(_ADDR_PREFIX)


class BoundedMemoryStore(MemoryStore):
    """The library's in-memory store, with a bound on how many callers it remembers."""

    def __init__(self, max_callers: int = MAX_CALLERS) -> None:
        super().__init__()
        self._max = max_callers

    async def set(self, key: str, tat: datetime) -> None:
        await super().set(key, tat)
        if len(self._tats) > self._max:
            now = datetime.now(UTC)
            # A theoretical arrival time in the past is a full bucket: the same as no entry.
            self._tats = {k: v for k, v in self._tats.items() if v > now}
            while len(self._tats) > self._max:  # all busy: forget the oldest entries
                del self._tats[next(iter(self._tats))]


class NodeRateLimiter(RateLimiter):
    async def _create_key(self, endpoint: str, rate_limit: RateLimit) -> str:
        # One bucket per caller and limit across every route (the library adds the endpoint).
        return f"{rate_limit.key}-{await rate_limit_caller()}"

    async def _after_request(self, response: Response) -> Response:
        # The library's RateLimit-* headers describe the shortest limit of the route even when
        # that limit was skipped for this caller (the other of our two); leave them out.
        return response


def _gcra(per_s: float, burst: int, skip: object) -> RateLimit:
    # GCRA: `count` requests at once, then count / period per second.
    return RateLimit(burst, timedelta(seconds=burst / per_s), skip_function=skip)  # type: ignore[arg-type]


async def _on_rate_limited(error: RateLimitExceeded) -> Response:
    # The library sets whole seconds (werkzeug types the attribute more widely).
    retry_after = max(1, error.retry_after if isinstance(error.retry_after, int) else 1)
    who = (
        "this API key"
        if (await rate_limit_caller()).startswith(_KEY_PREFIX)
        else "this address without a valid API key"
    )
    return problem_response(
        HTTPStatus.TOO_MANY_REQUESTS,
        f"too many requests from {who}; retry after {retry_after} s",
        type_=RATE_LIMITED,
        headers={"Retry-After": str(retry_after)},
    )


def install_rate_limits(app: Quart, limits: HttpRateLimits) -> None:
    """Limit every route of *app* (registered already) but the probes, and document the 429."""
    rate_limits = []
    if limits.per_key_per_s > 0:
        rate_limits.append(_gcra(limits.per_key_per_s, limits.per_key_burst, _skip_keyed))
    if limits.anonymous_per_s > 0:
        rate_limits.append(_gcra(limits.anonymous_per_s, limits.anonymous_burst, _skip_anonymous))
    if not rate_limits:
        return
    NodeRateLimiter(app, key_function=rate_limit_caller, store=BoundedMemoryStore(), default_limits=rate_limits)
    app.register_error_handler(RateLimitExceeded, _on_rate_limited)
    # web.openapi documents the 429 on every route but these (per app: the view functions are
    # shared by every app in the process, so they are not marked themselves).
    app.config[RATE_LIMIT_EXEMPT] = EXEMPT
