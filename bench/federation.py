"""Federated (FedAvg, FedProx, FedAdam on Flower) vs pooled vs each site alone on HAM10000 sites.

Run: ``python -m bench.federation [--data PATH] [--methods ...] [budget options]`` (hours on 2
shared cores for every method; run it with ``nohup``). Writes ``bench/results/federation.json``
and the ``## Federation`` section of ``bench/RESULTS.md`` after every method, so an interrupted
run leaves labelled partial results. Results are merged by method: rows of methods this run did
not re-run are kept from the JSON (``--fresh`` drops them), each row carrying its own budget.

Every method trains with the same site-side code (:mod:`common.site`: balancing, augmentation,
float epochs, federated calibration, QAT epochs, Akida conversion) and the same epoch budget;
only where the data is differs:

* **federated**: ``qanafed sim``'s apps on Flower's Simulation Engine, 4 natural sites;
* **pooled**: one "site" holding every site's training split (centralized training);
* **site alone**: each site trains on its own training split only.

Each final Akida model is scored on the same test images: the union of the 4 sites'
lesion-grouped test splits (and on each site's split). Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path
from typing import Any

for _var in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one thread, as each simulated site has

import numpy as np  # noqa: E402

import common  # noqa: E402,F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from bench._procmem import PeakMemory  # noqa: E402
from bench._report import machine, update_section  # noqa: E402
from common.log import get_logger  # noqa: E402

log = get_logger("bench.federation")
HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1] / "shared" / "data" / "ham10000"
STRATEGIES = ("fedavg", "fedprox", "fedadam")
METHODS = ("fedavg", "pooled", "alone", "fedprox", "fedadam")


# -- data -----------------------------------------------------------------------------------------
def capped_copy(data: Path, work: Path, site: str, label: str, cap: int, seed: int) -> Path:
    """A HAM10000 folder keeping at most ``cap`` images of ``label`` at ``site`` (whole lesions).

    The metadata CSV is filtered; image folders are symlinked, nothing is copied.
    """
    from common.loaders.ham10000 import IMAGE_DIRS, METADATA_CSV

    with open(data / METADATA_CSV, newline="") as fh:
        rows = list(csv.DictReader(fh))
    present = {p.stem for d in IMAGE_DIRS if (data / d).is_dir() for p in (data / d).iterdir()}
    capped = [r for r in rows if r["dataset"] == site and r["dx"] == label
              and r["image_id"] in present]
    lesions: dict[str, list[dict]] = {}
    for r in capped:
        lesions.setdefault(r["lesion_id"], []).append(r)
    keep: set[str] = set()
    for lesion in np.random.default_rng(seed).permutation(sorted(lesions)):
        if len(keep) >= cap:
            break
        keep.update(r["image_id"] for r in lesions[lesion])
    drop = {r["image_id"] for r in capped} - keep
    work.mkdir(parents=True, exist_ok=True)
    with open(work / METADATA_CSV, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if r["image_id"] not in drop)
    for d in IMAGE_DIRS:
        if (data / d).is_dir() and not (work / d).exists():
            (work / d).symlink_to(data / d)
    log.info("capped %s/%s at %d images: dropped %d", site, label, cap, len(drop))
    return work


# -- in-process training (pooled, site alone) ----------------------------------------------------
def run_in_process(cfg: Any, data: Any) -> dict[str, Any]:
    """The federated protocol for ONE site without Flower: warm-up, calibration, QAT, convert."""
    from common import site
    from common.aggregate import combine_ranges
    from server.global_model import QanaGlobalModel

    gm = QanaGlobalModel(cfg, len(data.class_names))
    arrays = gm.initial_arrays()
    seconds: dict[str, list[float]] = {"warmup": [], "calibrate": [], "qat": []}
    step = 0
    for _ in range(cfg.rounds.warmup):
        step += 1
        t = time.perf_counter()
        out, _, _ = site.warmup(cfg, data, arrays, step, lr=cfg.lr, epochs=cfg.local_epochs)
        arrays = {**arrays, **out}
        seconds["warmup"].append(time.perf_counter() - t)
    step += 1
    t = time.perf_counter()
    ranges, _, _ = site.calibrate(cfg, data, arrays, step)
    arrays = gm.quantize(arrays, combine_ranges([ranges]))
    seconds["calibrate"].append(time.perf_counter() - t)
    for _ in range(cfg.rounds.qat):
        step += 1
        t = time.perf_counter()
        out, _, _ = site.qat(cfg, data, arrays, step, lr=cfg.qat_lr, epochs=cfg.qat_local_epochs)
        arrays = {**arrays, **out}
        seconds["qat"].append(time.perf_counter() - t)
    akida_model, _ = site.akida_from_arrays(cfg, len(data.class_names), arrays)
    return {"akida_model": akida_model, "round_seconds": seconds}


def pooled_site(sites: list[Any]) -> Any:
    """One site holding every site's training and test images."""
    from common.site import SiteData

    return SiteData("pooled", sites[0].class_names,
                    np.concatenate([s.x_train for s in sites]),
                    np.concatenate([s.y_train for s in sites]),
                    np.concatenate([s.x_test for s in sites]),
                    np.concatenate([s.y_test for s in sites]))


