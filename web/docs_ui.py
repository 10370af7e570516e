"""Swagger UI from the node itself, so ``/docs`` works on a depot network without internet.

quart-schema's ``/docs`` page loads Swagger UI's script and stylesheet from a CDN by default,
which a depot site behind a firewall cannot reach (the page stays blank; ``/openapi.json``
works either way). The files come with the ``swagger-ui-py`` distribution (Swagger UI 5, the
version that reads OpenAPI 3.1); the node serves the two that the page needs under
``/docs/static/`` and points quart-schema at them. Nothing of that package is imported: its
files are found through the distribution's metadata.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import distribution
from pathlib import Path
from typing import Final

from quart import Blueprint, Quart, Response, send_file
from quart_schema import hide

from web.errors import ApiError

#: The Swagger UI files that ``/docs`` loads, and their media types. Nothing else is served.
ASSETS: Final = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css"}
#: Where they are served; the route-walking test lists it as public, like ``/docs`` itself.
PREFIX: Final = "/docs/static"
#: They only change with the package: browsers may keep them for a day.
MAX_AGE_S: Final = 86_400

bp = Blueprint("docs_ui", __name__)


@cache  # a metadata lookup on disk: once per process, not per request
def static_dir() -> Path:
    return Path(str(distribution("swagger-ui-py").locate_file("swagger_ui/static")))


def configure(app: Quart) -> None:
    """Point quart-schema's ``/docs`` page at the node's own copies (before QuartSchema reads them)."""
    app.config["QUART_SCHEMA_SWAGGER_JS_URL"] = f"{PREFIX}/swagger-ui-bundle.js"
    app.config["QUART_SCHEMA_SWAGGER_CSS_URL"] = f"{PREFIX}/swagger-ui.css"


@bp.get(f"{PREFIX}/<name>")
@hide
async def asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise ApiError(404, f"no such file: {name[:80]!r}")
    path = static_dir() / name
    if not path.is_file():  # a broken installation, not a client error
        raise ApiError(503, f"Swagger UI's {name} is missing from the swagger-ui-py package")
    return await send_file(path, mimetype=media_type, cache_timeout=MAX_AGE_S)
