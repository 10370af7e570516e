"""Ingest benchmark: N devices publishing QoS 1 telemetry to depot-node over real TCP, and
the same load against a plain node, bare amqtt and Mosquitto with a SQLite collector.

Run from the repository root:

    uv run python bench/ingest.py                 # defaults: 200 devices, see --help
    uv run python bench/ingest.py --quick         # smoke run (20 devices, 3 s latency phase)

The targets under test, each a process (or two) of its own, started by this one:

* **node**: ``python -m node serve`` on a fresh data dir, default settings (broker fast path
  on, ``sqlite_synchronous = FULL``).
* **slow node** (``--no-slow-node`` skips it): a second node with its own data dir, ports
  and registered devices, started with ``DEPOT_NODE_BROKER_FAST_PATH=false`` (amqtt's own
  packet reader).
* **bare amqtt** (``--no-bare``): ``bench/bare_amqtt.py``, whose only plugin counts what its
  ``broker_message_received`` hook receives.
* **Mosquitto + collector** (``--no-mosquitto``): the peer users build today. ``mosquitto -c``
  a generated configuration (127.0.0.1, anonymous, persistence off, unbounded per-client
  queue so that nothing is dropped) and ``bench/collector.py``, a paho-mqtt client that
  subscribes to ``iot/+/telemetry`` with QoS 1 and writes batched transactions to SQLite
  (WAL, ``synchronous = FULL``, unique ``(device_id, boot, seq)``). Without a ``mosquitto``
  binary the peer is skipped with a message saying how to install it.

The load generator (``bench/loader.py``: raw asyncio sockets, pre-encoded packets, one
connection per device, an in-flight window per connection) is a process of its own per
phase, and its CPU is reported per phase: it must not be the bottleneck.

Phases, per round (the order of the targets alternates from round to round, so that a drift
in the machine's load hits all of them alike):

1. node saturation (fast path, then again with it off): every device sends ``--messages``
   as fast as its window allows. Durable throughput = messages acknowledged / (last PUBACK -
   first PUBLISH). The node PUBACKs only after the SQLite commit, so the last PUBACK is no
   earlier than the last commit. Then every device's ``counters.stored`` is read back
   through the HTTP API and must equal what was sent. Node CPU seconds (user + system, all
   threads) per 1,000 durable messages and its RSS.
2. bare amqtt and Mosquitto + collector: the same load. Both acknowledge before the message
   is counted (the hook) or committed (the collector), so the publishers keep their sessions
   open until the count has settled (no change for ``--settle-seconds``, or every message
   counted); throughput = count / (time of the last counted message, or last commit - first
   PUBLISH). The peer's CPU is Mosquitto's and the collector's together (and each shown).

After the rounds, latency: ``--rate`` messages per second offered to the node in total,
spread evenly over the devices, for ``--latency-seconds``; p50 / p99 / max of PUBLISH →
PUBACK, measured from each message's scheduled send time.

Targets (printed as PASS/FAIL; the exit code is 0 either way): node CPU per durable QoS 1
message ≤ 50 µs; node durable msg/s ≥ 2x the Mosquitto + collector peer's; node durable
msg/s ≥ bare amqtt hook msg/s; p99 ≤ 100 ms at 1,000 msg/s. The exit code is 1 when
something broke: a node lost or did not acknowledge a message, a peer did not store every
message, a phase timed out, a process failed.

On a shared machine compare the ratios within one run, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import getpass
import importlib.metadata
import io
import json
import math
import os
import platform
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, Final

import httpx
import psutil

REPO: Final = Path(__file__).resolve().parent.parent
NODE_PACKAGES: Final = ("node", "actors", "storage", "web")
P99_TARGET_MS: Final = 100.0
RATIO_TARGET: Final = 1.0
#: Node CPU per durable QoS 1 message at saturation, in µs (issue #7).
CPU_US_TARGET: Final = 50.0
#: Node durable msg/s over the Mosquitto + collector peer's (issue #7).
PEER_RATIO_TARGET: Final = 2.0
MIB: Final = 1024 * 1024
#: Above this many cores used by other processes during a phase, its figures are flagged.
NOISY_CORES: Final = 0.25
WRITER_METRICS: Final = {
    "depot_node_commits_total": "commits",
    "depot_node_committed_messages_total": "messages",
    "depot_node_commit_seconds_total": "seconds",
}

# Every child is started through this: it asks the kernel to SIGTERM the child when this
# process dies (PR_SET_PDEATHSIG), then execs the real program (argv[1]) in the same pid. So
# nothing we start can outlive us, even when we are killed with SIGKILL (unless the program
# changes its user id, which clears the signal: Mosquitto is told to keep ours).
_DIE_WITH_PARENT: Final = """\
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
if os.getppid() != int(os.environ["BENCH_PARENT_PID"]):
    sys.exit(70)
os.execv(sys.argv[1], sys.argv[1:])
"""


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


class BenchError(Exception):
    """Something broke: the run's figures cannot be trusted."""


# --------------------------------------------------------------------------- child processes


