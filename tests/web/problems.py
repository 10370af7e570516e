"""The one check every error test makes: an RFC 9457 problem with the expected status."""

from __future__ import annotations

from typing import Any

from quart import Response


async def assert_problem(response: Response, status: int) -> dict[str, Any]:
    body_text = await response.get_data(as_text=True)
    assert response.status_code == status, body_text
    assert response.content_type == "application/problem+json"
    body: dict[str, Any] = await response.get_json()
    assert body["status"] == status
    assert isinstance(body["type"], str)
    assert isinstance(body["title"], str)
    assert isinstance(body["detail"], str)
    assert "Traceback" not in body_text
    return body
