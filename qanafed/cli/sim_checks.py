"""Checks ``qanafed sim`` makes before Ray starts, and where a run keeps its metrics key."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import ConfigError, DataError

if TYPE_CHECKING:
    from common.fedconfig import FedConfig

#: Files that mark a folder as a ``qanafed sim`` run.
RUN_MARKERS = ("checkpoints", "progress.jsonl", "report.json")


def key_paths(out: Path) -> tuple[Path, Path]:
    """Return the run's metrics key files ``(private, public)``, outside the shareable ``out``.

    A new run keeps them in the private sibling folder ``OUT.keys/`` (0700); a run made by an
    earlier version keeps its ``OUT/keys/`` (its checkpoints name that public key).
    """
    out = Path(out).expanduser().resolve()
    legacy = out / "keys"
    if (legacy / "metrics.key").is_file():
        return legacy / "metrics.key", legacy / "metrics.pub"
    folder = out.with_name(f"{out.name}.keys")
    return folder / "metrics.key", folder / "metrics.pub"


def check_data(cfg: FedConfig, source: str) -> None:
    """Refuse a scenario whose data path does not exist or matches no format (no decoding).

    Raises
    ------
    DataError, ConfigError
        Naming the path, where it came from (``source``) and the formats accepted.
    """
    from common.loaders.detect import detect_format, is_synthetic, parse_synthetic

    try:
        if is_synthetic(cfg.data):
            parse_synthetic(cfg.data)
        else:
            detect_format(cfg.data)
    except (DataError, ConfigError) as err:
        raise type(err)(f"{source}: {err.problem}", err.fix) from None


def check_rounds(cfg: FedConfig, config: Path, allow_no_training: bool) -> None:
    """Refuse a scenario without any training round unless ``--allow-no-training``."""
    from server.driver import plan

    training = [s for s in plan(cfg) if s.phase in ("warmup", "qat")]
    if not training and not allow_no_training:
        raise ConfigError(
            f"scenario {config} has no training rounds (rounds.warmup: {cfg.rounds.warmup}, "
            f"rounds.qat: {cfg.rounds.qat}, variant {cfg.model.variant}): the run would only "
            "convert and score an untrained model",
            "set rounds.warmup (or rounds.qat) above 0, or pass --allow-no-training if an "
            "untrained model is what you want",
        )


def check_out(
    out: Path, cfg: FedConfig, inputs: dict[str, str | Path | None], *, resume: bool, force: bool
) -> None:
    """Refuse an ``--out`` that holds inputs, another run, or a run of another scenario.

    ``--resume`` continues the run in ``out`` (same scenario), ``--force`` replaces what ``out``
    holds; without either, ``out`` must be new or empty.

    Raises
    ------
    ConfigError
        Naming the folder, what it holds and the fix. Nothing is written.
    """
    from common.checkpoint import load_latest
    from common.outdir import check_inputs_outside, folder_contents

    target = check_inputs_outside(out, inputs)
    if target.exists() and not target.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder", "give --out a run folder")
    if resume and force:
        raise ConfigError("--resume and --force together",
                          "--resume continues the run in --out; --force replaces it: pick one")
    count, first = folder_contents(target)
    if not count or force:
        return
    held = ", ".join(first) + (", ..." if count > len(first) else "")
    if not resume:
        what = "a run" if any((target / m).exists() for m in RUN_MARKERS) else "files"
        raise ConfigError(
            f"--out {out} already holds {what} ({held})",
            "pass --resume to continue it (same scenario and --data), --force to delete it and "
            "start over, or choose another --out",
        )
    if not any((target / m).exists() for m in RUN_MARKERS):
        raise ConfigError(f"--out {out} holds no qanafed run to resume ({held})",
                          "choose the folder of the run to continue, or drop --resume")
    ckpt = load_latest(target / "checkpoints")
    if ckpt is None:
        return
    public = key_paths(target)[1]
    expected = cfg.model_copy(update={"metrics_key": str(public)}).dump()
    saved = ckpt.state.get("scenario") or {}
    changed = sorted(k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k))
    if changed:
        raise ConfigError(
            f"the run in {out} was made with another scenario (differs in: "
            f"{', '.join(changed)}); --resume needs the same one",
            "resume with the same scenario file and --data, pass --force to start over, or "
            "choose another --out",
        )


def clear(out: Path) -> None:
    """Delete what ``out`` holds (``--force``), keeping the folder itself."""
    out = Path(out)
    if not out.is_dir():
        return
    for entry in out.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
