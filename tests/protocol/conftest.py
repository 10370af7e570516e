"""Fixtures of the protocol tests: the node under test and an HTTP client for it.

By default one real node is started per test module (in a background thread with its own
event loop, on free loopback ports, data in a temporary directory); it stops with the module,
so it never runs in the background of other tests. With ``--node-url``,
``--mqtt-url`` and an admin key the tests use that running node instead.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.protocol.target import NodeTarget, external_target, local_node


def machine_timeout(config: pytest.Config) -> float:
    """The state machine's time limit: the suite's 120 s are for a passing default run only.

    A failing run shrinks its example for up to 2 minutes more, and a longer hunt
    (--protocol-examples/--protocol-steps) takes longer in proportion.
    """
    examples = config.getoption("--protocol-examples") or 100
    steps = config.getoption("--protocol-steps") or 20
    return max(300.0, 300.0 * examples * steps / (100 * 20))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--timeout", None) is not None:
        return  # a --timeout on the command line rules (0 switches it off)
    for item in items:
        if item.path.name == "test_protocol_machine.py":
            item.add_marker(pytest.mark.timeout(machine_timeout(config)))


@pytest.fixture(scope="module")
def node_target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeTarget]:
    opt = request.config.getoption
    try:
        external = external_target(opt("--node-url"), opt("--mqtt-url"), opt("--admin-key"))
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    if external is None:
        # The checks after every step read the API with one admin key, far faster than the
        # per-key HTTP rate limit allows (web.limits; tested in tests/web/test_rate_limits.py).
        with local_node(tmp_path_factory.mktemp("protocol-node"), http_rate_limit_per_s=0) as target:
            yield target
        return
    with external.http() as client:
        try:
            health = client.get("/healthz")
            auth = client.get("/api/v1/devices", params={"limit": 1})
        except httpx.HTTPError as exc:
            pytest.fail(f"node at {external.http_url} does not answer: {exc!r}")
    if health.status_code != 200 or auth.status_code != 200:
        pytest.fail(
            f"node at {external.http_url}: /healthz answered {health.status_code}, and the admin key"
            f" got {auth.status_code} from /api/v1/devices"
        )
    yield external


@pytest.fixture(scope="module")
def node_http(node_target: NodeTarget) -> Iterator[httpx.Client]:
    """A synchronous client of the node's HTTP API with the admin key."""
    with node_target.http() as client:
        yield client
