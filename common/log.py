"""The one qanafed logger."""

from __future__ import annotations

import logging

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