# -- federated (Flower simulation) ----------------------------------------------------------------
def run_federated(cfg: Any, out: Path, parallel: int) -> dict[str, Any]:
    """``qanafed sim``'s apps on the Simulation Engine; the saved global Akida model and report."""
    from client.client_app import app as client_app
    from common.convert import load_akida
    from common.metrics_crypto import save_metrics_keypair
    from server.server_app import make_server_app
    from server.simulation import simulate

    keys = out / "keys"
    save_metrics_keypair(keys / "metrics.key", keys / "metrics.pub", overwrite=True)
    cfg = cfg.model_copy(update={"metrics_key": str((keys / "metrics.pub").resolve())})
    simulate(make_server_app({"scenario-config": cfg, "out-dir": str(out),
                              "metrics-private-key": str(keys / "metrics.key")}),
             client_app, num_sites=cfg.partition.sites, parallel=parallel)
    report = json.loads((out / "report.json").read_text())
    rounds = [{k: r[k] for k in ("step", "phase", "seconds", "bytes_sent", "bytes_received")}
              for r in report["rounds"]]
    return {"akida_model": load_akida(out / "global_model.fbz"), "rounds": rounds,
            "phase_seconds": report["phase_seconds"], "report_wall_seconds":
            report["wall_seconds"]}


# -- scoring --------------------------------------------------------------------------------------
def score(akida_model: Any, sites: list[Any]) -> dict[str, Any]:
    """Balanced accuracy and macro F1 on the union of the site test splits, and per site."""
    from common.metrics import classification_metrics
    from common.tta import predict_classes

    names = sites[0].class_names
    preds = [predict_classes(akida_model, s.x_test.astype(np.uint8)) for s in sites]
    union = classification_metrics(np.concatenate([s.y_test for s in sites]),
                                   np.concatenate(preds), names)
    keep = ("accuracy", "balanced_accuracy", "macro_f1", "num_examples")
    return {"union": {k: union[k] for k in keep},
            "per_site": {s.site_id: {k: m[k] for k in keep} for s, m in zip(sites, (
                classification_metrics(s.y_test, p, names) for s, p in zip(sites, preds,
                                                                           strict=True)),
                strict=True)}}


