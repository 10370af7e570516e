"""The Quart application of the node's HTTP API: :func:`create_app`.

The app holds no state of its own: everything comes in through :class:`WebServices`, so the
composition root decides what it reads and what a revocation does, and tests build it on a
temporary database. It never writes telemetry and never talks to the broker directly.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Final

from quart import Quart
from quart_schema import HttpSecurityScheme, Info, QuartSchema

from web import docs_ui
from web.auth import SECURITY_SCHEME
from web.context import install
from web.errors import register_error_handlers
from web.limits import install_rate_limits
from web.metrics import build_registry
from web.openapi import NodeOpenAPIProvider
from web.routes import (
    alerts,
    audit,
    credentials,
    devices,
    energy,
    events,
    forwarders,
    keys,
    operations,
    quarantine,
    telemetry,
)
from web.routes import commands as command_routes
from web.services import WebServices

TITLE: Final = "depot-node"

# Request bodies are small JSON documents; refuse anything larger (413) before parsing it.
MAX_BODY_BYTES: Final = 64 * 1024


def _version() -> str:
    try:
        return version("depot-node")
    except PackageNotFoundError:
        return "0+unknown"


def create_app(services: WebServices) -> Quart:
    """The HTTP API on top of *services*: routes, OpenAPI (``/openapi.json``, ``/docs``), errors."""
    app = Quart(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    docs_ui.configure(app)
    QuartSchema(
        app,
        info=Info(title=TITLE, version=_version()),
        openapi_path="/openapi.json",
        swagger_ui_path="/docs",
        redoc_ui_path=None,
        scalar_ui_path=None,
        security_schemes={
            SECURITY_SCHEME: HttpSecurityScheme(scheme="bearer", bearer_format="dnk_<key id>_<secret>"),
        },
        openapi_provider_class=NodeOpenAPIProvider,
    )
    install(app, services, build_registry(services.stats))
    register_error_handlers(app)
    for blueprint in (
        operations.bp,
        devices.bp,
        events.bp,
        telemetry.bp,
        energy.bp,
        quarantine.bp,
        alerts.bp,
        forwarders.bp,
    ):
        app.register_blueprint(blueprint)
    app.register_blueprint(command_routes.bp)
    app.register_blueprint(docs_ui.bp)
    for blueprint in (credentials.bp, keys.bp, audit.bp):
        app.register_blueprint(blueprint)
    if services.rate_limits is not None:
        install_rate_limits(app, services.rate_limits)  # after the routes: it documents their 429
    return app
