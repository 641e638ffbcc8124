"""Ctrl-C for long commands: the first asks the work to stop, the second quits at once."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

#: Exit status of a command stopped by Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 128 + signal.SIGINT


def _write(text: str) -> None:
    """Write to stderr without locks (safe in a signal handler, whatever the threads hold).

    Goes to ``sys.stderr``'s descriptor: under :func:`qanafed.cli.quiet.filter_native_stderr`
    descriptor 2 is a pipe whose reader thread dies with an ``os._exit``, this one is the console.
    """
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        fd = 2
    with contextlib.suppress(OSError):
        os.write(fd, (text.rstrip("\n") + "\n").encode())


@contextlib.contextmanager
def two_stage_interrupt(
    stop: threading.Event, first: str, second: Callable[[], str]
) -> Iterator[None]:
    """Within the block, the first SIGINT sets ``stop``; the second exits at once.

    Parameters
    ----------
    stop : threading.Event
        Set by the first SIGINT; the work polls it and winds down (keeping what it finished).
    first : str
        Said on the first SIGINT.
    second : Callable[[], str]
        Gives what to say on the second SIGINT, before the process exits with
        :data:`EXIT_INTERRUPTED` without unwinding (no traceback, no waiting for threads).
    """

    def handler(signum: int, frame: object) -> None:
        if not stop.is_set():
            stop.set()
            _write(first)
            return
        with contextlib.suppress(Exception):
            _write(second())
        os._exit(EXIT_INTERRUPTED)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
