"""MQTT over TLS on the real node: device certificates from `depot-node ca issue`, mutual TLS,
password logins over TLS, TLS 1.2 minimum, and the plain listener turned off.

Clients are ones nobody here wrote: mosquitto_pub (certificate logins, as a meter would) and
paho-mqtt (password logins), plus Python's ssl module for the protocol-version probe.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import anyio
import pytest

from node.app import run_node
from node.ca import init_ca
from node.config import Settings
from tests.integration.conftest import Device, RunningNode, make_admin_key, start_node, stop_node
from tests.payloads import telemetry

pytestmark = pytest.mark.anyio

needs_mosquitto = pytest.mark.skipif(
    shutil.which("mosquitto_pub") is None, reason="mosquitto-clients not installed (.ci/run installs it)"
)


def issue(data_dir: Path, device_id: str, out: Path) -> tuple[Path, Path, Path]:
    """`depot-node ca issue` as an operator runs it."""
    result = subprocess.run(
        [sys.executable, "-m", "node", "ca", "issue", device_id, "--out", str(out), "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out / f"{device_id}.crt", out / f"{device_id}.key", out / "ca.crt"


async def mosquitto_pub(
    port: int, client_id: str, topic: str, payload: bytes, *, ca: Path, cert: tuple[Path, Path] | None = None
) -> subprocess.CompletedProcess[bytes]:
    args = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "--cafile", str(ca), "-i", client_id]
    if cert is not None:
        args += ["--cert", str(cert[0]), "--key", str(cert[1])]
    args += ["-t", topic, "-m", payload.decode(), "-q", "1"]
    with anyio.fail_after(60):
        return await anyio.run_process(args, check=False)


async def refusals(node: RunningNode) -> dict[str, float]:
    async with node.http() as client:
        text = (await client.get("/metrics")).text
    prefix = 'depot_node_auth_refused_total{reason="'
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            reason, _, value = line[len(prefix) :].partition('"} ')
            out[reason] = float(value)
    return out


async def wait_for_event(node: RunningNode, device_id: str, event: str, detail: str | None = None) -> None:
    """The connection history is written by the device's actor after the fact: poll it."""
    with anyio.fail_after(30):
        while True:
            items = (await node.get(f"/api/v1/devices/{device_id}/events"))["items"]
            if any(e["event"] == event and detail in (None, e["detail"]) for e in items):
                return
            await anyio.sleep(0.05)


def tls_port(node: RunningNode) -> int:
    assert node.addresses is not None
    assert node.addresses.mqtts is not None
    return node.addresses.mqtts[1]


@pytest.fixture
async def mtls_node(tmp_path: Path) -> AsyncIterator[RunningNode]:
    """A node whose TLS listener requires a device certificate, with a CA from `ca init`."""
    init_ca(tmp_path)
    key = make_admin_key(tmp_path)
    async with anyio.create_task_group() as tg:
        running = await start_node(tg, tmp_path, key, mqtts_bind="127.0.0.1:0", mqtts_require_client_cert=True)
        yield running
        await stop_node(running)


@pytest.fixture
async def tls_node(tmp_path: Path) -> AsyncIterator[RunningNode]:
    """A node with TLS on and client certificates optional."""
    init_ca(tmp_path)
    key = make_admin_key(tmp_path)
    async with anyio.create_task_group() as tg:
        running = await start_node(tg, tmp_path, key, mqtts_bind="127.0.0.1:0")
        yield running
        await stop_node(running)


@needs_mosquitto
async def test_device_certificate_login_stores_telemetry(mtls_node: RunningNode, tmp_path: Path) -> None:
    node = mtls_node
    await node.register("meter-7")
    crt, key, ca = issue(node.data_dir, "meter-7", tmp_path / "meter-7")
    result = await mosquitto_pub(
        tls_port(node), "meter-7", "iot/meter-7/telemetry", telemetry("meter-7", 3, 0), ca=ca, cert=(crt, key)
    )
    assert result.returncode == 0, result.stderr
    rows = await node.telemetry("meter-7")
    assert [(r["boot"], r["seq"]) for r in rows] == [(3, 0)]
    await wait_for_event(node, "meter-7", "connected")
    assert await refusals(node) == {}


