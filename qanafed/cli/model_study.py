"""``qanafed model study``: float vs PTQ vs QAT (± PACT, ± SGT) on one split, as a table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qanafed.cli._common import console, print_json, stdout_to_stderr


def parse_bits(values: list[str]) -> tuple[int, ...]:
    """Parse ``--bits`` values, each an int or a comma-separated list (``8,4,2``).

    Raises
    ------
    ConfigError
        A value that is not a list of integers.
    """
    from common.errors import ConfigError

    out: list[int] = []
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                out.append(int(part))
            except ValueError:
                raise ConfigError(f"--bits {value!r} is not a bit width",
                                  "give integers, e.g. --bits 8,4,2 or --bits 8 --bits 4") from None
    return tuple(out)


def study(
    data: Annotated[str, typer.Option(help="Dataset folder/file, or 'synthetic[:n=..,size=..]'.")],
    out: Annotated[Path, typer.Option(help="Output folder: study.json, study.md, split.json.")],
    variant: Annotated[str, typer.Option(help="Model variant (qanafed model list).")] = (
        "qana-akd1000"
    ),
    size: Annotated[int, typer.Option(help="Input side in pixels.")] = 64,
    width: Annotated[float, typer.Option(help="Channel width multiplier.")] = 0.5,
    epochs: Annotated[int, typer.Option(help="Max float epochs per float stage.")] = 25,
    qat_epochs: Annotated[int, typer.Option(help="Max QAT epochs per QAT arm.")] = 4,
    bits: Annotated[
        list[str] | None,
        typer.Option(help="PTQ bit widths: repeat or comma-separate (default 8,4,2)."),
    ] = None,
    qat_bits: Annotated[
        list[str] | None,
        typer.Option(help="QAT bit widths [those of --bits the target's weights allow]."),
    ] = None,
    arms: Annotated[
        str, typer.Option(help="Comma-separated arms: ptq,qat,qat+pact,qat+sgt,qat+pact+sgt.")
    ] = "ptq,qat,qat+pact,qat+sgt,qat+pact+sgt",
    batch_size: Annotated[int, typer.Option(help="Mini-batch size.")] = 32,
    lr: Annotated[float, typer.Option(help="Float learning rate.")] = 1e-3,
    lr_schedule: Annotated[str, typer.Option(help="cosine|constant.")] = "cosine",
    balance: Annotated[str, typer.Option(help="Train balancing: smote|oversample|none.")] = (
        "none"
    ),
    class_weighted: Annotated[bool, typer.Option(help="Class-weighted loss.")] = True,
    patience: Annotated[int, typer.Option(help="Early-stopping patience in epochs.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of split, balancing, init.")] = 0,
    pact_alpha_init: Annotated[float, typer.Option(help="Initial PACT α (> 0).")] = 6.0,
    pact_l2: Annotated[float, typer.Option(help="L2 penalty on each PACT α.")] = 1e-4,
    sgt_mask_fraction: Annotated[
        float, typer.Option(help="SGT: fraction of lowest-saliency pixels masked.")
    ] = 0.1,
    sgt_kl_weight: Annotated[float, typer.Option(help="SGT: weight of the KL term.")] = 1.0,
    saliency_images: Annotated[
        int, typer.Option(help="Test images for saliency stability.")
    ] = 32,
    json_out: Annotated[bool, typer.Option("--json", help="Print study.json on stdout.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out.")] = False,
) -> None:
    """Compare float, PTQ and QAT (with/without PACT and SGT) on one split; write a table."""
    import numpy as np

    from common.loaders import load_dataset
    from common.masks import load_masks, mask_dir
    from common.outdir import check_out_dir
    from common.study import (
        in_lesion_sentence,
        run_study,
        study_table,
        targets_sentence,
        write_study,
    )
    from common.train import TrainConfig, prepare_arrays
    from qanafed.cli.model_train import stage_progress

    cfg = TrainConfig(
        variant=variant, size=size, width=width, epochs=epochs, qat_epochs=qat_epochs,
        batch_size=batch_size, lr=lr, lr_schedule=lr_schedule, balance=balance,
        class_weighted=class_weighted, patience=patience, seed=seed,
        pact_alpha_init=pact_alpha_init, pact_l2=pact_l2, sgt_mask_fraction=sgt_mask_fraction,
        sgt_kl_weight=sgt_kl_weight, min_agreement=0.01,
    )
    arm_list = tuple(a.strip() for a in arms.split(",") if a.strip())
    bit_list = parse_bits(bits) if bits else (8, 4, 2)
    qat_list = parse_bits(qat_bits) if qat_bits else None
    check_out_dir(out, inputs={"--data": data}, force=force)
    ds = load_dataset(data)
    with stage_progress() as progress, stdout_to_stderr():
        arrays, split = prepare_arrays(ds, cfg, progress=progress)
        test_masks = None
        if mask_dir(ds) is not None and arrays.test_image_ids is not None:
            index = {image_id: i for i, image_id in enumerate(ds.image_ids.tolist())}
            test_idx = np.array([index[i] for i in arrays.test_image_ids.tolist()], np.int64)
            test_masks = load_masks(ds, size, test_idx)
        result = run_study(arrays, cfg, bits=bit_list, qat_bits=qat_list, arms=arm_list,
                           progress=progress, saliency_images=saliency_images,
                           test_masks=test_masks)
        write_study(out, result, split)
    if json_out:
        print_json(result)
        return
    console.print(study_table(result))
    console.print(targets_sentence(result["targets"]))
    in_lesion = in_lesion_sentence(result)
    if in_lesion:
        console.print(in_lesion)
    console.print(f"wrote {out}/study.json and {out}/study.md")


def register(app: typer.Typer) -> None:
    """Add ``study`` to the ``model`` group."""
    app.command("study")(study)
