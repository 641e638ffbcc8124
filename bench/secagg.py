"""What Flower's SecAgg+ costs per round, next to the same round without it (numpy model).

Run: ``nice -n 19 python -m bench.secagg [--params 24423 400000] [--rounds 4]``. Flower's own
example set-up (legacy ``FedAvg`` + ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))``
on the server, ``secaggplus_mod`` on a ``NumPyClient``) on the Simulation Engine with 3 sites,
whose "training" adds a constant to one float32 vector of ``--params`` values; the baseline is
the same apps with the plain ``DefaultWorkflow``. It measures the protocol, not our model: a
site's real training time comes on top of both. Results: ``bench/results/secagg.json`` and
the ``## Secure aggregation (Flower SecAgg+)`` section of ``bench/RESULTS.md``. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._report import machine, update_section

HERE = Path(__file__).resolve().parent
TITLE = "Secure aggregation (Flower SecAgg+)"
SITES = 3


def _apps(params: int, rounds: int, secagg: bool, timings: list[float]):
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.server.workflow.default_workflows import default_fit_workflow

    class Site(NumPyClient):
        def fit(self, parameters, config):
            return [p + np.float32(0.01) for p in parameters], 10, {}

    def client_fn(context: Context):
        return Site().to_client()

    client = ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if secagg else [])
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=SITES,
                          min_available_clients=SITES,
                          initial_parameters=ndarrays_to_parameters(
                              [np.zeros(params, np.float32)]))
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds),
                               strategy=strategy)
        fit = SecAggPlusWorkflow(num_shares=SITES, reconstruction_threshold=2) if secagg \
            else default_fit_workflow

        def timed_fit(grid: Grid, context: Context) -> None:
            start = time.monotonic()
            fit(grid, context)
            timings.append(time.monotonic() - start)

        DefaultWorkflow(fit_workflow=timed_fit)(grid, legacy)

    return server, client


def run(params: int, rounds: int, secagg: bool) -> float:
    """Median seconds of a fit round, the first left out (it starts the site actors)."""
    from server.simulation import simulate

    timings: list[float] = []
    server, client = _apps(params, rounds, secagg, timings)
    simulate(server, client, num_sites=SITES, parallel=SITES)
    return float(np.median(timings[1:]))


def markdown(doc: dict[str, Any]) -> str:
    """The RESULTS.md section."""
    lines = [f"`python -m bench.secagg` ({doc['date']}), under `nice -n 19`: Flower's SecAgg+ "
             f"example set-up (legacy FedAvg, `SecAggPlusWorkflow(num_shares={SITES}, "
             "reconstruction_threshold=2)`, `secaggplus_mod`) on the Simulation Engine, "
             f"{SITES} sites, {doc['rounds']} fit rounds of a numpy vector (the sites only add "
             "a constant: protocol cost, no training); median seconds of a fit round, the "
             "first (which starts the site actors) left out.", "",
             f"- Machine: {doc['machine']['summary']}; load {doc['load_end']} at the end "
             "(other jobs share the 2 cores: figures are noisy).", "",
             "| parameters | plain round (s) | SecAgg+ round (s) | ratio | messages per site "
             "per round (plain / SecAgg+) |", "|---:|---:|---:|---:|---|"]
    for row in doc["rows"]:
        lines.append(f"| {row['params']} | {row['plain_s']:.2f} | {row['secagg_s']:.2f} | "
                     f"{row['secagg_s'] / row['plain_s']:.1f}× | 1 / 4 (setup, share keys, "
                     "masked vectors, unmask) |")
    lines += ["", "- Why it is not in qanafed's rounds: `deploy/README.md`, \"Secure "
              "aggregation\". Raw numbers: `bench/results/secagg.json`."]
    if doc.get("verdict"):
        lines += ["", doc["verdict"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Run the bench and write its JSON and RESULTS.md section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, nargs="+", default=[24_423, 400_000])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    doc: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
                           "rounds": args.rounds, "rows": []}
    for params in args.params:
        plain = run(params, args.rounds, secagg=False)
        secagg = run(params, args.rounds, secagg=True)
        doc["rows"].append({"params": params, "plain_s": plain, "secagg_s": secagg})
    doc["load_end"] = round(os.getloadavg()[0], 2)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "secagg.json").write_text(json.dumps(doc, indent=1))
    update_section(HERE / "RESULTS.md", TITLE, markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
