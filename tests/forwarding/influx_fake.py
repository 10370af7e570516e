"""An HTTP server that implements InfluxDB 2's ``POST /api/v2/write`` and checks the contract.

InfluxDB 2 cannot be installed on these machines, so the tests write to this instead. It runs
on 127.0.0.1 in a thread of its own (so a client on the test's event loop talks real HTTP to
it) and refuses anything InfluxDB would refuse, and more: the wrong method or path, a missing
``org``/``bucket``/``precision=ms``, an ``Authorization`` other than ``Token <token>``, a body
that claims gzip and is not, and any line that is not strict line protocol (escaping, field
types, integers with ``i``, a millisecond timestamp). A refused request answers 400 and is
recorded in :attr:`FakeInflux.violations`, which every test asserts empty.

Points are stored the way InfluxDB stores them: keyed by measurement, tag set and timestamp, a
later write of the same key overwriting the fields. So a replay leaves :attr:`points` as it
was, and :attr:`lines_received` counts what was sent, replays included.

Failure modes (:meth:`FakeInflux.fail`): ``500``, ``429`` with ``Retry-After``, ``hang`` (answer
after the client's timeout), and :meth:`FakeInflux.stop` / :meth:`FakeInflux.start` for
connection refused on the same port.
"""

from __future__ import annotations

import contextlib
import gzip
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

TOKEN: Final = "test-token-s3cr3t-never-logged"
ORG: Final = "depot"
BUCKET: Final = "telemetry"

type PointKey = tuple[str, tuple[tuple[str, str], ...], int]
type FieldValue = float | int | str | bool

# A key or measurement: escaped characters (\, \space \=) or anything but the separators.
_NAME: Final = r"(?:\\[, =\\]|[^, =\\])+"
_MEASUREMENT: Final = r"(?:\\[, \\]|[^, \\])+"
_LINE: Final = re.compile(rf"(?P<m>{_MEASUREMENT})(?P<tags>(?:,{_NAME}={_NAME})*) (?P<fields>.+) (?P<ts>-?\d+)")
_FIELD_VALUE: Final = re.compile(
    r"(?P<int>-?\d+i)|(?P<float>-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)|(?P<str>\"(?:\\.|[^\"\\])*\")"
    r"|(?P<bool>t|T|true|True|TRUE|f|F|false|False|FALSE)"
)
# Milliseconds since the epoch for 2001-09-09 .. 2286-11-20: a seconds or nanoseconds value is not.
_MS_RANGE: Final = (10**12, 10**13)


def _unescape(text: str) -> str:
    return re.sub(r"\\([, =\\])", r"\1", text)


def _split_unescaped(text: str, sep: str) -> list[str]:
    # The node escapes no backslash (device ids cannot hold one), so "\\," is always an escape.
    return re.split(rf"(?<!\\){re.escape(sep)}", text)


def parse_line(line: str) -> tuple[PointKey, dict[str, FieldValue]]:
    """One line of line protocol → ``((measurement, tags, ts), fields)``; ValueError if not strict."""
    match = _LINE.fullmatch(line)
    if match is None:
        raise ValueError(f"not line protocol: {line!r}")
    tags = tuple(sorted((_unescape(k), _unescape(v)) for k, v in (_split_unescaped(t, "=") for t in _tag_parts(match))))
    fields: dict[str, FieldValue] = {}
    for part in _split_unescaped(match["fields"], ","):
        key, sep, raw = _rsplit_field(part)
        if not sep or not key:
            raise ValueError(f"bad field {part!r} in {line!r}")
        value = _FIELD_VALUE.fullmatch(raw)
        if value is None:
            raise ValueError(f"bad field value {raw!r} in {line!r}")
        if value["int"]:
            fields[_unescape(key)] = int(raw[:-1])
        elif value["float"]:
            fields[_unescape(key)] = float(raw)
        elif value["str"]:
            fields[_unescape(key)] = raw[1:-1]
        else:
            fields[_unescape(key)] = raw[0] in "tT"
    ts = int(match["ts"])
    if not _MS_RANGE[0] <= ts < _MS_RANGE[1]:
        raise ValueError(f"timestamp {ts} is not in milliseconds: {line!r}")
    return (_unescape(match["m"]), tags, ts), fields


def _tag_parts(match: re.Match[str]) -> list[str]:
    text = match["tags"]
    return [] if not text else _split_unescaped(text[1:], ",")


