"""``/api/v1/forwarders``: the InfluxDB (readings, energy periods) and S3 forwarders, their backlog
and their last errors.

Read from the forwarders' own counters (:class:`actors.stats.ForwarderStats`), which their
monitors refresh every ``forward_monitor_interval_s``: a request makes no query, so polling it
costs the node nothing. Errors shown here never hold a secret (the sinks leave tokens and keys
out of their messages).
"""

from __future__ import annotations

import time

from quart import Blueprint
from quart_schema import tag_blueprint, validate_response

from web.auth import requires
from web.context import services
from web.models import ForwarderList, ForwarderStatus

bp = Blueprint("forwarders", __name__, url_prefix="/api/v1/forwarders")
tag_blueprint(bp, ["forwarders"])


@bp.get("")
@requires("viewer")
@validate_response(ForwarderList)
async def list_forwarders() -> ForwarderList:
    """Every forwarder, by name: enabled, position, backlog, last success and last error."""
    now = time.time()
    forwarders = services().stats.forwarders
    return ForwarderList(items=[ForwarderStatus.from_stats(name, s, now) for name, s in sorted(forwarders.items())])
