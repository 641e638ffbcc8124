"""Combine the sites' decrypted metrics into global numbers, and write the run report."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.log import get_logger
from common.pooled import pooled_scores

from .privacy import privacy_markdown, privacy_summary

log = get_logger("server.reports")

SCORES = ("accuracy", "balanced_accuracy", "macro_f1")
#: Evaluation blocks a site may report, in report order: the rounds' ``test`` (the global
#: model as received) and ``local_after_training`` (the site's own model after its local
#: epochs); the final round's ``keras_quantized``, ``akida`` and ``akida_after_edge``.
BLOCKS = ("test", "local_after_training", "keras_quantized", "akida", "akida_after_edge")


def _weighted(values: list[tuple[float, float]]) -> float | None:
    total = sum(w for _, w in values)
    return None if total <= 0 else float(sum(v * w for v, w in values) / total)


def pooled_blocks(reports: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Pool each evaluation block over the sites that sent its confusion matrix.

    Returns
    -------
    dict[str, dict[str, Any]]
        Block → :func:`common.pooled.pooled_scores` (union scores with 95 % intervals, per
        site, worst site, spread), for the blocks at least one site scored; a block whose
        matrices cannot be summed (different class lists) is left out, with a warning.
    """
    out = {}
    for block in BLOCKS:
        cms = {site: r[block]["confusion_matrix"] for site, r in reports.items()
               if isinstance(r.get(block), Mapping) and r[block].get("confusion_matrix")}
        if not cms:
            continue
        try:
            out[block] = pooled_scores(cms)
        except ValueError as err:  # e.g. sites with different class lists: no union
            log.warning("%s: confusion matrices not pooled: %s", block, err)
    return out


