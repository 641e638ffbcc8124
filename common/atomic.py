"""Write an output folder atomically: fill a temporary sibling, then swap it in."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``out``; on success it becomes ``out``.

    An existing ``out`` is replaced only once the new folder is complete; if the body raises
    (or the process is interrupted) the temporary folder is removed and ``out`` is untouched,
    so nothing half-written is ever left under the requested name.

    Parameters
    ----------
    out : str | Path
        The folder to create or replace.

    Yields
    ------
    Path
        The temporary folder to write into (same file system as ``out``; the usual umask
        permissions, not ``mkdtemp``'s 0700).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        yield tmp
        if out.exists():
            backup = out.with_name(f".{out.name}.old-{os.getpid()}")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(out, backup)
            os.replace(tmp, out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
