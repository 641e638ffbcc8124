"""The one qanafed logger."""

from __future__ import annotations

import logging
import os
from pathlib import Path

LOGGER_NAME = "qanafed"

logger = logging.getLogger(LOGGER_NAME)
logger.addHandler(logging.NullHandler())


def get_logger(child: str | None = None) -> logging.Logger:
    """Return the qanafed logger, or one of its children.

    Parameters
    ----------
    child : str | None (default: None)
        Optional dotted suffix, e.g. ``"data"`` gives ``qanafed.data``.

    Returns
    -------
    logging.Logger
        A logger that propagates to the single ``qanafed`` logger.
    """
    return logger.getChild(child) if child else logger


def ensure_log_output(log_file: str | Path, level: int = logging.INFO) -> None:
    """Send the qanafed logger to ``log_file`` too (idempotent, owner-only file).

    A run's full record (``OUT/run.log``, a ServerApp's ``serverapp.log``): the console shows
    what its handler's level lets through, the file everything from ``level`` up.

    Parameters
    ----------
    log_file : str | Path
        File appended to (created 0600).
    level : int (default: logging.INFO)
        Lowest level written to the file.
    """
    target = str(Path(log_file).resolve())
    if any(getattr(h, "baseFilename", None) == target for h in logger.handlers):
        return
    os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600))  # owner-only
    handler = logging.FileHandler(target, encoding="utf-8")
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)