def global_summary(reports: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Global numbers of a round: scores of the union of the sites' test images, and losses.

    ``<block>.balanced_accuracy``, ``.macro_f1`` and ``.accuracy`` are computed on the summed
    confusion matrices of the sites (:func:`common.pooled.pooled_scores`), never averaged
    over sites; with them come ``.balanced_accuracy_ci`` / ``.macro_f1_ci`` (95 %),
    ``.worst_site`` and ``.worst_site_balanced_accuracy`` (+ ``_ci``), ``.spread`` (best
    minus worst site balanced accuracy) and ``.pooled`` (True). A block no site sent a
    confusion matrix for falls back to the example-weighted mean over sites (``.pooled``
    False). Losses (``<block>.loss``, ``train_loss``) are example-weighted means: the mean
    loss over the union.

    Parameters
    ----------
    reports : Mapping[str, Mapping[str, Any]]
        Site id → decrypted metrics, e.g. ``{"train_loss": .., "test": {"balanced_accuracy":
        .., "confusion_matrix": .., "num_examples": ..}, "akida": {...}}``.

    Returns
    -------
    dict[str, Any]
        Keys like ``test.balanced_accuracy``, ``akida.worst_site``, ``train_loss``.
    """
    out: dict[str, Any] = {}
    for block in BLOCKS:
        for score in (*SCORES, "loss"):
            pairs = [
                (float(r[block][score]), float(r[block].get("num_examples", 1)))
                for r in reports.values()
                if isinstance(r.get(block), Mapping) and r[block].get(score) is not None
            ]
            if pairs:
                out[f"{block}.{score}"] = _weighted(pairs)
                out[f"{block}.pooled"] = False
    for block, p in pooled_blocks(reports).items():
        worst = p["worst_site"]
        out.update({f"{block}.{score}": p[score] for score in SCORES})
        out.update({
            f"{block}.balanced_accuracy_ci": p["balanced_accuracy_ci"],
            f"{block}.macro_f1_ci": p["macro_f1_ci"],
            f"{block}.worst_site": worst["site"],
            f"{block}.worst_site_balanced_accuracy": worst["balanced_accuracy"],
            f"{block}.worst_site_balanced_accuracy_ci": worst["balanced_accuracy_ci"],
            f"{block}.spread": p["spread"]["range"],
            f"{block}.pooled": True,
        })
    pairs = [(float(r["train_loss"]), float(r.get("train_examples", 1)))
             for r in reports.values() if r.get("train_loss") is not None]
    if pairs:
        out["train_loss"] = _weighted(pairs)
    return out


#: Where a simulated site's own files are, relative to the report (``OUT/sites/<site-id>``).
SITES_DIR = "sites"
#: An overlay file name a site may report: ``saliency/<method>/<image>_<float|quantized>.png``.
_OVERLAY = re.compile(r"^saliency/([a-z]+)/([A-Za-z0-9._-]+)_(float|quantized)\.png$")


def saliency_summary(final: Mapping[str, Any] | None) -> dict[str, Any]:
    """Per-site saliency of the final round: image count, stability, overlay paths.

    Paths are relative to the report (``sites/<site-id>/saliency/...``): where a simulation
    writes them; a deployed site keeps them in its own output folder under the same relative
    names. Names not of the form a site writes are dropped (a report never links elsewhere).

    Returns
    -------
    dict[str, Any]
        Site id → ``{"images", "stability", "files"}`` or ``{"error"}``.
    """
    out: dict[str, Any] = {}
    for site, m in sorted(((final or {}).get("sites") or {}).items()):
        sal = m.get("saliency") if isinstance(m, Mapping) else None
        if not isinstance(sal, Mapping):
            continue
        if "error" in sal:
            out[site] = {"error": str(sal["error"])}
            continue
        files = [f"{SITES_DIR}/{site}/{f}" for f in sal.get("files") or []
                 if isinstance(f, str) and _OVERLAY.match(f)]
        out[site] = {"images": sal.get("images"), "stability": sal.get("stability") or {},
                     "files": files}
    return out


def build_report(state: Mapping[str, Any], wall_seconds: float | None = None) -> dict[str, Any]:
    """Build the JSON report of a run from the driver's state (no keys, no per-image data)."""
    final = next((r for r in reversed(state.get("rounds", [])) if r["phase"] == "finalize"), None)
    return {
        "run_id": state.get("run-id"),
        "scenario": state.get("scenario"),
        "complete": final is not None,
        "sites": state.get("sites", {}),
        "hello_dropped": state.get("hello-dropped", {}),
        "rounds": state.get("rounds", []),
        "final": final,
        "phase_seconds": state.get("phase-seconds", {}),
        "wall_seconds": wall_seconds,
        "saliency": saliency_summary(final),
        "privacy": privacy_summary(state),
        # The final model on the union of the sites' test images (:func:`pooled_blocks`).
        "global": pooled_blocks((final or {}).get("sites") or {}),
    }


def _fmt(x: Any) -> str:
    return "–" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def _ci(ci: Any) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if isinstance(ci, list | tuple) and len(ci) == 2 else ""


def _with_ci(g: Mapping[str, Any], key: str) -> str:
    """Format a global score with its 95 % interval when known: ``0.512 [0.471, 0.553]``."""
    ci = _ci(g.get(f"{key}_ci"))
    return _fmt(g.get(key)) + (f" {ci}" if ci else "")


def _worst(g: Mapping[str, Any], block: str) -> str:
    site = g.get(f"{block}.worst_site")
    return "–" if site is None else \
        f"{site} {_fmt(g.get(f'{block}.worst_site_balanced_accuracy'))}"


def report_markdown(report: Mapping[str, Any]) -> str:
    """Render a human-readable summary of :func:`build_report`'s output."""
    sc = report.get("scenario") or {}
    phases = report.get("phase_seconds") or {}
    lines = [f"# Federated run {sc.get('name', '')}", "",
             f"- run id: `{report.get('run_id')}`",
             f"- data: `{sc.get('data')}`; variant {sc.get('model', {}).get('variant')}, "
             f"{sc.get('model', {}).get('size')} px; strategy {sc.get('strategy', {}).get('name')}",
             f"- complete: {report.get('complete')}; "
             f"wall time: {_fmt(report.get('wall_seconds'))} s",
             "- time per phase (s): " + ", ".join(f"{k} {_fmt(float(v))}"
                                                 for k, v in phases.items()), ""]
    new_class = (sc.get("edge") or {}).get("new-class")
    if new_class:
        lines += [f"Class `{new_class}` is held out of federated training: the rounds score the "
                  "other classes; the final Akida scores are on every local test image.", ""]
    for node, why in sorted((report.get("hello_dropped") or {}).items()):
        lines += [f"Left out at hello: {node}: {why}", ""]
    lines += _global_markdown(report.get("global") or {})
    lines += ["## Rounds", "",
              "Each site scores the global model it received, on its local test split, before "
              "training on it (round r scores the model aggregated in round r-1); global = the "
              "union of the sites' test images (summed confusion matrices), with a 95 % "
              "interval. Worst site and spread (best minus worst site) are balanced "
              "accuracies. The last column is each site's own model after its local epochs "
              "(locally tuned, not the federation's model).", "",
              "| round | phase | site | loss | bal. acc. | macro F1 | worst site | spread | "
              "local after training bal. acc. | bytes sent | bytes recv | s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report.get("rounds", []):
        if r["phase"] == "finalize":
            continue
        g = r.get("global", {})
        lines.append(
            f"| {r['step']} | {r['phase']} | **global** | {_fmt(g.get('test.loss'))} | "
            f"{_with_ci(g, 'test.balanced_accuracy')} | {_with_ci(g, 'test.macro_f1')} | "
            f"{_worst(g, 'test')} | {_fmt(g.get('test.spread'))} | "
            f"{_fmt(g.get('local_after_training.balanced_accuracy'))} | "
            f"{r['bytes_sent']} | {r['bytes_received']} | {r['seconds']} |")
        for site, m in sorted(r.get("sites", {}).items()):
            t, loc = m.get("test") or {}, m.get("local_after_training") or {}
            lines.append(f"| | | {site} | {_fmt(t.get('loss'))} | "
                         f"{_fmt(t.get('balanced_accuracy'))} | {_fmt(t.get('macro_f1'))} | | | "
                         f"{_fmt(loc.get('balanced_accuracy'))} | | | |")
        for site, why in r.get("dropped", {}).items():
            lines.append(f"| | | {site} | dropped: {why} | | | | | | | | |")
    final = report.get("final")
    if final:
        g = final.get("global", {})
        lines += ["", "## Final Akida model per site", "",
                  f"Server Akida model hash: `{final.get('server_hash')}` "
                  f"(bytes sent {final.get('bytes_sent')}, {final.get('seconds')} s)", "",
                  "| site | hash matches | Akida/quantized agreement | Akida bal. acc. | "
                  "Akida macro F1 | after on-chip learning bal. acc. | after macro F1 |",
                  "|---|---|---|---|---|---|---|",
                  f"| **global** | | | {_with_ci(g, 'akida.balanced_accuracy')} | "
                  f"{_with_ci(g, 'akida.macro_f1')} | "
                  f"{_with_ci(g, 'akida_after_edge.balanced_accuracy')} | "
                  f"{_with_ci(g, 'akida_after_edge.macro_f1')} |"]
        for site, m in sorted(final.get("sites", {}).items()):
            a, e = m.get("akida") or {}, m.get("akida_after_edge") or {}
            after = _fmt(e.get("balanced_accuracy")) if "error" not in e else \
                f"skipped: {e['error']}"
            lines.append(f"| {site} | {m.get('hash_matches')} | {_fmt(m.get('akida_agreement'))}"
                         f" | {_fmt(a.get('balanced_accuracy'))} | {_fmt(a.get('macro_f1'))} | "
                         f"{after} | {_fmt(e.get('macro_f1'))} |")
        news = {s: m["new_class"] for s, m in final.get("sites", {}).items()
                if m.get("new_class")}
        if news:
            lines += ["", f"## New class learned on-chip: `{new_class}`", "",
                      "Recall of the new class and balanced accuracy of the old classes, before "
                      "and after on-chip learning.", "",
                      "| site | shots | new-class recall before | after | old classes bal. acc. "
                      "before | after |", "|---|---|---|---|---|---|"]
            for site, n in sorted(news.items()):
                def part(when: str, which: str, key: str, n=n) -> str:
                    block = (n.get(when) or {}).get(which) or {}
                    return _fmt(block.get(key))
                lines.append(f"| {site} | {n.get('shots')} | {part('before', 'new', 'accuracy')}"
                             f" | {part('after', 'new', 'accuracy')} | "
                             f"{part('before', 'old', 'balanced_accuracy')} | "
                             f"{part('after', 'old', 'balanced_accuracy')} |")
    lines += privacy_markdown(report.get("privacy") or {})
    lines += _saliency_markdown(report.get("saliency") or {})
    return "\n".join(lines) + "\n"


#: Headline names of the final round's evaluation blocks.
_BLOCK_TITLES = {"test": "float model", "keras_quantized": "quantized Keras model",
                 "akida": "Akida model", "akida_after_edge": "Akida after on-chip learning"}


def _global_markdown(pooled: Mapping[str, Any]) -> list[str]:
    """Render the "Global model" headline: union scores, worst site and spread per block."""
    rows = [(b, pooled[b]) for b in _BLOCK_TITLES if isinstance(pooled.get(b), Mapping)]
    if not rows:
        return []
    lines = ["## Global model", "",
             "The final global model on the union of the sites' test images (summed confusion "
             "matrices, never a mean of site scores), with 95 % intervals (bootstrap over "
             "images, resampled within each site from its confusion matrix); worst site and "
             "spread (best minus worst) of the sites' balanced accuracies.", "",
             "| model | images | bal. acc. | macro F1 | worst site | worst site bal. acc. | "
             "spread |", "|---|---|---|---|---|---|---|"]
    for block, p in rows:
        worst, spread = p.get("worst_site") or {}, p.get("spread") or {}
        lines.append(
            f"| {_BLOCK_TITLES[block]} | {p.get('num_examples')} | "
            f"{_fmt(p.get('balanced_accuracy'))} {_ci(p.get('balanced_accuracy_ci'))} | "
            f"{_fmt(p.get('macro_f1'))} {_ci(p.get('macro_f1_ci'))} | {worst.get('site')} | "
            f"{_fmt(worst.get('balanced_accuracy'))} {_ci(worst.get('balanced_accuracy_ci'))} "
            f"| {_fmt(spread.get('range'))} ({_fmt(spread.get('min'))}–"
            f"{_fmt(spread.get('max'))}) |")
    return lines + [""]


def _saliency_markdown(saliency: Mapping[str, Any]) -> list[str]:
    """Render the per-site "Saliency" sections: stability table and overlay links."""
    if not saliency:
        return []
    lines = ["", "## Saliency", "",
             "Computed on each site from a few of its own test images, for the float global "
             "model (before QAT) and the final quantized global model; the overlays never left "
             "the site (links: where a simulation writes them). Stability = agreement of the "
             "float and quantized maps (Spearman rank correlation, top-10 % pixel overlap; "
             "1 = identical)."]
    for site, sal in sorted(saliency.items()):
        lines += ["", f"### Saliency: {site}", ""]
        if "error" in sal:
            lines.append(f"skipped: {sal['error']}")
            continue
        lines += [f"{sal.get('images')} images.", "",
                  "| method | Spearman mean | Spearman median | top-k overlap mean | median |",
                  "|---|---|---|---|---|"]
        for method, st in sorted((sal.get("stability") or {}).items()):
            rho, top = st.get("spearman") or {}, st.get("top_k_overlap") or {}
            lines.append(f"| {method} | {_fmt(rho.get('mean'))} | {_fmt(rho.get('median'))} | "
                         f"{_fmt(top.get('mean'))} | {_fmt(top.get('median'))} |")
        table: dict[str, dict[str, str]] = {}
        for path in sal.get("files") or []:
            match = _OVERLAY.match(path.split("/", 2)[-1])
            if match:
                method, image, kind = match.groups()
                table.setdefault(image, {})[f"{method} {kind}"] = path
        columns = sorted({c for row in table.values() for c in row})
        if table:
            lines += ["", "| image | " + " | ".join(columns) + " |",
                      "|---|" + "---|" * len(columns)]
            for image, row in sorted(table.items()):
                cells = [f"[png]({row[c]})" if c in row else "–" for c in columns]
                lines.append(f"| {image} | " + " | ".join(cells) + " |")
    return lines


def write_report(out_dir: str | Path, report: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    j, m = out / "report.json", out / "report.md"
    j.write_text(json.dumps(report, indent=1, default=str))
    m.write_text(report_markdown(report))
    return j, m
