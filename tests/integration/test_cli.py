"""The CLI as a user runs it: `depot-node keys create`, `serve`, `healthcheck`, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node", *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_serve_keys_healthcheck_and_sigterm(tmp_path: Path, event_loop: str) -> None:
    data = tmp_path / "data"
    created = cli("keys", "create", "--role", "admin", "--data-dir", str(data))
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("dnk_")

    mqtt_port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "DEPOT_NODE_DATA_DIR": str(data),
        "DEPOT_NODE_LOG_FORMAT": "json",
        "DEPOT_NODE_EVENT_LOOP": event_loop,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "node", "serve", "--mqtt-bind", f"127.0.0.1:{mqtt_port}",
         "--http-bind", f"127.0.0.1:{http_port}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            check = cli("healthcheck", "--http-bind", f"127.0.0.1:{http_port}")
            if check.returncode == 0:
                break
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, check.stderr
            time.sleep(0.2)
        req = urllib.request.Request(
            f"http://127.0.0.1:{http_port}/api/v1/devices",
            data=json.dumps({"device_id": "emu-1", "type": "ac_meter"}).encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - our own http:// URL
            assert resp.status == 201
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=10) as resp:
            assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    logs = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    events = [entry.get("event", "") for entry in logs]
    assert any("listening" in e for e in events)
    assert f"event loop: {event_loop}" in events
    assert any(e == "stopped" for e in events)
    # The node is gone: healthcheck now fails.
    assert cli("healthcheck", "--http-bind", f"127.0.0.1:{http_port}").returncode == 1


@pytest.mark.parametrize(
    ("args", "env_extra", "needle"),
    [
        (["--mqtt-bind", "localhost"], {}, "mqtt_bind"),
        (["--http-bind", "127.0.0.1:99999"], {}, "http_bind"),
        ([], {"DEPOT_NODE_MAX_PAYLOAD_BYTES": "ten"}, "max_payload_bytes"),
        # A full batch must fit in the broker's packet limit.
        ([], {"DEPOT_NODE_MAX_BATCH_PAYLOAD_BYTES": str(2 << 20)}, "max_packet_bytes"),
        ([], {"DEPOT_NODE_MAX_PAYLOAD_BYTES": "2000000"}, "max_packet_bytes"),  # a payload must fit a packet
        ([], {"DEPOT_NODE_DEVICE_LIMIT_ACTION": "drop"}, "device_limit_action"),
        ([], {"DEPOT_NODE_HTTP_RATE_LIMIT_PER_S": "-1"}, "http_rate_limit_per_s"),
    ],
)
def test_bad_settings_fail_at_start_naming_the_setting(
    tmp_path: Path, args: list[str], env_extra: dict[str, str], needle: str
) -> None:
    env = {**os.environ, "DEPOT_NODE_DATA_DIR": str(tmp_path), **env_extra}
    result = cli("serve", *args, env=env)
    assert result.returncode != 0
    assert needle in result.stderr


def test_config_file_unknown_setting(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text('data_dir = "x"\nmqtt_bnd = "127.0.0.1:1"\n')
    result = cli("serve", "--config", str(cfg))
    assert result.returncode != 0
    assert "mqtt_bnd" in result.stderr


def test_keys_list_and_delete(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    created = cli("keys", "create", "--role", "viewer", "--name", "grafana", "--data-dir", data)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    key_id = key.split("_")[1]
    listed = cli("keys", "list", "--data-dir", data)
    assert listed.returncode == 0, listed.stderr
    (row,) = [line for line in listed.stdout.splitlines() if line.startswith(key_id)]
    assert row.split()[1] == "viewer"
    assert row.endswith("grafana")
    assert key not in listed.stdout  # never the key itself

    deleted = cli("keys", "delete", key_id, "--data-dir", data)
    assert deleted.returncode == 0, deleted.stderr
    assert "deleted" in deleted.stdout
    again = cli("keys", "delete", key_id, "--data-dir", data)
    assert again.returncode == 0
    assert "deleted already" in again.stdout
    (row,) = [line for line in cli("keys", "list", "--data-dir", data).stdout.splitlines() if line.startswith(key_id)]
    assert row.split()[1] == "viewer"
    assert row.split()[4] != "-"  # revoked at a time

    unknown = cli("keys", "delete", "000000000000", "--data-dir", data)
    assert unknown.returncode != 0
    assert "no API key" in unknown.stderr

    # Both changes are in the audit log, made by "cli".
    with sqlite3.connect(tmp_path / "data" / "depot-node.sqlite3") as conn:
        rows = conn.execute("SELECT action, target, actor, role FROM audit_log ORDER BY id").fetchall()
    conn.close()
    assert rows == [("key_created", key_id, "cli", None), ("key_deleted", key_id, "cli", None)]


def test_the_mmap_threshold_can_be_fixed() -> None:
    from node.cli import fix_mmap_threshold

    assert fix_mmap_threshold(1 << 20) is (sys.platform == "linux")


@pytest.mark.parametrize("listener", ["mqtt", "http"])
def test_a_taken_port_is_one_clear_line_not_a_traceback(tmp_path: Path, listener: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        binds = {"mqtt": f"127.0.0.1:{free_port()}", "http": f"127.0.0.1:{free_port()}"}
        binds[listener] = f"127.0.0.1:{port}"
        env = {**os.environ, "DEPOT_NODE_DATA_DIR": str(tmp_path)}
        result = cli("serve", "--mqtt-bind", binds["mqtt"], "--http-bind", binds["http"], env=env)
    assert result.returncode == 1
    # Only the node's log lines (JSON; amqtt logs its own failure there) and the error line:
    # no interpreter traceback, no exception group.
    assert not [
        line for line in result.stderr.splitlines() if line.lstrip(" +|").startswith(("Traceback", "Exception"))
    ]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("depot-node: "), result.stderr[-2000:]
    assert str(port) in last
    assert "in use" in last
