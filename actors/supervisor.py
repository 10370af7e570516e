"""One-for-one supervision with exponential backoff and a restart-intensity limit.

A supervised child is an async callable. When it raises, :func:`supervise` restarts it after
a backoff that doubles from ``backoff_initial`` up to ``backoff_max``; when it has crashed more
than ``max_restarts`` times within ``period`` seconds, the supervisor stops restarting and
raises :class:`RestartIntensityExceeded` (escalation) — the caller decides whether that parks
one device or takes the node down. Cancellation is never treated as a crash.

Restart kinds follow Erlang/OTP: a *permanent* child is restarted whenever it ends; a
*transient* child only when it crashed; a *temporary* child never.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio

log = logging.getLogger(__name__)


class Restart(enum.Enum):
    PERMANENT = "permanent"
    TRANSIENT = "transient"
    TEMPORARY = "temporary"


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    restart: Restart = Restart.TRANSIENT
    max_restarts: int = 5
    period: float = 60.0
    backoff_initial: float = 0.1
    backoff_max: float = 10.0


class RestartIntensityExceeded(Exception):  # noqa: N818 - the OTP name says what happened
    """A child crashed more than ``max_restarts`` times within ``period`` seconds."""

    def __init__(self, name: str, restarts: int, period: float, last: BaseException) -> None:
        super().__init__(f"{name} crashed {restarts} times within {period:g} s; last error: {last!r}")
        self.name = name
        self.restarts = restarts
        self.period = period
        self.last = last


async def supervise(
    name: str,
    child: Callable[[], Awaitable[None]],
    policy: RestartPolicy,
    *,
    on_restart: Callable[[str, BaseException], None] | None = None,
) -> None:
    """Run *child* under *policy* until it ends for good (see module docstring)."""
    crashes: deque[float] = deque()
    while True:
        try:
            await child()
        except Exception as exc:
            now = anyio.current_time()
            crashes.append(now)
            while crashes and crashes[0] < now - policy.period:
                crashes.popleft()
            if policy.restart is Restart.TEMPORARY:
                raise
            if len(crashes) > policy.max_restarts:
                raise RestartIntensityExceeded(name, len(crashes), policy.period, exc) from exc
            # Backoff grows with the crashes inside the window, so a child that ran fine for a
            # whole period starts again from the initial delay.
            backoff = min(policy.backoff_initial * 2 ** (len(crashes) - 1), policy.backoff_max)
            log.warning("%s crashed, restarting in %.2f s: %r", name, backoff, exc, exc_info=exc)
            if on_restart is not None:
                on_restart(name, exc)
            await anyio.sleep(backoff)
            continue
        if policy.restart is not Restart.PERMANENT:
            return