class Child:
    """A child process (*program*, our Python by default, with ``args``), its stdout read line
    by line in a thread."""

    def __init__(
        self,
        name: str,
        args: list[str],
        *,
        env: dict[str, str],
        log: Path,
        stdout_lines: bool,
        cwd: Path = REPO,
        program: str = sys.executable,
    ) -> None:
        self.name = name
        self.log_path = log
        self._log: IO[bytes] = log.open("wb")
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _DIE_WITH_PARENT, program, *args],
            cwd=cwd,
            env={**env, "BENCH_PARENT_PID": str(os.getpid())},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE if stdout_lines else self._log,
            stderr=self._log,
        )
        if stdout_lines:
            threading.Thread(target=self._read, name=f"{name}-stdout", daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put(None)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        """The next ``{"event": event, ...}`` line; BenchError on an error event, exit or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name}: no {event!r} within {timeout:.0f} s")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise BenchError(f"{self.name} exited (code {self.proc.wait(5)}) before {event!r}{self.tail()}")
            try:
                msg: dict[str, Any] = json.loads(line)
            except json.JSONDecodeError:
                print(f"  [{self.name}] {line}")
                continue
            if msg.get("event") == "error":
                raise BenchError(f"{self.name}: {msg.get('error')}{self.tail()}")
            if msg.get("event") == event:
                return msg

    def tail(self, lines: int = 20) -> str:
        self._log.flush()
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return ("\n  " + "\n  ".join(text)) if text else ""

    def stop(self, *, graceful: float = 30.0) -> int | None:
        """SIGTERM, wait up to *graceful* seconds, then SIGKILL. Returns the exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                self.proc.wait(graceful)
            except subprocess.TimeoutExpired:
                print(f"  {self.name} did not stop within {graceful:.0f} s: killing it")
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def children() -> Iterator[list[Child]]:
    """Every child started into the list is stopped on the way out, whatever happened."""
    started: list[Child] = []
    try:
        yield started
    finally:
        for child in reversed(started):
            child.stop(graceful=15.0)


def child_env() -> dict[str, str]:
    """Our environment without any ``DEPOT_NODE_*`` setting (each node gets its own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPOT_NODE_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn_child(
    kids: list[Child],
    tmp: Path,
    base_env: dict[str, str],
    name: str,
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    lines: bool = False,
    cwd: Path = REPO,
    program: str = sys.executable,
) -> Child:
    """Start a :class:`Child` logging to ``tmp/<name>.log`` and add it to *kids* (so that it is
    stopped on the way out of :func:`children`)."""
    log = tmp / f"{name}.log"
    child = Child(name, args, env=env or base_env, log=log, stdout_lines=lines, cwd=cwd, program=program)
    kids.append(child)
    return child


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(proc: psutil.Process) -> tuple[float, float]:
    """(user, system) CPU seconds of *proc*, all its threads."""
    t = proc.cpu_times()
    return float(t.user), float(t.system)


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores; idle and iowait excluded)."""
    t = psutil.cpu_times()
    return float(sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal")))


def peak_rss(pid: int) -> int | None:
    """VmHWM (peak resident set) from /proc, in bytes; None where there is no /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# --------------------------------------------------------------------------- figures


@dataclass
class LoadResult:
    """What the loader reported for one phase, plus what we measured around it."""

    expected: int
    sent: int
    acked: int
    first_send: float
    last_send: float
    last_ack: float
    wall_s: float
    loader_cpu_s: float
    timed_out: bool
    error: str | None
    stalled: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    target_user_s: float = 0.0
    target_sys_s: float = 0.0
    connect_s: float = 0.0
    probe: dict[str, float] = field(default_factory=dict)
    #: CPU seconds (user + system) of each measured process, by name.
    parts: dict[str, float] = field(default_factory=dict)
    #: CPU the rest of the machine used meanwhile (other processes, kernel threads), in cores.
    other_cores: float = 0.0

    @classmethod
    def from_event(cls, msg: dict[str, Any], *, connect_s: float) -> LoadResult:
        fields = {k: msg[k] for k in cls.__dataclass_fields__ if k in msg}
        return cls(**fields, connect_s=connect_s)

    @property
    def target_cpu_s(self) -> float:
        return self.target_user_s + self.target_sys_s

    @property
    def ack_span_s(self) -> float:
        return max(self.last_ack - self.first_send, 1e-9)

    @property
    def send_span_s(self) -> float:
        return max(self.last_send - self.first_send, 1e-9)


@dataclass
class Round:
    """One round of the throughput comparison: the same load against every target."""

    round: int
    node_msg_s: float = math.nan
    node_cpu_s_per_1000: float = math.nan
    node_p50_ms: float = math.nan
    node_p99_ms: float = math.nan
    node_other_cores: float = math.nan
    node_msgs_per_commit: float = math.nan
    node_ms_per_commit: float = math.nan
    slow_msg_s: float = math.nan
    slow_cpu_s_per_1000: float = math.nan
    slow_p99_ms: float = math.nan
    slow_other_cores: float = math.nan
    bare_hook_msg_s: float = math.nan
    bare_puback_msg_s: float = math.nan
    bare_count: int = 0
    bare_sent: int = 0
    bare_settled: bool = False
    bare_cpu_s_per_1000: float = math.nan
    bare_other_cores: float = math.nan
    #: Mosquitto + collector: rows committed / (last commit - first PUBLISH).
    peer_msg_s: float = math.nan
    peer_puback_msg_s: float = math.nan
    peer_count: int = 0
    peer_sent: int = 0
    peer_settled: bool = False
    peer_cpu_s_per_1000: float = math.nan
    peer_broker_cpu_s_per_1000: float = math.nan
    peer_collector_cpu_s_per_1000: float = math.nan
    peer_other_cores: float = math.nan

    @staticmethod
    def _over(a: float, b: float) -> float:
        return a / b if b and not math.isnan(b) else math.nan

    @property
    def ratio(self) -> float:
        """node / bare amqtt."""
        return self._over(self.node_msg_s, self.bare_hook_msg_s)

    @property
    def fast_slow(self) -> float:
        """node with the fast path / without it."""
        return self._over(self.node_msg_s, self.slow_msg_s)

    @property
    def node_peer(self) -> float:
        """node / Mosquitto + collector."""
        return self._over(self.node_msg_s, self.peer_msg_s)


RATIOS: Final = ("ratio", "fast_slow", "node_peer")


@dataclass
class Report:
    machine: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    rounds: list[Round] = field(default_factory=list)
    #: Targets that were asked for but could not run (e.g. no mosquitto binary), and why.
    skipped: dict[str, str] = field(default_factory=dict)
    # Medians over the rounds.
    node_durable_msg_s: float = math.nan
    slow_durable_msg_s: float = math.nan
    bare_hook_msg_s: float = math.nan
    peer_durable_msg_s: float = math.nan
    ratio: float = math.nan
    fast_slow: float = math.nan
    node_peer: float = math.nan
    node_cpu_s_per_1000: float = math.nan
    slow_cpu_s_per_1000: float = math.nan
    bare_cpu_s_per_1000: float = math.nan
    peer_cpu_s_per_1000: float = math.nan
    peer_broker_cpu_s_per_1000: float = math.nan
    peer_collector_cpu_s_per_1000: float = math.nan
    # Totals over every phase of the node with the fast path ("node_") and without ("slow_").
    node_sent: int = 0
    node_acked: int = 0
    node_stored: int = 0
    node_rss_start_mib: float = math.nan
    node_rss_mib: float = math.nan
    node_peak_rss_mib: float | None = None
    slow_sent: int = 0
    slow_acked: int = 0
    slow_stored: int = 0
    slow_rss_start_mib: float = math.nan
    slow_rss_mib: float = math.nan
    slow_peak_rss_mib: float | None = None
    # Totals over the peer's phases: sent by the loader, rows the collector committed.
    peer_sent: int = 0
    peer_committed: int = 0
    latency_rate_offered: float = math.nan
    latency_rate_achieved: float = math.nan
    latency_p50_ms: float = math.nan
    latency_p90_ms: float = math.nan
    latency_p99_ms: float = math.nan
    latency_max_ms: float = math.nan
    latency_stalled: int = 0
    latency_cpu_s_per_1000: float = math.nan
    latency_other_cores: float = math.nan
    loader: dict[str, dict[str, float]] = field(default_factory=dict)
    other_cores: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        for rnd, raw in zip(self.rounds, doc["rounds"], strict=True):
            for name in RATIOS:
                raw[name] = getattr(rnd, name)
        return doc


def median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def git(*args: str) -> str:
    """Output of a git command in the repository ("" when git fails)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=False)
        if out.returncode == 0:
            return out.stdout.strip()
    return ""


def node_source(rev: str | None, tmp: Path) -> tuple[Path, str]:
    """Where the node under test is run from, and what it is: the working tree as it is, or
    *rev* exported from git into *tmp* (so that edits made meanwhile do not change the run)."""
    if rev is None:
        head = git("rev-parse", "--short", "HEAD") or "?"
        dirty = " + uncommitted changes" if git("status", "--porcelain", "--", *NODE_PACKAGES) else ""
        return REPO, f"working tree at {head}{dirty}"
    commit = git("rev-parse", "--short", "--verify", f"{rev}^{{commit}}")
    if not commit:
        raise BenchError(f"--rev {rev!r} is not a commit of {REPO}")
    archive = subprocess.run(["git", "archive", commit], cwd=REPO, capture_output=True, timeout=120, check=False)
    if archive.returncode != 0:
        raise BenchError(f"git archive {commit} failed: {archive.stderr.decode(errors='replace').strip()}")
    dest = tmp / f"src-{commit}"
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest, f"commit {commit}"


def machine_info(data_dir: Path) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    fs = "?"
    best = ""
    for part in psutil.disk_partitions(all=True):
        if str(data_dir).startswith(part.mountpoint) and len(part.mountpoint) > len(best):
            best, fs = part.mountpoint, part.fstype
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": model or platform.processor() or "?",
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "amqtt": importlib.metadata.version("amqtt"),
        "data_dir_fs": fs,
    }


