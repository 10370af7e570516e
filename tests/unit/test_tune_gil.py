"""``serve``'s GIL switch interval setting (ADR 0015)."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from node.cli import tune_gil
from node.config import Settings


@pytest.fixture(autouse=True)
def keep_interval() -> Iterator[None]:
    before = sys.getswitchinterval()
    yield
    sys.setswitchinterval(before)


def test_the_default_lets_a_waiting_thread_have_the_gil_after_1_ms() -> None:
    tune_gil(Settings().gil_switch_interval_ms)
    assert sys.getswitchinterval() == pytest.approx(0.001)


def test_zero_keeps_pythons_interval() -> None:
    sys.setswitchinterval(0.005)
    tune_gil(0)
    assert sys.getswitchinterval() == pytest.approx(0.005)


@pytest.mark.parametrize("bad", [-1, 101, "fast"])
def test_a_bad_interval_is_refused(bad: object) -> None:
    with pytest.raises(ValidationError, match="gil_switch_interval_ms"):
        Settings(gil_switch_interval_ms=bad)  # type: ignore[arg-type]
