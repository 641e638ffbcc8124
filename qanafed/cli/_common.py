"""Console, logging and output helpers shared by the CLI groups."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.logging import RichHandler

from common.log import LOGGER_NAME

#: Human output goes to stderr so that ``--json`` output on stdout stays machine-readable.
console = Console(stderr=True)


def setup_logging(level: int = logging.INFO) -> None:
    """Send the qanafed logger to a rich handler on stderr at ``level`` (idempotent).

    A run's log file (:func:`common.log.ensure_log_output`) may take lower levels than the
    console shows.
    """
    log = logging.getLogger(LOGGER_NAME)
    root = logging.getLogger()
    if not root.handlers:
        # A library calling logging.info() would otherwise give the root logger a stderr
        # handler (logging.basicConfig) that echoes every qanafed record, debug included.
        root.addHandler(logging.NullHandler())
    if log.level == logging.NOTSET or log.level > level:
        log.setLevel(level)
    handler = next((h for h in log.handlers if isinstance(h, RichHandler)), None)
    if handler is None:
        handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
        log.addHandler(handler)
    handler.setLevel(level)


def print_json(obj: Any) -> None:
    """Print one JSON object on stdout."""
    print(json.dumps(obj, indent=2, sort_keys=False, default=str))


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send whatever libraries print (quantizeml/Keras progress bars) to stderr.

    Wrap the work of a ``--json`` command in it so that stdout carries the JSON object only.
    """
    with contextlib.redirect_stdout(sys.stderr):
        yield
