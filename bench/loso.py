"""Leave-one-site-out on real HAM10000: train on three sources, test on the fourth.

The honest proxy for a clinic the model has never seen. For each held-out site the model
is trained with the default recipe of ``qanafed model train`` (or the options given) on the
other three sites (lesion-grouped train/val split of those sites, validation for selection
only), then scored on (a) the in-distribution test split of the three sites and (b) every
image of the held-out site. Results go to ``bench/results/loso.json`` and a section of
``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent


def _arrays(ds: Any, cfg: Any, held_out: str) -> tuple[Any, Any]:
    """Split arrays of the three training sites, and the held-out site's images."""
    from common.clinical import subgroups_from_metadata
    from common.preprocess import load_arrays
    from common.splits import grouped_split
    from common.train import SplitArrays

    inside = np.flatnonzero(ds.sites != held_out)
    outside = np.flatnonzero(ds.sites == held_out)
    train_ds = ds.subset(inside)
    split = grouped_split(train_ds, val=cfg.val, test=cfg.test, seed=cfg.seed)

    def load(d: Any, idx: np.ndarray) -> np.ndarray:
        return load_arrays(d, cfg.size, idx, colour=cfg.colour)

    test_ds = train_ds.subset(split.test)
    arrays = SplitArrays(
        load(train_ds, split.train), train_ds.labels[split.train],
        load(train_ds, split.val), train_ds.labels[split.val],
        load(train_ds, split.test), train_ds.labels[split.test],
        class_names=ds.class_names, test_lesions=test_ds.lesion_ids,
        test_groups=subgroups_from_metadata(test_ds.sites, test_ds.metadata),
    )
    held = ds.subset(outside)
    return arrays, (load(ds, outside), held.labels, held.lesion_ids)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    from bench._report import machine, update_section
    from common.loaders import load_dataset
    from common.quality import QualityConfig, check_quality
    from common.train import TrainConfig, score_logits, train_and_convert

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=str(HERE.parent.parent / "shared/data/ham10000"))
    p.add_argument("--sites", nargs="+", default=["rosendahl", "vidir_modern"])
    p.add_argument("--config", default="{}",
                   help="JSON of TrainConfig fields replacing the defaults")
    p.add_argument("--out", default=str(HERE / "results" / "loso.json"))
    p.add_argument("--results-md", default=str(HERE / "RESULTS.md"))
    args = p.parse_args(argv)

    started = time.strftime("%Y-%m-%d %H:%M")
    facts = machine()
    cfg = TrainConfig(**{"min_agreement": 0.5, **json.loads(args.config)})
    ds = load_dataset(args.data)
    ds = ds.subset(check_quality(ds, QualityConfig(min_side=min(256, cfg.size))).kept)
    rows: list[dict[str, Any]] = []
    for site in args.sites:
        t0 = time.perf_counter()
        arrays, (x_out, y_out, lesions_out) = _arrays(ds, cfg, site)
        result = train_and_convert(arrays, cfg)
        outside = score_logits(result["akida_model"], x_out, y_out, arrays.class_names, cfg.tta,
                               lesion_ids=lesions_out, seed=cfg.seed)
        inside = result["metrics"]["akida"]
        rows.append({
            "held_out": site, "images_out": int(len(y_out)),
            "inside": inside, "outside": outside,
            "gap_points": 100 * (inside["balanced_accuracy"] - outside["balanced_accuracy"]),
            "minutes": (time.perf_counter() - t0) / 60,
        })
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"machine": facts, "started": started,
                                   "config": dataclasses.asdict(cfg), "rows": rows},
                                  indent=1, default=float))
        print(site, f"inside {inside['balanced_accuracy']:.3f} "
              f"outside {outside['balanced_accuracy']:.3f}", flush=True)

    def ci(m: dict[str, Any]) -> str:
        lo, hi = m["ci95"]["balanced_accuracy"]
        return f"{m['balanced_accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"

    lines = [
        "| held-out site | images | Akida bal-acc, 3 training sites' test split [95% CI] | "
        "Akida bal-acc, held-out site [95% CI] | macro F1 held-out | gap (pts) | minutes |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['held_out']} | {r['images_out']} | {ci(r['inside'])} | {ci(r['outside'])} | "
            f"{r['outside']['macro_f1']:.3f} | {r['gap_points']:+.1f} | {r['minutes']:.0f} |")
    recipe = {k: getattr(cfg, k) for k in ("size", "width", "epochs", "qat_epochs", "balance",
                                            "loss", "colour", "distill", "tta", "spike_margin")}
    body = (
        f"`python -m bench.loso` ({started}) on `{args.data}`: train on three sources, test on "
        f"the fourth (all its images); recipe `{json.dumps(recipe)}`.\n\n"
        f"- Machine: {facts['summary']}.\n\n" + "\n".join(lines) + "\n\n"
        f"- Target: held-out site within 8 points of the in-distribution score.\n"
        f"- Raw numbers: `bench/results/{Path(args.out).name}`.\n"
    )
    update_section(Path(args.results_md), "Leave one site out", body)


if __name__ == "__main__":
    main()
