"""``qanafed data``: inspect, split and partition dermoscopy datasets."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    import numpy as np
    from rich.table import Table

    from common.dataset import LesionDataset
    from common.quality import QualityReport

app = typer.Typer(help="Inspect, split and partition datasets.", no_args_is_help=True)


class Format(StrEnum):
    """Dataset formats ``--format`` accepts (see ``common.loaders.FORMATS``)."""

    ham10000 = "ham10000"
    isic = "isic"
    npz = "npz"
    folders = "folders"
    synthetic = "synthetic"


class ExtraClasses(StrEnum):
    """What an ISIC loader does with SCC/UNK images (see ``common.loaders.load_isic``)."""

    error = "error"
    drop = "drop"
    keep = "keep"


class Scheme(StrEnum):
    """Partition schemes (see ``common.partition.partition``)."""

    natural = "natural"
    iid = "iid"
    dirichlet = "dirichlet"


PathArg = Annotated[
    str,
    typer.Argument(
        help="Dataset folder, HAM10000 metadata CSV, ISIC ground-truth CSV, MedMNIST .npz "
        "file, or 'synthetic[:n=600,size=64,sites=3,seed=0,mode=dermoscopy]'.",
        show_default=False,
    ),
]
FormatOpt = Annotated[
    Format | None, typer.Option("--format", help="Skip detection and read this format.")
]
ExtraOpt = Annotated[
    ExtraClasses | None,
    typer.Option(
        "--extra-classes",
        help="ISIC only: SCC/UNK images are an error (default), dropped, or kept as classes.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]

#: Dropped images ``data inspect`` names (every one is in the log with ``-v``).
FIRST_DROPPED = 5
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]


def _load(path: str, fmt: Format | None, extra: ExtraClasses | None) -> LesionDataset:
    """Load the dataset, passing ``--extra-classes`` only when it was given."""
    from common.loaders import load_dataset

    options = {} if extra is None else {"extra_classes": extra.value}
    return load_dataset(path, format=None if fmt is None else fmt.value, **options)


def _per_class(
    ds: LesionDataset, groups: Mapping[str, Sequence[int] | np.ndarray]
) -> dict[str, dict[str, int]]:
    """Count images per class within each group of indices."""
    import numpy as np

    counts = {}
    for name, indices in groups.items():
        hist = np.bincount(ds.labels[np.asarray(indices, dtype=np.int64)], minlength=ds.num_classes)
        counts[name] = {c: int(n) for c, n in zip(ds.class_names, hist, strict=True)}
    return counts


def _count_table(
    title: str, key: str, counts: dict[str, dict[str, int]], classes: tuple[str, ...]
) -> Table:
    """Build a rich table: one row per group, one column per class, plus totals."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column(key)
    for name in classes:
        table.add_column(name, justify="right")
    table.add_column("total", justify="right", style="bold")
    for group, row in counts.items():
        table.add_row(group, *(str(row[c]) for c in classes), str(sum(row.values())))
    totals = [sum(row[c] for row in counts.values()) for c in classes]
    table.add_row("all", *map(str, totals), str(sum(totals)), style="bold")
    return table


