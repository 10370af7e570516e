"""Crash test: SIGKILL the node under QoS 1 load, restart it, count lost and duplicated readings.

Run from the repository root:

    uv run python bench/crash.py               # 5 SIGKILLs, 20 devices at 50 msg/s each
    uv run python bench/crash.py --kills 20 --devices 50 --rate 20

The node runs as ``python -m node serve`` on a fresh data directory; after each SIGKILL it is
started again on the same data directory and the same ports. The publishers are paho-mqtt
clients (a client nobody here wrote), one per registered device, MQTT 3.1.1 with
``clean_session=False``, QoS 1, automatic reconnect. paho keeps every QoS 1 message it has not
seen a PUBACK for and, after it reconnects, resends it (DUP set) from its own state: the broker's
session died with the node, paho's did not. Each device publishes protocol v2 telemetry with
``boot = 1`` and ``seq = 0, 1, 2, ...`` at ``--rate`` messages per second for the whole run.

Each cycle lets the load run for a random 1-3 s (``--load-min`` / ``--load-max``), SIGKILLs the
node, starts it again, waits for ``/readyz`` and for every publisher to be connected again.
After the last cycle the publishers stop, every message still unacknowledged gets
``--drain-timeout`` seconds to be acknowledged, and every device's telemetry is read back
through the HTTP API. Then:

* ``lost``: readings whose PUBACK a publisher received but which are not stored. Must be 0:
  the node acknowledges only what it has committed.
* ``duplicated``: stored rows beyond the first for the same ``(boot, seq)``. Must be 0: the
  node stores each reading at most once, however often paho resends it.

A reading committed whose PUBACK died with the node is fine: paho resends it, the node
recognises the resend, counts it in the device's ``duplicates`` counter and acknowledges it
without storing it again. The run reports the sum of those counters as ``redelivered``, and
``in_flight_at_kills`` (messages without a PUBACK at the moments of the kills). Once the drain
completes every message is acknowledged, so ``unacked_stored`` (stored, no PUBACK) and
``unacked_missing`` (neither) are non-zero only after a drain timeout. ``resumed`` counts
CONNACKs with "session present": 0, since the broker's sessions die with the node and the
resends come from paho's own store.

The last line printed is ``kills=N sent=... acked=... stored=... lost=0 duplicated=0``. The exit
code is 1 when a reading was lost or duplicated, or when the run itself broke (the node did
not come back, a publisher never got its acknowledgements, the node did not stop cleanly).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import IO, Any, Final

import httpx
import paho.mqtt.client as mqtt

REPO: Final = Path(__file__).resolve().parent.parent
BOOT: Final = 1
BASE_TS: Final = datetime(2026, 11, 23, 16, 5, tzinfo=UTC)
HTTP_OK: Final = 200
HTTP_CREATED: Final = 201

# The node is started through this: it asks the kernel to SIGTERM it when the thread that
# started it dies (PR_SET_PDEATHSIG), then execs the real command in the same pid, so the pid
# we SIGKILL is the node's own and nothing outlives this script, even when it is SIGKILLed.
_DIE_WITH_PARENT: Final = """\
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
if os.getppid() != int(os.environ["CRASH_PARENT_PID"]):
    sys.exit(70)
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""

Log = Callable[[str], None]


