"""The tracemalloc debug hook (node/memtrace.py): off by default, snapshots on SIGUSR1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
import urllib.error
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(tmp_path: Path, **env_extra: str) -> tuple[subprocess.Popen[str], int]:
    env = {**os.environ, "DEPOT_NODE_DATA_DIR": str(tmp_path / "data"), **env_extra}
    http_port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "node", "serve", "--mqtt-bind", f"127.0.0.1:{free_port()}",
         "--http-bind", f"127.0.0.1:{http_port}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    return proc, http_port


def wait_ready(proc: subprocess.Popen[str], http_port: int) -> None:
    """Until /readyz answers 200 (the node's own signal handlers are in place by then)."""
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        assert time.monotonic() < deadline, "node not ready within 90 s"
        time.sleep(0.2)


def wait_for_file(proc: subprocess.Popen[str], directory: Path, pattern: str, within: float) -> list[Path]:
    deadline = time.monotonic() + within
    while not (found := sorted(directory.glob(pattern))):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"no {pattern} in {directory} within {within:.0f} s"
        time.sleep(0.1)
    return found


def test_sigusr1_writes_a_snapshot_that_tracemalloc_loads(tmp_path: Path) -> None:
    snaps = tmp_path / "snaps"
    proc, http_port = serve(tmp_path, DEPOT_NODE_DEBUG_TRACEMALLOC=str(snaps), DEPOT_NODE_DEBUG_TRACEMALLOC_FRAMES="4")
    try:
        wait_ready(proc, http_port)  # the hook is installed before the node starts
        proc.send_signal(signal.SIGUSR1)
        found = wait_for_file(proc, snaps, "snapshot-*.tracemalloc", within=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert found[0].name == f"snapshot-{proc.pid}-1.tracemalloc"
    snapshot = tracemalloc.Snapshot.load(str(found[0]))
    assert snapshot.traceback_limit == 4
    stats = snapshot.statistics("filename")
    assert sum(s.size for s in stats) > 1024 * 1024  # a running node has megabytes traced
    assert any("node" in str(s.traceback[0].filename) for s in stats)


def test_off_by_default_sigusr1_is_not_handled(tmp_path: Path) -> None:
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    proc, http_port = serve(tmp_path)
    try:
        wait_ready(proc, http_port)
        proc.send_signal(signal.SIGUSR1)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGUSR1  # the default action: nothing installed a handler


@pytest.mark.parametrize("frames", ["0", "many", "101"])
def test_a_bad_frame_count_fails_at_start_naming_the_variable(tmp_path: Path, frames: str) -> None:
    proc, _ = serve(
        tmp_path,
        DEPOT_NODE_DEBUG_TRACEMALLOC=str(tmp_path / "snaps"),
        DEPOT_NODE_DEBUG_TRACEMALLOC_FRAMES=frames,
    )
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "DEPOT_NODE_DEBUG_TRACEMALLOC_FRAMES" in err
