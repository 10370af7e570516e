"""The thread that owns the writer connection and runs its calls one after another (ADR 0015).

``anyio.to_thread.run_sync`` under a capacity limiter of one did the same, but each call first
passed through the event loop twice (anyio's checkpoint, then the limiter) before its worker
thread was even woken; under load a loop iteration takes milliseconds, and every group commit
(so every PUBACK) waited for them. Here a call is queued to the thread at once, and the thread
takes the next call as soon as the last one is done.

Calls run in the order they were made. As with ``to_thread.run_sync``, a cancelled caller
waits until its call has finished (the connection must not be left mid-transaction); the
cancellation takes effect after that.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio


@dataclass(slots=True)
class _Call:
    fn: Callable[[sqlite3.Connection], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


class WriterThread:
    """Runs callables on *conn* in a daemon thread of its own, in the order of :meth:`call`."""

    def __init__(self, conn: sqlite3.Connection, name: str = "sqlite-writer") -> None:
        self._conn = conn
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._name = name
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    async def call[T](self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` in the thread and return its result (or raise its exception)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._start()
        self._calls.put(_Call(fn, loop, future))
        with anyio.CancelScope(shield=True):
            result = await future
        return result  # noqa: RET504 - mypy: a CancelScope may swallow exceptions

    def _start(self) -> None:
        if self._closed:
            raise RuntimeError("the writer connection is closed")
        if self._thread is not None:
            return
        with self._lock:
            if self._closed:
                raise RuntimeError("the writer connection is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Finish the calls already queued, then stop the thread."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._calls.put(None)
            thread.join(timeout)

    def _loop(self) -> None:
        conn = self._conn
        while (call := self._calls.get()) is not None:
            result: Any = None
            error: BaseException | None = None
            try:
                result = call.fn(conn)
            except BaseException as exc:  # handed to the caller, whatever it is
                error = exc
            # A RuntimeError here: the caller's event loop is closed, nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                call.loop.call_soon_threadsafe(_settle, call.future, result, error)
            del call, result, error
