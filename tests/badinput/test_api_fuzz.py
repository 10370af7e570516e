"""schemathesis against the node's own ``/openapi.json``, served by a real node over real HTTP.

Every operation gets generated requests, valid (positive) and invalid (negative) bodies,
query strings and path parameters, sent with an admin key. Every answer must be documented
(status, content type, body schema, headers) and none may be a 5xx. Examples per operation
and mode are bounded so the module finishes in well under a minute.

The operations are driven with ``APIOperation.as_strategy`` and hypothesis directly rather
than schemathesis' pytest plugin, whose lazy fixture loader reads a private attribute that
pytest 9 no longer has.
"""

from __future__ import annotations

from http import HTTPStatus

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.core.transport import Response
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
from schemathesis.specs.openapi.schemas import OpenApiSchema

from tests.protocol.target import NodeTarget

#: Per operation and generation mode. ~13 operations x 2 modes x 15 = ~400 requests.
EXAMPLES = 15


@pytest.fixture(scope="module")
def api_schema(node_target: NodeTarget) -> OpenApiSchema:
    headers = {"Authorization": f"Bearer {node_target.admin_key}"}
    schema = schemathesis.openapi.from_url(f"{node_target.http_url}/openapi.json", headers=headers)
    schema.config.update(base_url=node_target.http_url, headers=headers)
    # A `cursor` is opaque: any string fits the schema, but only one this node issued is a
    # cursor, and any other is a documented 400 (bad-cursor). Every other check is as shipped.
    acceptance = schema.config.checks.positive_data_acceptance
    acceptance.expected_statuses = [*acceptance.expected_statuses, "400"]
    return schema


def cross_field_refusal(response: Response) -> bool:
    """A 422 only for a rule between query fields (``from`` before ``to``), which a schema
    cannot state: each field fits the schema, the request as a whole does not."""
    if response.status_code != HTTPStatus.UNPROCESSABLE_CONTENT:
        return False
    errors = response.json().get("errors", [])
    return bool(errors) and all(error["loc"] == ["query"] for error in errors)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_every_answer_is_documented_and_none_is_a_server_error(
    api_schema: OpenApiSchema, node_target: NodeTarget, mode: GenerationMode
) -> None:
    headers = {"Authorization": f"Bearer {node_target.admin_key}"}
    failures: list[str] = []
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    for operation in operations:
        # The node is shared by the module, so examples are not independent of each other.
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy(mode))
        def run(case: schemathesis.Case) -> None:
            response = case.call(base_url=node_target.http_url, headers=headers)
            excluded = [positive_data_acceptance] if cross_field_refusal(response) else []
            case.validate_response(response, excluded_checks=excluded)

        try:
            run()
        except Unsatisfiable:
            # No input breaks this operation's schema (no parameters, or only ones the URL
            # cannot carry broken): nothing to send in this mode.
            if mode is not GenerationMode.NEGATIVE:
                raise
        except Exception as exc:
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)
