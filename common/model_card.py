"""Write a run's model card (Markdown): intended use, data, recipe, clinical metrics, limits."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text
from .log import get_logger

__all__ = ["MODEL_CARD_NAME", "render_model_card", "write_model_card"]

log = get_logger("model_card")

#: File name written when ``write_model_card`` is given a folder.
MODEL_CARD_NAME = "model_card.md"

#: The models of a run, in report order, with their display names.
MODELS: tuple[tuple[str, str], ...] = (
    ("float", "float (Keras)"),
    ("quantized", "quantized (QuantizeML)"),
    ("akida", "Akida"),
)

#: Per-class support below which a class's metrics are flagged as uncertain.
SMALL_SUPPORT = 30

NA = "n/a"

HAM_CITATION = (
    "Tschandl P, Rosendahl C, Kittler H. The HAM10000 dataset, a large collection of "
    "multi-source dermatoscopic images of common pigmented skin lesions. Sci Data 5, 180161 "
    "(2018). doi:10.1038/sdata.2018.161. Licence: CC BY-NC 4.0 (attribution, non-commercial)."
)


def write_model_card(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write the model card of one run atomically (temporary file, then rename).

    Parameters
    ----------
    path : str | Path
        The Markdown file to write, or a folder (an existing one, or a path without suffix)
        in which ``model_card.md`` is written.
    payload : Mapping[str, Any]
        A run's ``metrics.json`` as written by :func:`common.train.run_training`: ``variant``,
        ``size``, ``class_names``, ``config``, ``data``, ``split``, and ``float`` /
        ``quantized`` / ``akida`` metrics from :func:`common.clinical.clinical_metrics`;
        optionally ``preprocessing`` (dict), ``tta`` (int), ``bits`` (dict with
        ``weight_bits`` and ``activation_bits``; else guessed from the variant name) and
        ``akida_hash``. Every key may be missing: the card then says ``n/a``.

    Returns
    -------
    Path
        The written file.
    """
    out = Path(path)
    if out.is_dir() or not out.suffix:
        out = out / MODEL_CARD_NAME
    atomic_write_text(out, render_model_card(payload))
    log.info("wrote model card %s", out)
    return out


def render_model_card(payload: Mapping[str, Any]) -> str:
    """Return the Markdown text of :func:`write_model_card`.

    Parameters
    ----------
    payload : Mapping[str, Any]
        As for :func:`write_model_card`.

    Returns
    -------
    str
        The model card, ending with a newline.
    """
    p = dict(payload)
    sections = [
        _title(p),
        _intended_use(p),
        _data(p),
        _preprocessing(p),
        _recipe(p),
        _metrics(p),
        _per_class(p),
        _subgroups(p),
        _limits(p),
    ]
    return "\n\n".join(s.strip("\n") for s in sections) + "\n"


# ---------------------------------------------------------------- formatting helpers


