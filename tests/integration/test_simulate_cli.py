"""``depot-node simulate`` as a user runs it, against a real node: registration through the API,
telemetry from every supply system, the secrets file, and errors that say what to fix."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import anyio
import pytest

from .conftest import RunningNode

pytestmark = pytest.mark.anyio


async def simulate(*args: str) -> anyio.abc.Process:
    return await anyio.run_process([sys.executable, "-m", "node", "simulate", *args], check=False)


#: Device ids of a default fleet of six and the supply each is registered with.
SUPPLY_OF = {
    "sim-dc600-0000": "dc_600v",
    "sim-dc750-0001": "dc_750v",
    "sim-dc1500-0002": "dc_1500v",
    "sim-dc3000-0003": "dc_3000v",
    "sim-ac15k-0004": "ac_15kv_16.7hz",
    "sim-ac25k-0005": "ac_25kv_50hz",
}
BACKLOG = 250


async def test_simulate_registers_publishes_and_reuses_its_secrets(node: RunningNode, tmp_path: Path) -> None:
    """Every supply system, registered with its ``supply``; the backlog (sent as batches and
    acknowledged before live readings start) is stored whole, and nothing a simulated meter
    sends breaks a validation rule."""
    secrets = tmp_path / "fleet" / "secrets.json"
    common = ("--devices", "6", "--mqtt", f"127.0.0.1:{node.mqtt_port}", "--secrets", str(secrets))
    run = await simulate(
        *common, "--rate", "5", "--duration", "2", "--backlog", str(BACKLOG), "--batch-size", "100",
        "--api", node.base_url, "--admin-key", node.admin_key,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert b"published" in run.stdout
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o600
    ids = sorted(json.loads(secrets.read_text()))
    assert ids == sorted(SUPPLY_OF)
    for device_id in ids:
        device = await node.get(f"/api/v1/devices/{device_id}")
        assert device["type"] == ("ac_meter" if "-ac" in device_id else "dc_meter")
        assert device["supply"] == SUPPLY_OF[device_id]
        readings = await node.telemetry(device_id)
        (boot,) = {r["boot"] for r in readings}
        # The backlog is seq 0 .. BACKLOG-1 of the first boot, all stored; live readings follow.
        assert [r["seq"] for r in readings][:BACKLOG] == list(range(BACKLOG)), device_id
        assert len(readings) > BACKLOG, device_id
        m = readings[-1]["m"]
        assert ("frequency_hz" in m) == (device["type"] == "ac_meter")
        assert device["counters"]["quarantined"] == 0, device_id
        assert boot == device["state"]["boot"]
    assert (await node.get("/api/v1/quarantine"))["items"] == []
    # Without an admin key, the devices' secrets come from the file.
    again = await simulate(*common, "--rate", "2", "--duration", "0.5")
    assert again.returncode == 0, again.stderr


async def test_simulate_says_what_is_wrong(node: RunningNode, tmp_path: Path) -> None:
    no_secrets = await simulate("--mqtt", f"127.0.0.1:{node.mqtt_port}", "--secrets", str(tmp_path / "none.json"))
    assert no_secrets.returncode == 1
    assert b"no secret for sim-dc600-0000" in no_secrets.stderr
    bad_faults = await simulate("--faults", "crash=0.5")
    assert bad_faults.returncode == 2
    assert b"--faults" in bad_faults.stderr
    lonely_key = await simulate("--admin-key", "dnk_x")
    assert lonely_key.returncode == 2
    assert b"--api and --admin-key go together" in lonely_key.stderr