@needs_mosquitto
async def test_without_certificate_with_anothers_or_after_revocation_refused(
    mtls_node: RunningNode, tmp_path: Path
) -> None:
    node = mtls_node
    port = tls_port(node)
    await node.register("meter-a")
    await node.register("meter-b")
    a_crt, a_key, ca = issue(node.data_dir, "meter-a", tmp_path / "a")
    b_crt, b_key, _ = issue(node.data_dir, "meter-b", tmp_path / "b")
    topic = "iot/meter-a/telemetry"

    no_cert = await mosquitto_pub(port, "meter-a", topic, telemetry("meter-a", 1, 0), ca=ca)
    assert no_cert.returncode != 0
    assert b"not authori" in no_cert.stderr.lower()
    assert (await refusals(node)).get("no_certificate") == 1

    # meter-b's (valid) certificate, claiming to be meter-a.
    other = await mosquitto_pub(port, "meter-a", topic, telemetry("meter-a", 1, 1), ca=ca, cert=(b_crt, b_key))
    assert other.returncode != 0
    assert (await refusals(node)).get("certificate_mismatch") == 1

    # Its own certificate works until the device is revoked; then it is refused.
    ok = await mosquitto_pub(port, "meter-a", topic, telemetry("meter-a", 1, 2), ca=ca, cert=(a_crt, a_key))
    assert ok.returncode == 0, ok.stderr
    async with node.http() as client:
        assert (await client.delete("/api/v1/devices/meter-a")).status_code == 204
    revoked = await mosquitto_pub(port, "meter-a", topic, telemetry("meter-a", 1, 3), ca=ca, cert=(a_crt, a_key))
    assert revoked.returncode != 0
    assert (await refusals(node)).get("revoked") == 1

    rows = await node.telemetry("meter-a")
    assert [r["seq"] for r in rows] == [2]


async def test_the_plain_listener_still_takes_passwords_when_tls_requires_certificates(
    mtls_node: RunningNode, devices: list[Device]
) -> None:
    # mqtts_require_client_cert is about the TLS listener; the plain one (loopback by default)
    # is turned off with mqtt_plain_enabled = false, which production does (docs/security.md).
    secret = await mtls_node.register("meter-l")
    dev = Device(mtls_node.mqtt_port, "meter-l", secret)
    devices.append(dev)
    assert (await dev.aconnect()).value == 0


@needs_mosquitto
async def test_certificate_from_another_ca_fails_the_handshake(mtls_node: RunningNode, tmp_path: Path) -> None:
    node = mtls_node
    await node.register("meter-x")
    foreign = tmp_path / "foreign"
    init_ca(foreign)
    crt, key, _ = issue(foreign, "meter-x", tmp_path / "x")
    node_ca = node.data_dir / "tls" / "ca.crt"
    result = await mosquitto_pub(tls_port(node), "meter-x", "iot/meter-x/telemetry", b"{}", ca=node_ca, cert=(crt, key))
    assert result.returncode != 0
    assert await node.telemetry("meter-x") == []


class TlsDevice(Device):
    """The conftest's paho device, over TLS with the node's CA (and optionally a certificate)."""

    def __init__(self, port: int, device_id: str, secret: str | None, ca: Path, cert: tuple[Path, Path] | None) -> None:
        super().__init__(port, device_id, secret or "")
        if secret is None:
            self.client.username_pw_set(None)
        certfile, keyfile = (str(cert[0]), str(cert[1])) if cert is not None else (None, None)
        self.client.tls_set(ca_certs=str(ca), certfile=certfile, keyfile=keyfile)


async def test_password_login_over_tls_when_certificates_are_optional(
    tls_node: RunningNode, devices: list[Device], tmp_path: Path
) -> None:
    node = tls_node
    secret = await node.register("meter-p")
    ca = node.data_dir / "tls" / "ca.crt"
    wrong = TlsDevice(tls_port(node), "meter-p", "not-the-secret", ca, None)
    devices.append(wrong)
    assert str(await wrong.aconnect()) == "Not authorized"
    await wrong.aclose()  # paho would retry in the background
    dev = TlsDevice(tls_port(node), "meter-p", secret, ca, None)
    devices.append(dev)
    assert (await dev.aconnect()).value == 0
    await dev.apublish("iot/meter-p/telemetry", telemetry("meter-p", 1, 0))
    # A certificate works here as well, without a password: paho, no username.
    await node.register("meter-q")
    crt, key, _ = issue(node.data_dir, "meter-q", tmp_path / "q")
    by_cert = TlsDevice(tls_port(node), "meter-q", None, ca, (crt, key))
    devices.append(by_cert)
    assert (await by_cert.aconnect()).value == 0
    await by_cert.apublish("iot/meter-q/telemetry", telemetry("meter-q", 1, 0))
    # The ACL still holds for a certificate login: another device's topic is denied.
    await by_cert.apublish("iot/meter-p/telemetry", telemetry("meter-p", 1, 1))
    assert [r["seq"] for r in await node.telemetry("meter-p")] == [0]
    assert [r["seq"] for r in await node.telemetry("meter-q")] == [0]
    assert set(await refusals(node)) == {"bad_secret"}


async def test_revoking_closes_a_live_certificate_session(
    mtls_node: RunningNode, devices: list[Device], tmp_path: Path
) -> None:
    node = mtls_node
    await node.register("meter-r")
    crt, key, ca = issue(node.data_dir, "meter-r", tmp_path / "r")
    dev = TlsDevice(tls_port(node), "meter-r", None, ca, (crt, key))
    devices.append(dev)
    assert (await dev.aconnect()).value == 0
    async with node.http() as client:
        assert (await client.delete("/api/v1/devices/meter-r")).status_code == 204
    with anyio.fail_after(30):
        while dev.client.is_connected():
            await anyio.sleep(0.05)
    await wait_for_event(node, "meter-r", "disconnected", "revoked")


