"""``qanafed model train`` and ``qanafed model evaluate``: centralized training and scoring."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from common.log import ensure_log_output
from qanafed.cli._common import console, print_json, stdout_to_stderr
from qanafed.cli.release import ReleaseKeyOpt


@contextmanager
def stage_progress() -> Iterator[Callable[[str, int, int], None]]:
    """Show a rich progress display with one bar per pipeline stage."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    labels = {
        "quality": "quality filter",
        "load": "decoding images",
        "float": "float training",
        "qat": "quantization-aware training",
    }
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bars:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(labels.get(stage, stage), total=total)
            bars.update(tasks[stage], completed=done, total=total)

        yield update


def train(
    data: Annotated[str, typer.Option(help="Dataset folder/file, or 'synthetic[:n=..,size=..]'.")],
    out: Annotated[Path, typer.Option(help="Output folder (written atomically).")],
    variant: Annotated[str, typer.Option(help="Model variant (qanafed model list).")] = (
        "qana-akd1000"
    ),
    size: Annotated[int, typer.Option(help="Input side in pixels.")] = 64,
    epochs: Annotated[int, typer.Option(help="Max float epochs (early stop on val).")] = 50,
    qat_epochs: Annotated[int, typer.Option(help="Max QAT epochs (0: post-training).")] = 5,
    batch_size: Annotated[int, typer.Option(help="Mini-batch size.")] = 32,
    lr: Annotated[float, typer.Option(help="Float learning rate.")] = 1e-3,
    qat_lr: Annotated[float | None, typer.Option(help="QAT learning rate [lr/10].")] = None,
    lr_schedule: Annotated[
        str, typer.Option(help="Per-stage learning-rate schedule: cosine|constant.")
    ] = "cosine",
    width: Annotated[float, typer.Option(help="Channel width multiplier.")] = 1.0,
    balance: Annotated[
        str, typer.Option(help="Train balancing: sampler|smote|oversample|none.")
    ] = "sampler",
    sampling_power: Annotated[
        float, typer.Option(help="--balance sampler: 1 class-balanced, 0.5 sqrt, 0 natural.")
    ] = 0.5,
    loss: Annotated[
        str, typer.Option(help="Training loss: ce|logit-adjusted.")
    ] = "logit-adjusted",
    la_tau: Annotated[float, typer.Option(help="Logit-adjustment strength (>= 0).")] = 1.0,
    colour: Annotated[
        str, typer.Option(help="Colour constancy: none|shades-of-gray|gray-world.")
    ] = "none",
    distill: Annotated[
        bool, typer.Option(help="Distil the float model into the quantized one in QAT.")
    ] = False,
    distill_temperature: Annotated[float, typer.Option(help="Distillation temperature.")] = 4.0,
    distill_weight: Annotated[
        float, typer.Option(help="Weight of the distillation term, in [0, 1].")
    ] = 0.5,
    tta: Annotated[
        int, typer.Option(help="Test-time augmentation views for the test scores (1-8).")
    ] = 8,
    spike_margin: Annotated[
        float, typer.Option(help="Keep spike inputs this far from the 0.5 threshold (0: off).")
    ] = 0.0,
    align_before_qat: Annotated[
        bool, typer.Option(help="Akida 1.0: power-of-two channel scales before QAT.")
    ] = True,
    class_weighted: Annotated[bool, typer.Option(help="Class-weighted loss.")] = False,
    augment: Annotated[bool, typer.Option(help="Augment training batches.")] = True,
    split: Annotated[Path | None, typer.Option(help="Reuse a split file (data split).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of split, balancing, augmentation, init.")] = 0,
    patience: Annotated[int, typer.Option(help="Early-stopping patience in epochs.")] = 20,
    min_agreement: Annotated[
        float, typer.Option(help="Akida-vs-quantized top-1 agreement needed to save.")
    ] = 0.9,
    quality_filter: Annotated[
        bool, typer.Option(help="Drop unreadable/tiny/dark/bright/blurry images.")
    ] = True,
    pact: Annotated[
        bool, typer.Option(help="Learn each bounded ReLU's clip α (PACT) in float training.")
    ] = False,
    pact_alpha_init: Annotated[float, typer.Option(help="Initial PACT α (> 0).")] = 6.0,
    pact_l2: Annotated[float, typer.Option(help="L2 penalty on each PACT α (>= 0).")] = 1e-4,
    sgt: Annotated[
        bool, typer.Option(help="Saliency-guided training (float and QAT).")
    ] = False,
    sgt_mask_fraction: Annotated[
        float, typer.Option(help="SGT: fraction of lowest-saliency pixels masked, in (0, 1).")
    ] = 0.1,
    sgt_kl_weight: Annotated[
        float, typer.Option(help="SGT: weight of the KL(original ‖ masked) term (>= 0).")
    ] = 1.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print metrics.json on stdout.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out.")] = False,
) -> None:
    """Train a QANA model: float → quantize (calibrated) → QAT → Akida, scored on the test split."""
    from common.loaders import load_dataset
    from common.metrics import headline
    from common.train import TrainConfig, run_training

    cfg = TrainConfig(
        variant=variant,
        size=size,
        width=width,
        epochs=epochs,
        qat_epochs=qat_epochs,
        batch_size=batch_size,
        lr=lr,
        qat_lr=qat_lr,
        lr_schedule=lr_schedule,
        balance=balance,
        sampling_power=sampling_power,
        loss=loss,
        la_tau=la_tau,
        colour=colour,
        distill=distill,
        distill_temperature=distill_temperature,
        distill_weight=distill_weight,
        tta=tta,
        spike_margin=spike_margin,
        align_before_qat=align_before_qat,
        class_weighted=class_weighted,
        augment=augment,
        seed=seed,
        patience=patience,
        min_agreement=min_agreement,
        quality_filter=quality_filter,
        pact=pact,
        pact_alpha_init=pact_alpha_init,
        pact_l2=pact_l2,
        sgt=sgt,
        sgt_mask_fraction=sgt_mask_fraction,
        sgt_kl_weight=sgt_kl_weight,
    )
    from common.outdir import check_out_dir

    check_out_dir(out, inputs={"--data": data, "--split": split}, force=force)
    out.mkdir(parents=True, exist_ok=True)
    ensure_log_output(out / "run.log", logging.DEBUG)
    ds = load_dataset(data)
    with stage_progress() as progress, stdout_to_stderr():
        payload = run_training(ds, cfg, out, split_file=split, progress=progress)
    if json_out:
        print_json(payload)
        return
    for kind in ("float", "quantized", "akida"):
        console.print(f"test {kind:<9} {headline(payload[kind])}")
    console.print(
        f"Akida/quantized agreement {payload['parity']['top1_agreement']:.1%}; "
        f"wrote {out}/model.fbz"
    )


