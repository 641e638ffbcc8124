"""Atomic run checkpoints: global arrays, strategy state and JSON state, one per round."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError
from .log import get_logger

log = get_logger("checkpoint")

LATEST = "LATEST"


@dataclass
class Checkpoint:
    """What a run needs to continue after its last complete round.

    Parameters
    ----------
    step : int
        Number of complete rounds (all phases counted), 1-based.
    arrays : dict[str, np.ndarray]
        The global model's arrays.
    groups : dict[str, dict[str, np.ndarray]] (default: {})
        Further named array sets (e.g. the strategy's ``m_t`` / ``v_t``).
    state : dict[str, Any] (default: {})
        JSON-serialisable state: phase, round, report so far, seeds, seen report ids ...
    """

    step: int
    arrays: dict[str, np.ndarray]
    groups: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as fh:
        np.savez(fh, **{k: np.asarray(v) for k, v in arrays.items()})


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def save_checkpoint(directory: str | Path, ckpt: Checkpoint, keep: int = 2) -> Path:
    """Write a checkpoint atomically: a temp folder renamed into place, then ``LATEST`` replaced.

    Parameters
    ----------
    directory : str | Path
        The run's checkpoint folder (created if needed).
    ckpt : Checkpoint
        What to save.
    keep : int (default: 2)
        How many most recent checkpoints to keep.

    Returns
    -------
    Path
        The checkpoint's folder.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{ckpt.step:05d}"
    final = root / name
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _save_npz(tmp / "arrays.npz", ckpt.arrays)
    for group, arrays in ckpt.groups.items():
        _save_npz(tmp / f"group-{group}.npz", arrays)
    (tmp / "state.json").write_text(json.dumps(ckpt.state, indent=1, default=_json_default))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(name)
    os.replace(pointer, root / LATEST)
    old = sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    log.debug("checkpoint %s saved", final)
    return final


def load_latest(directory: str | Path) -> Checkpoint | None:
    """Load the most recent complete checkpoint, or None if the folder holds none.

    Raises
    ------
    ConfigError
        If ``LATEST`` points at a missing or unreadable checkpoint.
    """
    root = Path(directory)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    folder = root / name
    try:
        state = json.loads((folder / "state.json").read_text())
        arrays = _load_npz(folder / "arrays.npz")
        groups = {
            p.stem[len("group-"):]: _load_npz(p) for p in sorted(folder.glob("group-*.npz"))
        }
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"checkpoint {str(folder)!r} is unreadable ({err})",
            "delete the run folder's checkpoints/ to start over, or restore it from backup",
        ) from err
    step = int(name.split("-", 1)[1])
    return Checkpoint(step=step, arrays=arrays, groups=groups, state=state)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
