"""Run a ServerApp and ClientApp on Flower's Simulation Engine (Ray), sized for small machines."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

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


def backend_config(
    parallel: int, memory_gb: float | None = None, *, worker_output: bool = False
) -> dict:
    """Ray backend config: ``parallel`` site actors of one CPU each, no dashboard, quiet logs.

    Parameters
    ----------
    parallel : int
        Sites trained at the same time (each holds a TensorFlow process, ~1 GB).
    memory_gb : float | None (default: None)
        Cap on Ray's object store, in GB.
    worker_output : bool (default: False)
        Echo the site actors' stdout/stderr (TensorFlow's start-up lines included) on the
        console; otherwise it stays in Ray's session logs. A site's errors reach the
        coordinator as error replies either way.
    """
    init_args: dict = {"num_cpus": int(parallel), "num_gpus": 0, "include_dashboard": False,
                       "logging_level": logging.WARNING, "log_to_driver": bool(worker_output)}
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
    cfg = backend_config(parallel or num_sites, worker_output=verbose)
    log.info("simulation: %d sites, %d in parallel", num_sites, cfg["init_args"]["num_cpus"])
    try:
        with warnings.catch_warnings(), _quiet_flower(not verbose):
            # Ray's FutureWarning about accelerator variables concerns GPUs we never ask for.
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\.")
            run_simulation(server_app=server_app, client_app=client_app,
                           num_supernodes=num_sites, backend_config=cfg, verbose_logging=verbose)
    finally:
        if ray.is_initialized():
            ray.shutdown()


class _FlowerWarningsOnly(logging.Filter):
    """Pass Flower's warnings and errors, except its notice that ``run_simulation`` is deprecated.

    Flower's INFO lines (app start, "aggregate_train: Received 3 results") repeat what the
    qanafed progress table shows; ``--verbose-flower`` brings them back.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and "DEPRECATED FEATURE" not in record.getMessage()


@contextlib.contextmanager
def _quiet_flower(active: bool) -> Iterator[None]:
    """Keep Flower's INFO lines and deprecation notice off the console while active."""
    flwr_log = logging.getLogger("flwr")
    drop = _FlowerWarningsOnly()
    if active:
        flwr_log.addFilter(drop)
    try:
        yield
    finally:
        flwr_log.removeFilter(drop)
