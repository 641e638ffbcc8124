"""Refuse an output path that would destroy inputs or results, before anything is written."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .errors import ConfigError

__all__ = ["check_inputs_outside", "check_out_dir", "check_out_file", "folder_contents"]

#: Inputs given as a path or spec (``None`` and ``synthetic[:...]`` specs are not files).
Inputs = Mapping[str, str | Path | None]


def _resolve(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _is_path(value: str | Path | None) -> bool:
    text = "" if value is None else str(value)
    return bool(text) and text != "synthetic" and not text.startswith("synthetic:")


def folder_contents(folder: str | Path, limit: int = 3) -> tuple[int, list[str]]:
    """Count the entries of ``folder`` and name the first ``limit`` (sorted); (0, []) if absent."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0, []
    names = sorted(p.name for p in folder.iterdir())
    return len(names), names[:limit]


def check_inputs_outside(out: str | Path, inputs: Inputs, *, option: str = "--out") -> Path:
    """Refuse an ``out`` that is, or contains, one of ``inputs``; return ``out`` resolved.

    ``--force`` never overrides this: replacing ``out`` would delete the input.

    Parameters
    ----------
    out : str | Path
        The output path.
    inputs : Mapping[str, str | Path | None]
        Option name (e.g. ``"--model"``) → the path it was given; None and synthetic specs
        are skipped.
    option : str (default: "--out")
        How the output is named in messages.

    Raises
    ------
    ConfigError
        Naming the output, the input and the fix.
    """
    target = _resolve(out)
    for name, value in inputs.items():
        if not _is_path(value):
            continue
        source = _resolve(value)
        if source == target or target in source.parents:
            how = "is" if source == target else "contains"
            raise ConfigError(
                f"{option} {out} {how} the input {name} {value}: writing it would destroy "
                "that input",
                f"choose a {option} outside the inputs (--force does not override this)",
            )
    return target


def check_out_dir(
    out: str | Path, *, inputs: Inputs | None = None, force: bool = False,
    option: str = "--out",
) -> Path:
    """Refuse an output folder that holds files (unless ``force``) or holds an input (always).

    Call it before any work, so that a refusal leaves every file as it was.

    Parameters
    ----------
    out : str | Path
        The output folder the command will create or replace.
    inputs : Mapping[str, str | Path | None] | None (default: None)
        Option name → path of each input (see :func:`check_inputs_outside`).
    force : bool (default: False)
        Allow replacing a non-empty folder (the user asked for it with ``--force``).
    option : str (default: "--out")
        How the output is named in messages.

    Returns
    -------
    Path
        ``out`` resolved.

    Raises
    ------
    ConfigError
        ``out`` is a file, holds or is an input, or is a non-empty folder without ``force``.
    """
    target = check_inputs_outside(out, inputs or {}, option=option)
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{option} {out} is a file, not a folder",
                          f"give {option} a folder path (new or empty)")
    count, first = folder_contents(target)
    if count and not force:
        more = ", ..." if count > len(first) else ""
        raise ConfigError(
            f"{option} folder {out} is not empty: it holds {count} item(s) "
            f"({', '.join(first)}{more})",
            f"choose another {option} folder, or pass --force to replace what it holds",
        )
    return target


def check_out_file(
    out: str | Path, *, inputs: Inputs | None = None, force: bool = False,
    option: str = "--out", example: str = "split.json",
) -> Path:
    """Refuse an output file path that is a folder, an input, or (unless ``force``) a file.

    Returns
    -------
    Path
        ``out`` resolved.

    Raises
    ------
    ConfigError
        Naming the path and the fix.
    """
    target = check_inputs_outside(out, inputs or {}, option=option)
    if target.is_dir():
        raise ConfigError(
            f"{option} {out} is a folder; this command writes one file",
            f"give a file path, e.g. {option} {Path(out) / example}",
        )
    if target.exists() and not force:
        raise ConfigError(
            f"{option} file {out} already exists",
            f"choose another {option} file, or pass --force to replace it",
        )
    return target
