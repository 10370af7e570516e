"""Debug hook, off by default: tracemalloc snapshots of a running node on SIGUSR1.

With ``DEPOT_NODE_DEBUG_TRACEMALLOC=DIR`` in its environment, ``depot-node serve`` starts
:mod:`tracemalloc` before the node starts (``DEPOT_NODE_DEBUG_TRACEMALLOC_FRAMES`` frames
per allocation, default 16), and every SIGUSR1 writes a snapshot of what is allocated at
that moment to ``DIR/snapshot-<pid>-<n>.tracemalloc``. The file is written under a
temporary name and renamed, so a reader that waits for it never sees half of it.
``bench/memory.py`` takes one snapshot with few devices connected and one with many, and
prints where the difference was allocated (``tracemalloc.Snapshot.load`` + ``compare_to``).

This is for finding where memory goes, never for production: tracemalloc keeps a traceback
for every live block (the node's RSS grows by about half), every allocation gets slower,
and writing a snapshot blocks the event loop for as long as it takes (about a second per
100 MB traced).

Without the variable nothing here runs: no tracing, no signal handler.
"""

from __future__ import annotations

import itertools
import os
import signal
import tracemalloc
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

from storage.errors import ConfigError

ENV_DIR = "DEPOT_NODE_DEBUG_TRACEMALLOC"
ENV_FRAMES = "DEPOT_NODE_DEBUG_TRACEMALLOC_FRAMES"
_MAX_FRAMES = 100


def install_from_env(environ: Mapping[str, str]) -> Path | None:
    """Start tracing and install the SIGUSR1 handler when *environ* asks for it; the
    snapshot directory, or None when the hook is off. ConfigError names a bad variable."""
    target = environ.get(ENV_DIR, "")
    if not target:
        return None
    frames_text = environ.get(ENV_FRAMES, "16")
    if not frames_text.isdigit() or not 1 <= int(frames_text) <= _MAX_FRAMES:
        raise ConfigError(ENV_FRAMES, f"expected a number of frames from 1 to {_MAX_FRAMES}, got {frames_text!r}")
    directory = Path(target)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(ENV_DIR, f"cannot create {directory}: {exc.strerror}") from exc
    tracemalloc.start(int(frames_text))
    numbers = itertools.count(1)

    def dump(signum: int, frame: FrameType | None) -> None:
        path = directory / f"snapshot-{os.getpid()}-{next(numbers)}.tracemalloc"
        partial = path.with_name(path.name + ".partial")
        tracemalloc.take_snapshot().dump(str(partial))
        partial.rename(path)

    signal.signal(signal.SIGUSR1, dump)
    return directory
