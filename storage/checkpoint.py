"""WAL checkpoints off the writer's path (ADR 0015).

SQLite copies the write-ahead log back into the database file in *checkpoints*. By default the
connection that commits runs one whenever the log has grown past 1,000 pages, inside that
``COMMIT``: under load every few group commits paid for copying and syncing a few megabytes
while every PUBACK of the group waited.

:class:`WalCheckpointer` runs passive checkpoints on a connection and thread of its own instead,
shortly after commits (:meth:`WalCheckpointer.kick`). A passive checkpoint never blocks the
writer or the readers; it copies what is committed while the writer goes on appending. So that
the log is still reset now and then (which needs a checkpoint to have copied every frame at
the moment a write transaction starts), the writer keeps an automatic checkpoint of its own,
at :data:`WRITER_AUTOCHECKPOINT_PAGES`; by then the frames are nearly all copied and it is cheap.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

#: The writer's own automatic checkpoint (pages of the log): the backstop that resets the log
#: while the checkpointer keeps the frames copied. 16,384 pages of 4 KiB: a log of 64 MiB.
WRITER_AUTOCHECKPOINT_PAGES: Final = 16384
#: After a kick, wait this long for more commits before checkpointing them all at once.
COALESCE_S: Final = 0.25
#: After a checkpoint failed (the disk, say), wait this long before the next try.
RETRY_S: Final = 1.0


class WalCheckpointer:
    """A daemon thread running ``PRAGMA wal_checkpoint(PASSIVE)`` after commits."""

    def __init__(self, path: Path, *, coalesce_s: float = COALESCE_S) -> None:
        self._path = path
        self._coalesce_s = coalesce_s
        self._kicked = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        #: Checkpoints run, and how many of them failed (for tests and diagnostics).
        self.runs = 0
        self.failures = 0

    def kick(self) -> None:
        """Something was committed: checkpoint it soon. Cheap; call it from any thread."""
        if self._thread is None:
            with self._lock:
                if self._thread is None and not self._closing.is_set():
                    self._thread = threading.Thread(target=self._loop, name="wal-checkpoint", daemon=True)
                    self._thread.start()
        self._kicked.set()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread (after the checkpoint under way, if any)."""
        with self._lock:
            self._closing.set()
            self._kicked.set()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _loop(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while True:
                self._kicked.wait()
                if self._closing.wait(self._coalesce_s):
                    return
                self._kicked.clear()
                try:
                    if conn is None:
                        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False, timeout=5.0)
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self.runs += 1
                except sqlite3.Error:
                    self.failures += 1
                    log.warning(
                        "WAL checkpoint of %s failed; the writer's own checkpoints go on", self._path, exc_info=True
                    )
                    if conn is not None:
                        conn.close()
                        conn = None
                    if self._closing.wait(RETRY_S):
                        return
                    self._kicked.set()
        finally:
            if conn is not None:
                conn.close()