class CrashError(Exception):
    """The run broke (not a verdict on lost or duplicated readings)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def telemetry(device_id: str, seq: int) -> bytes:
    """One protocol v2 reading (the shape of docs/protocol.md); energy grows with seq."""
    ts = BASE_TS + timedelta(milliseconds=10 * seq)
    doc = {
        "v": 2,
        "device_id": device_id,
        "boot": BOOT,
        "seq": seq,
        "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
        "m": {
            "voltage_v": 1512.3,
            "current_a": 230.4,
            "power_kw": 348.4,
            "energy_import_kwh": 123456.789 + seq / 100,
            "energy_export_kwh": 2345.6,
        },
    }
    return json.dumps(doc, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- the node


class Node:
    """``python -m node serve`` as a child process, on fixed ports, restartable after SIGKILL."""

    def __init__(self, data_dir: Path, log_path: Path, env: dict[str, str]) -> None:
        self.data_dir = data_dir
        self.mqtt_port = free_port()
        self.http_port = free_port()
        self.base_url = f"http://127.0.0.1:{self.http_port}"
        self.log_path = log_path
        self._env = env
        self._log: IO[bytes] | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def create_admin_key(self) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "node", "keys", "create", "--role", "admin", "--data-dir", str(self.data_dir)],
            cwd=REPO,
            env=self._env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise CrashError(f"keys create failed: {done.stderr.strip()}")
        return done.stdout.strip().splitlines()[-1]

    def start(self, timeout: float = 30.0) -> float:
        """Start the node and wait until ``/readyz`` answers 200; returns the seconds it took."""
        if self.proc is not None:
            raise CrashError("node already running")
        t0 = time.monotonic()
        self._log = self.log_path.open("ab")
        self._log.write(f"--- start {self.starts + 1}\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            [
                sys.executable, "-c", _DIE_WITH_PARENT, "-m", "node", "serve",
                "--data-dir", str(self.data_dir),
                "--mqtt-bind", f"127.0.0.1:{self.mqtt_port}",
                "--http-bind", f"127.0.0.1:{self.http_port}",
            ],
            cwd=REPO,
            env={**self._env, "CRASH_PARENT_PID": str(os.getpid())},
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )  # fmt: skip
        self.starts += 1
        deadline = t0 + timeout
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self._reap()
                raise CrashError(f"node exited with {code} while starting{self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/readyz", timeout=2.0).status_code == HTTP_OK:
                    return time.monotonic() - t0
            if time.monotonic() > deadline:
                raise CrashError(f"node not ready within {timeout:.0f} s{self.tail()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown code of the node runs."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._reap()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (the node's orderly shutdown); SIGKILL after *timeout*. Returns the exit code."""
        if self.proc is None:
            return None
        code: int | None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
                code = None
        else:
            code = self.proc.returncode
        self._reap()
        return code

    def _reap(self) -> None:
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return ("\n  " + "\n  ".join(text)) if text else ""


# --------------------------------------------------------------------------- the publishers