def _rsplit_field(part: str) -> tuple[str, str, str]:
    pieces = _split_unescaped(part, "=")
    if len(pieces) != 2:
        return part, "", ""
    return pieces[0], "=", pieces[1]


@dataclass
class FakeInflux:
    token: str = TOKEN
    org: str = ORG
    bucket: str = BUCKET
    #: (measurement, tags, ts) → fields, as InfluxDB keeps them.
    points: dict[PointKey, dict[str, FieldValue]] = field(default_factory=dict)
    lines_received: int = 0
    requests: int = 0
    gzipped_requests: int = 0
    violations: list[str] = field(default_factory=list)
    #: Failure responses still to give, in order: "500", "429", "hang".
    failures: list[str] = field(default_factory=list)
    retry_after: str = "1"
    hang_seconds: float = 3.0
    port: int = 0
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _connections: set[socket.socket] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail(self, *modes: str) -> None:
        with self._lock:
            self.failures.extend(modes)

    def start(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def setup(self) -> None:
                super().setup()
                with fake._lock:
                    fake._connections.add(self.connection)

            def finish(self) -> None:
                with fake._lock:
                    fake._connections.discard(self.connection)
                super().finish()

            def do_POST(self) -> None:
                fake._handle(self)

            def do_GET(self) -> None:
                fake._reply(self, 404, b'{"code":"not found","message":"only POST /api/v2/write"}')

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, name="fake-influx", daemon=True).start()

    def stop(self) -> None:
        """Close the listener: connections are refused until :meth:`start` (same port)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        # Kept-alive connections too: a client must find the server gone, not a live socket.
        with self._lock:
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def _violation(self, request: BaseHTTPRequestHandler, message: str) -> None:
        with self._lock:
            self.violations.append(message)
        self._reply(request, 400, b'{"code":"invalid","message":"contract violation"}')

    @staticmethod
    def _reply(
        request: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str] | None = None
    ) -> None:
        request.send_response(status)
        for name, value in (headers or {}).items():
            request.send_header(name, value)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        # The client may have given up (timeout) and closed the connection.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            request.wfile.write(body)

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("Content-Length", "0"))
        body = request.rfile.read(length)
        with self._lock:
            self.requests += 1
            mode = self.failures.pop(0) if self.failures else None
        if mode == "500":
            self._reply(request, 500, b'{"code":"internal error","message":"simulated outage"}')
            return
        if mode == "429":
            self._reply(
                request, 429, b'{"code":"too many requests","message":"slow down"}', {"Retry-After": self.retry_after}
            )
            return
        if mode == "hang":
            time.sleep(self.hang_seconds)
            self._reply(request, 503, b'{"code":"unavailable","message":"too late"}')
            return
        url = urlsplit(request.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if url.path != "/api/v2/write":
            self._violation(request, f"path {url.path!r}")
            return
        if query.get("org") != self.org or query.get("bucket") != self.bucket:
            self._violation(request, f"org/bucket {query}")
            return
        if query.get("precision") != "ms":
            self._violation(request, f"precision {query.get('precision')!r}, expected 'ms'")
            return
        if request.headers.get("Authorization") != f"Token {self.token}":
            with self._lock:
                self.violations.append("authorization header")
            self._reply(request, 401, b'{"code":"unauthorized","message":"unauthorized access"}')
            return
        if request.headers.get("Content-Encoding") == "gzip":
            try:
                body = gzip.decompress(body)
            except (OSError, EOFError):
                self._violation(request, "body is not gzip although Content-Encoding says so")
                return
            with self._lock:
                self.gzipped_requests += 1
        try:
            text = body.decode("utf-8")
            parsed = [parse_line(line) for line in text.split("\n") if line]
        except ValueError as exc:
            self._violation(request, str(exc))
            return
        with self._lock:
            for key, fields in parsed:
                self.points[key] = fields
            self.lines_received += len(parsed)
        request.send_response(204)
        request.send_header("Content-Length", "0")
        request.end_headers()


def main() -> None:
    """``python -m tests.forwarding.influx_fake PORT``: serve until killed (``bench/forward.py``
    runs it in a process of its own, so its parsing does not share the node's interpreter)."""
    import sys

    fake = FakeInflux(port=int(sys.argv[1]))
    fake.start()
    threading.Event().wait()


if __name__ == "__main__":
    main()
