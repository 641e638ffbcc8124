"""``qanafed model explain``: saliency overlays of a trained float and quantized model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from qanafed.cli._common import console, print_json, stdout_to_stderr

#: Files of a ``qanafed model train`` folder that explain needs.
FLOAT_FILE = "float.h5"
QUANTIZED_FILE = "quantized.h5"
METRICS_FILE = "metrics.json"


def _custom_objects() -> dict[str, Any]:
    """Project Keras objects a saved float model may contain (legacy .h5 needs them by name)."""
    from common.models import blocks
    from common.pact import MinValue, PACTReLU

    objects: dict[str, Any] = {"PACTReLU": PACTReLU, "MinValue": MinValue}
    for name in ("GhostFold", "SpikeReLU"):
        if hasattr(blocks, name):
            objects[name] = getattr(blocks, name)
    return objects


def load_run(model_dir: Path) -> tuple[Any, Any, dict[str, Any]]:
    """Load ``float.h5``, ``quantized.h5`` and ``metrics.json`` of a training output folder.

    Raises
    ------
    ModelError
        A file is missing or unreadable (an Akida ``model.fbz`` alone has no gradients).
    """
    from common.errors import ModelError

    if not model_dir.is_dir():
        raise ModelError(f"model folder {model_dir} does not exist",
                         "pass the --out folder of `qanafed model train`")
    for name in (FLOAT_FILE, QUANTIZED_FILE, METRICS_FILE):
        if not (model_dir / name).is_file():
            raise ModelError(
                f"{model_dir} has no {name}: saliency needs the float and quantized Keras "
                f"models ({FLOAT_FILE}, {QUANTIZED_FILE}) and {METRICS_FILE}; an Akida "
                "model.fbz alone is not enough (Akida models have no gradients)",
                "pass the complete output folder of `qanafed model train`",
            )
    try:
        meta = json.loads((model_dir / METRICS_FILE).read_text())
        class_names, size = list(meta["class_names"]), int(meta["size"])
    except (ValueError, KeyError, TypeError) as err:
        raise ModelError(
            f"{model_dir / METRICS_FILE} is not a training summary with class_names and size "
            f"({err})",
            "pass the output folder of `qanafed model train`",
        ) from err
    import tf_keras as keras
    from quantizeml import load_model

    try:
        # Legacy .h5 files name custom objects by class (e.g. the GhostFold constraint).
        with keras.utils.custom_object_scope(_custom_objects()):
            float_model = keras.models.load_model(model_dir / FLOAT_FILE, compile=False)
            qmodel = load_model(str(model_dir / QUANTIZED_FILE), compile_model=False)
    except (OSError, ValueError, TypeError) as err:
        raise ModelError(f"cannot load the Keras models in {model_dir}: {err}",
                         "re-run `qanafed model train` to write them") from err
    return float_model, qmodel, {**meta, "class_names": class_names, "size": size}


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
) -> None:
    """Write saliency overlays (float and quantized models) and a float→quantized stability score.

    Images come from the run's test split when ``split.json`` matches the dataset.
    """
    from common.errors import ConfigError
    from common.loaders import load_dataset
    from common.preprocess import load_arrays
    from common.saliency import METHODS
    from common.saliency import explain as run_explain

    chosen_methods = [m.strip() for m in methods.split(",") if m.strip()]
    if not chosen_methods or any(m not in METHODS for m in chosen_methods):
        raise ConfigError(f"--methods {methods!r}", f"use a comma-separated subset of "
                          f"{','.join(METHODS)}")
    if n < 1:
        raise ConfigError(f"--n {n}", "explain at least one image")
    with stdout_to_stderr():
        float_model, qmodel, meta = load_run(model)
        ds = load_dataset(data)
        indices, source = _pick(ds, model, n, seed)
        images = load_arrays(ds, meta["size"], indices)
        summary = run_explain(
            float_model, qmodel, images, ds.image_ids[indices], out, chosen_methods,
            class_names=meta["class_names"], labels=ds.labels[indices], top_k=top_k,
            smoothgrad_n=smoothgrad_n, seed=seed,
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
    console.print(f"wrote overlays and summary.json to {out}")


def register(app: typer.Typer) -> None:
    """Add ``explain`` to the ``model`` group."""
    app.command("explain")(explain)
