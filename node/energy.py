"""The energy aggregator's place in the node: built from the settings, supervised, stopped with it.

Kept out of ``node.app`` so that the composition root only wires it in: :func:`build_energy`
(None when ``energy_enabled`` is off) and :func:`run_energy` in the root task group. It reads
telemetry through its own read-only connection and writes through the writer connection, so
it needs the :class:`~storage.sqlite.SqliteStore`; it is cancelled with the task group at
shutdown, and resumes from its cursor at the next start.
"""

from __future__ import annotations

import logging
from pathlib import Path

from actors.energy_aggregator import EnergyAggregator, EnergyConfig
from actors.stats import EnergyStats
from actors.supervisor import Restart, RestartIntensityExceeded, RestartPolicy, supervise
from node.config import Settings
from storage.energy import SqliteEnergyStore
from storage.sqlite import SqliteStore

log = logging.getLogger(__name__)

#: Energy is derived data: past this the aggregator stays down (the API serves what it wrote)
#: and ingest goes on. It catches up from its cursor after the next start.
RESTART_POLICY = RestartPolicy(restart=Restart.PERMANENT, max_restarts=10, period=60.0)


def energy_config(settings: Settings) -> EnergyConfig:
    return EnergyConfig(
        max_interval_ms=round(settings.energy_max_interval_s * 1000), poll_interval=settings.energy_poll_s
    )


def build_energy(
    settings: Settings, db: Path, store: SqliteStore, stats: EnergyStats
) -> tuple[EnergyAggregator, SqliteEnergyStore] | None:
    if not settings.energy_enabled:
        return None
    config = energy_config(settings)
    energy_store = SqliteEnergyStore(db, store, max_interval_ms=config.max_interval_ms)
    return EnergyAggregator(energy_store, stats, config), energy_store


async def run_energy(energy: tuple[EnergyAggregator, SqliteEnergyStore] | None) -> None:
    if energy is None:
        return
    try:
        await supervise("energy", energy[0].run, RESTART_POLICY)
    except RestartIntensityExceeded:
        log.exception("the energy aggregator crashed too often; energy periods are not updated until the node restarts")