# --------------------------------------------------------------------------- the benchmark


@dataclass
class NodeProcess:
    """A ``depot-node serve`` child that answered ``/readyz``, with an admin API client."""

    child: Child
    proc: psutil.Process
    mqtt_port: int
    http_port: int
    client: httpx.Client


def start_node_process(
    spawn: Callable[..., Child],
    name: str,
    *,
    src: Path,
    env: dict[str, str],
    data: Path,
    ready_timeout: float = 120.0,
) -> NodeProcess:
    """Create an admin key in the fresh *data* dir, start ``python -m node serve`` on free
    loopback ports (*env* holds its ``DEPOT_NODE_*`` settings) and wait until it is ready."""
    data.mkdir(parents=True)
    out = subprocess.run(
        [sys.executable, "-m", "node", "keys", "create", "--role", "admin", "--data-dir", str(data)],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if out.returncode != 0:
        raise BenchError(f"{name}: keys create failed: {out.stderr.strip()}")
    key = out.stdout.strip().splitlines()[-1]
    mqtt_port, http_port = free_port(), free_port()
    args = ["-m", "node", "serve", "--data-dir", str(data)]
    args += ["--mqtt-bind", f"127.0.0.1:{mqtt_port}", "--http-bind", f"127.0.0.1:{http_port}"]
    child = spawn(name, args, env=env, cwd=src)
    base = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + ready_timeout
    while True:
        if child.proc.poll() is not None:
            raise BenchError(f"{name} exited with {child.proc.returncode}{child.tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                break
        if time.monotonic() > deadline:
            raise BenchError(f"{name} not ready within {ready_timeout:.0f} s{child.tail()}")
        time.sleep(0.1)
    # No kept-alive connections: a node idle while another is measured closes them, and a
    # request racing that close failed a whole run with "Server disconnected".
    client = httpx.Client(
        base_url=base,
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
        limits=httpx.Limits(max_keepalive_connections=0),
    )
    return NodeProcess(child, psutil.Process(child.pid), mqtt_port, http_port, client)


def register_devices(client: httpx.Client, count: int) -> list[tuple[str, str]]:
    """Register ``bench-00000`` … through the API; their (device id, secret) pairs."""
    devices = []
    for i in range(count):
        device_id = f"bench-{i:05d}"
        resp = client.post("/api/v1/devices", json={"device_id": device_id, "type": "dc_meter"})
        if resp.status_code != 201:
            raise BenchError(f"registering {device_id}: {resp.status_code} {resp.text[:200]}")
        devices.append((device_id, str(resp.json()["secret"])))
    return devices


def control_counts(port: int) -> dict[str, Any]:
    """The JSON line that a counting child (bare amqtt, the collector) answers on *port*."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    counts: dict[str, Any] = json.loads(data)
    return counts


def wait_for_control(child: Child, port: int, what: str, *, ready: str | None = None) -> dict[str, Any]:
    """Poll the control *port* until it answers (and its *ready* flag is true), up to 60 s."""
    deadline = time.monotonic() + 60
    while True:
        if child.proc.poll() is not None:
            raise BenchError(f"{what} exited with {child.proc.returncode}{child.tail()}")
        with contextlib.suppress(OSError):
            counts = control_counts(port)
            if ready is None or counts.get(ready):
                return counts
        if time.monotonic() > deadline:
            raise BenchError(f"{what} not up within 60 s{child.tail()}")
        time.sleep(0.1)


def mosquitto_conf(port: int) -> str:
    """Mosquitto's configuration for the peer: loopback, anonymous, nothing kept on disk."""
    return "\n".join(
        [
            "# generated by bench/ingest.py: the Mosquitto + collector peer",
            f"listener {port} 127.0.0.1",
            "allow_anonymous true",
            "persistence false",
            # Mosquitto drops QoS 1 messages for a subscriber beyond 1,000 queued ones by default:
            # the collector must see every message, so the queue is unbounded (it stays small
            # as long as the collector keeps up).
            "max_queued_messages 0",
            "max_inflight_messages 100",
            # asyncio (the node, amqtt) sets TCP_NODELAY on every socket; so does the peer.
            "set_tcp_nodelay true",
            # Run as whoever we are: a switch of user would also clear the parent-death signal.
            f"user {getpass.getuser()}",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "",
        ]
    )


MOSQUITTO_MISSING: Final = "no mosquitto binary on PATH or in /usr/sbin"


def mosquitto_binary(given: str | None) -> str | None:
    """The mosquitto executable: *given* (if it is one), else from PATH or /usr/sbin."""
    if given is not None:
        return shutil.which(given)
    return shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")


# --------------------------------------------------------------------------- the benchmark


@dataclass
class NodeHandle:
    """A node under test: ``node`` (fast path on) or ``slow`` (fast path off)."""

    label: str
    title: str
    node: NodeProcess
    devices: list[tuple[str, str]]
    #: What every device should have stored so far (checked against counters.stored).
    expected: dict[str, int]
    seq_next: int = 0

    @property
    def proc(self) -> psutil.Process:
        return self.node.proc

    @property
    def client(self) -> httpx.Client:
        return self.node.client


@dataclass
class BareHandle:
    child: Child
    proc: psutil.Process
    port: int
    control: int


@dataclass
class PeerHandle:
    """Mosquitto and its collector."""

    broker: Child
    collector: Child
    broker_proc: psutil.Process
    collector_proc: psutil.Process
    port: int
    control: int
    seq_next: int = 0


class Bench:
    def __init__(self, opts: argparse.Namespace, tmp: Path, kids: list[Child]) -> None:
        self.opts = opts
        self.tmp = tmp
        self.kids = kids
        self.report = Report()
        self.env = child_env()
        # The brokers that take any password get the same device ids as the nodes.
        self.anon_devices = [(f"bench-{i:05d}", "anonymous") for i in range(opts.devices)]
        self.node_src = REPO

    # ---- helpers

    def spawn(
        self,
        name: str,
        args: list[str],
        *,
        env: dict[str, str] | None = None,
        lines: bool = False,
        cwd: Path = REPO,
        program: str = sys.executable,
    ) -> Child:
        return spawn_child(self.kids, self.tmp, self.env, name, args, env=env, lines=lines, cwd=cwd, program=program)

    def retire(self, child: Child, *, graceful: float) -> int | None:
        code = child.stop(graceful=graceful)
        self.kids.remove(child)
        return code

    def run_load(
        self,
        name: str,
        port: int,
        targets: dict[str, psutil.Process],
        spec: dict[str, Any],
        *,
        devices: list[tuple[str, str]],
        settle: Callable[[LoadResult], None] | None = None,
        probe: Callable[[], dict[str, float]] | None = None,
    ) -> LoadResult:
        """Run one loader phase of *devices* against *port*; the CPU of each of *targets* is
        measured from go to done (or, with *settle*, until it returns, while the connections
        are still held open), and so is the difference of what *probe* returns."""
        o = self.opts
        full = {
            "host": "127.0.0.1",
            "port": port,
            "devices": devices,
            "window": o.window,
            "phase_timeout": o.phase_timeout,
            "hold": settle is not None,
            "hold_timeout": o.settle_timeout + 60,
            **spec,
        }
        path = self.tmp / f"spec-{name}.json"
        path.write_text(json.dumps(full))
        loader = self.spawn(f"loader-{name}", ["-m", "bench.loader", str(path)], lines=True)
        ready = loader.expect("ready", timeout=300)
        before = probe() if probe is not None else {}
        watch = [psutil.Process(loader.pid), psutil.Process()]  # the loader and this process
        sys0, mine0, wall0 = machine_busy(), sum(sum(cpu_seconds(p)) for p in watch), time.monotonic()
        cpu0 = {k: cpu_seconds(p) for k, p in targets.items()}
        loader.send("go")
        result = LoadResult.from_event(
            loader.expect("done", timeout=o.phase_timeout + 60), connect_s=ready["connect_s"]
        )
        if settle is not None:
            settle(result)
            loader.send("release")
        cpu1 = {k: cpu_seconds(p) for k, p in targets.items()}
        sys1, mine1, wall1 = machine_busy(), sum(sum(cpu_seconds(p)) for p in watch), time.monotonic()
        result.target_user_s = sum(cpu1[k][0] - cpu0[k][0] for k in targets)
        result.target_sys_s = sum(cpu1[k][1] - cpu0[k][1] for k in targets)
        result.parts = {k: sum(cpu1[k]) - sum(cpu0[k]) for k in targets}
        others = (sys1 - sys0) - result.target_cpu_s - (mine1 - mine0)
        result.other_cores = max(others, 0.0) / max(wall1 - wall0, 1e-9)
        if probe is not None:
            after = probe()
            result.probe = {k: after[k] - before.get(k, 0.0) for k in after}
        loader.expect("closed", timeout=60)
        code = loader.proc.wait(60)
        self.kids.remove(loader)
        loader.stop()
        if code != 0:
            raise BenchError(f"loader-{name} exited with {code}{loader.tail()}")
        if result.error:
            raise BenchError(f"phase {name}: {result.error}")
        if result.timed_out:
            raise BenchError(
                f"phase {name}: timed out after {o.phase_timeout:.0f} s ({result.acked} of {result.expected} acked)"
            )
        self.report.loader[name] = {
            "cpu_s": round(result.loader_cpu_s, 3),
            "wall_s": round(result.wall_s, 3),
            "core_share": round(result.loader_cpu_s / max(result.wall_s, 1e-9), 3),
        }
        self.report.other_cores[name] = round(result.other_cores, 2)
        return result

    @staticmethod
    def phase_footer(res: LoadResult, what: str) -> None:
        parts = ""
        if len(res.parts) > 1:
            parts = " = " + " + ".join(f"{k} {v:.2f}" for k, v in res.parts.items())
        print(
            f"  {what} CPU {res.target_cpu_s:.2f} s{parts} (user {res.target_user_s:.2f}, sys {res.target_sys_s:.2f});"
            f" loader CPU {res.loader_cpu_s:.2f} s over {res.wall_s:.2f} s"
            f" ({res.loader_cpu_s / max(res.wall_s, 1e-9):.0%} of one core);"
            f" rest of the machine {res.other_cores:.2f} cores"
        )
        if res.other_cores > NOISY_CORES:
            print(f"  note: other processes used {res.other_cores:.2f} cores meanwhile: these figures are disturbed")

    def settler(self, port: int, start: int, final: dict[str, Any]) -> Callable[[LoadResult], None]:
        """A *settle* for :meth:`run_load`: wait until the count on the control *port* has
        grown by every message sent, or stopped changing for ``--settle-seconds``; the last
        answer goes into *final* (with ``settled``)."""
        o = self.opts

        def settle(result: LoadResult) -> None:
            last_count, last_change = -1, time.monotonic()
            deadline = time.monotonic() + o.settle_timeout
            while time.monotonic() < deadline:
                c = control_counts(port)
                now = time.monotonic()
                if c["count"] != last_count:
                    last_count, last_change = c["count"], now
                final.update(c)
                if c["count"] - start >= result.sent or now - last_change >= o.settle_seconds:
                    final["settled"] = True
                    return
                time.sleep(0.1)
            final["settled"] = False

        return settle

    # ---- the nodes

    def start_node(self, label: str, *, fast: bool) -> NodeHandle:
        o = self.opts
        title = "node" if fast else "node, fast path off"
        print(f"{title}: starting (sqlite_synchronous={o.sync}), registering {o.devices} devices")
        env = {
            **self.env,
            "DEPOT_NODE_LOG_LEVEL": "warning",
            "DEPOT_NODE_SQLITE_SYNCHRONOUS": o.sync,
            "DEPOT_NODE_BROKER_FAST_PATH": "true" if fast else "false",
            # bench/backlog.py drives this class with a parser of its own: defaults then.
            "DEPOT_NODE_EVENT_LOOP": getattr(o, "event_loop", "asyncio"),
            **dict(setting.split("=", 1) for setting in getattr(o, "node_setting", [])),
        }
        proc = start_node_process(self.spawn, label, src=self.node_src, env=env, data=self.tmp / f"{label}-data")
        setattr(self.report, f"{label}_rss_start_mib", proc.proc.memory_info().rss / MIB)
        t0 = time.monotonic()
        devices = register_devices(proc.client, o.devices)
        print(f"  registered {len(devices)} devices in {time.monotonic() - t0:.1f} s")
        return NodeHandle(label, title, proc, devices, dict.fromkeys((d for d, _ in devices), 0))

    @staticmethod
    def writer_metrics(client: httpx.Client) -> dict[str, float]:
        """The storage writer's counters from ``/metrics`` (commits, messages, seconds)."""
        resp = client.get("/metrics")
        if resp.status_code != 200:
            raise BenchError(f"GET /metrics: {resp.status_code}")
        out: dict[str, float] = {}
        for line in resp.text.splitlines():
            name, _, value = line.partition(" ")
            if name in WRITER_METRICS:
                out[WRITER_METRICS[name]] = float(value)
        return out

    @staticmethod
    def writer_figures(res: LoadResult) -> tuple[float, float]:
        """(PUBLISHes per commit, ms per commit) of a phase; NaN without /metrics figures."""
        commits = res.probe.get("commits", 0.0)
        if not commits:
            return math.nan, math.nan
        return res.probe.get("messages", 0.0) / commits, res.probe.get("seconds", 0.0) / commits * 1000

    def writer_line(self, res: LoadResult) -> str:
        per, ms = self.writer_figures(res)
        busy = res.probe.get("seconds", 0.0) / max(res.wall_s, 1e-9)
        return (
            f"  storage writer: {res.probe.get('commits', 0):,.0f} commits, {per:.1f} PUBLISHes per commit,"
            f" {ms:.2f} ms per commit, busy {busy:.0%} of the phase"
        )

    def check_stored(self, node: NodeHandle) -> int:
        """Sum of counters.stored over the devices; notes every device that is not as expected."""
        deadline = time.monotonic() + 10
        while True:
            got: dict[str, int] = {}
            for device_id in node.expected:
                resp = node.client.get(f"/api/v1/devices/{device_id}")
                if resp.status_code != 200:
                    raise BenchError(f"GET device {device_id}: {resp.status_code} {resp.text[:200]}")
                got[device_id] = int(resp.json()["counters"]["stored"])
            wrong = {d: (got[d], n) for d, n in node.expected.items() if got[d] != n}
            if not wrong or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        for d, (g, n) in list(wrong.items())[:10]:
            self.report.problems.append(f"{node.title}: {d}: stored {g}, sent {n}")
        if len(wrong) > 10:
            self.report.problems.append(f"{node.title}: ... and {len(wrong) - 10} more devices with stored != sent")
        return sum(got.values())

    def account(self, node: NodeHandle, res: LoadResult, what: str) -> int:
        """Add a phase's messages to the expected counts (the loader sends message k of a
        phase from device k % N) and check them against the node's counters."""
        n = len(node.devices)
        for i, (d, _) in enumerate(node.devices):
            node.expected[d] += len(range(i, res.expected, n))
        node.seq_next += -(-res.expected // n)
        r, label = self.report, node.label
        setattr(r, f"{label}_sent", getattr(r, f"{label}_sent") + res.sent)
        setattr(r, f"{label}_acked", getattr(r, f"{label}_acked") + res.acked)
        stored = self.check_stored(node)
        setattr(r, f"{label}_stored", stored)
        total = sum(node.expected.values())
        if res.acked != res.sent or stored != total:
            r.problems.append(f"{what}: sent {res.sent}, acked {res.acked}; stored {stored} of {total} so far")
        return stored

    def node_saturate(self, node: NodeHandle, rnd: Round) -> None:
        o, r, label = self.opts, self.report, node.label
        print(
            f"round {rnd.round}, {node.title}: saturation, {o.devices} devices x {o.messages} messages,"
            f" window {o.window}"
        )
        res = self.run_load(
            f"{label}-{rnd.round}",
            node.node.mqtt_port,
            {label: node.proc},
            {"mode": "saturate", "messages": o.messages, "seq_start": node.seq_next},
            devices=node.devices,
            probe=lambda: self.writer_metrics(node.client),
        )
        if math.isnan(getattr(r, f"{label}_rss_mib")):
            setattr(r, f"{label}_rss_mib", node.proc.memory_info().rss / MIB)
        stored = self.account(node, res, f"{node.title} round {rnd.round}")
        msg_s = res.acked / res.ack_span_s
        cpu = res.target_cpu_s / max(res.acked, 1) * 1000
        if label == "node":
            rnd.node_msg_s, rnd.node_cpu_s_per_1000 = msg_s, cpu
            rnd.node_p50_ms, rnd.node_p99_ms = res.p50_ms, res.p99_ms
            rnd.node_other_cores = res.other_cores
            rnd.node_msgs_per_commit, rnd.node_ms_per_commit = self.writer_figures(res)
        else:
            rnd.slow_msg_s, rnd.slow_cpu_s_per_1000 = msg_s, cpu
            rnd.slow_p99_ms, rnd.slow_other_cores = res.p99_ms, res.other_cores
        print(
            f"  connect {res.connect_s:.1f} s; acked {res.acked}/{res.sent} in {res.ack_span_s:.2f} s"
            f" -> {msg_s:,.0f} durable msg/s; stored (API, all phases so far) {stored}"
        )
        print(
            f"  publish->PUBACK under saturation: p50 {res.p50_ms:.1f} ms, p99 {res.p99_ms:.1f} ms,"
            f" max {res.max_ms:.1f} ms; node CPU {cpu:.3f} s per 1,000 msgs ({cpu * 1000:.0f} µs per msg)"
        )
        print(self.writer_line(res))
        self.phase_footer(res, "node")

    def node_latency(self, node: NodeHandle) -> None:
        o, r = self.opts, self.report
        print(f"latency, node: {o.rate:,.0f} msg/s offered for {o.latency_seconds:g} s over {o.devices} devices")
        res = self.run_load(
            "latency",
            node.node.mqtt_port,
            {node.label: node.proc},
            {"mode": "paced", "rate": o.rate, "duration": o.latency_seconds, "seq_start": node.seq_next},
            devices=node.devices,
            probe=lambda: self.writer_metrics(node.client),
        )
        stored = self.account(node, res, "latency phase")
        r.latency_rate_offered = o.rate
        r.latency_rate_achieved = res.sent / res.send_span_s if res.sent > 1 else math.nan
        r.latency_p50_ms, r.latency_p90_ms, r.latency_p99_ms = res.p50_ms, res.p90_ms, res.p99_ms
        r.latency_max_ms = res.max_ms
        r.latency_stalled = res.stalled
        r.latency_cpu_s_per_1000 = res.target_cpu_s / max(res.acked, 1) * 1000
        r.latency_other_cores = res.other_cores
        print(
            f"  sent {res.sent} at {r.latency_rate_achieved:,.0f} msg/s; acked {res.acked};"
            f" stored (API, all phases) {stored}"
        )
        print(
            f"  publish->PUBACK: p50 {res.p50_ms:.1f} ms, p90 {res.p90_ms:.1f} ms, p99 {res.p99_ms:.1f} ms,"
            f" max {res.max_ms:.1f} ms ({res.stalled} PUBLISHes written more than 1 ms after they were due);"
            f" node CPU {r.latency_cpu_s_per_1000:.3f} s per 1,000 msgs"
        )
        print(self.writer_line(res))
        self.phase_footer(res, "node")

    def stop_node(self, node: NodeHandle) -> None:
        hwm = peak_rss(node.node.child.pid)
        setattr(self.report, f"{node.label}_peak_rss_mib", hwm / MIB if hwm is not None else None)
        node.client.close()
        code = self.retire(node.node.child, graceful=30)
        if code not in (0, -signal.SIGTERM):
            self.report.problems.append(f"{node.title} exited with {code} on SIGTERM")

    # ---- bare amqtt

    def budget(self) -> float:
        """How long a baseline child may live at most (it stops by itself after that)."""
        o = self.opts
        return (o.phase_timeout + o.settle_timeout + 120) * o.rounds + o.phase_timeout + 600

    def start_bare(self) -> BareHandle:
        port, control = free_port(), free_port()
        args = ["-m", "bench.bare_amqtt", "--port", str(port), "--control-port", str(control)]
        child = self.spawn("bare-amqtt", [*args, "--max-seconds", str(self.budget())])
        counts = wait_for_control(child, control, "bare amqtt")
        return BareHandle(child, psutil.Process(counts["pid"]), port, control)

    def bare_saturate(self, bare: BareHandle, rnd: Round) -> None:
        o = self.opts
        print(f"round {rnd.round}, bare amqtt + counting plugin: the same load")
        start = control_counts(bare.control)["count"]
        final: dict[str, Any] = {}
        res = self.run_load(
            f"bare-{rnd.round}",
            bare.port,
            {"broker": bare.proc},
            {"mode": "saturate", "messages": o.messages, "keepalive": 600},
            devices=self.anon_devices,
            settle=self.settler(bare.control, start, final),
        )
        time.sleep(0.5)
        after = control_counts(bare.control)  # counted after the disconnects: not in the rate
        rnd.bare_count = int(final.get("count", 0)) - start
        rnd.bare_sent = res.sent
        rnd.bare_settled = bool(final.get("settled"))
        span = float(final.get("last", 0.0)) - res.first_send
        rnd.bare_hook_msg_s = rnd.bare_count / span if rnd.bare_count and span > 0 else 0.0
        rnd.bare_puback_msg_s = res.acked / res.ack_span_s
        rnd.bare_cpu_s_per_1000 = res.target_cpu_s / max(rnd.bare_count, 1) * 1000
        rnd.bare_other_cores = res.other_cores
        print(
            f"  connect {res.connect_s:.1f} s; PUBACKs {res.acked}/{res.sent} in {res.ack_span_s:.2f} s"
            f" -> {rnd.bare_puback_msg_s:,.0f} msg/s (amqtt acknowledges before the hook runs)"
        )
        settled = "settled" if rnd.bare_settled else f"NOT settled within {o.settle_timeout:g} s"
        late = after["count"] - start - rnd.bare_count
        print(
            f"  hook received {rnd.bare_count}/{res.sent} in {span:.2f} s -> {rnd.bare_hook_msg_s:,.0f} msg/s"
            f" ({settled}; {late} more after the disconnects); broker CPU {rnd.bare_cpu_s_per_1000:.3f} s"
            " per 1,000 hook msgs"
        )
        self.phase_footer(res, "broker")
        if not rnd.bare_settled:
            self.report.problems.append(f"bare round {rnd.round}: hook count did not settle")

    # ---- Mosquitto + collector

    def start_peer(self) -> PeerHandle | None:
        exe = mosquitto_binary(self.opts.mosquitto)
        if exe is None:
            why = MOSQUITTO_MISSING if self.opts.mosquitto is None else f"{self.opts.mosquitto} is not an executable"
            print(f"{why}: skipping the Mosquitto + collector peer (Debian/Ubuntu: apt-get install mosquitto)")
            self.report.skipped["mosquitto"] = why
            return None
        port, control = free_port(), free_port()
        conf = self.tmp / "mosquitto.conf"
        conf.write_text(mosquitto_conf(port))
        broker = self.spawn("mosquitto", ["-c", str(conf)], program=exe)
        deadline = time.monotonic() + 30
        while True:
            if broker.proc.poll() is not None:
                raise BenchError(f"mosquitto exited with {broker.proc.returncode}{broker.tail()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise BenchError(f"mosquitto not listening within 30 s{broker.tail()}") from None
                time.sleep(0.05)
        version = subprocess.run([exe, "-h"], capture_output=True, text=True, timeout=10, check=False)
        first = (version.stdout or version.stderr).splitlines()
        self.report.machine["mosquitto"] = first[0] if first else "?"
        db = self.tmp / "collector" / "telemetry.db"
        db.parent.mkdir()
        args = ["-m", "bench.collector", "--port", str(port), "--control-port", str(control), "--db", str(db)]
        collector = self.spawn("collector", [*args, "--max-seconds", str(self.budget())])
        counts = wait_for_control(collector, control, "collector", ready="subscribed")
        print(f"Mosquitto + collector: {self.report.machine['mosquitto']}, collector subscribed")
        return PeerHandle(broker, collector, psutil.Process(broker.pid), psutil.Process(counts["pid"]), port, control)

    def peer_saturate(self, peer: PeerHandle, rnd: Round) -> None:
        o, r = self.opts, self.report
        print(f"round {rnd.round}, Mosquitto + collector (paho-mqtt -> SQLite, synchronous=FULL): the same load")
        start = control_counts(peer.control)["count"]
        final: dict[str, Any] = {}
        res = self.run_load(
            f"mosquitto-{rnd.round}",
            peer.port,
            {"mosquitto": peer.broker_proc, "collector": peer.collector_proc},
            {"mode": "saturate", "messages": o.messages, "keepalive": 600, "seq_start": peer.seq_next},
            devices=self.anon_devices,
            settle=self.settler(peer.control, start, final),
        )
        peer.seq_next += o.messages
        count = int(final.get("count", 0)) - start
        span = float(final.get("last", 0.0)) - res.first_send
        rnd.peer_count, rnd.peer_sent = count, res.sent
        rnd.peer_settled = bool(final.get("settled"))
        rnd.peer_msg_s = count / span if count and span > 0 else 0.0
        rnd.peer_puback_msg_s = res.acked / res.ack_span_s
        per = 1000 / max(count, 1)
        rnd.peer_cpu_s_per_1000 = res.target_cpu_s * per
        rnd.peer_broker_cpu_s_per_1000 = res.parts["mosquitto"] * per
        rnd.peer_collector_cpu_s_per_1000 = res.parts["collector"] * per
        rnd.peer_other_cores = res.other_cores
        r.peer_sent += res.sent
        r.peer_committed += count
        print(
            f"  connect {res.connect_s:.1f} s; PUBACKs {res.acked}/{res.sent} in {res.ack_span_s:.2f} s"
            f" -> {rnd.peer_puback_msg_s:,.0f} msg/s (Mosquitto acknowledges before the collector commits)"
        )
        settled = "settled" if rnd.peer_settled else f"NOT settled within {o.settle_timeout:g} s"
        print(
            f"  collector committed {count}/{res.sent} rows in {span:.2f} s -> {rnd.peer_msg_s:,.0f} durable msg/s"
            f" ({settled}); CPU {rnd.peer_cpu_s_per_1000:.3f} s per 1,000 rows (Mosquitto"
            f" {rnd.peer_broker_cpu_s_per_1000:.3f} + collector {rnd.peer_collector_cpu_s_per_1000:.3f})"
        )
        self.phase_footer(res, "peer")
        if count != res.sent:
            r.problems.append(f"Mosquitto round {rnd.round}: the collector committed {count} of {res.sent} sent")

    # ---- the whole run

    def run(self) -> bool:
        o, r = self.opts, self.report
        node = slow = bare = peer = None
        if not o.no_node:
            node = self.start_node("node", fast=True)
        if not o.no_slow_node:
            slow = self.start_node("slow", fast=False)
        if not o.no_bare:
            bare = self.start_bare()
        if not o.no_mosquitto:
            peer = self.start_peer()
        steps: list[tuple[str, Callable[[Round], None]]] = []
        if node is not None:
            steps.append(("node", lambda rnd: self.node_saturate(node, rnd)))
        if slow is not None:
            steps.append(("slow", lambda rnd: self.node_saturate(slow, rnd)))
        if bare is not None:
            steps.append(("bare", lambda rnd: self.bare_saturate(bare, rnd)))
        if peer is not None:
            steps.append(("peer", lambda rnd: self.peer_saturate(peer, rnd)))
        for i in range(1, o.rounds + 1):
            rnd = Round(i)
            r.rounds.append(rnd)
            # Alternate the order, so that a drift in the machine's load hits all targets alike.
            for _, step in steps if i % 2 else reversed(steps):
                step(rnd)
            shown = [
                f"{name} {getattr(rnd, attr):.2f}"
                for name, attr in (("node/bare", "ratio"), ("fast/slow", "fast_slow"), ("node/peer", "node_peer"))
                if not math.isnan(getattr(rnd, attr))
            ]
            if shown:
                print(f"round {i}: " + ", ".join(shown))
        for child in (bare.child if bare else None, peer.collector if peer else None, peer.broker if peer else None):
            if child is not None:
                self.retire(child, graceful=15)
        if slow is not None:
            self.stop_node(slow)
        if node is not None:
            self.node_latency(node)
            self.stop_node(node)
        for name in (
            "node_cpu_s_per_1000",
            "slow_cpu_s_per_1000",
            "bare_cpu_s_per_1000",
            "peer_cpu_s_per_1000",
            "peer_broker_cpu_s_per_1000",
            "peer_collector_cpu_s_per_1000",
            "bare_hook_msg_s",
            *RATIOS,
        ):
            setattr(r, name, median([getattr(x, name) for x in r.rounds]))
        r.node_durable_msg_s = median([x.node_msg_s for x in r.rounds])
        r.slow_durable_msg_s = median([x.slow_msg_s for x in r.rounds])
        r.peer_durable_msg_s = median([x.peer_msg_s for x in r.rounds])
        return self.summary()

    # ---- summary

    def summary(self) -> bool:
        o, r = self.opts, self.report
        rounds = r.rounds

        def each(attr: str, spec: str) -> str:
            return ", ".join(format(getattr(x, attr), spec) for x in rounds)

        m = r.machine
        n = len(rounds)
        print()
        print("== summary " + "=" * 69)
        print(f"machine      {m['cores']} cores, {m['cpu']}, Python {m['python']}, amqtt {m['amqtt']}")
        print(f"             data dir on {m['data_dir_fs']}, {m['date']}; node: {m['node']}")
        if "mosquitto" in m:
            print(f"             {m['mosquitto']}")
        print(
            f"load         {o.devices} devices, window {o.window}, {o.messages} msgs/device per saturation phase,"
            f" {n} round{'s' * (n != 1)}; sqlite_synchronous={o.sync}"
        )
        medians = "median of the rounds" if n > 1 else "one round"
        print(f"             durable msg/s ({medians}; rounds)       CPU s per 1,000 durable msgs")
        rows = (
            ("node", "node (fast path)", "node_durable_msg_s", "node_msg_s", "node_cpu_s_per_1000"),
            ("slow", "node, fast path off", "slow_durable_msg_s", "slow_msg_s", "slow_cpu_s_per_1000"),
            ("bare", "bare amqtt (hook)", "bare_hook_msg_s", "bare_hook_msg_s", "bare_cpu_s_per_1000"),
            ("peer", "Mosquitto+collector", "peer_durable_msg_s", "peer_msg_s", "peer_cpu_s_per_1000"),
        )
        for _, title, med, per_round, cpu in rows:
            if math.isnan(getattr(r, med)):
                continue
            line = f"  {title:<20} {getattr(r, med):9,.0f}   ({each(per_round, ',.0f')})"
            line = f"{line:<58} {getattr(r, cpu):.3f}"
            if per_round == "peer_msg_s":
                line += (
                    f" (Mosquitto {r.peer_broker_cpu_s_per_1000:.3f} + collector {r.peer_collector_cpu_s_per_1000:.3f})"
                )
            print(line)
        for what, why in r.skipped.items():
            print(f"  {what}: skipped: {why}")
        self.summary_targets()
        self.summary_resources()
        if r.problems:
            print("PROBLEMS")
            for p in r.problems:
                print(f"  {p}")
        print("=" * 80)
        return not r.problems

    def summary_targets(self) -> None:
        o, r = self.opts, self.report
        have_node = not o.no_node
        rounds = r.rounds

        def each(attr: str, spec: str) -> str:
            return ", ".join(format(getattr(x, attr), spec) for x in rounds)

        cpu_us = r.node_cpu_s_per_1000 * 1000  # CPU s per 1,000 msgs x 1,000 = µs per msg
        if have_node or any(not math.isnan(getattr(r, name)) for name in RATIOS):
            print("targets and ratios")
        if have_node:
            print(
                f"  node CPU per durable QoS 1 msg   {cpu_us:6.1f} µs  (rounds: "
                f"{', '.join(f'{x.node_cpu_s_per_1000 * 1000:.1f}' for x in rounds)})"
                f"   target <= {CPU_US_TARGET:.0f} µs: {verdict(round(cpu_us, 1) <= CPU_US_TARGET)}"
            )
        ratio_rows = (
            ("node / Mosquitto+collector", "node_peer", PEER_RATIO_TARGET),
            ("node fast path / fast path off", "fast_slow", None),
            ("node / bare amqtt hook", "ratio", RATIO_TARGET),
        )
        for title, attr, target in ratio_rows:
            value = getattr(r, attr)
            if math.isnan(value):
                continue
            line = f"  {title:<32} {value:6.2f}     (rounds: {each(attr, '.2f')})"
            if target is not None:
                line += f"   target >= {target:.1f}: {verdict(value >= target)}"
            print(line)
        if have_node:
            p99_v = verdict(r.latency_p99_ms <= P99_TARGET_MS)
            print(
                f"  latency at {r.latency_rate_offered:,.0f} msg/s offered: p50 {r.latency_p50_ms:.1f} ms,"
                f" p99 {r.latency_p99_ms:.1f} ms, max {r.latency_max_ms:.1f} ms"
                f" (achieved {r.latency_rate_achieved:,.0f} msg/s)   target p99 <= {P99_TARGET_MS:.0f} ms: {p99_v}"
            )
            print(
                f"node CPU     {r.node_cpu_s_per_1000:.3f} s per 1,000 durable msgs at saturation,"
                f" {r.latency_cpu_s_per_1000:.3f} s per 1,000 at {r.latency_rate_offered:,.0f} msg/s"
            )

    def summary_resources(self) -> None:
        r = self.report
        for label, title in (("node", "node"), ("slow", "node, fast path off")):
            if math.isnan(getattr(r, f"{label}_rss_start_mib")):
                continue
            peak = getattr(r, f"{label}_peak_rss_mib")
            peak_s = f", peak {peak:.1f} MiB" if peak is not None else ""
            print(
                f"RSS          {title}: {getattr(r, f'{label}_rss_mib'):.1f} MiB after the first saturation phase"
                f"{peak_s} ({getattr(r, f'{label}_rss_start_mib'):.1f} MiB when it became ready)"
            )
            print(
                f"stored       {title}: {getattr(r, f'{label}_stored')} of {getattr(r, f'{label}_sent')} sent"
                f" ({getattr(r, f'{label}_acked')} acknowledged), all phases"
            )
        if r.peer_sent:
            print(f"stored       Mosquitto+collector: {r.peer_committed} rows committed of {r.peer_sent} sent")
        shares = [v["core_share"] for v in r.loader.values()]
        if not shares:
            print("loader       no phase ran")
            return
        cpu = sum(v["cpu_s"] for v in r.loader.values())
        print(
            f"loader       {cpu:.2f} s CPU in all phases; {min(shares):.0%}-{max(shares):.0%} of one core"
            " while publishing; per phase:"
        )
        print("             " + ", ".join(f"{name} {v['core_share']:.0%}" for name, v in r.loader.items()))
        others = ", ".join(f"{name} {v:.2f}" for name, v in r.other_cores.items())
        print(f"other load   cores used by the rest of the machine, per phase: {others}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/ingest.py",
        description=(
            "Ingest benchmark of depot-node (fast path on and off) against bare amqtt and Mosquitto with a"
            " SQLite collector (QoS 1 over loopback TCP)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--devices", type=int, default=200, help="devices (one MQTT connection each)")
    parser.add_argument("--messages", type=int, default=250, help="messages per device in each saturation phase")
    parser.add_argument("--window", type=int, default=10, help="QoS 1 PUBLISHes in flight per connection")
    parser.add_argument(
        "--rounds", type=int, default=3, help="saturation rounds (each target once, order alternating; medians)"
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="latency phase: msg/s offered, all devices")
    parser.add_argument("--latency-seconds", type=float, default=10.0, help="latency phase: how long to offer --rate")
    parser.add_argument(
        "--sync", choices=("FULL", "NORMAL"), default="FULL", help="the node's sqlite_synchronous (FULL is its default)"
    )
    parser.add_argument(
        "--node-setting",
        action="append",
        default=[],
        metavar="DEPOT_NODE_X=VALUE",
        help="an environment setting for the nodes (repeatable), e.g. DEPOT_NODE_ENERGY_ENABLED=false",
    )
    parser.add_argument(
        "--event-loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="the nodes' event loop (setting event_loop)",
    )
    parser.add_argument("--no-node", action="store_true", help="skip the node (fast path on) and the latency phase")
    parser.add_argument("--no-slow-node", action="store_true", help="skip the node with the fast path off")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare amqtt baseline")
    parser.add_argument("--no-mosquitto", action="store_true", help="skip the Mosquitto + collector peer")
    parser.add_argument(
        "--mosquitto", metavar="BINARY", help="the mosquitto executable (default: mosquitto on PATH or in /usr/sbin)"
    )
    parser.add_argument(
        "--settle-seconds", type=float, default=2.0, help="bare amqtt, peer: count unchanged this long = settled"
    )
    parser.add_argument(
        "--settle-timeout", type=float, default=180.0, help="bare amqtt, peer: stop waiting for the count"
    )
    parser.add_argument("--phase-timeout", type=float, default=300.0, help="a phase's load must finish within this")
    parser.add_argument(
        "--rev",
        metavar="REV",
        help="run the node from this git revision (exported to the temp dir) instead of the working tree;"
        " a revision older than the broker fast path ignores DEPOT_NODE_BROKER_FAST_PATH (both nodes are alike)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every figure to PATH as JSON")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 20 devices x 20 messages, 1 round, 3 s latency phase (overrides those); its CPU figures"
        " are too coarse to judge (the kernel counts CPU time in 10 ms ticks)",
    )
    opts = parser.parse_args(argv)
    if opts.no_node and opts.no_slow_node and opts.no_bare and opts.no_mosquitto:
        parser.error("--no-node, --no-slow-node, --no-bare and --no-mosquitto leave nothing to run")
    if opts.quick:
        opts.devices, opts.messages, opts.rounds, opts.latency_seconds = 20, 20, 1, 3.0
    positive = ("devices", "messages", "window", "rounds", "rate", "latency_seconds")
    if any(getattr(opts, name) <= 0 for name in positive):
        parser.error("--devices, --messages, --window, --rounds, --rate and --latency-seconds must be positive")
    return opts


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_bench(name: str, body: Callable[[Path, list[Child]], bool], *, errors: tuple[type[Exception], ...] = ()) -> int:
    """What every benchmark's ``main()`` does around its own work: SIGTERM and SIGINT stop it
    like Ctrl-C, *body* gets a fresh temporary directory (removed afterwards) and the list its
    child processes go in (all stopped afterwards), and a failure is one line on stderr.

    *body* returns whether every target was met; the exit code is 0 (met), 1 (missed or
    failed) or 130 (interrupted). *errors* are failures of that benchmark's own besides
    :class:`BenchError`, httpx's and OS errors.
    """
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)  # also when started with SIGINT ignored (e.g. `cmd &`)
    tmp = Path(tempfile.mkdtemp(prefix=f"depot-{Path(name).stem}-"))
    try:
        with children() as kids:
            ok = body(tmp, kids)
    except (BenchError, httpx.HTTPError, OSError, *errors) as exc:
        print(f"\n{name}: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


def _ingest(opts: argparse.Namespace, tmp: Path, kids: list[Child]) -> bool:
    bench = Bench(opts, tmp, kids)
    bench.report.machine = machine_info(tmp)
    bench.report.options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()}
    m = bench.report.machine
    nodes = not (opts.no_node and opts.no_slow_node)
    bench.node_src, m["node"] = node_source(opts.rev, tmp) if nodes else (REPO, "not run")
    print(
        f"depot-node ingest benchmark  {m['date']}  {m['cores']} cores {m['cpu']}"
        f"  Python {m['python']}  amqtt {m['amqtt']}  data on {m['data_dir_fs']}"
    )
    print(f"node under test: {m['node']}, run from {bench.node_src}")
    ok = bench.run()
    if opts.json is not None:
        opts.json.write_text(json.dumps(bench.report.to_json(), indent=2) + "\n")
    return ok


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    return run_bench("bench/ingest.py", lambda tmp, kids: _ingest(opts, tmp, kids))


if __name__ == "__main__":
    sys.exit(main())
