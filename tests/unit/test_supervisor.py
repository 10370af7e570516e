"""One-for-one supervision: restarts counted exactly, backoff, intensity, restart kinds.

Every test runs on trio's autojump clock: backoff delays are measured with
``trio.current_time()`` and nothing sleeps in real time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from actors.supervisor import Restart, RestartIntensityExceeded, RestartPolicy, supervise


class ChildCrashError(Exception):
    """The crash the test children raise; ``n`` says which run raised it."""

    def __init__(self, n: int) -> None:
        super().__init__(f"crash #{n}")
        self.n = n


@dataclass
class Child:
    """A child that runs for ``runs_for[i]`` seconds on its i-th start, then crashes.

    Past the end of ``runs_for`` it returns normally (or, with ``then_block``, waits forever).
    """

    runs_for: list[float]
    then_block: bool = False
    starts: list[float] = field(default_factory=list)
    restarts: list[tuple[str, BaseException]] = field(default_factory=list)

    async def __call__(self) -> None:
        n = len(self.starts)
        self.starts.append(trio.current_time())
        if n < len(self.runs_for):
            await trio.sleep(self.runs_for[n])
            raise ChildCrashError(n + 1)
        if self.then_block:
            await trio.sleep_forever()

    def on_restart(self, name: str, exc: BaseException) -> None:
        self.restarts.append((name, exc))

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:], strict=False)]


#: Explicit values (not RestartPolicy's defaults) so that every number below is visible here.
BASE_POLICY = RestartPolicy(
    restart=Restart.TRANSIENT, max_restarts=3, period=60.0, backoff_initial=0.1, backoff_max=10.0
)


def policy(**overrides: Any) -> RestartPolicy:
    return dataclasses.replace(BASE_POLICY, **overrides)


async def run(child: Callable[[], Awaitable[None]], p: RestartPolicy, on_restart: Child | None = None) -> None:
    await supervise("child", child, p, on_restart=on_restart.on_restart if on_restart else None)


@pytest.mark.trio
async def test_restarts_are_counted_exactly(autojump_clock: trio.testing.MockClock) -> None:
    child = Child(runs_for=[0.0] * 3)
    await run(child, policy(max_restarts=3), child)
    # Three crashes, three restarts, and a fourth run that ended normally.
    assert len(child.starts) == 4
    assert [(name, exc.n) for name, exc in child.restarts if isinstance(exc, ChildCrashError)] == [
        ("child", 1),
        ("child", 2),
        ("child", 3),
    ]


@pytest.mark.trio
async def test_backoff_doubles_up_to_the_maximum(autojump_clock: trio.testing.MockClock) -> None:
    child = Child(runs_for=[0.0] * 7)
    await run(child, policy(max_restarts=10, backoff_initial=0.1, backoff_max=1.0), child)
    assert child.gaps() == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])


@pytest.mark.trio
async def test_more_than_max_restarts_within_the_period_escalates(
    autojump_clock: trio.testing.MockClock,
) -> None:
    child = Child(runs_for=[1.0] * 100)
    with pytest.raises(RestartIntensityExceeded) as caught:
        await run(child, policy(max_restarts=3, period=60.0), child)
    # max_restarts restarts are allowed; crash number max_restarts + 1 escalates instead.
    assert len(child.starts) == 4
    assert len(child.restarts) == 3
    exc = caught.value
    assert (exc.name, exc.restarts) == ("child", 4)
    assert isinstance(exc.last, ChildCrashError)
    assert exc.last.n == 4
    assert exc.__cause__ is exc.last
    assert str(exc) == "child crashed 4 times within 60 s; last error: ChildCrashError('crash #4')"


@pytest.mark.trio
async def test_zero_max_restarts_escalates_on_the_first_crash(autojump_clock: trio.testing.MockClock) -> None:
    child = Child(runs_for=[0.0])
    with pytest.raises(RestartIntensityExceeded):
        await run(child, policy(max_restarts=0), child)
    assert (len(child.starts), len(child.restarts)) == (1, 0)


@pytest.mark.trio
async def test_crashes_spread_over_more_than_the_period_never_escalate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Each run outlives the period, so the window never holds more than the latest crash.
    child = Child(runs_for=[11.0] * 50)
    await run(child, policy(max_restarts=1, period=10.0, backoff_initial=0.5), child)
    assert len(child.restarts) == 50
    # One crash in the window each time: the backoff never grows.
    assert child.gaps() == pytest.approx([11.5] * 50)


@pytest.mark.parametrize(
    ("third_run", "escalates"),
    [
        # Crashes at 0 and 0.1 have left the 10 s window when the third one comes at 10.8.
        (10.5, False),
        # At 9.3 all three crashes are within 10 s: more than max_restarts = 2.
        (9.0, True),
    ],
)
@pytest.mark.trio
async def test_the_crash_window_slides(
    autojump_clock: trio.testing.MockClock, third_run: float, *, escalates: bool
) -> None:
    child = Child(runs_for=[0.0, 0.0, third_run, 0.0])
    p = policy(max_restarts=2, period=10.0, backoff_initial=0.1)
    if escalates:
        with pytest.raises(RestartIntensityExceeded):
            await run(child, p, child)
        assert child.starts == pytest.approx([0.0, 0.1, 0.3])
        return
    await run(child, p, child)
    # Starts: 0, crash, +0.1, crash, +0.2, runs 10.5, crash (alone in the window: +0.1 again),
    # crash (two in the window: +0.2), then the fifth run ends normally.
    assert child.starts == pytest.approx([0.0, 0.1, 0.3, 10.9, 11.1])
    assert len(child.restarts) == 4


@pytest.mark.trio
async def test_a_transient_child_that_returns_is_not_restarted(autojump_clock: trio.testing.MockClock) -> None:
    child = Child(runs_for=[])
    await run(child, policy(restart=Restart.TRANSIENT), child)
    assert len(child.starts) == 1
    assert child.restarts == []


@pytest.mark.trio
async def test_a_transient_child_that_crashes_is_restarted(autojump_clock: trio.testing.MockClock) -> None:
    child = Child(runs_for=[0.0, 0.0])
    await run(child, policy(restart=Restart.TRANSIENT), child)
    assert len(child.starts) == 3
    assert len(child.restarts) == 2


@pytest.mark.trio
async def test_a_permanent_child_is_restarted_when_it_returns(autojump_clock: trio.testing.MockClock) -> None:
    runs = 0

    async def child() -> None:
        nonlocal runs
        runs += 1
        await trio.sleep(1)

    restarts: list[BaseException] = []
    with trio.move_on_after(10.5):
        await supervise("child", child, policy(restart=Restart.PERMANENT), on_restart=lambda _, e: restarts.append(e))
    assert runs == 11  # started at 0, 1, ..., 10
    assert restarts == []  # a normal return is not a crash


@pytest.mark.trio
async def test_a_permanent_child_is_restarted_when_it_crashes(autojump_clock: trio.testing.MockClock) -> None:
    child = Child(runs_for=[0.0, 0.0], then_block=True)
    with trio.move_on_after(100):
        await run(child, policy(restart=Restart.PERMANENT), child)
    assert len(child.starts) == 3
    assert len(child.restarts) == 2


@pytest.mark.trio
async def test_a_temporary_child_is_never_restarted(autojump_clock: trio.testing.MockClock) -> None:
    child = Child(runs_for=[0.0])
    with pytest.raises(ChildCrashError):
        await run(child, policy(restart=Restart.TEMPORARY), child)
    assert (len(child.starts), len(child.restarts)) == (1, 0)
    returns = Child(runs_for=[])
    await run(returns, policy(restart=Restart.TEMPORARY), returns)
    assert len(returns.starts) == 1


@pytest.mark.parametrize("restart", list(Restart))
@pytest.mark.trio
async def test_cancellation_is_not_a_crash(autojump_clock: trio.testing.MockClock, restart: Restart) -> None:
    child = Child(runs_for=[], then_block=True)
    with trio.move_on_after(5) as scope:
        await run(child, policy(restart=restart), child)
    assert scope.cancelled_caught
    assert len(child.starts) == 1
    assert child.restarts == []
    assert trio.current_time() == pytest.approx(5)


@pytest.mark.trio
async def test_cancellation_during_the_backoff_ends_supervision(autojump_clock: trio.testing.MockClock) -> None:
    child = Child(runs_for=[0.0] * 10)
    with trio.move_on_after(0.5):
        await run(child, policy(max_restarts=10, backoff_initial=0.4), child)
    # Crash at 0, restart at 0.4, crash, backoff 0.8 is cut short by the deadline at 0.5.
    assert child.starts == pytest.approx([0.0, 0.4])
    assert trio.current_time() == pytest.approx(0.5)


@pytest.mark.trio
async def test_a_base_exception_is_not_a_crash(autojump_clock: trio.testing.MockClock) -> None:
    class Stop(BaseException):
        pass

    starts = 0

    async def child() -> None:
        nonlocal starts
        starts += 1
        raise Stop

    with pytest.raises(Stop):
        await supervise("child", child, policy(restart=Restart.PERMANENT))
    assert starts == 1
