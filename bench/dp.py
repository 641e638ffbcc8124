"""Balanced accuracy against ε: a small federation trained at a few DP noise levels.

Run: ``nice -n 19 python -m bench.dp [--data SPEC] [--noise 0.01 0.1 1] [--clip C]`` (a few
minutes on 2 shared cores). Every run is ``qanafed sim``'s apps on Flower's Simulation Engine
(3 sites, :mod:`client.mods` clipping and noising each site's update on the site), the float
reference variant (warm-up rounds only, so each run takes about a minute), and the same seed;
only ``dp`` differs. ε is what the run's ``report.json`` says (dp-accounting, RDP) for the
rounds each site took part in. Writes ``bench/results/dp.json`` and the ``## Differential
privacy`` section of ``bench/RESULTS.md``. Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

for _var in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one thread, as each simulated site has

import common  # noqa: E402,F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from bench._report import machine, update_section  # noqa: E402
from common.log import get_logger  # noqa: E402

log = get_logger("bench.dp")
HERE = Path(__file__).resolve().parent
TITLE = "Differential privacy"


def scenario(data: str, rounds: int, dp: dict[str, Any] | None, keys: Path) -> Any:
    """The bench scenario: 3 sites, qana-float 32 px width 0.25, ``rounds`` warm-up rounds."""
    from common.fedconfig import parse_config

    return parse_config({
        "name": "bench-dp", "data": data, "partition": {"scheme": "natural", "sites": 3},
        "model": {"variant": "qana-float", "size": 32, "width": 0.25, "depth": 1},
        "rounds": {"warmup": rounds, "qat": 0}, "local-epochs": 1, "batch-size": 16,
        "lr": 3e-3, "balance": "oversample", "explain-images": 0,
        "quorum": {"min-sites": 3, "min-replies": 3},
        "timeouts": {"connect": 300, "round": 600}, "metrics-key": str(keys / "metrics.pub"),
        "seed": 0, **({"dp": dp} if dp else {}),
    })


def run(cfg: Any, out: Path, keys: Path) -> dict[str, Any]:
    """Run one simulation; return its final scores, ε per site and wall time."""
    from client.client_app import app as client_app
    from server.server_app import make_server_app
    from server.simulation import simulate

    start = time.monotonic()
    simulate(make_server_app({"scenario-config": cfg, "out-dir": str(out),
                              "metrics-private-key": str(keys / "metrics.key")}),
             client_app, num_sites=3, parallel=2)
    report = json.loads((out / "report.json").read_text())
    final = report["final"] or {}
    privacy = report["privacy"]
    eps = [s["epsilon"] for s in privacy["sites"].values()]
    return {
        "balanced_accuracy": (final.get("global") or {}).get("test.balanced_accuracy"),
        "macro_f1": (final.get("global") or {}).get("test.macro_f1"),
        "epsilon": None if not eps or None in eps else max(eps),
        "delta": privacy.get("delta"),
        "rounds_per_site": sorted({s["rounds"] for s in privacy["sites"].values()}),
        "seconds": round(time.monotonic() - start, 1),
    }


def _f(x: Any, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def markdown(doc: dict[str, Any]) -> str:
    """The RESULTS.md section."""
    m = doc["machine"]
    lines = [f"`python -m bench.dp` ({doc['date']}), run under `nice -n 19`.", "",
             f"- Scenario: `{doc['data']}`, 3 sites (natural partition), qana-float 32 px width "
             f"0.25 depth 1, {doc['rounds']} warm-up rounds of 1 local epoch (Adam 3e-3, batch "
             "16, oversampled), seed 0; balanced accuracy = example-weighted mean of the sites' "
             "local test splits (final round, float global model).",
             f"- DP: each site clips its whole update (trainable weights and BN statistics) to "
             f"L2 norm {doc['clip']} and adds N(0, (z·clip)²) per coordinate before sending; ε "
             f"from dp-accounting's RDP accountant at δ = {doc['delta']}, for the rounds each "
             "site took part in (all of them; sampling rate 1).",
             f"- Machine: {m['summary']}; load average {doc['load_end']} at the end (a long "
             "training job shares the 2 cores).", "",
             "| noise multiplier z | ε (per site) | balanced accuracy | macro F1 | s |",
             "|---:|---:|---:|---:|---:|"]
    for row in doc["rows"]:
        z = "off" if row["noise_multiplier"] is None else _f(row["noise_multiplier"])
        eps = "∞ (no DP)" if row["noise_multiplier"] is None else _f(row["epsilon"])
        lines.append(f"| {z} | {eps} | {_f(row['balanced_accuracy'])} | "
                     f"{_f(row['macro_f1'])} | {row['seconds']} |")
    lines += ["", f"- Chance level: {_f(doc.get('chance'))} (1 / classes present).",
              "- Raw numbers: `bench/results/dp.json`."]
    if doc.get("verdict"):
        lines += ["", doc["verdict"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Run the bench and write its JSON and RESULTS.md section."""
    from common.metrics_crypto import save_metrics_keypair

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="synthetic:n=360,size=32,sites=3,seed=0")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.003, 0.03, 0.3, 1.0])
    parser.add_argument("--verdict", default="")
    args = parser.parse_args(argv)
    doc: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
                           "data": args.data, "rounds": args.rounds, "clip": args.clip,
                           "delta": args.delta, "rows": [], "verdict": args.verdict}
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys"
        save_metrics_keypair(keys / "metrics.key", keys / "metrics.pub")
        for z in [None, *args.noise]:
            dp = None if z is None else {"enabled": True, "clip": args.clip,
                                         "noise-multiplier": z, "delta": args.delta}
            out = Path(tmp) / f"run-{z}"
            row = run(scenario(args.data, args.rounds, dp, keys), out, keys)
            row["noise_multiplier"] = z
            doc["rows"].append(row)
            if z is None:
                final = json.loads((out / "report.json").read_text())["final"]["sites"]
                counts = [sum(sum(r) for r in m["test"]["confusion_matrix"]) for m in
                          final.values()]
                present = {i for m in final.values()
                           for i, r in enumerate(m["test"]["confusion_matrix"]) if sum(r)}
                doc["chance"] = 1.0 / len(present) if present and sum(counts) else None
            log.info("z=%s: %s", z, row)
    doc["load_end"] = round(os.getloadavg()[0], 2)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "dp.json").write_text(json.dumps(doc, indent=1))
    update_section(HERE / "RESULTS.md", TITLE, markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