def _run_quality(ds: LesionDataset) -> QualityReport:
    """Run the quality filter with a rich progress bar on stderr."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from common.quality import check_quality
    from qanafed.cli._common import console

    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("quality check", total=len(ds))
        return check_quality(ds, progress=lambda done, _total: bar.update(task, completed=done))


@app.command()
def inspect(
    path: PathArg,
    json_out: JsonOpt = False,
    no_quality: Annotated[
        bool, typer.Option("--no-quality", help="Skip the image quality filter (decodes images).")
    ] = False,
    fmt: FormatOpt = None,
    extra_classes: ExtraOpt = None,
) -> None:
    """Detect the format and count images, lesions, classes, sites, lesion masks and drops.

    PATH is a dataset folder (HAM10000, ISIC, class-per-folder), a HAM10000 metadata or ISIC
    ground-truth CSV, a MedMNIST .npz file, or synthetic[:n=600,size=64,sites=3,seed=0].
    """
    import numpy as np
    from rich.table import Table

    from common.masks import mask_paths
    from qanafed.cli._common import console, print_json

    ds = _load(path, fmt, extra_classes)
    masks = int((mask_paths(ds) != "").sum())
    sites = {s: np.flatnonzero(ds.sites == s) for s in ds.site_counts()}
    site_classes = _per_class(ds, sites)
    report = None if no_quality else _run_quality(ds)
    quality = None
    if report is not None:
        quality = {
            "kept": int(len(report.kept)),
            "dropped": report.summary(),
            "first_dropped": [
                {"image_id": image_id, "reason": reason, "detail": report.details.get(i, "")}
                for i, image_id, reason in report.dropped[:FIRST_DROPPED]
            ],
        }

    if json_out:
        print_json(
            {
                "format": ds.format,
                "root": ds.root or path,
                "images": len(ds),
                "lesions": ds.num_lesions,
                "classes": ds.class_counts(),
                "sites": ds.site_counts(),
                "site_classes": site_classes,
                "quality": quality,
                "masks": masks,
            }
        )
        return

    console.print(
        f"[bold]{ds.root or path}[/] — format [cyan]{ds.format}[/], {len(ds)} images, "
        f"{ds.num_lesions} lesions, {ds.num_classes} classes, {len(sites)} sites, "
        f"{masks} lesion masks"
    )
    classes = Table(title="Images per class")
    classes.add_column("class")
    classes.add_column("images", justify="right")
    classes.add_column("share", justify="right")
    for name, n in ds.class_counts().items():
        classes.add_row(name, str(n), f"{100 * n / max(len(ds), 1):.1f} %")
    console.print(classes)
    console.print(_count_table("Images per site and class", "site", site_classes, ds.class_names))
    if quality is not None:
        table = Table(title="Quality filter")
        table.add_column("verdict")
        table.add_column("images", justify="right")
        table.add_row("kept", str(quality["kept"]), style="green")
        for reason, n in quality["dropped"].items():
            table.add_row(f"dropped: {reason}", str(n), style="red" if n else None)
        console.print(table)
        first = quality["first_dropped"]
        if first:
            more = len(report.dropped) - len(first)
            console.print(f"first dropped{'' if not more else f' ({more} more not shown)'}:")
            for row in first:
                console.print(f"  {row['image_id']}: {row['reason']} ({row['detail']})",
                              highlight=False, soft_wrap=True)


@app.command()
def split(
    path: PathArg,
    out: Annotated[Path, typer.Option("--out", help="Where to write the split (JSON).")],
    val: Annotated[float, typer.Option("--val", help="Fraction of lesions for validation.")] = 0.15,
    test: Annotated[float, typer.Option("--test", help="Fraction of lesions for test.")] = 0.15,
    seed: SeedOpt = 0,
    json_out: JsonOpt = False,
    fmt: FormatOpt = None,
    extra_classes: ExtraOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
    strict: Annotated[
        bool, typer.Option("--strict", help="Stop at unreadable images, not leave them out.")
    ] = False,
) -> None:
    """Split by lesion (no lesion in two splits), write it to --out and print class counts.

    PATH is any dataset 'qanafed data inspect' reads. Images that cannot be decoded are left
    out of the split and counted (--strict stops instead).
    """
    import numpy as np

    from common.outdir import check_out_file
    from common.splits import grouped_split
    from qanafed.cli._common import console, print_json
    from qanafed.cli._readable import describe, refuse_if_strict, unreadable

    check_out_file(out, inputs={"PATH": path}, force=force)
    ds = _load(path, fmt, extra_classes)
    bad = unreadable(ds)
    refuse_if_strict(bad, strict)
    if bad:
        ds = ds.subset(np.setdiff1d(np.arange(len(ds)), [i for i, _, _ in bad]))
    result = grouped_split(ds, val=val, test=test, seed=seed)
    result.save(out)
    counts = result.class_counts(ds)
    if json_out:
        print_json(
            {
                "out": str(out),
                "excluded_unreadable": len(bad),
                "format": ds.format,
                "root": ds.root or path,
                "val": val,
                "test": test,
                "seed": seed,
                "sizes": result.sizes(),
                "lesions": {
                    name: len(set(ds.lesion_ids[idx].tolist()))
                    for name, idx in result.parts.items()
                },
                "splits": counts,
            }
        )
        return
    console.print(_count_table("Images per split and class", "split", counts, ds.class_names))
    if bad:
        console.print(f"[yellow]left out {len(bad)} unreadable image(s):[/] {describe(bad)}",
                      highlight=False, soft_wrap=True)
    console.print(f"wrote the split of {len(ds)} images to [bold]{out}[/]")


@app.command()
def partition(
    path: PathArg,
    scheme: Annotated[
        Scheme, typer.Option("--scheme", help="natural: the data's own sites; iid or dirichlet.")
    ] = Scheme.natural,
    sites: Annotated[
        int | None, typer.Option("--sites", help="Number of sites (iid/dirichlet).")
    ] = None,
    alpha: Annotated[
        float, typer.Option("--alpha", help="Dirichlet concentration; smaller is more skewed.")
    ] = 0.5,
    seed: SeedOpt = 0,
    json_out: JsonOpt = False,
    fmt: FormatOpt = None,
    extra_classes: ExtraOpt = None,
) -> None:
    """Partition the dataset into federated sites and print per-site class counts.

    PATH is any dataset 'qanafed data inspect' reads.
    """
    from common.partition import partition as make_partition
    from qanafed.cli._common import console, print_json

    if scheme is not Scheme.natural and sites is None:
        raise typer.BadParameter(f"--scheme {scheme.value} needs --sites N", param_hint="--sites")
    ds = _load(path, fmt, extra_classes)
    parts = make_partition(ds, scheme=scheme.value, num_sites=sites, alpha=alpha, seed=seed)
    counts = _per_class(ds, parts)
    if json_out:
        print_json(
            {
                "format": ds.format,
                "root": ds.root or path,
                "scheme": scheme.value,
                "num_sites": len(parts),
                "alpha": alpha,
                "seed": seed,
                "sizes": {name: sum(row.values()) for name, row in counts.items()},
                "sites": counts,
            }
        )
        return
    title = f"Images per site and class ({scheme.value}, {len(parts)} sites)"
    console.print(_count_table(title, "site", counts, ds.class_names))