def evaluate(
    model: Annotated[Path, typer.Option(help="Akida model file (DIR/model.fbz).")],
    data: Annotated[str, typer.Option(help="Dataset folder/file in any supported format.")],
    classes: Annotated[
        str | None, typer.Option(help="Model class names in label order, comma-separated.")
    ] = None,
    split: Annotated[Path | None, typer.Option(help="Score one part of this split file.")] = None,
    part: Annotated[str, typer.Option(help="Which part of --split: train|val|test.")] = "test",
    tta: Annotated[
        int | None,
        typer.Option(help="Test-time augmentation views (1-8); default: the model's own."),
    ] = None,
    colour: Annotated[
        str | None,
        typer.Option(help="Colour constancy; default: the model's own (from its .meta.json)."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    strict: Annotated[
        bool, typer.Option(help="Stop at an unreadable image instead of skipping and counting it.")
    ] = False,
    release_key: ReleaseKeyOpt = None,
) -> None:
    """Score a saved Akida model on any supported dataset (classes matched by name)."""
    from common.evaluate import evaluate_akida
    from common.release import check_before_use

    check_before_use(model, release_key)  # a released model is refused unless it verifies
    from common.loaders import load_dataset
    from common.metrics import headline
    from qanafed.cli._readable import describe, scoring_indices

    ds = load_dataset(data)
    indices, skipped = scoring_indices(ds, split, part, strict=strict)
    names = [c.strip() for c in classes.split(",")] if classes else None
    with stage_progress() as progress, stdout_to_stderr():
        result = evaluate_akida(
            model,
            ds,
            class_names=names,
            indices=indices,
            progress=lambda d, t: progress("load", d, t),
            tta=tta,
            colour=colour,
        )
    result["skipped_unreadable"] = len(skipped)
    if skipped:
        console.print(f"[yellow]skipped {len(skipped)} unreadable image(s)[/] (--strict stops "
                      f"instead): {describe(skipped)}", highlight=False, soft_wrap=True)
    if json_out:
        print_json(result)
        return
    from rich.table import Table

    table = Table("class", "precision", "recall", "f1", "support", title=str(model))
    for name, m in result["per_class"].items():
        table.add_row(
            name, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"])
        )
    console.print(table)
    console.print(headline(result))


def register(app: typer.Typer) -> None:
    """Add ``train`` and ``evaluate`` to the ``model`` group."""
    app.command("train")(train)
    app.command("evaluate")(evaluate)
