"""Options shared by the whole suite.

``--node-url``, ``--mqtt-url`` and ``--admin-key`` point the protocol tests
(``tests/protocol``) at a node that is already running instead of one they start themselves;
see ``tests/protocol/README.md``. Every other test ignores them.

Hypothesis runs without its per-example deadline (the ``depot-node`` profile): the deadline
is wall-clock time, and on a machine shared with other test suites it failed pure-CPU
properties at random (``test_sequence``'s restart property took 352 ms of its 200 ms under
load). What each property asserts is unchanged; a test that must bound time says so itself.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

settings.register_profile("depot-node", deadline=None)
settings.load_profile("depot-node")

#: The environment variable for --admin-key (a key on the command line lands in shell history).
ADMIN_KEY_ENV = "DEPOT_NODE_TEST_ADMIN_KEY"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("depot-node", "depot-node protocol tests against a running node")
    group.addoption(
        "--node-url",
        metavar="URL",
        default=None,
        help="HTTP API of a running node, e.g. http://127.0.0.1:8080 (default: start a node in-process)",
    )
    group.addoption(
        "--mqtt-url",
        metavar="URL",
        default=None,
        help="MQTT listener of that node, e.g. mqtt://127.0.0.1:1883",
    )
    group.addoption(
        "--admin-key",
        metavar="KEY",
        default=None,
        help="admin API key of that node (or set DEPOT_NODE_TEST_ADMIN_KEY)",
    )
    group.addoption(
        "--protocol-examples",
        metavar="N",
        type=int,
        default=None,
        help="hypothesis examples of the protocol state machine (default 100)",
    )
    group.addoption(
        "--protocol-steps",
        metavar="N",
        type=int,
        default=None,
        help="most steps per example of the protocol state machine (default 20)",
    )


def pytest_configure(config: pytest.Config) -> None:
    # Fail at once on an incomplete target, not with one error per protocol test.
    node_url, mqtt_url = config.getoption("--node-url"), config.getoption("--mqtt-url")
    if (node_url is None) != (mqtt_url is None):
        raise pytest.UsageError("--node-url and --mqtt-url go together: give both to test a running node")
    if node_url is not None and not (config.getoption("--admin-key") or os.environ.get(ADMIN_KEY_ENV)):
        raise pytest.UsageError(f"testing a running node needs an admin API key: --admin-key KEY or {ADMIN_KEY_ENV}")
    for name in ("--protocol-examples", "--protocol-steps"):
        value = config.getoption(name)
        if value is not None and value < 1:
            raise pytest.UsageError(f"{name} must be at least 1")
