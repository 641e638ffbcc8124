"""Deployment Engine vs Simulation Engine on 127.0.0.1: round time, start-up cost, memory, recovery.

Run: ``python -m bench.deployment [--modes sim subprocess warm-fork warm]`` (20-40 min on 2 shared
cores). The same tiny scenario (synthetic 48 px lesions, 3 sites, qana-akd1000 width 0.25,
warm-up, federated calibration, QAT, finalize) runs on:

* ``sim``: ``qanafed sim``'s apps on the Simulation Engine (Ray; 3 long-lived site actors);
* ``subprocess`` / ``warm-fork`` / ``warm``: the Deployment Engine with kits provisioned into a
  temporary folder, one SuperLink (TLS + SuperNode authentication) and 3 SuperNodes started
  by ``qanafed coord/site start --isolation MODE`` (see ``deploy/site.py``); each deployment
  site holds exactly the images of the simulation's partition of the same name.

Measured: time per round and per phase (the ServerApp's own ``report.json``) and the ratio to
the simulation; the ClientApp's import cost (a fresh interpreter importing it, as every
``flwr-clientapp`` does, vs the warm executor's one import); peak PSS/RSS per site process
tree (supervisor, SuperNode, SuperExec, ClientApp processes); recovery after a site's
SuperNode is killed (until the SuperLink re-activates it) and after the coordinator is killed
mid-run (until the resumed run completes its next round). Writes
``bench/results/deployment.json`` and the ``## Deployment (Flower Deployment Engine)`` section
of ``bench/RESULTS.md``. Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

for _var in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import yaml  # noqa: E402

import common  # noqa: E402,F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from bench._procmem import PeakMemory  # noqa: E402
from bench._report import machine, update_section  # noqa: E402
from common.log import get_logger  # noqa: E402

log = get_logger("bench.deployment")
HERE = Path(__file__).resolve().parent
MODES = ("sim", "subprocess", "warm-fork", "warm")
DEPLOY_MODES = MODES[1:]
TARGET = 1.3
SECTION = "Deployment (Flower Deployment Engine)"


def scenario(args: argparse.Namespace) -> dict[str, Any]:
    """The tiny scenario every mode runs."""
    return {
        "name": "bench-deployment", "data": f"synthetic:n={args.images},size=48,sites=3,seed=0",
        "partition": {"scheme": "natural", "sites": 3, "seed": 0},
        "model": {"variant": "qana-akd1000", "size": 48, "width": 0.25, "depth": 1},
        "rounds": {"warmup": args.warmup, "qat": args.qat},
        "local-epochs": 1, "batch-size": 32, "lr": 0.01, "calibration-samples": 16,
        "quorum": {"min-sites": 3, "min-replies": 3},
        "timeouts": {"connect": 600, "round": 900},
        "edge": {"shots": 1, "neurons-per-class": 1}, "seed": 0,
    }


def write_partitions(root: Path, spec: str, sites: int) -> dict[str, Path]:
    """One npz per simulated partition (same images as the simulation's sites)."""
    from common.loaders import load_synthetic
    from common.partition import partition

    ds = load_synthetic(spec)
    out = {}
    for name, idx in sorted(partition(ds, "natural", sites, 0.5, 0).items()):
        site = str(name).lower().replace("_", "-")
        (root / site).mkdir(parents=True, exist_ok=True)
        out[site] = root / site / "dermamnist.npz"
        np.savez(out[site], train_images=ds.images[idx], train_labels=ds.labels[idx])
    return out


def rounds_of(report: dict[str, Any]) -> dict[str, Any]:
    """Per-round seconds and per-phase means of a run's report."""
    rounds = [{k: r[k] for k in ("step", "phase", "seconds")} for r in report["rounds"]]
    phases: dict[str, list[float]] = {}
    for r in rounds:
        phases.setdefault(r["phase"], []).append(r["seconds"])
    return {"rounds": rounds, "phase_mean_s": {p: float(np.mean(v)) for p, v in phases.items()},
            "total_round_s": float(sum(r["seconds"] for r in rounds))}


# -- simulation -----------------------------------------------------------------------------------
def run_sim(cfg: Any, out: Path) -> dict[str, Any]:
    """The scenario on the Simulation Engine, all 3 sites in parallel."""
    from bench.federation import run_federated

    t0 = time.monotonic()
    with PeakMemory(interval=1.0) as peak:
        run_federated(cfg, out, parallel=cfg.partition.sites)
    report = json.loads((out / "report.json").read_text())
    return {**rounds_of(report), "wall_s": time.monotonic() - t0,
            "peak_tree": peak.as_dict()}


# -- deployment -----------------------------------------------------------------------------------
class Federation:
    """Provisioned kits for the coordinator and the sites, and daemons started from them."""

    def __init__(self, work: Path, data: dict[str, Path]) -> None:
        from deploy.loopback import free_ports, write_project
        from deploy.provision import provision

        self.kits = work / "kits"
        provision(write_project(work / "project.yaml", data, free_ports(1 + len(data)),
                                "bench"), self.kits)
        self.coord = self.kits / "coordinator"
        self.sites = {s: self.kits / "sites" / s for s in data}

    def site_pid(self, site: str) -> int:
        from deploy.site import site_paths

        return int(site_paths(self.sites[site]).pid_file.read_text().strip())

    def supernode_pid(self, site: str) -> int:
        from deploy.site import site_paths

        state = json.loads(site_paths(self.sites[site]).state_file.read_text())
        return int(state["children"]["supernode"]["pid"])

    def activations(self, site: str) -> int:
        """How often the site's SuperNode was activated at the SuperLink (its log says)."""
        from deploy.site import site_paths

        log_file = site_paths(self.sites[site]).log_file
        if not log_file.exists():
            return 0
        return log_file.read_text(errors="replace").count("SuperNode ID:")


def run_deployment(fed: Federation, scenario_file: Path, mode: str, out: Path,
                   recovery: bool) -> dict[str, Any]:
    """Start the coordinator and the sites with ``--isolation mode``, run, measure, stop."""
    from deploy.coord import coord_paths, launch_run, wait_run
    from deploy.loopback import Daemons, events, has_event, qanafed, wait_for
    from deploy.process import kill_tree

    result: dict[str, Any] = {}
    logs = _SiteLogs(fed)  # the site logs are shared by every mode: read this mode's part only
    with Daemons() as daemons:
        before = {s: fed.activations(s) for s in fed.sites}
        coord_pid = daemons.start("coord", fed.coord)
        for kit in fed.sites.values():
            daemons.start("site", kit, "--isolation", mode)
        wait_for("every site active", lambda: all(
            fed.activations(s) > before[s] for s in fed.sites), 600, poll=1.0)
        peaks = {s: PeakMemory(fed.site_pid(s), interval=1.0) for s in fed.sites}
        for p in peaks.values():
            p.__enter__()
        t0 = time.monotonic()
        try:
            run = launch_run(fed.coord, scenario_file, out_dir=out)
            status = wait_run(fed.coord, run["run-id"], timeout=3600, poll=3.0)
        finally:
            for p in peaks.values():
                p.__exit__()
        result["status"] = status
        result["wall_s"] = time.monotonic() - t0
        report_file = out / "report.json"
        if report_file.exists():
            result.update(rounds_of(json.loads(report_file.read_text())))
        result["peak_per_site"] = {s: p.as_dict() for s, p in peaks.items()}
        result["executor_log"] = logs.executor_lines()
        if mode == "warm":
            result["executor_rss_mb"] = logs.executor_rss()
        if not recovery:
            for kit in fed.sites.values():
                qanafed("site", "stop", "--kit", str(kit))
            qanafed("coord", "stop", "--kit", str(fed.coord))
            return result

        # Recovery 1: kill one site's SuperNode; time until the SuperLink re-activates it
        site = sorted(fed.sites)[-1]
        before = fed.activations(site)
        os.kill(fed.supernode_pid(site), signal.SIGKILL)
        t_kill = time.monotonic()
        wait_for(f"site {site} re-activated", lambda: fed.activations(site) > before, 600)
        result["recovery_site_s"] = time.monotonic() - t_kill

        # Recovery 2: kill the coordinator as round 2 starts, restart it, resume the run;
        # time until the resumed run completes its next round
        cpaths = coord_paths(fed.coord)
        out2 = out.parent / f"{out.name}-restart"
        launch_run(fed.coord, scenario_file, out_dir=out2)
        progress = out2 / "progress.jsonl"
        wait_for("round 2 start", lambda: has_event(progress, event="round-start", step=2), 900)
        done = sum(ev["event"] == "round-end" for ev in events(progress))
        kill_tree(coord_pid)
        t_kill = time.monotonic()
        wait_for("coordinator gone", lambda: not Path(f"/proc/{coord_pid}").exists(), 30)
        cpaths.pid_file.unlink(missing_ok=True)
        daemons.start("coord", fed.coord)
        result["coordinator_back_s"] = time.monotonic() - t_kill
        resumed = launch_run(fed.coord, scenario_file, resume=True, out_dir=out2)
        wait_for("a round after the restart", lambda: sum(
            ev["event"] == "round-end" for ev in events(progress)) > done, 1200, poll=1.0)
        result["recovery_coordinator_s"] = time.monotonic() - t_kill
        result["recovery_resumed_status"] = wait_run(fed.coord, resumed["run-id"], timeout=1200,
                                                     poll=3.0)
    return result


class _SiteLogs:
    """The sites' logs from now on (they are appended to by every mode of a bench run)."""

    def __init__(self, fed: Federation) -> None:
        from deploy.site import site_paths

        self.files = {s: site_paths(kit).log_file for s, kit in fed.sites.items()}
        self.start = {s: f.stat().st_size if f.exists() else 0 for s, f in self.files.items()}

    def text(self, site: str) -> str:
        """What ``site`` logged since this object was made."""
        with open(self.files[site], "rb") as fh:
            fh.seek(self.start[site])
            return fh.read().decode(errors="replace")

    def executor_rss(self) -> dict[str, list[float]]:
        """Per site, the in-process executor's RSS (MB) after each task."""
        import re

        pattern = re.compile(r"RSS (\d+) MB after \d+ tasks")
        return {s: [float(m) for m in pattern.findall(self.text(s))] for s in self.files}

    def executor_lines(self) -> list[str]:
        """Per site, the warm executor's start-up line (none for ``subprocess``)."""
        lines: list[str] = []
        for site in self.files:
            lines += [ln for ln in self.text(site).splitlines()
                      if "warm ClientApp executor" in ln][:1]
        return lines


def import_cost(repeats: int) -> dict[str, Any]:
    """What every fresh ``flwr-clientapp`` pays: import the ClientApp, TensorFlow, quantizeml
    and akida (:func:`deploy.warm_exec.warm_up`) in a new interpreter."""
    code = ("import resource; from deploy.warm_exec import warm_up; s = warm_up(); "
            "print(s, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    seconds, rss = [], []
    load = os.getloadavg()[0]
    for _ in range(repeats):
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=300, check=True)
        s, kb = res.stdout.split()[-2:]
        seconds.append(float(s))
        rss.append(int(kb) / 1024)
    return {"seconds": seconds, "mean_s": float(np.mean(seconds)), "max_rss_mb": max(rss),
            "load": load}


# -- report ---------------------------------------------------------------------------------------
def _f(x: Any, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def compare(doc: dict[str, Any]) -> None:
    """Ratios of every deployment mode to the simulation (per phase and over all rounds)."""
    sim = doc["modes"].get("sim")
    if not sim or "phase_mean_s" not in sim:
        return
    for mode in DEPLOY_MODES:
        r = doc["modes"].get(mode)
        if not r or "phase_mean_s" not in r:
            continue
        r["ratio_per_phase"] = {p: r["phase_mean_s"][p] / s
                                for p, s in sim["phase_mean_s"].items() if p in r["phase_mean_s"]}
        r["ratio_total"] = r["total_round_s"] / sim["total_round_s"]
        r["target_met"] = r["ratio_total"] <= TARGET


def markdown(doc: dict[str, Any]) -> str:
    """The deployment section of bench/RESULTS.md."""
    modes, sc = doc["modes"], doc["scenario"]
    from deploy.site import DEFAULT_ISOLATION

    names = {m: f"Deployment, `{m}`" + (" (default)" if m == DEFAULT_ISOLATION else "")
             for m in DEPLOY_MODES}
    names["sim"] = "Simulation"
    present = [m for m in MODES if m in modes and "phase_mean_s" in modes[m]]
    phases = [p for p in ("warmup", "calibrate", "qat", "finalize")
              if any(p in modes[m]["phase_mean_s"] for m in present)]
    partial = "" if doc["complete"] else " — **PARTIAL**"
    lines = [
        f"`python -m bench.deployment` ({doc['date']}){partial}",
        "",
        f"- Scenario: `{sc['data']}`, 3 sites (natural partition; each deployment site holds "
        f"its simulated partition's images), {sc['model']['variant']} {sc['model']['size']} px "
        f"width {sc['model']['width']}; {sc['rounds']['warmup']} warm-up rounds, federated "
        f"calibration, {sc['rounds']['qat']} QAT round(s), finalize (Akida conversion); 1 "
        "local epoch, batch 32.",
        "- Deployment: kits provisioned into a temp folder, one SuperLink (TLS, SuperNode "
        "authentication, state DB) and 3 supervised SuperNodes on 127.0.0.1 "
        "(`qanafed coord/site start`). Simulation: Ray, 3 site actors in parallel.",
        f"- Machine: {doc['machine']['summary']}; load average {doc['load_during']} during the "
        "run (other work shares the 2 cores, so every figure is noisy)"
        + (f"; {', '.join(doc['merged']['modes'])} from the run of {doc['merged']['date']} "
           f"(load {doc['merged']['load_during']})" if doc.get("merged") else "") + ".",
        "",
        "Mean seconds per round (the ServerApp's `report.json`), ratio to the simulation in "
        "brackets:",
        "",
        "| phase | " + " | ".join(names[m] for m in present) + " |",
        "|---|" + "---:|" * len(present),
    ]
    for p in phases:
        cells = []
        for m in present:
            v = modes[m]["phase_mean_s"].get(p)
            ratio = modes[m].get("ratio_per_phase", {}).get(p)
            cells.append(_f(v) + (f" ({ratio:.2f}×)" if ratio is not None else ""))
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    cells = []
    for m in present:
        ratio = modes[m].get("ratio_total")
        cells.append(_f(modes[m]["total_round_s"])
                     + (f" (**{ratio:.2f}×**)" if ratio is not None else ""))
    lines.append("| all rounds (s) | " + " | ".join(cells) + " |")
    mem = []
    for m in present:
        if m == "sim":
            t = modes[m]["peak_tree"]
            mem.append(f"{t['peak_pss_gb']:.2f} / {t['peak_rss_gb']:.2f} (whole tree)")
        else:
            per = modes[m]["peak_per_site"].values()
            mem.append(f"{max(x['peak_pss_gb'] for x in per):.2f} / "
                       f"{max(x['peak_rss_gb'] for x in per):.2f}")
    lines.append("| peak PSS / RSS per site (GB) | " + " | ".join(mem) + " |")
    lines.append("")
    default = modes.get(DEFAULT_ISOLATION, {})
    if "ratio_total" in default:
        verdict = "met" if default["target_met"] else "**not met**"
        lines.append(f"- Target ≤ {TARGET}× (default `{DEFAULT_ISOLATION}` vs simulation, all "
                     f"rounds): {default['ratio_total']:.2f}× — {verdict}.")
    for m in DEPLOY_MODES:
        if m != DEFAULT_ISOLATION and "ratio_total" in modes.get(m, {}):
            lines.append(f"- `{m}` vs simulation, all rounds: {modes[m]['ratio_total']:.2f}×.")
    missing = [m for m in MODES if m not in present]
    if missing:
        lines.append(f"- Not measured in this run: {', '.join(missing)}.")
    imp = doc.get("import_cost")
    if imp:
        lines.append(
            f"- ClientApp start-up per message: `subprocess` imports TensorFlow, QANA and the "
            f"ClientApp in every fresh `flwr-clientapp`: {imp['mean_s']:.1f} s "
            f"(n={len(imp['seconds'])}, {min(imp['seconds']):.1f}–{max(imp['seconds']):.1f} s, "
            f"{imp['max_rss_mb']:.0f} MB RSS"
            + (f", load {imp['load']:.1f}" if "load" in imp else "")
            + "), then loads the data and builds/traces the model "
            "again; `warm-fork` pays the import once per site (a fork per message) but still "
            "rebuilds data and model; `warm` pays all of it once per site ("
            + "; ".join(modes.get("warm", {}).get("executor_log", [])[:1]) + ").")
    for rec_mode in [m for m in DEPLOY_MODES if "recovery_site_s" in modes.get(m, {})]:
        rec = modes[rec_mode]
        lines.append(
            f"- Recovery (`{rec_mode}`): a site's SuperNode killed → re-activated at the SuperLink "
            f"after {rec['recovery_site_s']:.1f} s (the SuperLink holds a killed node's "
            "identity until its heartbeat expires; the supervisor retries with backoff). "
            f"Coordinator killed as round 2 started → SuperLink back in "
            f"{rec['coordinator_back_s']:.1f} s, resumed run's next round complete "
            f"{rec['recovery_coordinator_s']:.1f} s after the kill "
            f"(resumed run: {rec.get('recovery_resumed_status')}).")
    rss = modes.get("warm", {}).get("executor_rss_mb")
    if rss:
        lines.append("- `warm` executor RSS after each task (MB; memory must not grow without "
                     "bound): " + "; ".join(f"{s}: {', '.join(f'{v:.0f}' for v in vals)}"
                                            for s, vals in sorted(rss.items())) + ".")
    lines += ["- PSS charges shared pages once across a tree; per site it is the supervisor, "
              "SuperNode, SuperExec and ClientApp processes of that site.",
              "- Raw numbers: `bench/results/deployment.json`."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from common.fedconfig import parse_config
    from deploy.site import DEFAULT_ISOLATION

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--work", default="/tmp/qanafed-bench-deployment")
    p.add_argument("--images", type=int, default=240)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--qat", type=int, default=1)
    p.add_argument("--no-recovery", action="store_true", help="skip the kill/restart drills")
    p.add_argument("--recovery-modes", nargs="+", choices=DEPLOY_MODES, default=None,
                   help="modes that run the kill/restart drills (default: the default "
                   "isolation)")
    p.add_argument("--import-repeats", type=int, default=3)
    p.add_argument("--merge", default=None,
                   help="an earlier deployment.json whose modes not run now are kept")
    p.add_argument("--out", default=str(HERE / "results" / "deployment.json"))
    p.add_argument("--results-md", default=str(HERE / "RESULTS.md"))
    args = p.parse_args(argv)

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sc = scenario(args)
    cfg = parse_config(sc, "bench")
    scenario_file = work / "scenario.yaml"
    scenario_file.write_text(yaml.safe_dump(sc))
    doc: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
                           "scenario": sc, "modes": {}, "complete": False}
    loads: list[float] = []
    out = Path(args.out)
    if args.merge:
        earlier = json.loads(Path(args.merge).read_text())
        kept = {m: r for m, r in earlier["modes"].items()
                if m not in args.modes and "error" not in r}
        doc["modes"].update(kept)
        doc["merged"] = {"modes": sorted(kept), "date": earlier["date"],
                         "load_during": earlier.get("load_during")}

    def save() -> None:
        loads.append(os.getloadavg()[0])
        doc["load_during"] = f"{min(loads):.1f}–{max(loads):.1f}"
        compare(doc)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1, default=str))
        update_section(Path(args.results_md), SECTION, markdown(doc))

    recovery_modes = args.recovery_modes or [DEFAULT_ISOLATION]
    fed = None
    for mode in args.modes:
        log.info("bench: %s", mode)
        try:
            if mode == "sim":
                doc["modes"]["sim"] = run_sim(cfg, work / "sim")
            else:
                if fed is None:
                    fed = Federation(work, write_partitions(work / "data", sc["data"], 3))
                res = run_deployment(fed, scenario_file, mode, work / f"run-{mode}",
                                     recovery=(mode in recovery_modes
                                               and not args.no_recovery))
                doc["modes"][mode] = res
        except Exception as err:  # noqa: BLE001 - a bench keeps the other modes' numbers
            log.exception("bench %s failed", mode)
            doc["modes"][mode] = {"error": f"{type(err).__name__}: {err}"}
        save()
    doc["import_cost"] = import_cost(args.import_repeats)
    doc["complete"] = set(doc["modes"]) == set(MODES)
    save()


if __name__ == "__main__":
    main()