def _num(x: Any, digits: int = 3) -> str:
    """Format a number, or ``n/a`` when it is missing or not a finite number."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return NA
    if isinstance(x, numbers.Integral):
        return str(int(x))
    return f"{float(x):.{digits}f}" if math.isfinite(x) else NA


def _with_ci(m: Mapping[str, Any], key: str) -> str:
    """Return ``value [lo, hi]`` from ``m[key]`` and ``m["ci95"][key]`` (n/a when missing)."""
    value = _num(m.get(key))
    ci = _get(m, "ci95", key)
    if isinstance(ci, list | tuple) and len(ci) == 2:
        return f"{value} [{_num(ci[0])}, {_num(ci[1])}]"
    return f"{value} [CI n/a]" if value != NA else NA


def _get(d: Any, *keys: str) -> Any:
    """Return ``d[k1][k2]...``, or None as soon as a level is missing or not a mapping."""
    for k in keys:
        if not isinstance(d, Mapping):
            return None
        d = d.get(k)
    return d


def _cell(x: Any) -> str:
    """Return ``x`` as a Markdown table cell, pipes and newlines escaped."""
    s = NA if x is None else str(x)
    return s.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    """Return a Markdown table."""
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _reference(p: Mapping[str, Any]) -> tuple[str, str, Mapping[str, Any]] | None:
    """Return (key, label, metrics) of the Akida model if present, else quantized, else float."""
    for key, label in reversed(MODELS):
        if isinstance(p.get(key), Mapping):
            return key, label, p[key]
    return None


# ---------------------------------------------------------------- sections


def _title(p: Mapping[str, Any]) -> str:
    variant = p.get("variant") or NA
    size = p.get("size")
    size_txt = f"{size}x{size} px" if isinstance(size, int) else "input size n/a"
    lines = [f"# Model card: {variant} ({size_txt})"]
    if p.get("akida_hash"):
        lines.append(f"\nAkida model hash: `{p['akida_hash']}`")
    return "\n".join(lines)


def _intended_use(p: Mapping[str, Any]) -> str:
    names = p.get("class_names")
    classes = f" ({len(names)} classes: {', '.join(map(str, names))})" if names else ""
    return (
        "## Intended use\n\n"
        "**Intended use: research only, not for diagnosis; not a medical device.** A "
        f"dermatoscopic skin-lesion classifier{classes} for studying federated, quantized "
        "(Akida) edge deployment. Its outputs must not inform the care of any patient; it has "
        "not been clinically validated or approved by any regulator."
    )


def _data(p: Mapping[str, Any]) -> str:
    data = p.get("data") if isinstance(p.get("data"), Mapping) else {}
    fmt = data.get("format") or NA
    lines = ["## Data", "", f"- Format: {fmt}"]
    lines.append(f"- Images: {_num(data.get('images_in'))}; lesions: {_num(data.get('lesions'))}")
    split = p.get("split") if isinstance(p.get("split"), Mapping) else {}
    parts = ", ".join(f"{k} {_num(split.get(k))}" for k in ("train", "val", "test"))
    lines.append(f"- Split (images; lesion-grouped, no lesion in two parts): {parts}")
    if isinstance(data.get("quality_dropped"), Mapping):
        dropped = {k: v for k, v in data["quality_dropped"].items() if v}
        lines.append(f"- Dropped by the quality filter: {dropped or 'none'}")
    if "train_before_balance" in data or "train_after_balance" in data:
        lines.append(
            f"- Training images before/after class balancing: "
            f"{_num(data.get('train_before_balance'))} / {_num(data.get('train_after_balance'))}"
        )
    counts = data.get("split_counts")
    if isinstance(counts, Mapping) and counts:
        names = list(p.get("class_names") or next(iter(counts.values()), {}).keys())
        parts_ = list(counts)
        rows = [[c, *(_num(_get(counts, s, c)) for s in parts_)] for c in names]
        lines += ["", "Images per class and split:", "", _table(["class", *parts_], rows)]
    else:
        lines.append("- Images per class and split: n/a")
    if str(fmt).lower() == "ham10000":
        lines += ["", f"Source: {HAM_CITATION}"]
    return "\n".join(lines)


def _preprocessing(p: Mapping[str, Any]) -> str:
    lines = ["## Preprocessing", ""]
    pre = p.get("preprocessing")
    if isinstance(pre, Mapping) and pre:
        lines += [f"- {k}: {v}" for k, v in pre.items()]
    else:
        lines.append("- Details: n/a (not recorded in this run)")
    size = p.get("size")
    if not (isinstance(pre, Mapping) and "size" in pre):
        lines.append(f"- Input size: {f'{size}x{size} px' if isinstance(size, int) else NA}")
    tta = p.get("tta")
    if isinstance(tta, numbers.Integral) and not isinstance(tta, bool):
        lines.append(f"- Test-time augmentation: {f'{tta} views' if tta > 1 else 'none'}")
    else:
        lines.append(f"- Test-time augmentation: {NA}")
    return "\n".join(lines)


def _recipe(p: Mapping[str, Any]) -> str:
    cfg = p.get("config")
    if not isinstance(cfg, Mapping) or not cfg:
        return "## Training recipe\n\nn/a (no configuration recorded)"
    return "## Training recipe\n\n" + _table(["setting", "value"], [[k, v] for k, v in cfg.items()])


def _metrics(p: Mapping[str, Any]) -> str:
    header = [
        "model",
        "balanced accuracy [95% CI]",
        "macro F1 [95% CI]",
        "accuracy",
        "melanoma sens. @80% spec.",
        "melanoma sens. @90% spec.",
        "melanoma AUC",
        "ECE",
    ]
    rows, missing, notes = [], [], set()
    for key, label in MODELS:
        m = p.get(key)
        if not isinstance(m, Mapping):
            missing.append(label)
            continue
        mel = m.get("melanoma") if isinstance(m.get("melanoma"), Mapping) else {}
        rows.append(
            [
                label,
                _with_ci(m, "balanced_accuracy"),
                _with_ci(m, "macro_f1"),
                _num(m.get("accuracy")),
                _num(mel.get("sensitivity_at_80_specificity")),
                _num(mel.get("sensitivity_at_90_specificity")),
                _num(mel.get("auc")),
                _num(m.get("ece")),
            ]
        )
        ci = m.get("ci95")
        if isinstance(ci, Mapping):
            notes.add(
                f"95% CI: percentile bootstrap over {ci.get('unit') or NA}s, "
                f"{_num(ci.get('n_boot'))} resamples."
            )
        if mel.get("reason"):
            notes.add(f"{label}: no melanoma operating points ({mel['reason']}).")
        if "ece_bins" in m:
            notes.add(f"ECE: top-1 confidence, {_num(m['ece_bins'])} equal-width bins.")
    lines = ["## Metrics (test split)", ""]
    if not rows:
        lines.append("n/a (no float, quantized or Akida metrics in this run)")
        return "\n".join(lines)
    lines.append(_table(header, rows))
    if missing:
        lines += ["", f"Not evaluated: {', '.join(missing)}."]
    if notes:
        lines += [""] + [f"- {n}" for n in sorted(notes)]
    return "\n".join(lines)


def _per_class(p: Mapping[str, Any]) -> str:
    ref = _reference(p)
    if ref is None or not isinstance(ref[2].get("per_class"), Mapping):
        return "## Per-class metrics\n\nn/a"
    _, label, m = ref
    rows = []
    for name, c in m["per_class"].items():
        c = c if isinstance(c, Mapping) else {}
        support = c.get("support")
        small = isinstance(support, numbers.Integral) and support < SMALL_SUPPORT
        flag = " (small: uncertain)" if small else ""
        rows.append(
            [
                name,
                f"{_num(support)}{flag}",
                _num(c.get("sensitivity", c.get("recall"))),
                _num(c.get("specificity")),
                _num(c.get("roc_auc")),
                _num(c.get("precision")),
                _num(c.get("f1")),
            ]
        )
    header = ["class", "support", "sensitivity", "specificity", "AUC (1-vs-rest)", "precision"]
    lines = [f"## Per-class metrics ({label})", "", _table([*header, "F1"], rows)]
    auc = m.get("roc_auc_macro")
    lines += ["", f"Macro one-vs-rest AUC: {_num(auc)}"]
    return "\n".join(lines)


def _subgroups(p: Mapping[str, Any]) -> str:
    ref = _reference(p)
    groups = ref[2].get("subgroups") if ref else None
    if not isinstance(groups, Mapping) or not groups:
        return "## Subgroups\n\nn/a (no subgroup metadata evaluated)"
    lines = [f"## Subgroups ({ref[1]})"]
    for group, g in groups.items():
        g = g if isinstance(g, Mapping) else {}
        values = g.get("values") if isinstance(g.get("values"), Mapping) else {}
        rows = [
            [v, _num(s.get("n")), _num(s.get("balanced_accuracy")), _num(s.get("macro_f1"))]
            for v, s in values.items()
            if isinstance(s, Mapping)
        ]
        lines += ["", f"### {group}", ""]
        if rows:
            lines.append(_table(["value", "images", "balanced accuracy", "macro F1"], rows))
        else:
            lines.append("No value has enough images to be scored.")
        skipped = g.get("skipped") if isinstance(g.get("skipped"), Mapping) else {}
        if skipped:
            items = "; ".join(
                f"{v} ({_num(_get(s, 'n'))} images: {_get(s, 'reason') or 'skipped'})"
                for v, s in skipped.items()
            )
            lines += ["", f"Not scored: {items}."]
    return "\n".join(lines)


def _bits(p: Mapping[str, Any]) -> str:
    """Describe the quantization: ``payload["bits"]`` if given, else from the variant name."""
    bits = p.get("bits")
    if isinstance(bits, Mapping) and bits:
        w, a = _num(bits.get("weight_bits")), _num(bits.get("activation_bits"))
        return f"{w}-bit weights and {a}-bit activations"
    variant = str(p.get("variant") or _get(p, "config", "variant") or "")
    if variant.endswith("akd1000"):
        return "4-bit weights and activations (8-bit input layer)"
    if variant.endswith("akida2"):
        return "8-bit weights and activations"
    return "low-bit quantized weights and activations"


def _limits(p: Mapping[str, Any]) -> str:
    ref = _reference(p)
    small = []
    if ref and isinstance(ref[2].get("per_class"), Mapping):
        small = [
            f"{name} ({c.get('support')})"
            for name, c in ref[2]["per_class"].items()
            if isinstance(c, Mapping)
            and isinstance(c.get("support"), numbers.Integral)
            and c["support"] < SMALL_SUPPORT
        ]
    fmt = str(_get(p, "data", "format") or "").lower()
    source = (
        "Trained on HAM10000, dermatoscopic images from 4 sources in Austria (Vienna) and "
        "Australia (Queensland); mostly fair-skinned patients, so performance on other skin "
        "types, cameras and clinics is unknown."
        if fmt in ("ham10000", "")
        else f"Trained on {fmt} data; performance on other populations and devices is unknown."
    )
    items = [
        f"A small CNN sized for the Akida neuromorphic chip, with {_bits(p)}: less accurate "
        "than large dermatology models.",
        source,
        "The split is lesion-level (no lesion in both training and test), but all parts come "
        "from the same sources: expect lower performance on external data.",
        "Per-class metrics are uncertain where support is small"
        + (f": {', '.join(small)} test images." if small else "."),
        "Confidence intervals cover resampling of this test split only, not other populations.",
    ]
    return "## Known limits\n\n" + "\n".join(f"- {i}" for i in items)
