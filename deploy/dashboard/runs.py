"""What the dashboard shows of a run folder: its report, or the live checkpoint and progress log.

A federated run folder (``qanafed sim`` / ``qanafed coord run``) holds ``progress.jsonl`` from the
first round on, ``checkpoints/<LATEST>/state.json`` after every round and ``report.json`` only at
the end; a ``qanafed model train`` folder holds ``metrics.json``. While a run is in progress the
view is built from the last checkpoint's state with the same :func:`server.reports.build_report`
the run will end with, so the page shows the same numbers before and after. Nothing here returns
file paths or images of a site: saliency overlays stay on the sites (only their counts and
stability scores are shown).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.checkpoint import LATEST
from common.progress import read_events
from common.runio import AKIDA_FILE, METRICS_FILE
from deploy.dashboard import trust
from server.reports import build_report

__all__ = ["RUN_NAME", "find_run", "list_runs", "run_summary", "run_view"]

#: A run folder name the dashboard accepts in a URL (anything else is a 404).
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
REPORT_FILE = "report.json"
PROGRESS_FILE = "progress.jsonl"
CHECKPOINTS_DIR = "checkpoints"
MODEL_FILE = "global_model.fbz"
#: Files whose presence makes a folder a run.
_MARKERS = (REPORT_FILE, PROGRESS_FILE, CHECKPOINTS_DIR, METRICS_FILE)
SCORES = ("accuracy", "balanced_accuracy", "macro_f1")


def _is_run(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in _MARKERS)


def list_runs(runs_dir: Path) -> list[str]:
    """Names of the run folders directly inside ``runs_dir``, sorted.

    Hidden folders, names a URL could not carry and symlinks leading out of ``runs_dir`` are left
    out (``qanafed sim`` keeps a run's private key in ``<run>.keys``, which is not a run).
    """
    root = runs_dir.resolve()
    try:
        children = sorted(runs_dir.iterdir())
    except OSError:
        return []
    return [c.name for c in children
            if RUN_NAME.match(c.name) and c.resolve().parent == root and _is_run(c)]


def find_run(runs_dir: Path, name: str) -> Path | None:
    """Return the run folder ``name`` in ``runs_dir``, or None (never a path outside it)."""
    if not RUN_NAME.match(name) or name not in list_runs(runs_dir):
        return None
    return runs_dir / name


def _read_json(path: Path) -> tuple[Any, str | None]:
    """Return ``(data, None)``, ``(None, None)`` if absent, ``(None, problem)`` if unreadable."""
    if not path.is_file():
        return None, None
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return None, f"{path.name} could not be read ({type(err).__name__}: {err})"


def _events(run_dir: Path) -> tuple[list[dict[str, Any]], str | None]:
    """Read the progress log; a damaged line is skipped (and said), not fatal."""
    path = run_dir / PROGRESS_FILE
    try:
        events, _ = read_events(path)
        return [e for e in events if isinstance(e, dict)], None
    except (UnicodeDecodeError, ValueError):
        pass
    except OSError as err:
        return [], f"{PROGRESS_FILE} could not be read ({err})"
    events, bad = [], 0
    for line in path.read_bytes().split(b"\n")[:-1]:  # the last one may be being written
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(event, dict):
            events.append(event)
    return events, f"{PROGRESS_FILE}: {bad} unreadable line(s) skipped"


def _checkpoint_state(run_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """Read the JSON state of the last complete checkpoint (never its arrays)."""
    root = run_dir / CHECKPOINTS_DIR
    try:
        folder = (root / LATEST).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None, None
    if not RUN_NAME.match(folder):
        return None, f"checkpoint pointer {LATEST} is damaged"
    state, problem = _read_json(root / folder / "state.json")
    return (state if isinstance(state, dict) else None), problem


def _mtime(*paths: Path) -> float | None:
    times = [p.stat().st_mtime for p in paths if p.exists()]
    return max(times) if times else None


def _scores(block: Any) -> dict[str, Any] | None:
    if not isinstance(block, Mapping):
        return None
    if "error" in block:
        return {"error": str(block["error"])}
    return {k: block.get(k) for k in (*SCORES, "loss", "num_examples") if k in block}


def _global(summary: Mapping[str, Any] | None, block: str) -> dict[str, Any]:
    summary = summary or {}
    return {k: summary.get(f"{block}.{k}") for k in (*SCORES, "loss")
            if summary.get(f"{block}.{k}") is not None}


def _rounds(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    rounds = []
    for r in report.get("rounds") or []:
        if not isinstance(r, Mapping) or r.get("phase") == "finalize":
            continue
        sites = {}
        for site, m in sorted((r.get("sites") or {}).items()):
            m = m if isinstance(m, Mapping) else {}
            sites[site] = {**(_scores(m.get("test")) or {}), "train_loss": m.get("train_loss")}
        rounds.append({
            "step": r.get("step"), "phase": r.get("phase"), "index": r.get("index"),
            "seconds": r.get("seconds"), "bytes_sent": r.get("bytes_sent"),
            "bytes_received": r.get("bytes_received"),
            "global": {**_global(r.get("global"), "test"),
                       "train_loss": (r.get("global") or {}).get("train_loss")},
            "sites": sites, "dropped": dict(r.get("dropped") or {}),
        })
    return rounds


def _confusion(block: Any, names: list[str]) -> dict[str, Any] | None:
    if not isinstance(block, Mapping) or not block.get("confusion_matrix"):
        return None
    matrix = [[int(v) for v in row] for row in block["confusion_matrix"]]
    labels = names[: len(matrix)] if len(names) >= len(matrix) else \
        [str(i) for i in range(len(matrix))]
    return {"labels": labels, "matrix": matrix, "max": max((max(r) for r in matrix), default=0)}


def _final(report: Mapping[str, Any]) -> dict[str, Any] | None:
    final = report.get("final")
    if not isinstance(final, Mapping):
        return None
    sites = {}
    for site, m in sorted((final.get("sites") or {}).items()):
        m = m if isinstance(m, Mapping) else {}
        names = list(((report.get("sites") or {}).get(site) or {}).get("class_names") or [])
        after = m.get("akida_after_edge")
        has_after = isinstance(after, Mapping) and "confusion_matrix" in after
        sites[site] = {
            "hash_matches": m.get("hash_matches"),
            "agreement": m.get("akida_agreement"),
            "akida": _scores(m.get("akida")),
            "after_edge": _scores(after),
            "new_class": m.get("new_class") if isinstance(m.get("new_class"), Mapping) else None,
            "confusion": _confusion(after if has_after else m.get("akida"), names),
            "confusion_of": "after on-chip learning" if has_after else "Akida",
        }
    g = final.get("global")
    return {"server_hash": final.get("server_hash"), "bytes_sent": final.get("bytes_sent"),
            "seconds": final.get("seconds"), "akida": _global(g, "akida"),
            "after_edge": _global(g, "akida_after_edge"), "sites": sites}


def _saliency(report: Mapping[str, Any]) -> dict[str, Any]:
    """Per-site saliency summary: image count, stability, share inside the lesion (no files)."""
    final_sites = ((report.get("final") or {}).get("sites") or {})
    out: dict[str, Any] = {}
    for site, sal in sorted((report.get("saliency") or {}).items()):
        if not isinstance(sal, Mapping):
            continue
        if "error" in sal:
            out[site] = {"error": str(sal["error"])}
            continue
        site_sal = (final_sites.get(site) or {}).get("saliency") or {}
        in_lesion = sal.get("saliency_in_lesion") or site_sal.get("saliency_in_lesion")
        out[site] = {"images": sal.get("images"),
                     "overlays_on_site": len(sal.get("files") or []),
                     "stability": {
                         method: {"spearman": (st.get("spearman") or {}).get("mean"),
                                  "top_k_overlap": (st.get("top_k_overlap") or {}).get("mean")}
                         for method, st in sorted((sal.get("stability") or {}).items())
                         if isinstance(st, Mapping)},
                     "in_lesion": in_lesion if isinstance(in_lesion, Mapping) else None}
    return out


def _phases(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    seconds = report.get("phase_seconds") or {}
    counts: dict[str, int] = {}
    for r in report.get("rounds") or []:
        if isinstance(r, Mapping) and r.get("phase"):
            counts[r["phase"]] = counts.get(r["phase"], 0) + 1
    order = list(dict.fromkeys([*counts, *seconds]))
    return [{"phase": p, "rounds": counts.get(p, 0), "seconds": seconds.get(p)} for p in order]


def _status(report: Mapping[str, Any] | None, events: list[dict[str, Any]],
            damaged: bool = False) -> str:
    if report is not None:
        return "complete" if report.get("complete") else "stopped"
    kinds = [e.get("event") for e in events]
    if damaged and not kinds:
        return "report unreadable"
    if kinds and kinds[-1] == "interrupted":
        return "interrupted"
    if "done" in kinds:
        return "writing report"
    return "in progress"


def _current(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Return the round started and not yet ended, from the progress log."""
    for ev in reversed(events):
        if ev.get("event") == "round-end":
            return None
        if ev.get("event") == "round-start":
            return {k: ev.get(k) for k in ("step", "phase", "index", "time")}
    return None


def _from_events(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Build a report skeleton from the progress log alone (global scores, no sites)."""
    rounds = [{"step": e.get("step"), "phase": e.get("phase"), "seconds": e.get("seconds"),
               "sites": {}, "dropped": {}, "global": e.get("summary") or {}}
              for e in events if e.get("event") == "round-end"]
    run_id = next((e.get("run_id") for e in events if e.get("event") == "start"), None)
    return {"run_id": run_id, "rounds": rounds}


def _report_shaped(report: Any) -> bool:
    """Whether ``report`` has the types :func:`server.reports.build_report` gives its keys."""
    if not isinstance(report, dict):
        return False
    kinds = {"sites": dict, "rounds": list, "final": dict, "scenario": dict, "saliency": dict,
             "phase_seconds": dict}
    return all(report.get(k) is None or isinstance(report[k], t) for k, t in kinds.items())


def _load(run_dir: Path) -> dict[str, Any]:
    """Read a federated run folder: the report, or what a run in progress has written so far."""
    notices: list[str] = []
    report, problem = _read_json(run_dir / REPORT_FILE)
    if report is not None and not _report_shaped(report):
        problem = f"{REPORT_FILE} is not a qanafed run report"
    if problem:
        notices.append(f"{problem}: the report is being written or is damaged; showing the "
                       "last checkpoint")
        report = None
    events, events_problem = _events(run_dir)
    if events_problem:
        notices.append(events_problem)
    status = _status(report, events, damaged=problem is not None)
    source = "report"
    if report is None:
        state, problem = _checkpoint_state(run_dir)
        if problem:
            notices.append(problem)
        if state is not None:
            report, source = build_report(state), "checkpoint"
        else:
            report, source = _from_events(events), "progress log"
    return {"report": report, "events": events, "status": status, "source": source,
            "notices": notices}


def _scenario(report: Mapping[str, Any]) -> dict[str, Any]:
    sc = report.get("scenario") or {}
    model, rounds = sc.get("model") or {}, sc.get("rounds") or {}
    return {"name": sc.get("name"), "data": sc.get("data"), "variant": model.get("variant"),
            "size": model.get("size"), "strategy": (sc.get("strategy") or {}).get("name"),
            "warmup": rounds.get("warmup"), "qat": rounds.get("qat"),
            "new_class": (sc.get("edge") or {}).get("new-class")}


def _training_view(run_dir: Path, release_key: Path | None, check: bool) -> dict[str, Any]:
    metrics, problem = _read_json(run_dir / METRICS_FILE)
    metrics = metrics if isinstance(metrics, dict) else {}
    return {"name": run_dir.name, "kind": "training",
            "status": "complete" if metrics else "unreadable",
            "notices": [problem] if problem else [],
            "variant": metrics.get("variant"), "size": metrics.get("size"),
            "class_names": metrics.get("class_names"),
            "scores": {k: _scores(metrics.get(k)) for k in ("float", "quantized", "akida")
                       if isinstance(metrics.get(k), Mapping)},
            "updated": _mtime(run_dir / METRICS_FILE),
            "release": trust.release_status(run_dir / AKIDA_FILE, release_key)
            if check else None}


def _is_training(run_dir: Path) -> bool:
    return (run_dir / METRICS_FILE).is_file() and not any(
        (run_dir / m).exists() for m in (REPORT_FILE, PROGRESS_FILE, CHECKPOINTS_DIR))


def version(run_dir: Path) -> str:
    """Return a token that changes whenever the run's files change (for polling)."""
    parts = []
    for name in (REPORT_FILE, PROGRESS_FILE, METRICS_FILE, f"{CHECKPOINTS_DIR}/{LATEST}"):
        try:
            st = (run_dir / name).stat()
            parts.append(f"{st.st_mtime_ns}:{st.st_size}")
        except OSError:
            parts.append("-")
    return "/".join(parts)


def run_view(run_dir: Path, release_key: Path | None = None,
             check_release: bool = True) -> dict[str, Any]:
    """Gather everything the run page shows, as JSON (what ``/api/runs/<name>`` returns).

    Parameters
    ----------
    run_dir : Path
        The run folder.
    release_key : Path | None (default: None)
        Public key the global model's release is checked against (None: the check's default).
    check_release : bool (default: True)
        Check the release (hash and signature); without, ``release`` is None.
    """
    if _is_training(run_dir):
        return {**_training_view(run_dir, release_key, check_release), "version": version(run_dir)}
    loaded = _load(run_dir)
    report, events = loaded["report"], loaded["events"]
    start = next((e for e in events if e.get("event") == "start"), {})
    done = sum(1 for r in report.get("rounds") or [] if isinstance(r, Mapping))
    model = run_dir / MODEL_FILE
    return {
        "name": run_dir.name, "kind": "federated", "status": loaded["status"],
        "source": loaded["source"], "notices": loaded["notices"],
        "run_id": report.get("run_id") or start.get("run_id"),
        "scenario": _scenario(report),
        "progress": {"done": done, "total": start.get("total"), "current": _current(events)
                     if loaded["status"] == "in progress" else None},
        "wall_seconds": report.get("wall_seconds"),
        "phases": _phases(report),
        "sites": sorted(report.get("sites") or {}),
        "site_info": {s: _site_info(m) for s, m in sorted((report.get("sites") or {}).items())},
        "rounds": _rounds(report),
        "final": _final(report),
        "saliency": _saliency(report),
        "privacy": trust.privacy(report),
        "hello_dropped": {str(k): str(v) for k, v in (report.get("hello_dropped") or {}).items()},
        "release": trust.release_status(model, release_key)
        if check_release and model.is_file() else None,
        "updated": _mtime(*(run_dir / n for n in (REPORT_FILE, PROGRESS_FILE))),
        "version": version(run_dir),
    }


def _site_info(hello: Any) -> dict[str, Any]:
    hello = hello if isinstance(hello, Mapping) else {}
    return {"train_examples": hello.get("train_examples"),
            "test_examples": hello.get("test_examples"),
            "policy": hello.get("policy") if isinstance(hello.get("policy"), Mapping) else None}


def run_summary(view: Mapping[str, Any]) -> dict[str, Any]:
    """Shorten a :func:`run_view` to one line of the runs page (what ``/api/runs`` lists)."""
    if view["kind"] == "training":
        akida = (view["scores"].get("akida") or {})
        return {"name": view["name"], "kind": "training", "status": view["status"],
                "run_id": None, "scenario": view["variant"], "rounds": None,
                "sites": [], "balanced_accuracy": akida.get("balanced_accuracy"),
                "updated": view["updated"]}
    final = view["final"] or {}
    last = view["rounds"][-1]["global"] if view["rounds"] else {}
    return {"name": view["name"], "kind": "federated", "status": view["status"],
            "run_id": view["run_id"], "scenario": view["scenario"]["name"],
            "rounds": f"{view['progress']['done']}/{view['progress']['total'] or '?'}",
            "sites": view["sites"],
            "balanced_accuracy": (final.get("akida") or {}).get("balanced_accuracy",
                                                                 last.get("balanced_accuracy")),
            "updated": view["updated"]}


def age(timestamp: float | None) -> str:
    """``"42 s ago"``-style age of a timestamp, for the pages."""
    if timestamp is None:
        return "–"
    seconds = max(0.0, time.time() - timestamp)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"
