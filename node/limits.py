"""The limit settings (ADR 0011) turned into the objects that enforce them.

Per-device MQTT rates are enforced by :class:`actors.limits.DeviceLimiter` in the broker
bridge, HTTP rates by :mod:`web.limits`, connection limits by :mod:`node.guard`, the device
count by the registration route.
"""

from __future__ import annotations

from actors.limits import DeviceLimits
from node.config import Settings
from web.limits import HttpRateLimits


def device_limits(settings: Settings) -> DeviceLimits:
    return DeviceLimits(
        messages_per_s=settings.device_max_messages_per_s,
        messages_burst=settings.device_burst_messages,
        bytes_per_s=settings.device_max_bytes_per_s,
        bytes_burst=settings.device_burst_bytes,
    )


def http_rate_limits(settings: Settings) -> HttpRateLimits:
    return HttpRateLimits(
        per_key_per_s=settings.http_rate_limit_per_s,
        per_key_burst=settings.http_rate_limit_burst,
        anonymous_per_s=settings.http_anonymous_rate_limit_per_s,
        anonymous_burst=settings.http_anonymous_rate_limit_burst,
    )
