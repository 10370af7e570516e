"""The bad-input campaign's node: one real node per module, in a background thread, reached
over real TCP only (HTTP for schemathesis, raw sockets for the MQTT attempts)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.protocol.target import NodeTarget, local_node


@pytest.fixture(scope="module")
def node_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeTarget]:
    # The HTTP limits stay on (a 429 is a documented answer); the per-address one is raised
    # so that schemathesis' requests without a key are mostly answered with what they test.
    with local_node(
        tmp_path_factory.mktemp("badinput-node"),
        http_anonymous_rate_limit_per_s=100.0,
        # Truncated packets are closed after this: short, so the attempts do not pile up.
        mqtt_packet_timeout_s=1.0,
    ) as target:
        yield target
