"""``/api/v1/keys``: API keys, managed by admins.

Creating a key shows it once, in the 201 response; only its SHA-256 digest is stored. Listing
never shows a key or its digest. Deleting a key revokes it: the very next request with it gets
401 (every request looks its key up, nothing is cached). The row stays, revoked, so that the
key ids in the audit log keep pointing at something. ``depot-node keys`` does the same from the
node's own machine, which is also the way back in when no admin key is left.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Final

from quart import Blueprint, Response
from quart_schema import tag_blueprint, validate_querystring, validate_request, validate_response

from storage.credentials import Change
from storage.secrets import new_api_key
from web.auth import caller, requires
from web.context import services
from web.errors import ApiError
from web.models import ApiKey, ApiKeyCreate, ApiKeyCreated, ApiKeyPage, NoContent, PageQuery, epoch_to_ts
from web.openapi import documents, documents_problems
from web.paging import page_limit

bp = Blueprint("keys", __name__, url_prefix="/api/v1/keys")
tag_blueprint(bp, ["keys"])

# Key ids are 12 hex digits (storage.secrets.new_api_key); anything else cannot be one.
_KEY_ID: Final = re.compile(r"[0-9a-f]{12}")


@bp.post("")
@requires("admin")
@validate_request(ApiKeyCreate)
@validate_response(ApiKeyCreated, HTTPStatus.CREATED)
@documents_problems(HTTPStatus.UNPROCESSABLE_CONTENT)
async def create_key(data: ApiKeyCreate) -> tuple[ApiKeyCreated, int, dict[str, str]]:
    """Create an API key with a role; the response holds the key (`key`), shown this once."""
    key_id, key, key_hash = new_api_key()
    created = await services().store.insert_api_key(key_id, data.role, key_hash, name=data.name, by=caller())
    body = ApiKeyCreated(
        key_id=key_id,
        role=data.role,
        name=data.name,
        created_at=epoch_to_ts(created),
        revoked=False,
        revoked_at=None,
        key=key,
    )
    return body, HTTPStatus.CREATED, {"Location": f"{bp.url_prefix}/{key_id}"}


@bp.get("")
@requires("admin")
@validate_querystring(PageQuery)
@validate_response(ApiKeyPage)
@documents_problems(HTTPStatus.BAD_REQUEST, HTTPStatus.UNPROCESSABLE_CONTENT)
async def list_keys(query_args: PageQuery) -> ApiKeyPage:
    """API keys ordered by id, revoked ones included; never the keys themselves."""
    svc = services()
    page = await svc.reader.api_keys(page_limit(query_args.limit, svc.max_page), query_args.cursor)
    return ApiKeyPage(items=[ApiKey.from_row(row) for row in page.items], next_cursor=page.next_cursor)


@bp.delete("/<key_id>")
@requires("admin")
@documents(NoContent, HTTPStatus.NO_CONTENT)
@documents_problems(HTTPStatus.NOT_FOUND)
async def delete_key(key_id: str) -> Response:
    """Delete (revoke) an API key: requests with it get 401 from now on.

    Idempotent: deleting a deleted key answers 204 again. A key may delete itself.
    """
    change = await services().store.revoke_api_key(key_id, by=caller()) if _KEY_ID.fullmatch(key_id) else None
    if change is None or change is Change.MISSING:
        raise ApiError(HTTPStatus.NOT_FOUND, f"no API key {key_id[:40]!r}")
    return Response(status=HTTPStatus.NO_CONTENT)
