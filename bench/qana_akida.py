"""QANA variants on real data: float vs quantized vs Akida, mapping, latency, edge learning.

Run: ``python -m bench.qana_akida [--data PATH] [--sizes 64 128] [--variants ...]``. Writes
``bench/results/qana_akida.json`` and the ``## QANA on Akida`` section of ``bench/RESULTS.md``.
Not a test: it prints what it measures and asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

import common  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from bench._report import machine, update_section
from common.log import get_logger

log = get_logger("bench.qana")
HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1] / "shared" / "data" / "ham10000"
DEVICE = {"akd1000": "akd1000", "akida2": "akida2-6n"}


def _subset(arrays: Any, keep_classes: np.ndarray) -> Any:
    """Arrays without the images of classes outside ``keep_classes`` in train/val."""
    tr = np.isin(arrays.y_train, keep_classes)
    va = np.isin(arrays.y_val, keep_classes)
    return dataclasses.replace(
        arrays,
        x_train=arrays.x_train[tr],
        y_train=arrays.y_train[tr],
        x_val=arrays.x_val[va],
        y_val=arrays.y_val[va],
    )


def _unbalanced_train(arrays: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The original (pre-balancing) training images: balancing appends, originals come first."""
    return arrays.x_train[:n], arrays.y_train[:n]


