"""Run a ServerApp and ClientApp on Flower's Simulation Engine (Ray), sized for small machines."""

from __future__ import annotations

import logging
import os

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from common.log import get_logger

log = get_logger("server.simulation")

#: One TF/BLAS thread per simulated site; Ray workers inherit these from this process.
THREAD_ENV = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "OMP_NUM_THREADS": "1"}

#: Ray starts workers at niceness 15, so on a busy machine the simulated sites — which do all
#: the work of a simulation — get only the CPU left over by everything else. Run them at the
#: caller's priority instead (``RAY_worker_niceness`` is read when Ray starts).
RAY_ENV = {"RAY_worker_niceness": "0"}


def backend_config(parallel: int, memory_gb: float | None = None) -> dict:
    """Ray backend config: ``parallel`` site actors of one CPU each, no dashboard, quiet logs.

    Parameters
    ----------
    parallel : int
        Sites trained at the same time (each holds a TensorFlow process, ~1 GB).
    memory_gb : float | None (default: None)
        Cap on Ray's object store, in GB.
    """
    init_args: dict = {"num_cpus": int(parallel), "num_gpus": 0, "include_dashboard": False,
                       "logging_level": logging.WARNING, "log_to_driver": True}
    if memory_gb:
        init_args["object_store_memory"] = int(memory_gb * 1024**3)
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": init_args}


def simulate(
    server_app: ServerApp,
    client_app: ClientApp,
    num_sites: int,
    parallel: int | None = None,
    verbose: bool = False,
) -> None:
    """Run the apps with ``num_sites`` simulated SuperNodes (node config: ``partition-id``).

    Parameters
    ----------
    server_app : ServerApp
        The ServerApp (its exceptions are re-raised here).
    client_app : ClientApp
        The ClientApp.
    num_sites : int
        Number of simulated SuperNodes.
    parallel : int | None (default: None)
        Concurrent site actors; all sites when None.
    verbose : bool (default: False)
        Flower debug logging.
    """
    import ray
    from flwr.simulation import run_simulation

    for key, value in {**THREAD_ENV, **RAY_ENV}.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():  # a previous run in this process left Ray up
        ray.shutdown()
    cfg = backend_config(parallel or num_sites)
    log.info("simulation: %d sites, %d in parallel", num_sites, cfg["init_args"]["num_cpus"])
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_sites,
                       backend_config=cfg, verbose_logging=verbose)
    finally:
        if ray.is_initialized():
            ray.shutdown()
