"""The node's exception tree. Every error we raise on purpose is one of these.

::

    NodeError
    ├── ConfigError          a setting is missing or invalid (names the setting)
    ├── StartupError         a listener or file could not be opened (names which)
    ├── DeviceError          a device-level problem: unknown, revoked, bad identity
    │   ├── DeviceNotFound
    │   ├── DeviceExists
    │   ├── CommandConflict   an idempotency key came again with a different command
    │   └── DeviceLimitReached   registering one more would pass max_devices
    ├── StorageError         SQLite failed; the batch was not committed
    │   └── MigrationError   the schema could not be brought to the current version
    └── SinkError            a forwarder's sink (InfluxDB, S3) did not confirm a batch

It lives in ``storage`` because that is the bottom layer: every package may import it.
"""

from __future__ import annotations


class NodeError(Exception):
    """Base of every error the node raises on purpose."""


class ConfigError(NodeError):
    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting


class StartupError(NodeError):
    """The node could not start: a port is taken, the data directory is not writable…"""


class DeviceError(NodeError):
    def __init__(self, device_id: str, message: str) -> None:
        super().__init__(f"{device_id}: {message}")
        self.device_id = device_id


class DeviceNotFound(DeviceError):  # noqa: N818 - reads as what happened
    def __init__(self, device_id: str) -> None:
        super().__init__(device_id, "no such device")


class DeviceExists(DeviceError):  # noqa: N818
    def __init__(self, device_id: str) -> None:
        super().__init__(device_id, "device already registered")


class DeviceLimitReached(DeviceError):  # noqa: N818
    def __init__(self, device_id: str, limit: int) -> None:
        super().__init__(device_id, f"the node already holds its maximum of {limit} devices")
        self.limit = limit


class StorageError(NodeError):
    """SQLite failed; nothing of the batch was committed."""


class MigrationError(StorageError):
    pass


class CommandConflict(DeviceError):  # noqa: N818
    """The idempotency key was used before, for this device, with a different command."""

    def __init__(self, device_id: str, idempotency_key: str, command_id: str) -> None:
        super().__init__(device_id, f"idempotency key {idempotency_key!r} was used for command {command_id}")
        self.idempotency_key = idempotency_key
        self.command_id = command_id


class SinkError(NodeError):
    """A sink did not confirm a batch; the forwarder retries it. The message never holds a secret.

    ``retry_after``: seconds the sink asked to wait (HTTP ``Retry-After``), when it said so.
    """

    def __init__(self, sink: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(f"{sink}: {message}")
        self.sink = sink
        self.retry_after = retry_after
