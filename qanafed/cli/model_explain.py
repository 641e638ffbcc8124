"""``qanafed model explain``: saliency overlays of a trained float and quantized model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from common.runio import load_run
from qanafed.cli._common import console, print_json, stdout_to_stderr

__all__ = ["explain", "load_run", "register"]


def _pick(ds: Any, model_dir: Path, n: int, seed: int) -> tuple[Any, str]:
    """Choose ``n`` images: from the run's test split when it matches ``ds``, else from all."""
    import numpy as np

    from common.errors import DataError

    indices, source = np.arange(len(ds)), "all images"
    split_file = model_dir / "split.json"
    if split_file.is_file():
        from common.splits import Split

        try:
            indices, source = Split.load(split_file, ds).test, "test split"
        except (DataError, ValueError, KeyError):
            source = "all images (the run's split does not match this dataset)"
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(indices, min(n, len(indices)), replace=False))
    return chosen, source


def explain(
    model: Annotated[Path, typer.Option(help="Output folder of `qanafed model train`.")],
    data: Annotated[str, typer.Option(help="Dataset folder/file, or 'synthetic[:n=..]'.")],
    out: Annotated[Path, typer.Option(help="Output folder for overlays (written atomically).")],
    n: Annotated[int, typer.Option(help="Number of images to explain.")] = 16,
    methods: Annotated[str, typer.Option(help="Comma-separated: vanilla,smoothgrad.")] = (
        "vanilla,smoothgrad"
    ),
    smoothgrad_n: Annotated[int, typer.Option(help="Noisy samples per SmoothGrad map.")] = 16,
    top_k: Annotated[float, typer.Option(help="Top-k pixel fraction for the overlap score.")] = (
        0.1
    ),
    seed: Annotated[int, typer.Option(help="Seed of image choice and SmoothGrad noise.")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print summary.json on stdout.")] = (
        False
    ),
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out.")] = False,
) -> None:
    """Write saliency overlays (float and quantized models) and a float→quantized stability score.

    Images come from the run's test split when ``split.json`` matches the dataset.
    """
    from common.errors import ConfigError
    from common.loaders import load_dataset
    from common.masks import load_masks
    from common.outdir import check_out_dir
    from common.preprocess import load_arrays
    from common.saliency import METHODS
    from common.saliency import explain as run_explain

    chosen_methods = [m.strip() for m in methods.split(",") if m.strip()]
    if not chosen_methods or any(m not in METHODS for m in chosen_methods):
        raise ConfigError(f"--methods {methods!r}", f"use a comma-separated subset of "
                          f"{','.join(METHODS)}")
    if n < 1:
        raise ConfigError(f"--n {n}", "explain at least one image")
    check_out_dir(out, inputs={"--model": model, "--data": data}, force=force)
    with stdout_to_stderr():
        float_model, qmodel, meta = load_run(model)
        ds = load_dataset(data)
        indices, source = _pick(ds, model, n, seed)
        from common.model_meta import resolve_colour

        colour, _ = resolve_colour(Path(model) / "model.fbz", None)
        images = load_arrays(ds, meta["size"], indices, colour=colour)
        masks, present = load_masks(ds, meta["size"], indices)
        summary = run_explain(
            float_model, qmodel, images, ds.image_ids[indices], out, chosen_methods,
            class_names=meta["class_names"], labels=ds.labels[indices], top_k=top_k,
            smoothgrad_n=smoothgrad_n, seed=seed, masks=masks, mask_present=present,
        )
    if json_out:
        print_json(summary)
        return
    console.print(f"explained {summary['n_images']} images ({source}); "
                  f"float/quantized top-1 agreement {summary['top1_agreement']:.0%}")
    for method, stats in summary["stability"].items():
        rho, overlap = stats["spearman"]["mean"], stats["top_k_overlap"]["mean"]
        console.print(
            f"{method:<10} float→quantized Spearman "
            f"{'n/a' if rho is None else f'{rho:.3f}'}, top-{top_k:.0%} overlap "
            f"{'n/a' if overlap is None else f'{overlap:.3f}'}"
        )
    _print_in_lesion(summary)
    console.print(f"wrote overlays and summary.json to {out}")


def _print_in_lesion(summary: dict[str, Any]) -> None:
    """Print the saliency-in-lesion scores and, once, what they mean."""
    scores = summary.get("saliency_in_lesion")
    if not scores:
        return
    area = None
    for method, by_kind in scores.items():
        parts = [f"{kind} " + ("n/a" if s["mean"] is None else f"{s['mean']:.2f}")
                 for kind, s in by_kind.items()]
        first = next(iter(by_kind.values()))
        area = first["lesion_area"] if area is None else area
        console.print(f"{method:<10} saliency in lesion: {', '.join(parts)} "
                      f"({first['n']} images; {first['skipped_no_mask']} without mask)")
    if area is not None:
        console.print(
            "saliency in lesion = share of the map's mass inside the lesion mask; a map with "
            f"no preference scores the lesion's area ({area:.2f}); a score near or below it "
            "means the model looks at the skin around the lesion: a warning"
        )


def register(app: typer.Typer) -> None:
    """Add ``explain`` to the ``model`` group."""
    app.command("explain")(explain)
