"""Accuracy recipe ablation on real HAM10000: one lever added per row, chosen on validation.

Every row trains on the same lesion-grouped split (test never used for a choice): the
baseline (one image per lesion, class-weighted cross-entropy, as the last benchmark) ->
all images -> colour constancy -> balanced sampling + logit-adjusted loss -> input size ->
distillation in QAT -> test-time augmentation. A lever is kept for the following rows only
when it raises the **validation** balanced accuracy of the Akida model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent

#: The recipe's choices named in the summary.
CHOICES = ("size", "colour", "balance", "sampling_power", "loss", "distill", "align_before_qat",
           "tta")


def _first_image_per_lesion(lesions: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Positions in ``idx`` of each lesion's first image, as the old data had."""
    seen: set[str] = set()
    keep = []
    for pos, i in enumerate(idx.tolist()):
        if lesions[i] not in seen:
            seen.add(lesions[i])
            keep.append(pos)
    return np.array(keep, dtype=np.int64)


class Arrays:
    """Decoded splits per (size, colour), cached; the same lesion-grouped split for all."""

    def __init__(self, data: str, seed: int) -> None:
        from common.loaders import load_dataset
        from common.quality import QualityConfig, check_quality
        from common.splits import grouped_split

        ds = load_dataset(data)
        report = check_quality(ds, QualityConfig(min_side=64))
        self.ds = ds.subset(report.kept)
        self.split = grouped_split(self.ds, val=0.15, test=0.15, seed=seed)
        self._cache: dict[tuple[int, str], Any] = {}

    def get(self, size: int, colour: str, one_per_lesion: bool = False) -> Any:
        from common.preprocess import load_arrays
        from common.train import SplitArrays

        key = (size, colour)
        if key not in self._cache:
            parts = {
                name: load_arrays(self.ds, size, getattr(self.split, name), colour=colour)
                for name in ("train", "val", "test")
            }
            self._cache = {key: parts}  # keep one decoding in memory
        parts = self._cache[key]
        labels = {name: self.ds.labels[getattr(self.split, name)] for name in parts}
        train_x, train_y = parts["train"], labels["train"]
        val_x, val_y = parts["val"], labels["val"]
        if one_per_lesion:
            for name in ("train", "val"):
                pos = _first_image_per_lesion(self.ds.lesion_ids, getattr(self.split, name))
                if name == "train":
                    train_x, train_y = parts[name][pos], labels[name][pos]
                else:
                    val_x, val_y = parts[name][pos], labels[name][pos]
        return SplitArrays(
            train_x, train_y, val_x, val_y, parts["test"], labels["test"],
            class_names=self.ds.class_names,
        )

    def test_groups(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        idx = self.split.test
        lesions = self.ds.lesion_ids[idx]
        try:
            from common.clinical import subgroups_from_metadata

            sub = self.ds.subset(idx)
            return lesions, subgroups_from_metadata(sub.sites, sub.metadata)
        except ImportError:
            return lesions, {"site": self.ds.sites[idx]}


def score(model: Any, x: np.ndarray, y: np.ndarray, names: tuple[str, ...], tta: int,
          lesions: np.ndarray | None = None, groups: dict | None = None) -> dict[str, Any]:
    """Metrics of one model on one split (clinical metrics with lesion-bootstrap CIs)."""
    from common.clinical import softmax
    from common.tta import tta_logits

    logits, info = tta_logits(model, x, tta)
    try:
        from common.clinical import clinical_metrics

        m = clinical_metrics(y, softmax(logits), names, lesion_ids=lesions, subgroups=groups,
                             n_boot=1000 if lesions is not None else 1)
    except ImportError:
        from common.metrics import classification_metrics

        m = classification_metrics(y, logits.argmax(-1), names)
    m["tta"] = info
    return m


def run_row(name: str, lever: str, arrays: Any, cfg: Any, bench: Arrays,
            float_cache: dict[str, Any], tta_list: list[int]) -> dict[str, Any]:
    """Train (or reuse) the float model, QAT, convert; score val and test."""
    from common.akida_exact import convert_exact
    from common.train import quantize_and_qat, train_float

    t_cpu, t_wall = time.process_time(), time.perf_counter()
    fkey = json.dumps({k: v for k, v in dataclasses.asdict(cfg).items()
                       if k not in ("distill", "distill_temperature", "distill_weight",
                                    "tta", "qat_epochs")}, sort_keys=True) + str(
        len(arrays.y_train))
    reused = fkey in float_cache
    if reused:
        fmodel, frecord = float_cache[fkey]
    else:
        fmodel, frecord = train_float(arrays, cfg)
        float_cache.clear()
        float_cache[fkey] = (fmodel, frecord)
    qmodel, qrecord = quantize_and_qat(fmodel, arrays, cfg)
    ak = convert_exact(qmodel, cfg.variant)
    cpu_min = (time.process_time() - t_cpu) / 60
    wall_min = (time.perf_counter() - t_wall) / 60
    names = arrays.class_names
    lesions, groups = bench.test_groups()
    row: dict[str, Any] = {
        "row": name, "lever": lever, "config": dataclasses.asdict(cfg),
        "train_images": int(len(arrays.y_train)), "float_reused": reused,
        "float_best_epoch": frecord.get("best_epoch"),
        "cpu_minutes": cpu_min, "wall_minutes": wall_min, "by_tta": {},
    }
    for tta in tta_list:
        entry: dict[str, Any] = {}
        for kind, m in (("float", fmodel), ("quantized", qmodel), ("akida", ak)):
            entry[f"val_{kind}"] = score(m, arrays.x_val, arrays.y_val, names, tta)
            entry[f"test_{kind}"] = score(m, arrays.x_test, arrays.y_test, names, tta,
                                          lesions, groups)
        row["by_tta"][str(tta)] = entry
    return row


def brief(row: dict[str, Any], tta: str = "1") -> dict[str, Any]:
    e = row["by_tta"][tta]

    def ci(m: dict[str, Any], key: str) -> str:
        c = m.get("ci95", {}).get(key)
        return f"{m[key]:.3f} [{c[0]:.3f}, {c[1]:.3f}]" if c else f"{m[key]:.3f}"

    mel = e["test_akida"].get("melanoma") or {}
    return {
        "val_akida": e["val_akida"]["balanced_accuracy"],
        "float": ci(e["test_float"], "balanced_accuracy"),
        "quantized": ci(e["test_quantized"], "balanced_accuracy"),
        "akida": ci(e["test_akida"], "balanced_accuracy"),
        "akida_f1": ci(e["test_akida"], "macro_f1"),
        "mel_sens": e["test_akida"]["per_class"]["mel"]["recall"],
        "mel_sens_at_90spec": mel.get("sensitivity_at_90_specificity"),
        "qat_gap": 100 * (e["test_float"]["balanced_accuracy"]
                          - e["test_quantized"]["balanced_accuracy"]),
        "val_qat_gap": 100 * (e["val_float"]["balanced_accuracy"]
                              - e["val_quantized"]["balanced_accuracy"]),
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| row | lever | train imgs | val Akida bal-acc | float bal-acc [95% CI] | "
            "quantized | Akida bal-acc [95% CI] | Akida macro F1 [CI] | mel sens. | "
            "QAT gap test / val (pts) | CPU min | kept? |\n"
            "|---|---|---:|---:|---|---|---|---|---:|---:|---:|---|\n")
    lines = []
    for r in rows:
        for tta in r["by_tta"]:
            b = brief(r, tta)
            label = r["row"] if tta == "1" else f"{r['row']} (TTA {tta})"
            lines.append(
                f"| {label} | {r['lever']} | {r['train_images']} | {b['val_akida']:.3f} | "
                f"{b['float']} | {b['quantized']} | {b['akida']} | {b['akida_f1']} | "
                f"{b['mel_sens']:.2f} | {b['qat_gap']:+.1f} / {b['val_qat_gap']:+.1f} | "
                f"{r['cpu_minutes']:.1f} | {r.get('kept', '')} |")
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import os

    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    from bench._report import machine, update_section
    from common.train import TrainConfig

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=str(HERE.parent.parent / "shared/data/ham10000"))
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--qat-epochs", type=int, default=2)
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 96])
    p.add_argument("--tta", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--min-gain", type=float, default=0.01,
                   help="validation gain a lever must bring to be kept (noise floor)")
    p.add_argument("--resume", action="store_true",
                   help="reuse rows of --out whose configuration is unchanged")
    p.add_argument("--out", default=str(HERE / "results" / "recipe.json"))
    p.add_argument("--results-md", default=str(HERE / "RESULTS.md"))
    args = p.parse_args(argv)

    started = time.strftime("%Y-%m-%d %H:%M")
    facts = machine()
    bench = Arrays(args.data, seed=0)
    out = Path(args.out)
    done: list[dict[str, Any]] = []
    float_cache: dict[str, Any] = {}
    base = TrainConfig(
        variant="qana-akd1000", size=args.sizes[0], width=args.width, epochs=args.epochs,
        qat_epochs=args.qat_epochs, balance="none", class_weighted=True, patience=5,
        min_agreement=0.5, align_before_qat=False,
    )

    base_now = json.loads(json.dumps(dataclasses.asdict(base)))

    def val_score(row: dict[str, Any]) -> float:
        return row["by_tta"]["1"]["val_akida"]["balanced_accuracy"]

    def record(row: dict[str, Any]) -> None:
        done.append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"machine": facts, "started": started, "args": vars(args),
                                   "rows": done}, indent=1, default=float))
        print(f"{row['row']}: {brief(row)}", flush=True)

    previous = {}
    if args.resume and out.is_file():
        previous = {r["row"]: r for r in json.loads(out.read_text())["rows"]}

    def step(name: str, lever: str, cfg: Any, one_per_lesion: bool = False,
             tta: list[int] | None = None) -> dict[str, Any]:
        now = json.loads(json.dumps(dataclasses.asdict(cfg)))
        before = previous.get(name, {}).get("config")
        # A row measured before a config field existed stands for that field's base value.
        if before is not None and all(before.get(k, base_now[k]) == v for k, v in now.items()):
            record(previous[name])
            return previous[name]
        arrays = bench.get(cfg.size, cfg.colour, one_per_lesion)
        row = run_row(name, lever, arrays, cfg, bench, float_cache, tta or [1])
        record(row)
        return row

    cfg = base
    a = step("A baseline", "one image per lesion, class-weighted CE", cfg, one_per_lesion=True)
    b = step("B full data", "all 10,015 images (several per lesion)", cfg)
    best = b
    c = step("C colour", "Shades of Gray (p = 6)",
             dataclasses.replace(cfg, colour="shades-of-gray"))
    c["kept"] = val_score(c) >= val_score(best) + args.min_gain
    if c["kept"]:
        cfg, best = dataclasses.replace(cfg, colour="shades-of-gray"), c
    d_cfg = dataclasses.replace(cfg, balance="sampler", sampling_power=0.5, loss="logit-adjusted",
                                class_weighted=False)
    d = step("D balanced", "sqrt class-balanced sampling + logit-adjusted loss", d_cfg)
    d["kept"] = val_score(d) >= val_score(best) + args.min_gain
    if d["kept"]:
        cfg, best = d_cfg, d
    for size in args.sizes[1:]:
        s_cfg = dataclasses.replace(cfg, size=size)
        s = step(f"E {size} px", f"input {size} px", s_cfg)
        s["kept"] = val_score(s) >= val_score(best) + args.min_gain
        if s["kept"]:
            cfg, best = s_cfg, s
    f_cfg = dataclasses.replace(cfg, distill=True)
    f = step("F distill", "float teacher in QAT (T 4, w 0.5)", f_cfg)
    f["kept"] = val_score(f) >= val_score(best) + args.min_gain
    if f["kept"]:
        cfg, best = f_cfg, f
    g_cfg = dataclasses.replace(cfg, align_before_qat=True)
    g = step("G align", "power-of-two channel scales before QAT (Akida 1.0)", g_cfg,
             tta=args.tta)
    g["kept"] = val_score(g) >= val_score(best) + args.min_gain
    if g["kept"]:
        cfg, best = g_cfg, g
    tta_val = {t: best["by_tta"].get(str(t), {}).get("val_akida", {}).get("balanced_accuracy")
               for t in args.tta}
    tta_val = {t: v for t, v in tta_val.items() if v is not None}
    chosen_tta = max(tta_val, key=lambda t: (tta_val[t] - (0 if t == 1 else args.min_gain), -t))
    cfg = dataclasses.replace(cfg, tta=chosen_tta)
    for row in (a, b):
        row["kept"] = "-"
    rows = done
    out.write_text(json.dumps({"machine": facts, "started": started, "args": vars(args),
                               "rows": done, "chosen": dataclasses.asdict(cfg)},
                              indent=1, default=float))
    body = (
        f"`python -m bench.recipe` ({started}) on `{args.data}`: one lesion-grouped split "
        f"(seed 0, 70/15/15 % of lesions; test never used for a choice); qana-akd1000, width "
        f"{args.width}, <= {args.epochs} float + <= {args.qat_epochs} QAT epochs, cosine, "
        "early stopping on validation.\n\n"
        f"- Machine: {facts['summary']}.\n"
        "- Each row adds one lever to the last kept row; `kept?` says whether it raised the "
        f"validation Akida balanced accuracy by at least {100 * args.min_gain:.0f} point(s) (the "
        "validation split's noise floor); TTA rows re-score the same models, and the view "
        "count is chosen the same way. Intervals: 95 % bootstrap over test lesions.\n\n"
        + table(rows)
        + f"\n- Chosen recipe: `{json.dumps({k: cfg.__dict__[k] for k in CHOICES})}`.\n"
        f"- Raw numbers: `{Path(args.out).relative_to(HERE.parent)}`.\n"
    )
    update_section(Path(args.results_md), "Accuracy recipe (ablation)", body)


if __name__ == "__main__":
    main()
