"""SIGKILL the node under QoS 1 load and restart it: nothing acknowledged is lost, nothing is
stored twice. A short run of ``bench/crash.py`` (which see); the benchmark does 5+ kills."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.crash import run


@pytest.mark.slow
def test_sigkill_under_load_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    lines: list[str] = []
    result = run(kills=2, devices=5, rate=50.0, load_min=0.8, load_max=1.2, seed=1, work_dir=tmp_path, log=lines.append)
    report = "\n".join([*lines, result.line()])
    assert result.kills == 2, report
    assert result.acked > 0, report
    assert result.lost == 0, report
    assert result.duplicated == 0, report
    # Everything sent was acknowledged in the end (paho resent what the kills cut off) and
    # nothing is stored that was not sent.
    assert result.acked == result.sent == result.stored, report
    assert result.problems == [], report
