"""Where a request handler finds the node's services: on the app, put there by ``create_app``.

Kept on ``app.extensions`` rather than in module globals so that several apps (tests) can live
in one process without seeing each other's database.
"""

from __future__ import annotations

from typing import Final, cast

from prometheus_client import CollectorRegistry
from quart import Quart, current_app

from web.services import WebServices

_SERVICES: Final = "depot_node.services"
_REGISTRY: Final = "depot_node.metrics_registry"


def install(app: Quart, services: WebServices, registry: CollectorRegistry) -> None:
    app.extensions[_SERVICES] = services
    app.extensions[_REGISTRY] = registry


def services() -> WebServices:
    return cast("WebServices", current_app.extensions[_SERVICES])


def app_services(app: Quart) -> WebServices:
    """The services of *app*, outside a request (the OpenAPI document is built per app)."""
    return cast("WebServices", app.extensions[_SERVICES])


def metrics_registry() -> CollectorRegistry:
    return cast("CollectorRegistry", current_app.extensions[_REGISTRY])