# -- report ---------------------------------------------------------------------------------------
def _f(x: Any, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def short_budget(b: dict[str, Any]) -> str:
    """One table cell summarizing a row's budget (and its strategy's server settings)."""
    text = (f"{b['size']} px ×{b['width']}, {b['warmup']}×{b['local_epochs']} + "
            f"{b['qat']}×{b['qat_local_epochs']} ep, nv ≤ {b.get('nv_cap', '?')}")
    if "seed" in b and b["seed"] != 0:
        text += f", seed {b['seed']}"
    strategy = b.get("strategy") or {}
    if strategy.get("name") == "fedprox":
        text += f", mu {strategy['proximal-mu']}"
    elif strategy.get("name") == "fedadam":
        text += f", eta {strategy['server-lr']}, tau {strategy['tau']}"
    return text


def markdown(doc: dict[str, Any]) -> str:
    """The ``## Federation`` section of bench/RESULTS.md."""
    b, res = doc["budget"], doc["results"]
    sites = doc["sites"]
    mixed = any(r.get("budget", {}).get("date") != doc["date"] for r in res.values())
    lines = [
        f"`python -m bench.federation` ({doc['date']}){'' if doc['complete'] else ' — **PARTIAL: '}"
        f"{'' if doc['complete'] else 'the run did not finish all methods**'}",
        "",
        f"- Data: {doc['data']} — the 4 natural sites (`dataset` column); "
        f"{b['nv_cap_note']}. Per site: lesion-grouped train/test split "
        f"({int(b['test_fraction'] * 100)} % of lesions held out), the SAME split for every "
        "method; scores are on the union of the 4 test splits "
        f"({doc['test_images']} images) unless per site.",
        f"- Reduced budget (2 shared cores): {b['variant']} at {b['size']} px, width "
        f"{b['width']}, depth {b['depth']}; {b['warmup']} warm-up rounds × {b['local_epochs']} "
        f"float epochs, federated calibration ({b['calibration_samples']} images/site), "
        f"{b['qat']} QAT rounds × {b['qat_local_epochs']} epoch; batch {b['batch_size']}, Adam "
        f"{b['lr']} / QAT {b['qat_lr']}; oversampling and augmentation on every training split. "
        "Pooled and site-alone runs get the same epochs over their data, with the same site "
        "code, in one process.",
        f"- Strategies: FedAvg; FedProx (mu {b['proximal_mu']}); FedAdam (server lr "
        f"{b['server_lr']}, tau {b['tau']}, beta 0.9/0.99; Adam steps the trainable weights, "
        "BN statistics are example-weighted means). Weighted by training examples (after "
        "oversampling).",
        f"- Machine: {doc['machine']['summary']}.",
    ]
    if mixed:
        lines.append("- Rows come from several runs (`--methods` re-runs some): the budget "
                     "column gives each row's own; the bullets above are the latest run's "
                     f"({doc['date']}, methods: {', '.join(doc['methods_run'])}). Rows with "
                     "another nv cap or seed were scored on another test split.")
    lines += [
        "",
        "| method | Akida bal. acc. | Akida macro F1 | accuracy | "
        + " | ".join(f"bal. acc. {s}" for s in sites)
        + " | wall time (s) | peak PSS (GB) | budget |",
        "|---|---:|---:|---:|" + "---:|" * len(sites) + "---:|---:|---|",
    ]
    for name, r in res.items():
        u = r["score"]["union"]
        per = [r["score"]["per_site"].get(s, {}).get("balanced_accuracy") for s in sites]
        lines.append(f"| {name} | {_f(u['balanced_accuracy'])} | {_f(u['macro_f1'])} | "
                     f"{_f(u['accuracy'])} | " + " | ".join(_f(p) for p in per)
                     + f" | {_f(r.get('wall_seconds'), 0)} | {_f(r.get('peak_pss_gb'), 2)} | "
                     f"{short_budget(r['budget']) if 'budget' in r else '–'} |")
    fed = {k: v for k, v in res.items() if "rounds" in v}
    if fed:
        lines += ["", "Per federated round (mean over rounds of the phase): wall time, and the "
                  "same local training outside Flower (the site-alone runs' rounds, all sites "
                  "one after another, in one process).", "",
                  "| strategy | phase | Flower round (s) | sites in-process, sequential (s) | "
                  "ratio | bytes sent / round | bytes received / round |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for name, r in fed.items():
            for phase, o in r["overhead"].items():
                lines.append(f"| {name} | {phase} | {_f(o['flower_s'], 1)} | "
                             f"{_f(o.get('in_process_s'), 1)} | {_f(o.get('ratio'), 2)} | "
                             f"{o['bytes_sent']:,} | {o['bytes_received']:,} |")
    lines += ["", "- Ratio > 1 is the federation's overhead (message passing, Ray, per-process "
              "model build and graph tracing, sealing reports); < 1 means the 2 parallel site "
              "processes beat one process doing the sites in turn. The calibrate row's "
              "in-process column includes one server-side quantization per site (the "
              "federation does one in all), so it overstates the in-process cost.",
              "- Peak PSS is summed over the bench's process tree (the bench process, Ray and "
              "its site processes). The bench process does not give back the memory of its "
              "in-process runs, so the figure grows run after run: only the first method's "
              "(FedAvg, 2 site processes + the server in the bench process) is a clean "
              "federation figure.",
              "- Raw numbers: `bench/results/federation.json`."]
    return "\n".join(lines) + "\n"


def _overhead(fed: dict[str, Any], alone: dict[str, Any] | None) -> dict[str, Any]:
    out = {}
    for phase in ("warmup", "calibrate", "qat"):
        rounds = [r for r in fed["rounds"] if r["phase"] == phase]
        if not rounds:
            continue
        o: dict[str, Any] = {
            "flower_s": float(np.mean([r["seconds"] for r in rounds])),
            "bytes_sent": int(np.mean([r["bytes_sent"] for r in rounds])),
            "bytes_received": int(np.mean([r["bytes_received"] for r in rounds])),
        }
        if alone and all(a["round_seconds"].get(phase) for a in alone.values()):
            seq = sum(float(np.mean(a["round_seconds"][phase])) for a in alone.values())
            o["in_process_s"] = seq
            o["ratio"] = o["flower_s"] / seq if seq else None
        out[phase] = o
    return out


#: Budget keys that are not about local training (a strategy's server settings, bookkeeping).
_NOT_TRAINING = ("strategy", "date", "nv_cap_note", "server_lr", "tau", "proximal_mu")


def _training(budget: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in budget.items() if k not in _NOT_TRAINING}


def _same_training_alone(results: dict[str, Any], budget: dict[str, Any]) -> dict[str, Any]:
    """Site-alone rows trained with ``budget``'s local training (for the overhead table)."""
    return {name: r for name, r in results.items() if name.endswith(" alone")
            and "round_seconds" in r and _training(r.get("budget", {})) == _training(budget)}


def previous_results(path: Path, budget: dict[str, Any]) -> dict[str, Any]:
    """Result rows of an earlier run's JSON, each given its run's budget if it lacks its own."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    results = old.get("results", {})
    for name, r in results.items():
        if "budget" not in r:
            b = {**old.get("budget", {}), "date": old.get("date")}
            b.setdefault("nv_cap", _cap_from_note(b.get("nv_cap_note", "")))
            method = name if name in STRATEGIES else None
            r["budget"] = {**b, "strategy": _strategy(method, b) if method else None}
    log.info("kept %d result rows of %s (%s)", len(results), path, ", ".join(results))
    return results


def _cap_from_note(note: str) -> int | None:
    words = note.split()
    return int(words[words.index("at") + 1]) if "at" in words else None


def _strategy(method: str, budget: dict[str, Any]) -> dict[str, Any]:
    """The scenario's ``strategy`` section for a federated method, from the budget."""
    strategy: dict[str, Any] = {"name": method}
    if method == "fedprox":
        strategy["proximal-mu"] = budget["proximal_mu"]
    if method == "fedadam":
        strategy["server-lr"] = budget["server_lr"]
        strategy["tau"] = budget.get("tau", 1e-3)
    return strategy


def _complete(results: dict[str, Any], sites: list[str]) -> bool:
    wanted = {"fedavg", "fedprox", "fedadam", "pooled", *(f"{s} alone" for s in sites)}
    return wanted <= set(results)


def main(argv: list[str] | None = None) -> None:
    from common import site
    from common.fedconfig import parse_config

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--work", default="/tmp/qanafed-bench-federation")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="methods to run, in order (alone = each site alone); default: all")
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--warmup", type=int, default=4, help="float warm-up rounds")
    p.add_argument("--local-epochs", type=int, default=2, help="float epochs per warm-up round")
    p.add_argument("--qat", type=int, default=2, help="QAT rounds")
    p.add_argument("--qat-local-epochs", type=int, default=1, help="QAT epochs per QAT round")
    p.add_argument("--lr", type=float, default=0.003, help="local Adam lr, warm-up")
    p.add_argument("--qat-lr", type=float, default=0.0003, help="local Adam lr, QAT")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--calibration-samples", type=int, default=128,
                   help="calibration images per site")
    p.add_argument("--proximal-mu", type=float, default=0.01, help="FedProx mu")
    p.add_argument("--server-lr", type=float, default=0.03,
                   help="FedAdam eta (0.03: see server.strategies.make_strategy)")
    p.add_argument("--tau", type=float, default=1e-3, help="FedAdam tau")
    p.add_argument("--nv-cap", type=int, default=600,
                   help="at most this many nv images at vidir_molemax (94 %% nv)")
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true",
                   help="drop the rows of earlier runs instead of merging by method")
    p.add_argument("--out", default=str(HERE / "results" / "federation.json"))
    p.add_argument("--results-md", default=str(HERE / "RESULTS.md"))
    args = p.parse_args(argv)

    work = Path(args.work)
    data = capped_copy(Path(args.data), work / f"data-nv{args.nv_cap}-seed{args.seed}",
                       "vidir_molemax", "nv", args.nv_cap, args.seed)
    date = time.strftime("%Y-%m-%d %H:%M")
    budget = {
        "variant": "qana-akd1000", "size": args.size, "width": args.width, "depth": args.depth,
        "warmup": args.warmup, "local_epochs": args.local_epochs, "qat": args.qat,
        "qat_local_epochs": args.qat_local_epochs, "batch_size": args.batch_size,
        "lr": args.lr, "qat_lr": args.qat_lr, "calibration_samples": args.calibration_samples,
        "test_fraction": 0.2, "proximal_mu": args.proximal_mu, "server_lr": args.server_lr,
        "tau": args.tau, "nv_cap": args.nv_cap, "seed": args.seed, "date": date,
        "nv_cap_note": f"vidir_molemax's nv capped at {args.nv_cap} images (whole lesions, "
                       f"seeded) of its 2983",
    }
    scenario = {
        "name": "bench-federation", "data": str(data),
        "partition": {"scheme": "natural", "sites": 4, "seed": args.seed},
        "model": {"variant": budget["variant"], "size": args.size, "width": args.width,
                  "depth": args.depth},
        "rounds": {"warmup": args.warmup, "qat": args.qat},
        "local-epochs": args.local_epochs, "qat-local-epochs": args.qat_local_epochs,
        "batch-size": args.batch_size, "lr": args.lr, "qat-lr": args.qat_lr,
        "calibration-samples": args.calibration_samples,
        "test-fraction": budget["test_fraction"],
        "quorum": {"min-sites": 4, "min-replies": 4},
        "timeouts": {"connect": 900, "round": 7200},
        "balance": "oversample", "augment": True,
        "edge": {"shots": 5, "neurons-per-class": 2}, "seed": args.seed,
    }
    cfg = parse_config(scenario, "bench")
    sites = [site.data_of(cfg, i, None) for i in range(4)]
    out = Path(args.out)
    doc: dict[str, Any] = {
        "date": date, "machine": machine(), "data": args.data,
        "budget": budget, "scenario": scenario, "methods_run": list(args.methods),
        "sites": [s.site_id for s in sites],
        "site_counts": {s.site_id: {"train": np.bincount(s.y_train, minlength=7).tolist(),
                                    "test": np.bincount(s.y_test, minlength=7).tolist()}
                        for s in sites},
        "test_images": int(sum(len(s.y_test) for s in sites)),
        "results": {} if args.fresh else previous_results(out, budget),
    }
    doc["complete"] = _complete(doc["results"], doc["sites"])

    def save() -> None:
        for r in doc["results"].values():  # site-alone timings may arrive after a strategy
            if "rounds" in r:
                r["overhead"] = _overhead(r, _same_training_alone(doc["results"], r["budget"]))
        doc["complete"] = _complete(doc["results"], doc["sites"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1, default=str))
        update_section(Path(args.results_md), "Federation", markdown(doc))

    for method in args.methods:
        log.info("bench: %s", method)
        t0 = time.perf_counter()
        if method in STRATEGIES:
            strategy = _strategy(method, budget)
            fcfg = parse_config({**scenario, "strategy": strategy}, "bench")
            with PeakMemory() as peak:
                run = run_federated(fcfg, work / method, args.parallel)
            r = {"rounds": run["rounds"], "phase_seconds": run["phase_seconds"],
                 "budget": {**budget, "strategy": strategy}, **peak.as_dict()}
            runs = {method: (r, run["akida_model"])}
        elif method == "pooled":
            with PeakMemory() as peak:
                run = run_in_process(cfg, pooled_site(sites))
            runs = {"pooled": ({"round_seconds": run["round_seconds"], "budget": budget,
                                **peak.as_dict()}, run["akida_model"])}
        else:
            runs = {}
            for s in sites:
                t1 = time.perf_counter()
                with PeakMemory() as peak:
                    run = run_in_process(cfg, s)
                runs[f"{s.site_id} alone"] = ({"round_seconds": run["round_seconds"],
                                               "wall_seconds": time.perf_counter() - t1,
                                               "budget": budget, **peak.as_dict()},
                                              run["akida_model"])
        for name, (r, akida_model) in runs.items():
            r.setdefault("wall_seconds", time.perf_counter() - t0)
            r["score"] = score(akida_model, sites)
            doc["results"][name] = r
            log.info("bench %s: %s", name, r["score"]["union"])
        save()
    save()


if __name__ == "__main__":
    main()
