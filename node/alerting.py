"""The alert actor's place in the node: built from the settings, supervised, stopped last.

Kept out of ``node.app`` so that the composition root only wires it in: :func:`build_alerts`
(None when ``alerts_enabled`` is off), :func:`run_alerts` in the root task group, and
:func:`stop_alerts` once the device actors are drained, so that their last signals count.
"""

from __future__ import annotations

import logging

import anyio

from actors.alerts import AlertActor, AlertConfig
from actors.stats import AlertStats
from actors.supervisor import Restart, RestartIntensityExceeded, RestartPolicy, supervise
from node.config import Settings
from storage.interfaces import AlertStore

log = logging.getLogger(__name__)

#: Alerts are not what the node exists for: past this the actor stays down (its signals are
#: counted as dropped) and ingest goes on, unlike the storage writer, whose end stops the node.
RESTART_POLICY = RestartPolicy(restart=Restart.TRANSIENT, max_restarts=10, period=60.0)

#: At shutdown the actor saves its last changes; a store that hangs must not hold up the stop.
STOP_TIMEOUT_S = 10.0


def alert_config(settings: Settings) -> AlertConfig:
    return AlertConfig(
        offline_grace=settings.alert_offline_grace_s,
        gap_min_missing=settings.alert_gap_min_missing,
        quarantine_burst=settings.alert_quarantine_burst,
        quarantine_window=settings.alert_quarantine_window_s,
        acl_clear_after=settings.alert_acl_clear_after_s,
        stale_boot_clear_after=settings.alert_stale_boot_clear_after_s,
        implausible_clear_after=settings.alert_implausible_clear_after_s,
        disabled=settings.alert_rules_disabled,
    )


def build_alerts(settings: Settings, store: AlertStore, stats: AlertStats) -> AlertActor | None:
    return AlertActor(store, stats, alert_config(settings)) if settings.alerts_enabled else None


async def run_alerts(actor: AlertActor | None, done: anyio.Event) -> None:
    try:
        if actor is not None:
            await supervise("alerts", actor.run, RESTART_POLICY)
    except RestartIntensityExceeded:
        log.exception("the alert actor crashed too often; no alerts are raised or cleared until the node restarts")
    finally:
        if actor is not None:
            actor.mailbox.close()
        done.set()


async def stop_alerts(actor: AlertActor | None, done: anyio.Event) -> None:
    """Let the actor apply what is queued and save it; returns when it ended (or timed out)."""
    if actor is None:
        return
    actor.mailbox.close_sending()
    with anyio.move_on_after(STOP_TIMEOUT_S) as scope:
        await done.wait()
    if scope.cancelled_caught:
        log.warning("the alert actor did not stop within %g s; its last changes may be lost", STOP_TIMEOUT_S)
