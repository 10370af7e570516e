"""The S3 archive sink: raw payloads as gzip-compressed JSON Lines, one object per device, time
window and batch, written through aioboto3 (AWS, MinIO or any S3-compatible endpoint).

Key of an object (all parts deterministic)::

    {prefix}{device_id}/{YYYY}/{MM}/{DD}/{HHMMSS}Z-{first_id}.jsonl.gz

``HHMMSS`` is the start of the receipt-time window (UTC) and ``first_id`` the rowid that starts
the batch (12 digits). The S3 source (:class:`storage.outbox.RawSource`) hands out only messages
of windows that have closed, as a prefix of what follows the cursor. A batch after a restart
starts at the same cursor, so its first rowid and its keys are the same, and each of its
objects holds every line the earlier object of that key held (a window that has closed gets no
new messages): the rewrite replaces the object whole and loses nothing. Objects are compressed
with ``mtime=0``, so the same lines give the same bytes. Only a smaller ``s3_batch_rows`` between
two runs can split a window differently: then lines may be archived twice, in two objects,
never lost; every line carries its rowid (``id``) to tell them apart.

A line::

    {"id": 42, "device_id": "emu-4021-m1", "topic": "iot/emu-4021-m1/telemetry",
     "received_at": "2026-11-23T16:05:00.012Z", "payload": "{\\"v\\": 2, …}", "quarantine": []}

``payload`` is the payload as text when it is UTF-8, else ``payload_base64`` holds it;
``quarantine`` lists ``{"reason", "detail"}`` for what of it was quarantined.

Credentials go to aioboto3 only; errors (:class:`storage.errors.SinkError`) carry the S3 error
code and HTTP status, never a credential.
"""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import Sequence
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

import aioboto3
import aiohttp
import anyio
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError

from storage.contract import format_ts
from storage.errors import SinkError
from storage.records import RawOut

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

SINK: Final = "s3"
#: Objects of one batch uploaded at once: enough to hide round trips, few enough for a thin WAN.
UPLOAD_CONCURRENCY: Final = 8
CLOSE_TIMEOUT_S: Final = 5.0


def window_start(received_at: float, window: float) -> float:
    return received_at // window * window


def object_key(prefix: str, device_id: str, window_at: float, first_id: int) -> str:
    start = datetime.fromtimestamp(window_at, UTC)
    return f"{prefix}{device_id}/{start:%Y/%m/%d/%H%M%S}Z-{first_id:012d}.jsonl.gz"


def to_line(row: RawOut) -> dict[str, Any]:
    line: dict[str, Any] = {
        "id": row.id,
        "device_id": row.device_id,
        "topic": row.topic,
        "received_at": format_ts(datetime.fromtimestamp(row.received_at, UTC)),
    }
    try:
        line["payload"] = row.payload.decode("utf-8")
    except UnicodeDecodeError:
        line["payload_base64"] = base64.b64encode(row.payload).decode("ascii")
    line["quarantine"] = [{"reason": r, "detail": d} for r, d in row.quarantine]
    return line


def build_objects(rows: Sequence[RawOut], prefix: str, window: float) -> dict[str, bytes]:
    """Key → gzip-compressed JSON Lines body, for one batch (see the module docs)."""
    if not rows:
        return {}
    first_id = rows[0].id
    groups: dict[str, list[RawOut]] = {}
    for row in rows:
        key = object_key(prefix, row.device_id, window_start(row.received_at, window), first_id)
        groups.setdefault(key, []).append(row)
    return {
        key: gzip.compress(
            b"".join(json.dumps(to_line(r), separators=(",", ":")).encode() + b"\n" for r in group), mtime=0
        )
        for key, group in groups.items()
    }


class S3Sink:
    """Archives batches of raw messages; use as ``async with S3Sink(...) as sink``."""

    def __init__(
        self,
        *,
        bucket: str,
        prefix: str,
        window: float,
        endpoint_url: str | None,
        region: str,
        path_style: bool,
        access_key_id: str | None,
        secret_access_key: str | None,
        timeout_s: float,
    ) -> None:
        self._bucket = bucket
        self._prefix = prefix
        self._window = window
        self._endpoint_url = endpoint_url
        # Without keys, boto's default chain (environment, shared files, instance role) applies.
        self._session = aioboto3.Session(
            aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key, region_name=region
        )
        self._config = AioConfig(
            s3={"addressing_style": "path" if path_style else "auto"},
            # The forwarder retries, with backoff, for as long as it takes; boto must not as well.
            retries={"max_attempts": 1, "mode": "standard"},
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
        )
        self._stack = AsyncExitStack()
        self._client: S3Client | None = None

    def __repr__(self) -> str:
        return f"S3Sink(endpoint={self._endpoint_url!r}, bucket={self._bucket!r}, prefix={self._prefix!r})"

    async def __aenter__(self) -> Self:
        self._client = await self._stack.enter_async_context(
            self._session.client("s3", endpoint_url=self._endpoint_url, config=self._config)
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._client = None
        # Shielded (bounded): a cancelled forwarder must still close its HTTP session.
        with anyio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            await self._stack.aclose()

    async def send(self, rows: Sequence[RawOut]) -> None:
        objects = build_objects(rows, self._prefix, self._window)
        limiter = anyio.CapacityLimiter(UPLOAD_CONCURRENCY)
        errors: list[SinkError] = []

        async def put(key: str, body: bytes) -> None:
            async with limiter:
                try:
                    await self._put(key, body)
                except SinkError as exc:
                    errors.append(exc)

        async with anyio.create_task_group() as tg:
            for key, body in objects.items():
                tg.start_soon(put, key, body)
        if errors:
            raise SinkError(SINK, f"{len(errors)} of {len(objects)} objects not stored; first: {errors[0]}")

    async def _put(self, key: str, body: bytes) -> None:
        if self._client is None:
            raise RuntimeError("S3Sink used outside its async with block")
        try:
            await self._client.put_object(Bucket=self._bucket, Key=key, Body=body, ContentType="application/gzip")
        except ClientError as exc:
            error = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            raise SinkError(SINK, f"{key}: HTTP {status} {error.get('Code', '')} {error.get('Message', '')}") from None
        except (BotoCoreError, aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise SinkError(SINK, f"{key}: {type(exc).__name__}: {exc}") from None