def _balanced(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Every class resampled (with replacement if short) to the median class count."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    n = int(np.median(counts))
    idx = np.concatenate([rng.choice(np.flatnonzero(y == c), n, replace=(k < n))
                          for c, k in zip(classes, counts, strict=True)])
    return x[idx], y[idx]


def run_variant(arrays: Any, cfg: Any) -> dict[str, Any]:
    """Train one variant; score float/quantized/Akida; map; time; learn on-chip (Akida 1.0)."""
    from common.edge import map_model, measure_latency
    from common.metrics import classification_metrics
    from common.models import get_variant
    from common.train import train_and_convert

    info = get_variant(cfg.variant)
    t0 = time.perf_counter()
    res = train_and_convert(arrays, cfg)
    out: dict[str, Any] = {
        "variant": cfg.variant,
        "size": cfg.size,
        "width": cfg.width,
        "train_seconds": time.perf_counter() - t0,
        "epochs_max": cfg.epochs,
        "qat_epochs_max": cfg.qat_epochs,
        "lr_schedule": cfg.lr_schedule,
        "best_float_epoch": res["training"]["float"]["best_epoch"],
    }
    for kind in ("float", "quantized", "akida"):
        m = res["metrics"][kind]
        out[kind] = {k: m[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")}
    out["parity"] = res["parity"].to_dict()
    tr = res["training"]
    out["float_epoch_s"] = tr["float"]["seconds"] / max(1, len(tr["float"]["history"]))
    if "qat" in tr:
        out["qat_epoch_s"] = tr["qat"]["seconds"] / max(1, len(tr["qat"]["history"]))
        out["qat_over_float_epoch"] = out["qat_epoch_s"] / out["float_epoch_s"]
    ak = res["akida_model"]
    try:
        out["mapping"] = map_model(ak, DEVICE[info.target]).to_dict()
    except Exception as err:  # a bench reports what failed and goes on
        out["mapping"] = {"error": str(err)}
    sample = arrays.x_test[:64]
    out["latency_keras_float"] = measure_latency(res["float_model"], sample)
    out["latency_akida_software"] = measure_latency(ak, sample)
    if info.edge_learning:
        from common.edge import learn, predict_classes, prepare_edge_learning

        n0 = arrays.info["train_before_balance"]
        x_tr, y_tr = _unbalanced_train(arrays, n0)
        # A small grid over the head's settings, chosen on the VALIDATION split (never test):
        # neurons per class, class-balanced presentation (each class resampled to the same
        # count) or the natural mix, and passes over the data.
        presentations = {False: (x_tr, y_tr), True: _balanced(x_tr, y_tr, seed=0)}
        grid, best = [], None
        for npc in (4, 16):
            for balanced, (xs, ys) in presentations.items():
                for epochs in (1, 3):
                    head = prepare_edge_learning(ak, len(arrays.class_names), x_tr[:256],
                                                 neurons_per_class=npc)
                    learn(head, xs, ys, epochs=epochs)
                    val = classification_metrics(
                        arrays.y_val, predict_classes(head, arrays.x_val), arrays.class_names)
                    grid.append({"neurons_per_class": npc, "balanced": balanced,
                                 "epochs": epochs, "val_balanced_accuracy":
                                 val["balanced_accuracy"]})
                    log.info("on-chip head %s", grid[-1])
                    if best is None or val["balanced_accuracy"] > best[0]:
                        best = (val["balanced_accuracy"], grid[-1], head)
        assert best is not None
        out["onchip_grid"] = grid
        out["onchip_choice"] = best[1]
        y_pred = predict_classes(best[2], arrays.x_test)
        onchip = classification_metrics(arrays.y_test, y_pred, arrays.class_names)
        out["onchip_head"] = {k: onchip[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")}
        out["onchip_over_float_head_balacc"] = onchip["balanced_accuracy"] / max(
            1e-9, out["akida"]["balanced_accuracy"]
        )
    return out


def new_class_curve(arrays: Any, cfg: Any, new_class: str, shots: list[int]) -> dict[str, Any]:
    """Train without ``new_class``; then add it on-chip from k shots; old classes kept?"""
    from common.edge import add_classes, learn, predict_classes, prepare_edge_learning
    from common.metrics import classification_metrics
    from common.train import train_and_convert

    names = list(arrays.class_names)
    new = names.index(new_class)
    old = np.array([i for i in range(len(names)) if i != new])
    res = train_and_convert(_subset(arrays, old), cfg)
    ak = res["akida_model"]
    remap = np.full(len(names), -1)
    remap[old] = np.arange(len(old))
    remap[new] = len(old)
    n0 = arrays.info["train_before_balance"]
    x_tr, y_tr = _unbalanced_train(arrays, n0)
    is_old = np.isin(y_tr, old)
    y_test = remap[arrays.y_test]
    test_new = y_test == len(old)
    rng = np.random.default_rng(cfg.seed)
    curve = []
    for k in shots:
        head = prepare_edge_learning(ak, len(old), x_tr[is_old][:256], neurons_per_class=4)
        learn(head, x_tr[is_old], remap[y_tr[is_old]])
        add_classes(head, 1)
        pool = np.flatnonzero(y_tr == new)
        pick = rng.choice(pool, size=min(k, len(pool)), replace=False)
        learn(head, x_tr[pick], np.full(len(pick), len(old)))
        y_pred = predict_classes(head, arrays.x_test)
        m_old = classification_metrics(
            y_test[~test_new], y_pred[~test_new], [names[i] for i in old] + [new_class]
        )
        curve.append(
            {
                "shots": int(len(pick)),
                "new_class_recall": float(np.mean(y_pred[test_new] == len(old))),
                "old_balanced_accuracy": m_old["balanced_accuracy"],
            }
        )
        log.info("new class %s, %d shots: %s", new_class, k, curve[-1])
    return {
        "new_class": new_class,
        "curve": curve,
        "old_balanced_accuracy_before": classification_metrics(
            y_test[~test_new],
            # the backbone keeps the original class indices (its new-class output never trained)
            remap[predict_classes(ak, arrays.x_test)][~test_new],
            [names[i] for i in old],
        )["balanced_accuracy"],
    }


def table(results: list[dict[str, Any]]) -> str:
    """Markdown table of the variant results."""
    rows = [
        "| variant | px | float bal-acc / F1 | quantized | Akida | agree | NPs / passes | "
        "float ms/img b1 / b32 | Akida ms/img b1 / b32 | QAT/float epoch |",
        "|---|---:|---|---|---|---:|---|---|---|---:|",
    ]
    for r in results:
        mp = r.get("mapping", {})
        nps = f"{mp.get('nps_used', '?')}/{mp.get('nps_available', '?')} / {mp.get('passes', '?')}"
        lk, la = r["latency_keras_float"], r["latency_akida_software"]

        def ms(lat: dict[str, Any], b: int) -> str:
            return (
                f"{lat['batches'][str(b)]['ms_per_image']:.2f}"
                if str(b) in lat.get("batches", {})
                else "?"
            )

        rows.append(
            f"| {r['variant']} | {r['size']} | {r['float']['balanced_accuracy']:.3f} / "
            f"{r['float']['macro_f1']:.3f} | {r['quantized']['balanced_accuracy']:.3f} / "
            f"{r['quantized']['macro_f1']:.3f} | {r['akida']['balanced_accuracy']:.3f} / "
            f"{r['akida']['macro_f1']:.3f} | {r['parity']['top1_agreement']:.3f} | {nps} | "
            f"{ms(lk, 1)} / {ms(lk, 32)} | {ms(la, 1)} / {ms(la, 32)} | "
            f"{r.get('qat_over_float_epoch', float('nan')):.1f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and record it."""
    from common.loaders import load_dataset
    from common.models import list_variants
    from common.train import TrainConfig, prepare_arrays

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--data",
        default=str(DEFAULT_DATA)
        if DEFAULT_DATA.exists()
        else "synthetic:n=3000,size=128,sites=4,seed=0",
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[64])
    p.add_argument(
        "--variants", nargs="*", default=[v.name for v in list_variants() if v.convertible]
    )
    p.add_argument(
        "--curve",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Run the qana-akd1000 new-class shot curve (default: when qana-akd1000 is run).",
    )
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--qat-epochs", type=int, default=3)
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--balance", default="none")
    p.add_argument("--lr-schedule", default="cosine")
    p.add_argument("--patience", type=int, default=8)
    p.add_argument("--class-weighted", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--new-class", default="bcc")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10, 20])
    p.add_argument("--out", default=str(HERE / "results" / "qana_akida.json"))
    p.add_argument("--results-md", default=str(HERE / "RESULTS.md"))
    p.add_argument(
        "--merge",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Keep other variants/sizes already in --out (the table shows them all).",
    )
    args = p.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ds = load_dataset(args.data)
    results, curves = [], []
    t0 = time.time()
    out = Path(args.out)
    prev = json.loads(out.read_text()) if args.merge and out.exists() else {}

    def record() -> dict[str, Any]:
        """Merge with earlier runs' other variants/sizes and write the JSON (after every row,
        so a run stopped later keeps what it measured)."""
        mine = {(r["variant"], r["size"]) for r in results}
        done = {c["size"] for c in curves}
        doc = {
            "machine": machine(),
            "data": args.data,
            "args": vars(args),
            "results": [r for r in prev.get("results", [])
                        if (r["variant"], r["size"]) not in mine] + results,
            "edge_new_class": [c for c in prev.get("edge_new_class", [])
                               if c["size"] not in done] + curves,
            "wall_seconds": time.time() - t0,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2, default=str))
        return doc

    for size in args.sizes:
        base = TrainConfig(
            size=size,
            width=args.width,
            epochs=args.epochs,
            qat_epochs=args.qat_epochs,
            balance=args.balance,
            class_weighted=args.class_weighted,
            min_agreement=0.01,
            lr_schedule=args.lr_schedule,
            patience=args.patience,
        )
        arrays, _ = prepare_arrays(ds, base)
        for variant in args.variants:
            cfg = dataclasses.replace(base, variant=variant)
            log.info("=== %s at %d px", variant, size)
            results.append(run_variant(arrays, cfg))
            record()
            print(json.dumps(results[-1], indent=1, default=str)[:2000])
        curve = args.curve if args.curve is not None else "qana-akd1000" in args.variants
        if curve and args.new_class in arrays.class_names:
            cfg = dataclasses.replace(base, variant="qana-akd1000")
            curves.append(
                {"size": size, **new_class_curve(arrays, cfg, args.new_class, args.shots)}
            )
            record()
    doc = record()
    results, curves = doc["results"], doc["edge_new_class"]
    md = [
        f"`python -m bench.qana_akida` ({time.strftime('%Y-%m-%d %H:%M')}), data "
        f"`{Path(args.data).name}`, lesion-grouped test split, {args.epochs} float + "
        f"{args.qat_epochs} QAT epochs max (early stopping on validation), width "
        f"{args.width}, balance {args.balance}, class-weighted loss {args.class_weighted}. "
        f"Machine: {doc['machine']['summary']}.",
        "",
        table(results),
    ]
    for c in curves:
        md += [
            "",
            f"Edge learning at {c['size']} px: backbone trained without `{c['new_class']}`,"
            f" on-chip head learned from local training data, then the new class from k shots "
            f"(old-class balanced accuracy before: {c['old_balanced_accuracy_before']:.3f}).",
            "",
            "| shots | new-class recall | old-class bal-acc |",
            "|---:|---:|---:|",
        ]
        md += [
            f"| {p['shots']} | {p['new_class_recall']:.3f} | {p['old_balanced_accuracy']:.3f} |"
            for p in c["curve"]
        ]
    for r in results:
        if "onchip_head" in r:
            md += [
                "",
                f"On-chip head ({r['variant']}, {r['size']} px) learned from all local "
                f"training data (settings chosen on validation: {r.get('onchip_choice')}): "
                f"balanced accuracy {r['onchip_head']['balanced_accuracy']:.3f}"
                f" = {r['onchip_over_float_head_balacc']:.0%} of the trained head's "
                f"{r['akida']['balanced_accuracy']:.3f}.",
            ]
    update_section(Path(args.results_md), "QANA on Akida", "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
