"""PNG plots of a run report: learning curves and per-site confusion matrices (matplotlib Agg)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def write_plots(report: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """Write ``learning_curves.png`` and ``confusion_<site>.png`` files; return their paths.

    The curves show each round's global model as the sites received it (scored on their
    test splits before local training); the dotted line is the sites' locally trained models.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out = Path(out_dir)
    written: list[Path] = []
    rounds = [r for r in report.get("rounds", []) if r["phase"] in ("warmup", "qat")]
    if rounds:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for ax, key, title in zip(axes, ("loss", "balanced_accuracy", "macro_f1"),
                                  ("test loss", "balanced accuracy", "macro F1"), strict=True):
            steps = [r["step"] for r in rounds]
            ax.plot(steps, [r["global"].get(f"test.{key}") for r in rounds], "k-o",
                    label="global (union of sites)")
            local = [r["global"].get(f"local_after_training.{key}") for r in rounds]
            if any(v is not None for v in local):
                ax.plot(steps, local, ":", color="0.5", label="sites' own models after training")
            sites = sorted({s for r in rounds for s in r["sites"]})
            for site in sites:
                ys = [(r["sites"].get(site) or {}).get("test", {}).get(key) for r in rounds]
                ax.plot(steps, ys, "--", marker=".", label=site)
            qat = [r["step"] for r in rounds if r["phase"] == "qat"]
            if qat:
                ax.axvspan(min(qat) - 0.5, max(qat) + 0.5, color="0.9", label="QAT")
            ax.set_title(f"{title}: global model received")
            ax.set_xlabel("round (scored before local training)")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        path = out / "learning_curves.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    final = report.get("final") or {}
    names = (report.get("scenario") or {}).get("class_names")
    for site, metrics in sorted((final.get("sites") or {}).items()):
        block = metrics.get("akida_after_edge") or {}
        block = block if "confusion_matrix" in block else metrics.get("akida") or {}
        cm = block.get("confusion_matrix")
        if not cm:
            continue
        cm = np.asarray(cm)
        labels = names or [str(i) for i in range(len(cm))]
        fig, ax = plt.subplots(figsize=(4.2, 4))
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(cm)), labels[: len(cm)], rotation=45, fontsize=7)
        ax.set_yticks(range(len(cm)), labels[: len(cm)], fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{site}: Akida on local test", fontsize=9)
        fig.tight_layout()
        path = out / f"confusion_{site}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