async def _cert_session_closed(dev: Device, node: RunningNode, device_id: str, reason: str) -> None:
    with anyio.fail_after(30):
        while dev.client.is_connected():
            await anyio.sleep(0.05)
    await dev.aclose()  # paho would reconnect in the background
    await wait_for_event(node, device_id, "disconnected", reason)


async def test_disable_and_rotation_close_a_live_certificate_session(
    mtls_node: RunningNode, devices: list[Device], tmp_path: Path
) -> None:
    """The credential lifecycle (creds) covers certificate logins (tls): disabling closes the
    session and refuses the certificate until enabled; a rotation closes the session, and the
    certificate, which the rotation does not invalidate, logs in again."""
    node = mtls_node
    await node.register("meter-c")
    crt, key, ca = issue(node.data_dir, "meter-c", tmp_path / "c")

    def connect() -> TlsDevice:
        dev = TlsDevice(tls_port(node), "meter-c", None, ca, (crt, key))
        devices.append(dev)
        return dev

    dev = connect()
    assert (await dev.aconnect()).value == 0
    async with node.http() as client:
        assert (await client.post("/api/v1/devices/meter-c/disable")).json()["disabled"] is True
    await _cert_session_closed(dev, node, "meter-c", "disabled")
    refused = connect()
    assert str(await refused.aconnect()) == "Not authorized"
    await refused.aclose()
    assert (await refusals(node)).get("disabled") == 1

    async with node.http() as client:
        assert (await client.post("/api/v1/devices/meter-c/enable")).json()["disabled"] is False
    dev = connect()
    assert (await dev.aconnect()).value == 0
    async with node.http() as client:
        assert (await client.post("/api/v1/devices/meter-c/secret")).status_code == 200
    await _cert_session_closed(dev, node, "meter-c", "secret_rotated")
    again = connect()
    assert (await again.aconnect()).value == 0
    await again.apublish("iot/meter-c/telemetry", telemetry("meter-c", 1, 0))
    assert [r["seq"] for r in await node.telemetry("meter-c")] == [0]


def _handshake(port: int, ca: Path, version: ssl.TLSVersion) -> str:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    # OpenSSL 3 disables TLS 1.0/1.1 on the client side too (security level 1+); level 0
    # lets this client offer TLS 1.1, so that refusing it is the node's doing.
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ssl.TLSVersion.TLSv1_1 is deprecated
        ctx.minimum_version = version
        ctx.maximum_version = version
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls,
    ):
        return str(tls.version())


async def test_tls_1_1_is_refused_and_1_2_accepted(tls_node: RunningNode) -> None:
    port, ca = tls_port(tls_node), tls_node.data_dir / "tls" / "ca.crt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = ssl.TLSVersion.TLSv1_1
    # asyncio's TLS transport closes on a failed handshake, so the client sees either the
    # protocol_version alert or an EOF; the same client offering TLS 1.2 gets through.
    with pytest.raises(ssl.SSLError, match=r"PROTOCOL_VERSION|UNEXPECTED_EOF"):
        await anyio.to_thread.run_sync(_handshake, port, ca, old)
    assert await anyio.to_thread.run_sync(_handshake, port, ca, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_plain_listener_off_serves_tls_only(tmp_path: Path, devices: list[Device]) -> None:
    init_ca(tmp_path)
    node = RunningNode(data_dir=tmp_path, admin_key=make_admin_key(tmp_path))
    plain_port = _free_port()
    settings = Settings(
        data_dir=tmp_path,
        mqtt_bind=f"127.0.0.1:{plain_port}",
        mqtt_plain_enabled=False,
        mqtts_bind="127.0.0.1:0",
        http_bind="127.0.0.1:0",
    )
    async with anyio.create_task_group() as tg:
        node.addresses = await tg.start(partial(run_node, settings, shutdown=node.shutdown))
        try:
            assert node.addresses.mqtt is None
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", plain_port), timeout=5).close()
            secret = await node.register("meter-t")
            dev = TlsDevice(tls_port(node), "meter-t", secret, tmp_path / "tls" / "ca.crt", None)
            devices.append(dev)
            assert (await dev.aconnect()).value == 0
        finally:
            node.shutdown.set()


async def test_missing_tls_files_name_the_setting(tmp_path: Path) -> None:
    from storage.errors import ConfigError

    key = make_admin_key(tmp_path)
    with pytest.raises(BaseException) as caught:  # noqa: PT011 - unwrapped below
        async with anyio.create_task_group() as tg:
            await start_node(tg, tmp_path, key, mqtts_bind="127.0.0.1:0")
    exc: BaseException | None = caught.value
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, ConfigError)
    assert exc.setting == "tls_cert_file"
    assert "ca init" in str(exc)
