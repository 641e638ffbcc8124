"""``qanafed model map`` and ``model learn``: Akida hardware mapping and on-chip learning."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from qanafed.cli.release import ReleaseKeyOpt

if TYPE_CHECKING:
    import akida
    import numpy as np

    from common.dataset import LesionDataset

ModelOpt = Annotated[
    Path,
    typer.Option(
        "--model", help="Akida model file (.fbz), or a folder holding model.fbz.",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


def _model_file(path: Path) -> Path:
    """``DIR`` → ``DIR/model.fbz``; a file stays as it is."""
    return path / "model.fbz" if path.is_dir() else path


def _load_akida(path: Path, release_key: Path | None = None) -> akida.Model:
    """Load an Akida model, turning a missing or foreign file into a clear ModelError.

    A released model (a ``release_key`` given, or a ``.release.json`` beside it) is verified
    first and refused unless its signature and SHA-256 check out.
    """
    import akida

    from common.errors import ModelError
    from common.release import check_before_use

    file = _model_file(path)
    if not file.is_file():
        raise ModelError(
            f"no Akida model at {str(file)!r}",
            "pass the model.fbz that conversion wrote (or its folder) with --model",
        )
    check_before_use(file, release_key)
    try:
        return akida.Model(str(file))
    except Exception as err:  # noqa: BLE001 - akida raises bare RuntimeError/ValueError
        raise ModelError(
            f"{str(file)!r} is not an Akida model file ({type(err).__name__}: {err})",
            "pass a converted Akida model (.fbz), not a Keras model or another file",
        ) from err


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def map_command(
    model: ModelOpt,
    device: Annotated[
        str,
        typer.Option(
            "--device", help="akd1000, akd1500 (Akida 1.0) or akida2-2n/4n/6n/12n (Akida 2.0 IP)."
        ),
    ] = "akd1000",
    hw_only: Annotated[
        bool,
        typer.Option(
            "--hw-only/--allow-software",
            help="Require the whole model on hardware in one sequence.",
        ),
    ] = True,
    as_json: JsonOpt = False,
    release_key: ReleaseKeyOpt = None,
) -> None:
    """Map an Akida model on a (virtual) device: passes, NPs used/available, program size."""
    from rich.table import Table

    from common.edge import map_model
    from qanafed.cli._common import console, print_json

    report = map_model(_load_akida(model, release_key), device, hw_only=hw_only)
    if as_json:
        print_json(report.to_dict())
        return
    table = Table(title=f"{_model_file(model)} on {device} ({report.akida_version})")
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("sequences", str(report.sequences))
    table.add_row("hardware passes", str(report.passes))
    table.add_row("NPs used / available", f"{report.nps_used} / {report.nps_available}")
    table.add_row("input layer on HRC", "yes" if report.hrc_used else "no")
    table.add_row("program bytes", f"{report.program_bytes:,}")
    table.add_row("external memory bytes", f"{report.external_memory_bytes:,}")
    latency = report.on_chip_latency_ms
    table.add_row("on-chip latency", "n/a" if latency is None else f"{latency:.3f} ms/image")
    energy = report.energy_mj
    table.add_row("energy", "n/a" if energy is None else f"{energy:.3f} mJ/image")
    console.print(table)
    if report.note:
        console.print(f"[yellow]note:[/] {report.note}")


def _split_shots(
    ds: LesionDataset, classes: list[int], shots: int, seed: int
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Pick up to ``shots`` images per class by whole lesions, keeping ≥ 1 lesion to evaluate.

    Returns the learning indices, the evaluation indices and the shots taken per class
    (fewer than ``shots`` for a class with few lesions).
    """
    import numpy as np

    from common.errors import DataError

    rng = np.random.default_rng(seed)
    learn_idx: list[int] = []
    eval_idx: list[int] = []
    taken_per_class: dict[str, int] = {}
    for c in classes:
        members = np.flatnonzero(ds.labels == c)
        lesions = rng.permutation(np.unique(ds.lesion_ids[members]))
        if len(lesions) < 2:
            raise DataError(
                f"--shots {shots}: class {ds.class_names[c]!r} has {len(members)} image(s) in "
                f"{len(lesions)} lesion(s), but learning needs at least 2 lesions per class "
                "(shots from one, evaluation on another)",
                "use --data with at least 2 lesions of every class",
            )
        taken: list[int] = []
        used = 0
        while len(taken) < shots and used < len(lesions) - 1:
            taken.extend(members[ds.lesion_ids[members] == lesions[used]].tolist())
            used += 1
        rest = members[~np.isin(ds.lesion_ids[members], lesions[:used])]
        learn_idx.extend(taken[:shots])
        eval_idx.extend(rest.tolist())
        taken_per_class[ds.class_names[c]] = min(len(taken), shots)
    return (
        np.asarray(learn_idx, dtype=np.int64),
        np.asarray(eval_idx, dtype=np.int64),
        taken_per_class,
    )


