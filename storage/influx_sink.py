"""The InfluxDB sink: readings as line protocol, written through influxdb-client's async API.

Each reading becomes one point: measurement = the device type (``dc_meter``, ``ac_meter``),
tags ``device_id`` and ``type``, the fields of ``m`` as floats plus ``boot`` and ``seq`` as
integers, and the device's timestamp in milliseconds. A point is identified in InfluxDB by
measurement, tags and time, so sending a batch again overwrites the same points with the same
values: replays are idempotent. (Two readings of one device with the same millisecond would
share a point; a meter's clock gives every reading its own.)

The same sink writes energy periods (measurement ``energy``, :func:`energy_change_line`, built by
:func:`storage.energy_influx.energy_line`) for the second InfluxDB stream: an :class:`InfluxSink`
is generic in what it sends and takes the function that makes a row's line.

The token is handed to the client and to nothing else: it is never logged, and the errors
raised here (:class:`storage.errors.SinkError`) carry the HTTP status and InfluxDB's message,
never the request's headers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Self, cast

import aiohttp
import anyio
from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
from influxdb_client.rest import ApiException

from storage.energy import EnergyChange
from storage.energy_influx import energy_line
from storage.errors import SinkError
from storage.records import TelemetryOut

SINK: Final = "influxdb"
#: Timestamps are sent in milliseconds, the resolution the node stores.
PRECISION: Final[Any] = "ms"
CLOSE_TIMEOUT_S: Final = 5.0


# Line protocol escaping: measurements escape commas and spaces; tag keys, tag values and field
# keys also escape equals signs (a backslash elsewhere is literal; device ids cannot hold one).
_MEASUREMENT_ESCAPES: Final = str.maketrans({",": "\\,", " ": "\\ "})
_KEY_ESCAPES: Final = str.maketrans({",": "\\,", " ": "\\ ", "=": "\\="})


def _float(value: float) -> str:
    # repr() is the shortest text that reads back as the same float (e.g. 1512.3, 1e+21).
    return repr(float(value))


def to_line(row: TelemetryOut) -> str:
    """One reading as a line of InfluxDB line protocol, timestamp in milliseconds."""
    measurement = row.device_type.translate(_MEASUREMENT_ESCAPES)
    tags = f"device_id={row.device_id.translate(_KEY_ESCAPES)},type={row.device_type.translate(_KEY_ESCAPES)}"
    fields = [
        f"{key.translate(_KEY_ESCAPES)}={_float(value)}"
        for key, value in sorted(row.m.items())
        # The contract admits finite numbers only; InfluxDB refuses NaN and infinities anyway.
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ]
    fields += [f"boot={row.boot}i", f"seq={row.seq}i"]
    return f"{measurement},{tags} {','.join(fields)} {row.ts_ms}"


def energy_change_line(change: EnergyChange) -> str:
    """A changed energy period as a line of the ``energy`` measurement, timestamp in milliseconds."""
    return energy_line(change.device_id, change.period, device_type=change.device_type, precision=PRECISION)


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds (the delta-seconds form; an HTTP date is taken as unknown)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


class InfluxSink[T = TelemetryOut]:
    """Writes batches of rows to one bucket; use as ``async with InfluxSink(...) as sink``.

    Rows are readings (:func:`to_line`) unless *line* says how to write them."""

    def __init__(
        self,
        url: str,
        org: str,
        bucket: str,
        token: str,
        *,
        timeout_s: float,
        gzip: bool,
        line: Callable[[T], str] | None = None,
    ) -> None:
        # Without *line*, T is its default, TelemetryOut.
        self._line = line if line is not None else cast("Callable[[T], str]", to_line)
        self._url = url
        self._org = org
        self._bucket = bucket
        self._token = token
        self._timeout_ms = int(timeout_s * 1000)
        self._gzip = gzip
        self._client: InfluxDBClientAsync | None = None

    def __repr__(self) -> str:
        return f"InfluxSink(url={self._url!r}, org={self._org!r}, bucket={self._bucket!r})"

    async def __aenter__(self) -> Self:
        self._client = InfluxDBClientAsync(
            url=self._url, token=self._token, org=self._org, timeout=self._timeout_ms, enable_gzip=self._gzip
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        client, self._client = self._client, None
        if client is not None:
            # Shielded (bounded): a cancelled forwarder must still close its HTTP session.
            with anyio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                await client.close()

    async def send(self, rows: Sequence[T]) -> None:
        if self._client is None:
            raise RuntimeError("InfluxSink used outside its async with block")
        lines = [self._line(r) for r in rows]
        try:
            await self._client.write_api().write(
                bucket=self._bucket, org=self._org, record="\n".join(lines), write_precision=PRECISION
            )
        except ApiException as exc:
            headers: Mapping[str, str] = exc.headers or {}
            message = _influx_message(exc.body) or exc.reason or ""
            raise SinkError(
                SINK,
                f"HTTP {exc.status} {message}".strip(),
                retry_after=retry_after_seconds(headers.get("Retry-After")),
            ) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise SinkError(SINK, f"{type(exc).__name__}: {exc or 'no answer in time'}") from None


def _influx_message(body: object) -> str:
    """InfluxDB's JSON error ``message`` (or the start of the body), never more than 200 characters."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if not isinstance(body, str) or not body:
        return ""
    try:
        doc = json.loads(body)
    except ValueError:
        return body[:200]
    return str(doc.get("message", ""))[:200] if isinstance(doc, dict) else body[:200]
