"""Probes and metrics, without authentication: ``/healthz``, ``/readyz``, ``/metrics``.

``/healthz`` answers whenever the HTTP server does (liveness: restart the node if it does not).
``/readyz`` reports :attr:`web.services.WebServices.readiness`, which the composition root sets
as parts come up and go down; it is 503 until every part reported up (an empty report is not
"all up"). Neither touches the database, so a probe cannot pile up behind a slow query.
``/metrics`` carries no secrets or per-device data; with the setting ``metrics_require_key`` it
needs an API key (viewer or higher), for sites whose HTTP listener is reachable by more than
their Prometheus.
"""

from __future__ import annotations

from http import HTTPStatus

from prometheus_client.exposition import choose_encoder
from quart import Blueprint, Response, request
from quart_schema import tag_blueprint, validate_response

from web.auth import requires
from web.context import metrics_registry, services
from web.errors import NOT_READY, ApiError
from web.models import Health, MetricsText, NotReady, Readiness
from web.openapi import documents
from web.services import WebServices

bp = Blueprint("operations", __name__)
tag_blueprint(bp, ["operations"])


@bp.get("/healthz")
@validate_response(Health)
async def healthz() -> Health:
    """Liveness: the process serves HTTP."""
    return Health()


@bp.get("/readyz")
@validate_response(Readiness)
@documents(NotReady, HTTPStatus.SERVICE_UNAVAILABLE)
async def readyz() -> Readiness:
    """Readiness: every component of the node is up."""
    components = dict(services().readiness)
    down = sorted(name for name, up in components.items() if not up)
    if down or not components:
        detail = f"not ready: {', '.join(down)} down" if down else "not ready: no component has reported yet"
        raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, detail, type_=NOT_READY, extra={"down": down})
    return Readiness(components=components)


def _metrics_protected(svc: WebServices) -> bool:
    return svc.metrics_require_key


@bp.get("/metrics")
@requires("viewer", only_if=_metrics_protected)
@documents(MetricsText, HTTPStatus.OK)
async def metrics() -> Response:
    """Prometheus metrics (text exposition format; OpenMetrics when asked for)."""
    # Synchronous on purpose: the collector reads counters that the actors bump on this
    # same event loop thread, and a scrape takes well under a millisecond.
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encoder(metrics_registry()), content_type=content_type)
