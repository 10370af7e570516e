"""``/api/v1/devices/{id}/energy``: a device's energy per period (``docs/energy.md``).

The energy aggregator keeps 5-minute periods in ``energy_periods``; this route reads them, or
sums them into hours and UTC days in SQL. It answers every period of the range, also those
with no data (0 and incomplete), so a gap is visible rather than silently absent.

Ranges are bounded per period length (:data:`MAX_SPAN`) so that one request reads at most a few
hundred thousand rows and answers a few thousand items.
"""

from __future__ import annotations

import time
from datetime import timedelta
from http import HTTPStatus
from typing import Any, Final

from quart import Blueprint
from quart_schema import tag_blueprint, validate_querystring, validate_response

from actors.energy import PERIODS, period_of
from storage.records import EnergyPeriod
from web.auth import requires
from web.context import services
from web.errors import RANGE_TOO_LARGE, ApiError
from web.models import AcEnergyItem, EnergyItem, EnergyPage, EnergyQuery, ms_to_ts, ts_to_ms_ceil
from web.openapi import documents_problems
from web.routes.devices import find_device

bp = Blueprint("energy", __name__, url_prefix="/api/v1/devices")
tag_blueprint(bp, ["energy"])

DAY_MS: Final = 86_400_000
#: The longest range per period length: 7 days of 5-minute periods (2,016 items), 93 days of
#: hours (2,232), 1,096 days (3 years) of days.
MAX_SPAN: Final = {"5m": 7 * DAY_MS, "1h": 93 * DAY_MS, "1d": 1096 * DAY_MS}
#: The range when ``from`` is not given: a day of 5-minute periods or hours, 31 days of days.
DEFAULT_SPAN: Final = {"5m": DAY_MS, "1h": DAY_MS, "1d": 31 * DAY_MS}


@bp.get("/<device_id>/energy")
@requires("viewer")
@validate_querystring(EnergyQuery)
@validate_response(EnergyPage)
@documents_problems(HTTPStatus.NOT_FOUND, HTTPStatus.UNPROCESSABLE_CONTENT)
async def device_energy(device_id: str, query_args: EnergyQuery) -> EnergyPage:
    """A device's consumed and regenerated energy per period (reactive too for AC meters), oldest first.

    The periods are those that overlap `from <= t < to`, aligned to UTC. `complete` is false
    when readings do not cover the whole period or something in it is uncertain.
    """
    device, _ = await find_device(device_id)
    name = query_args.period
    size = PERIODS[name]
    to_ms = ts_to_ms_ceil(query_args.to) if query_args.to is not None else int(time.time() * 1000) + 1
    end = period_of(to_ms - 1, size) + size
    start = (
        period_of(ts_to_ms_ceil(query_args.from_), size) if query_args.from_ is not None else end - DEFAULT_SPAN[name]
    )
    if end - start > MAX_SPAN[name]:
        limit = timedelta(milliseconds=MAX_SPAN[name]).days
        raise ApiError(
            HTTPStatus.UNPROCESSABLE_CONTENT,
            f"the range covers {(end - start) // size} periods of {name}; the most is {limit} days of them",
            type_=RANGE_TOO_LARGE,
        )
    periods = await services().reader.energy(device_id, start, end, size)
    if device.type == "ac_meter":
        return EnergyPage(device_id=device_id, period=name, items=[_ac_item(p, size) for p in periods])
    return EnergyPage(device_id=device_id, period=name, items=[EnergyItem(**_fields(p, size)) for p in periods])


def _fields(p: EnergyPeriod, size: int) -> dict[str, Any]:
    return {
        "start": ms_to_ts(p.start_ms),
        "end": ms_to_ts(p.start_ms + size),
        "consumed_kwh": p.consumed_kwh,
        "regenerated_kwh": p.regenerated_kwh,
        "covered_s": p.covered_ms / 1000,
        "complete": p.complete,
    }


def _ac_item(p: EnergyPeriod, size: int) -> AcEnergyItem:
    return AcEnergyItem(
        **_fields(p, size), reactive_import_kvarh=p.reactive_import_kvarh, reactive_export_kvarh=p.reactive_export_kvarh
    )