def _shots_note(shots: int, taken: dict[str, int]) -> str | None:
    """Say which classes gave fewer than ``--shots`` images (None when every class gave all)."""
    short = {name: n for name, n in taken.items() if n < shots}
    if not short:
        return None
    listed = ", ".join(f"{name} {n}" for name, n in short.items())
    return (f"--shots {shots} is more than some classes have outside the lesions kept for "
            f"evaluation; they learn from fewer ({listed}). Use --shots {min(short.values())} "
            "for the same number in every class")


def _write_out(out: Path, model: akida.Model, record: dict[str, Any]) -> None:
    """Write model.fbz and learn.json into a temp folder, then rename it to ``out``.

    ``out`` was checked (``check_out_dir``) before any work.
    """
    from common.atomic import atomic_dir
    from common.edge import save_model_atomic

    with atomic_dir(out) as tmp:
        save_model_atomic(model, tmp / "model.fbz")
        record["model_sha256"] = _sha256(tmp / "model.fbz")
        (tmp / "learn.json").write_text(json.dumps(record, indent=2) + "\n")


def learn_command(
    model: ModelOpt,
    data: Annotated[
        str,
        typer.Option(
            "--data", help="Dataset path or 'synthetic[:n=300,size=32]' spec.", show_default=False
        ),
    ],
    shots: Annotated[int, typer.Option("--shots", min=1, help="Images learned per class.")],
    out: Annotated[
        Path, typer.Option("--out", help="Folder for model.fbz + learn.json.", show_default=False)
    ],
    new_class: Annotated[
        list[str] | None,
        typer.Option(
            "--new-class",
            help="A dataset class the model never learned: added on-chip (repeatable).",
        ),
    ] = None,
    size: Annotated[
        int | None, typer.Option("--size", help="Image side in px (default: the model's).")
    ] = None,
    neurons_per_class: Annotated[
        int, typer.Option("--neurons-per-class", min=1, help="Learning neurons per class.")
    ] = 1,
    competition: Annotated[
        float, typer.Option("--competition", min=0.0, max=1.0, help="Learning competition.")
    ] = 0.1,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Passes over the shots.")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the shot choice and order.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out.")] = False,
    as_json: JsonOpt = False,
    release_key: ReleaseKeyOpt = None,
) -> None:
    """Learn on-chip (Akida 1.0) from K shots per class and/or add a class never trained on.

    The float head is replaced by a learnable Akida layer that learns the old classes from
    --shots images each, then any --new-class is added and learned the same way. Reports
    accuracy, balanced accuracy and macro F1 before and after, on old and new classes, on
    the images of the lesions not used as shots.
    """
    import numpy as np

    from common.edge import (
        add_classes,
        edge_learning_eval,
        learn,
        learning_params,
        predict_classes,
        prepare_edge_learning,
    )
    from common.errors import DataError, ModelError
    from common.loaders import load_dataset
    from common.metrics import headline
    from common.outdir import check_out_dir
    from common.preprocess import load_arrays
    from qanafed.cli._common import console, print_json

    started = time.perf_counter()
    check_out_dir(out, inputs={"--model": model, "--data": data}, force=force)
    ak = _load_akida(model, release_key)
    if ak.learning is not None:
        raise ModelError(
            f"{str(_model_file(model))!r} already has a learned edge head",
            "run learn on the converted model (with its trained head); continuing an "
            "edge-learned model is not supported yet",
        )
    side = int(ak.input_shape[0])
    if size is not None and size != side:
        raise DataError(
            f"--size {size} but the Akida model takes {side}x{side} images",
            f"use --size {side} (or omit it)",
        )
    ds = load_dataset(data)
    names = list(ds.class_names)
    unknown = [n for n in new_class or [] if n not in names]
    if unknown:
        raise DataError(
            f"--new-class {', '.join(unknown)} not in the dataset's classes {names}",
            "name a class of the dataset",
        )
    new_idx = sorted({names.index(n) for n in new_class or []})
    old_idx = [i for i in range(len(names)) if i not in new_idx]
    if not old_idx:
        raise DataError("every class is marked --new-class", "leave at least one old class")
    learn_i, eval_i, shots_taken = _split_shots(ds, old_idx + new_idx, shots, seed)
    shots_note = _shots_note(shots, shots_taken)
    if shots_note:
        console.print(f"[yellow]warning:[/] {shots_note}", highlight=False, soft_wrap=True)
    from common.model_meta import resolve_colour

    colour, _ = resolve_colour(_model_file(model), None)
    x = load_arrays(ds, side, indices=np.concatenate([learn_i, eval_i]), colour=colour)
    x_learn, x_eval = x[: len(learn_i)], x[len(learn_i):]
    y_learn, y_eval = ds.labels[learn_i], ds.labels[eval_i]
    # Edge head order: old classes (dataset order), then the new ones.
    edge_order = np.asarray(old_idx + new_idx)
    to_edge = np.full(len(names), -1)
    to_edge[edge_order] = np.arange(len(edge_order))

    units = int(ak.output_shape[-1])
    before = None
    before_note = None
    raw = predict_classes(ak, x_eval, units)
    if units == len(names):
        before = raw
    elif units == len(old_idx):
        before = np.asarray(old_idx)[raw]
    else:
        before_note = (
            f"the model has {units} outputs but the dataset {len(names)} classes "
            f"({len(old_idx)} old): 'before' cannot be scored"
        )

    edge = prepare_edge_learning(
        ak, len(old_idx), x_learn,
        neurons_per_class=neurons_per_class, learning_competition=competition,
    )
    old_mask = np.isin(y_learn, old_idx)
    learn(edge, x_learn[old_mask], to_edge[y_learn[old_mask]], epochs=epochs, seed=seed)
    if new_idx:
        add_classes(edge, len(new_idx))
        learn(edge, x_learn[~old_mask], to_edge[y_learn[~old_mask]], epochs=epochs, seed=seed)
    after = edge_order[predict_classes(edge, x_eval, len(edge_order))]
    metrics = edge_learning_eval(y_eval, after, names, new_idx, before)

    record = {
        "source_model": str(_model_file(model).resolve()),
        "source_sha256": _sha256(_model_file(model)),
        "data": data,
        "image_size": side,
        "shots": shots,
        "shots_per_class": shots_taken,
        "shots_note": shots_note,
        "epochs": epochs,
        "seed": seed,
        "edge_classes": [names[i] for i in edge_order],
        "new_classes": [names[i] for i in new_idx],
        "learning": learning_params(edge),
        "num_learn_images": len(learn_i),
        "num_eval_images": len(eval_i),
        "before_note": before_note,
        "metrics": metrics,
        "seconds": round(time.perf_counter() - started, 2),
    }
    _write_out(out, edge, record)
    if as_json:
        print_json(record)
        return
    for when in ("before", "after"):
        scored = metrics[when]
        if scored is None:
            console.print(f"{when}: {before_note or 'not scored'}")
            continue
        console.print(f"{when}: {headline(scored['all'])}")
        for part in ("old", "new"):
            if scored[part] is not None:
                console.print(f"  {part} classes: {headline(scored[part])}")
    console.print(f"saved {out / 'model.fbz'} and {out / 'learn.json'}")


def register(app: typer.Typer) -> None:
    """Add the edge commands to the ``model`` group."""
    app.command("map")(map_command)
    app.command("learn")(learn_command)