class Publisher:
    """One device: a paho client with a persistent session, and what it sent and got acknowledged."""

    def __init__(self, device_id: str, secret: str, port: int, *, max_inflight: int) -> None:
        self.device_id = device_id
        self.topic = f"iot/{device_id}/telemetry"
        self.port = port
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, clean_session=False, protocol=mqtt.MQTTv311
        )
        client.username_pw_set(device_id, secret)
        client.max_inflight_messages_set(max_inflight)
        client.max_queued_messages_set(0)  # unlimited: nothing is refused while the node is down
        client.reconnect_delay_set(min_delay=0.1, max_delay=1)  # type: ignore[arg-type]  # floats work
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_log = self._on_log
        self.client = client
        self.connected = threading.Event()
        self._lock = threading.Lock()
        self.next_seq = 0
        #: mid -> seq of every message handed to paho and not acknowledged yet.
        self.pending: dict[int, int] = {}
        #: PUBACKs that arrived before publish() returned the message's mid to us.
        self._early: set[int] = set()
        self.acked: set[int] = set()
        self.connects = 0
        #: CONNACKs with session present: none expected, the broker's sessions die with the node
        self.resumed = 0
        self.refusals = 0
        self.disconnects = 0
        self.queue_full = 0
        #: paho's last log lines (not its PUBLISH/PUBACK traffic), for the error when a reconnect hangs.
        self.paho_log: collections.deque[str] = collections.deque(maxlen=12)

    # paho's network thread calls these. paho holds its own locks around on_publish, so we never
    # call into paho while holding ours.
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self.refusals += 1
            return
        self.connects += 1
        if flags.session_present:
            self.resumed += 1
        self.connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.disconnects += 1
        self.connected.clear()

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, buf: str) -> None:
        if not buf.startswith(("Sending PUBLISH", "Received PUBACK")):
            self.paho_log.append(f"{time.monotonic():.2f} {buf}")

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._lock:
            seq = self.pending.pop(mid, None)
            if seq is None:
                self._early.add(mid)
            else:
                self.acked.add(seq)

    def start(self) -> None:
        self.client.connect_async("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()

    def publish_next(self) -> None:
        seq = self.next_seq
        info = self.client.publish(self.topic, telemetry(self.device_id, seq), qos=1)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            # Only when paho's 16-bit message ids wrap onto one still unacknowledged: try later.
            self.queue_full += 1
            return
        # Any other rc (NO_CONN while the node is down) still leaves the message in paho's
        # store: it goes out, or out again, when paho reconnects.
        self.next_seq += 1
        with self._lock:
            if info.mid in self._early:
                self._early.discard(info.mid)
                self.acked.add(seq)
            else:
                self.pending[info.mid] = seq

    def unacked(self) -> int:
        with self._lock:
            return len(self.pending)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Pacer:
    """A thread that makes every publisher send ``rate`` messages per second until stopped."""

    def __init__(self, publishers: list[Publisher], rate: float) -> None:
        self.publishers = publishers
        self.interval = 1.0 / rate
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.behind = 0
        self._thread = threading.Thread(target=self._run, name="crash-pacer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            next_t = time.monotonic()
            while not self.stopping.is_set():
                for p in self.publishers:
                    p.publish_next()
                next_t += self.interval
                delay = next_t - time.monotonic()
                if delay > 0:
                    self.stopping.wait(delay)
                elif delay < -1.0:
                    # More than a second behind: the publishing side itself is saturated. Skip
                    # ahead instead of bursting (it shows up as fewer messages sent).
                    self.behind += 1
                    next_t = time.monotonic()
        except BaseException as exc:  # reported by stop(); a thread must not die silently
            self.error = exc

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self.stopping.set()
        self._thread.join(10)


# --------------------------------------------------------------------------- the run


@dataclass
class Result:
    kills: int = 0
    devices: int = 0
    #: messages handed to paho (each is in paho's store until its PUBACK)
    sent: int = 0
    #: messages whose PUBACK reached the publisher
    acked: int = 0
    #: rows stored for the run's devices (a reading stored twice counts twice)
    stored: int = 0
    #: acknowledged but not stored: must be 0
    lost: int = 0
    #: rows beyond the first for one (boot, seq): must be 0
    duplicated: int = 0
    #: stored but never acknowledged (committed, PUBACK lost; not resent yet: only after a drain timeout)
    unacked_stored: int = 0
    #: neither acknowledged nor stored (only after a drain timeout)
    unacked_missing: int = 0
    #: messages without a PUBACK at the moments of the kills, summed
    in_flight_at_kills: int = 0
    #: resends the node recognised as already stored (the devices' ``duplicates`` counters):
    #: committed before a kill, PUBACK lost with the node, resent by paho, not stored again
    redelivered: int = 0
    quarantined: int = 0
    connects: int = 0
    #: connects on which the broker reported a session present
    resumed: int = 0
    refusals: int = 0
    elapsed_s: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and not self.problems

    def line(self) -> str:
        return (
            f"kills={self.kills} sent={self.sent} acked={self.acked} stored={self.stored}"
            f" lost={self.lost} duplicated={self.duplicated}"
        )

    def details(self) -> str:
        return (
            f"unacked_stored={self.unacked_stored} unacked_missing={self.unacked_missing}"
            f" in_flight_at_kills={self.in_flight_at_kills} redelivered={self.redelivered}"
            f" quarantined={self.quarantined} connects={self.connects} resumed={self.resumed} refusals={self.refusals}"
            f" elapsed={self.elapsed_s:.1f}s"
        )


def _wait(condition: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


@dataclass(frozen=True)
class Options:
    kills: int = 5
    devices: int = 20
    #: messages per second per device
    rate: float = 50.0
    load_min: float = 1.0
    load_max: float = 3.0
    down_s: float = 0.2
    max_inflight: int = 20
    drain_timeout: float = 30.0
    reconnect_timeout: float = 30.0
    seed: int | None = None


class CrashRun:
    def __init__(self, opts: Options, work: Path, log: Log) -> None:
        if opts.kills < 1 or opts.devices < 1 or opts.rate <= 0 or not 0 < opts.load_min <= opts.load_max:
            raise ValueError("kills, devices, rate and load_min <= load_max must be positive")
        self.opts = opts
        self.log = log
        self.rng = random.Random(opts.seed)
        data_dir = work / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEPOT_NODE_")}
        env |= {"DEPOT_NODE_LOG_LEVEL": "info", "PYTHONUNBUFFERED": "1"}
        # Each device publishes far faster than a meter (default 50 msg/s), and on a busy machine
        # a restart can take tens of seconds: paho then resends more than the default burst of
        # 1,000 messages at once, and the per-device limit quarantines the excess as
        # rate_limited. This test is about durability; the limits have tests of their own.
        env |= {"DEPOT_NODE_DEVICE_BURST_MESSAGES": "1000000"}
        self.node = Node(data_dir, work / "node.log", env)
        self.key = ""
        self.publishers: list[Publisher] = []
        self.pacer: Pacer | None = None
        self.result = Result(devices=opts.devices)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.node.base_url, headers={"Authorization": f"Bearer {self.key}"}, timeout=30.0)

    def all_connected(self) -> bool:
        return all(p.connected.is_set() for p in self.publishers)

    def publisher_states(self) -> str:
        """Who is not connected, and what paho saw of it: for the error when a reconnect hangs."""
        return "; ".join(
            f"{p.device_id} connects={p.connects} refusals={p.refusals} disconnects={p.disconnects}"
            f" unacked={p.unacked()} paho: {' | '.join(p.paho_log)}"
            for p in self.publishers
            if not p.connected.is_set()
        )

    def acked(self) -> int:
        return sum(len(p.acked) for p in self.publishers)

    def start(self) -> None:
        """Start the node, register the devices, connect them, start publishing."""
        o = self.opts
        self.log(
            f"crash test: {o.kills} SIGKILLs, {o.devices} devices x {o.rate:g} msg/s, QoS 1, clean_session=False;"
            f" node log {self.node.log_path}"
        )
        self.key = self.node.create_admin_key()
        ready_s = self.node.start()
        self.log(f"node ready in {ready_s:.2f} s (mqtt :{self.node.mqtt_port}, http :{self.node.http_port})")
        with self.http() as http:
            for i in range(o.devices):
                device_id = f"crash-{i:03d}"
                resp = http.post("/api/v1/devices", json={"device_id": device_id, "type": "dc_meter"})
                if resp.status_code != HTTP_CREATED:
                    raise CrashError(f"registering {device_id}: HTTP {resp.status_code} {resp.text[:200]}")
                secret = resp.json()["secret"]
                self.publishers.append(Publisher(device_id, secret, self.node.mqtt_port, max_inflight=o.max_inflight))
        for p in self.publishers:
            p.start()
        if not _wait(self.all_connected, o.reconnect_timeout):
            raise CrashError("publishers did not connect")
        self.pacer = Pacer(self.publishers, o.rate)
        self.pacer.start()

    def cycle(self, number: int, last_acked: int) -> int:
        """Load for a random while, SIGKILL, restart, wait for every publisher; returns acked at the kill."""
        o = self.opts
        assert self.pacer is not None
        load_s = self.rng.uniform(o.load_min, o.load_max)
        time.sleep(load_s)
        if not self.pacer.alive():
            raise CrashError(f"publishing stopped: {self.pacer.error!r}")
        in_flight = sum(p.unacked() for p in self.publishers)
        acked = self.acked()
        self.node.kill()
        self.result.kills += 1
        self.result.in_flight_at_kills += in_flight
        if acked <= last_acked:
            self.result.problems.append(f"cycle {number}: no acknowledgement in {load_s:.1f} s of load")
        time.sleep(o.down_s)
        ready_s = self.node.start()
        t_ready = time.monotonic()
        if not _wait(self.all_connected, o.reconnect_timeout):
            raise CrashError(
                f"cycle {number}: publishers did not reconnect within {o.reconnect_timeout:.0f} s:"
                f" {self.publisher_states()}{self.node.tail()}"
            )
        self.log(
            f"kill {number}/{o.kills} after {load_s:.1f} s of load: acked so far {acked},"
            f" without PUBACK at the kill {in_flight}; node ready in {ready_s:.2f} s,"
            f" all reconnected {time.monotonic() - t_ready:.2f} s later"
        )
        return acked

    def drain(self) -> None:
        """A last stretch of load, then stop publishing and wait for the last PUBACKs."""
        o = self.opts
        assert self.pacer is not None
        # After the last restart too, paho's resends run next to new traffic for a while.
        time.sleep(self.rng.uniform(o.load_min, o.load_max))
        self.pacer.stop()
        if self.pacer.error is not None:
            raise CrashError(f"publishing failed: {self.pacer.error!r}")
        if self.pacer.behind:
            self.log(f"note: the publishing thread fell more than 1 s behind {self.pacer.behind} times")
        t0 = time.monotonic()
        drained = _wait(lambda: all(p.unacked() == 0 for p in self.publishers), o.drain_timeout)
        left = sum(p.unacked() for p in self.publishers)
        took = time.monotonic() - t0
        if drained:
            self.log(f"publishing stopped; every message acknowledged {took:.2f} s later")
        else:
            self.log(f"publishing stopped; {left} messages still unacknowledged {took:.2f} s later")
            self.result.problems.append(f"{left} messages not acknowledged within {o.drain_timeout:.0f} s of the end")

    def verify(self) -> None:
        """Read every device's telemetry back and count."""
        r = self.result
        with self.http() as http:
            for p in self.publishers:
                rows = _telemetry(http, p.device_id)
                keys = Counter((row["boot"], row["seq"]) for row in rows)
                stored = {seq for (boot, seq) in keys if boot == BOOT}
                sent = set(range(p.next_seq))
                r.sent += p.next_seq
                r.acked += len(p.acked)
                r.stored += len(rows)
                r.duplicated += sum(n - 1 for n in keys.values())
                lost = p.acked - stored
                r.lost += len(lost)
                r.unacked_stored += len(stored - p.acked)
                r.unacked_missing += len(sent - p.acked - stored)
                if lost:
                    r.problems.append(f"{p.device_id}: acknowledged but not stored: seq {sorted(lost)[:20]}")
                twice = sorted(k for k, n in keys.items() if n > 1)
                if twice:
                    r.problems.append(f"{p.device_id}: stored more than once: (boot, seq) {twice[:20]}")
                foreign = sorted(k for k in keys if k[0] != BOOT or k[1] not in sent)
                if foreign:
                    r.problems.append(f"{p.device_id}: stored but never sent: (boot, seq) {foreign[:20]}")
                r.redelivered += int(_get(http, f"/api/v1/devices/{p.device_id}")["counters"].get("duplicates", 0))
                quarantine = _get(http, "/api/v1/quarantine", device_id=p.device_id, limit=1000)
                r.quarantined += len(quarantine["items"])
        if r.quarantined:
            r.problems.append(f"{r.quarantined} messages quarantined (see /api/v1/quarantine)")

    def close(self) -> None:
        """Stop publishing, disconnect every publisher, stop the node in order (SIGTERM)."""
        if self.pacer is not None:
            self.pacer.stop()
        for p in self.publishers:
            p.close()
        self.result.connects = sum(p.connects for p in self.publishers)
        self.result.resumed = sum(p.resumed for p in self.publishers)
        self.result.refusals = sum(p.refusals for p in self.publishers)
        started = self.node.starts > 0
        code = self.node.stop()
        if started and code != 0:
            self.result.problems.append(f"node did not stop cleanly on SIGTERM (exit code {code}){self.node.tail()}")


def _get(http: httpx.Client, path: str, **params: Any) -> Any:
    resp = http.get(path, params=params)
    if resp.status_code != HTTP_OK:
        raise CrashError(f"GET {path}: HTTP {resp.status_code} {resp.text[:200]}")
    return resp.json()


def _telemetry(http: httpx.Client, device_id: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(100_000):  # bounded: 1,000 readings a page
        params: dict[str, Any] = {"limit": 1000}
        if cursor:
            params["cursor"] = cursor
        page = _get(http, f"/api/v1/devices/{device_id}/telemetry", **params)
        items.extend(page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            return items
    raise CrashError(f"telemetry of {device_id}: too many pages")


def run(
    kills: int = 5,
    devices: int = 20,
    rate: float = 50.0,
    *,
    work_dir: Path | None = None,
    log: Log = print,
    **options: Any,
) -> Result:
    """Run the crash test and return its counts (see :class:`Options` for *options*).

    *rate* is messages per second per device. *work_dir* (data directory and node log) is a
    new temporary directory when None. Every wait is bounded; a run that breaks raises
    :class:`CrashError`. Everything started here is stopped before this returns or raises.
    """
    opts = Options(kills=kills, devices=devices, rate=rate, **options)
    work = work_dir if work_dir is not None else Path(tempfile.mkdtemp(prefix="depot-crash-"))
    t0 = time.monotonic()
    crash = CrashRun(opts, work, log)
    try:
        crash.start()
        last_acked = 0
        for number in range(1, kills + 1):
            last_acked = crash.cycle(number, last_acked)
        crash.drain()
        crash.verify()
    finally:
        crash.close()
        crash.result.elapsed_s = time.monotonic() - t0
    result = crash.result
    log(result.details())
    for problem in result.problems:
        log(f"PROBLEM: {problem}")
    return result


# --------------------------------------------------------------------------- the command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/crash.py",
        description="SIGKILL depot-node under QoS 1 load from paho-mqtt publishers; count lost and duplicated.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--kills", type=int, default=5, help="SIGKILL / restart cycles")
    parser.add_argument("--devices", type=int, default=20, help="publishers (one registered device each)")
    parser.add_argument("--rate", type=float, default=50.0, help="messages per second per device")
    parser.add_argument("--load-min", type=float, default=1.0, help="shortest load before a kill, seconds")
    parser.add_argument("--load-max", type=float, default=3.0, help="longest load before a kill, seconds")
    parser.add_argument("--down", type=float, default=0.2, help="seconds between the SIGKILL and the restart")
    parser.add_argument("--inflight", type=int, default=20, help="paho's max in-flight QoS 1 messages per client")
    parser.add_argument("--drain-timeout", type=float, default=30.0, help="seconds for the last acknowledgements")
    parser.add_argument("--seed", type=int, help="seed for the load durations")
    parser.add_argument("--keep", action="store_true", help="keep the data directory and node log")
    opts = parser.parse_args(argv)
    if opts.kills < 1 or opts.devices < 1 or opts.rate <= 0 or not 0 < opts.load_min <= opts.load_max:
        parser.error("--kills, --devices, --rate must be positive and 0 < --load-min <= --load-max")
    return opts


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    work = Path(tempfile.mkdtemp(prefix="depot-crash-"))
    result: Result | None = None
    try:
        result = run(
            opts.kills,
            opts.devices,
            opts.rate,
            load_min=opts.load_min,
            load_max=opts.load_max,
            down_s=opts.down,
            max_inflight=opts.inflight,
            drain_timeout=opts.drain_timeout,
            seed=opts.seed,
            work_dir=work,
        )
    except CrashError as exc:
        print(f"bench/crash.py: FAILED: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("bench/crash.py: interrupted", file=sys.stderr)
    finally:
        if opts.keep or result is None or not result.ok:
            print(f"data and node log kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    if result is None:
        return 1
    print(result.line())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
