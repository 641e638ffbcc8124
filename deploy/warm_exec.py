"""A long-lived ClientApp executor: import TensorFlow once, then run every message in-process.

By default ``flower-supernode`` starts ``flower-superexec``, which starts a fresh
``flwr-clientapp`` process for every message; each re-imports TensorFlow and the QANA code,
reloads the site's data and rebuilds and retraces its model. With ``flower-supernode
--isolation process`` flwr leaves that to an external executor: this one imports the ClientApp
once and runs flwr's own SuperExec loop (``run_superexec``) with one of two executors:

* :class:`InProcessExecutor` (``--mode inprocess``, ``qanafed site start --isolation warm``)
  runs each task *in this process*, one after another, with flwr's ``run_clientapp`` (same
  Runtime API protocol, same token). Data and compiled models stay cached between messages
  (``common.site``, ``common.local_training``), as in the Simulation Engine's long-lived actors.
  ``run_clientapp`` ends every task with ``flwr_exit`` (which exits the process and arms a
  force-exit timer) and installs SIGINT/SIGTERM handlers; here both are replaced, for the
  task's duration, by versions that run the task's exit handlers and return, so neither a task
  nor its end can stop the loop. A task that raises is reported failed to the SuperNode and the
  executor goes on. When the process outgrows ``--max-rss-mb`` after a task, it re-executes
  itself between tasks (same pid, fresh interpreter), so memory cannot grow without bound.
  Three guards keep one task from holding the executor: a task whose input does not become
  available in the SuperNode within ``--input-timeout`` seconds is dropped (see
  :func:`input_deadline`); the SIGINT that flwr's task heartbeat raises when the SuperNode no
  longer knows the task (its run was stopped or abandoned) ends that task only; and a task
  still running after ``--task-timeout`` seconds makes the executor re-execute itself (a
  thread cannot be killed; the fresh interpreter takes the next task, and the SuperNode sees
  the abandoned task's heartbeat stop).
* :class:`ForkExecutor` (``--mode fork``, ``--isolation warm-fork``) forks this warm process for
  each task; the child runs ``run_clientapp`` and exits, so nothing survives a message except
  the imported modules (the data and model are rebuilt every time).

Run as ``python -m deploy.warm_exec --runtime-api-address 127.0.0.1:PORT [--mode ...]``.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from common.log import get_logger

__all__ = ["MODES", "ForkExecutor", "InProcessExecutor", "TaskStopped", "input_deadline", "main",
           "rss_mb", "warm_up"]

log = get_logger("deploy.warm_exec")

MODES = ("inprocess", "fork")
#: Default ``--max-rss-mb``: re-execute the in-process executor above this resident size.
DEFAULT_MAX_RSS_MB = 3072.0
#: Default ``--task-timeout`` (s): a task running longer is abandoned by re-executing.
DEFAULT_TASK_TIMEOUT_S = 3600.0
#: Default ``--input-timeout`` (s): a task whose input is not in the SuperNode by then is dropped.
DEFAULT_INPUT_TIMEOUT_S = 60.0
#: Longest wait between two polls for a task's input (the SuperNode is on this machine).
_INPUT_POLL_CAP_S = 2.0


def rss_mb() -> float:
    """Resident set size of this process now, in MB (``/proc/self/statm``)."""
    with open("/proc/self/statm", encoding="ascii") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / 2**20


@contextmanager
def input_deadline(seconds: float | None) -> Iterator[None]:
    """Within this block, a ClientApp task gives up on its input after ``seconds``.

    The SuperNode creates a task as soon as a message starts to arrive, then pulls the
    message's objects from the SuperLink. If the run stops meanwhile (the coordinator was
    killed, a run was stopped), flwr 1.41 drops the message but leaves the task pending, with
    objects that never become available; ``run_clientapp`` would wait up to two hours for
    them (flwr's ``PULL_MAX_TIME``). Run in this process, that wait blocks every later task,
    including the next run's. Here the pull gives up after ``seconds`` (polling the local
    SuperNode at least every 2 s); the task then fails with ``ObjectPullError`` and the
    executor takes the next one. None: flwr's own limits.

    Parameters
    ----------
    seconds : float | None
        How long a task may wait for its input message to be complete in the SuperNode.
    """
    if seconds is None:
        yield
        return
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError
    from flwr.supernode.runtime import run_clientapp as rc

    unbounded = rc.pull_and_inflate_object_from_tree

    def bounded(*args: Any, **kwargs: Any) -> Any:
        kwargs["max_time"] = seconds
        kwargs["backoff_cap"] = min(kwargs.get("backoff_cap", _INPUT_POLL_CAP_S),
                                    _INPUT_POLL_CAP_S)
        start = time.monotonic()
        try:
            return unbounded(*args, **kwargs)
        except ObjectPullError as err:
            log.warning("this task's input could not be pulled from the SuperNode in %.0f s "
                        "(--input-timeout %.0f s): %s. Dropping the task; its run most likely "
                        "ended while the message was arriving. On a slow link to the "
                        "coordinator, raise --input-timeout.", time.monotonic() - start,
                        seconds, err)
            raise

    rc.pull_and_inflate_object_from_tree = bounded
    try:
        yield
    finally:
        rc.pull_and_inflate_object_from_tree = unbounded


class _ExecutorBase:
    """What both executors share: accept ClientApp tasks only, no capacity gate."""

    def get_eligible_capacity(self, supported_task_types, *, insecure=False,
                              root_certificates_path=None):
        """Offer only ClientApp tasks (this process imported the ClientApp, nothing else)."""
        from flwr.supercore.constant import TaskType

        return {t for t in supported_task_types if t == TaskType.CLIENT_APP}, set()

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure=False,
                          root_certificates_path=None) -> None:
        """Return at once: there is no capacity gate."""


class _TaskEnded(Exception):
    """Raised in place of ``flwr_exit`` at the end of an in-process ``run_clientapp``."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class TaskStopped(Exception):
    """SIGINT during an in-process task: the SuperNode stopped it (flwr's task heartbeat)."""


def _reexec() -> None:
    """Replace this process by a fresh interpreter running the same command (same pid)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


class InProcessExecutor(_ExecutorBase):
    """Run each ClientApp task in this process, one after another; survive any task.

    Parameters
    ----------
    max_rss_mb : float | None (default: DEFAULT_MAX_RSS_MB)
        After a task, if the resident size exceeds this, re-execute the executor (same pid,
        fresh interpreter) before taking the next task. None: never.
    run_task : Callable[[Any], int] | None (default: None)
        What runs one task spec and returns its exit code; default flwr's ``run_clientapp``
        with in-process exit semantics (:meth:`run_clientapp`).
    task_timeout : float | None (default: DEFAULT_TASK_TIMEOUT_S)
        Seconds a task may run; past that the executor re-executes itself. None: no limit.
    on_timeout : Callable[[], None] | None (default: None)
        What the watchdog does when a task overruns (default: re-execute this process).
    input_timeout : float | None (default: DEFAULT_INPUT_TIMEOUT_S)
        Seconds a task may wait for its input in the SuperNode (:func:`input_deadline`).
    """

    def __init__(self, max_rss_mb: float | None = DEFAULT_MAX_RSS_MB,
                 run_task: Callable[[Any], int] | None = None,
                 task_timeout: float | None = DEFAULT_TASK_TIMEOUT_S,
                 on_timeout: Callable[[], None] | None = None,
                 input_timeout: float | None = DEFAULT_INPUT_TIMEOUT_S) -> None:
        self.max_rss_mb = max_rss_mb
        self.run_task = run_task or self.run_clientapp
        self.task_timeout = task_timeout
        self.input_timeout = input_timeout
        self.on_timeout = on_timeout or _reexec
        self.tasks = 0
        self.failures = 0
        self.rss_after: list[float] = []
        self.recycle = False

    def launch(self, spec):
        """Run the task now, in this process; any failure is logged and reported, never raised."""
        from flwr.supercore.superexec.executor.types import LaunchResult

        start = time.monotonic()
        watchdog = self._watchdog(spec)
        saved_sigint = self._stop_task_on_sigint()
        try:
            with input_deadline(self.input_timeout):
                code = self.run_task(spec)
        except TaskStopped:
            log.warning("task %s: stopped by the SuperNode (its run was stopped or abandoned) "
                        "after %.1f s; taking the next task", spec.task_id,
                        time.monotonic() - start)
            self.failures += 1
            return LaunchResult.accepted()
        except Exception as err:  # noqa: BLE001 - one task must never end the executor
            log.exception("task %s: the in-process ClientApp failed", spec.task_id)
            self.failures += 1
            return LaunchResult.failed(f"{type(err).__name__}: {err}")
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if saved_sigint is not None:
                signal.signal(signal.SIGINT, saved_sigint)
            self.tasks += 1
            gc.collect()
            self.rss_after.append(rss_mb())
        if code:
            self.failures += 1
        log.info("task %s: done in-process in %.1f s (exit code %d); RSS %.0f MB after %d tasks",
                 spec.task_id, time.monotonic() - start, code, self.rss_after[-1], self.tasks)
        if self.max_rss_mb is not None and self.rss_after[-1] > self.max_rss_mb:
            log.warning("RSS %.0f MB > --max-rss-mb %.0f: re-executing the ClientApp executor "
                        "before the next task", self.rss_after[-1], self.max_rss_mb)
            self.recycle = True
        return LaunchResult.accepted()

    def _watchdog(self, spec) -> threading.Timer | None:
        """Start the timer that abandons ``spec`` if it overruns ``task_timeout``."""
        if self.task_timeout is None:
            return None

        def overrun() -> None:
            log.error("task %s still running after --task-timeout %.0f s: re-executing the "
                      "ClientApp executor to take the next task", spec.task_id,
                      self.task_timeout)
            self.on_timeout()

        timer = threading.Timer(self.task_timeout, overrun)
        timer.daemon = True
        timer.start()
        return timer

    @staticmethod
    def _stop_task_on_sigint() -> Any:
        """For the task's duration, SIGINT raises TaskStopped; return the handler to restore.

        flwr's task heartbeat raises SIGINT when the SuperNode answers that the task is no
        longer valid; in a ``flwr-clientapp`` process that ends the process, here it must end
        the task only. Only the main thread may set handlers (None returned elsewhere).
        """
        if threading.current_thread() is not threading.main_thread():
            return None

        def stop(_signum: int, _frame: Any) -> None:
            raise TaskStopped("SIGINT during the task")

        return signal.signal(signal.SIGINT, stop)

    @staticmethod
    def run_clientapp(spec) -> int:
        """Run flwr's ``run_clientapp`` for ``spec`` here; return its exit code.

        ``run_clientapp`` registers its exit handler through ``register_signal_handlers`` and
        ends with ``flwr_exit``; both are swapped, for this call only, for versions that keep
        the handlers and run them (push the task status, stop the heartbeat, close the Runtime
        API client) without touching signals or exiting.
        """
        from flwr.supernode.runtime import run_clientapp as rc

        handlers: list[Callable[[], None]] = []

        def keep_handlers(*_args: Any, exit_handlers: list | None = None, **_kw: Any) -> None:
            handlers.extend(exit_handlers or [])

        def end_task(code: int, *_args: Any, **_kw: Any) -> None:
            raise _TaskEnded(code)

        def run_handlers() -> None:
            while handlers:
                try:
                    handlers.pop()()
                except Exception:  # noqa: BLE001 - as flwr's exit handlers, best effort
                    log.exception("task %s: exit handler failed", spec.task_id)

        saved = rc.register_signal_handlers, rc.flwr_exit
        rc.register_signal_handlers, rc.flwr_exit = keep_handlers, end_task
        try:
            _run_flwr_clientapp(spec, parent_pid=None)
        except _TaskEnded as ended:
            return ended.code
        finally:
            rc.register_signal_handlers, rc.flwr_exit = saved
            run_handlers()
        return 0

    def reconcile(self) -> None:
        """Between tasks: re-execute this process if the last task left it too big."""
        if self.recycle:
            _reexec()

    def close(self) -> None:
        """Nothing to stop: a running task ends with the process."""


class ForkExecutor(_ExecutorBase):
    """A flwr SuperExec executor that forks the (warm) current process for each task.

    Parameters
    ----------
    input_timeout : float | None (default: DEFAULT_INPUT_TIMEOUT_S)
        Seconds a child may wait for its task's input (:func:`input_deadline`); a child
        waiting longer blocks nothing, but would hold its memory for up to two hours.
    """

    def __init__(self, input_timeout: float | None = DEFAULT_INPUT_TIMEOUT_S) -> None:
        self.children: set[int] = set()
        self.input_timeout = input_timeout

    def launch(self, spec):
        """Fork; the child runs flwr's ``run_clientapp`` for the task's token and exits."""
        from flwr.supercore.superexec.executor.types import LaunchResult

        pid = os.fork()
        if pid == 0:  # child: never returns into the SuperExec loop
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                with input_deadline(self.input_timeout):
                    _run_flwr_clientapp(spec, parent_pid=os.getppid())
                code = 0
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else 0
            except BaseException:  # noqa: BLE001 - a child must never unwind into the parent
                log.exception("ClientApp task %s failed", spec.task_id)
            finally:
                os._exit(code)
        self.children.add(pid)
        log.debug("task %s: forked ClientApp pid %d", spec.task_id, pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished children."""
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)

    def close(self) -> None:
        """Stop running children (the SuperExec is shutting down)."""
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def _run_flwr_clientapp(spec, parent_pid: int | None) -> None:
    """Call flwr's ``run_clientapp`` for the task ``spec`` (the caller decides how it ends)."""
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    run_clientapp(
        runtime_api_address=spec.runtime_api_address,
        token=spec.token,
        insecure=spec.insecure,
        certificates=validate_and_resolve_root_certificates(
            spec.root_certificates_path, spec.insecure
        ),
        parent_pid=parent_pid,
        runtime_dependency_install=False,
    )


def warm_up() -> float:
    """Import the ClientApp and everything it needs (TensorFlow, QANA); return the seconds.

    The ClientApp imports TensorFlow, quantizeml and akida lazily, so they are imported here
    explicitly (importing starts no TensorFlow runtime threads, so forking afterwards is safe).
    """
    start = time.monotonic()
    import flwr.supernode.runtime.run_clientapp  # noqa: F401

    import client.client_app  # noqa: F401
    import common.site  # noqa: F401

    for name in ("tensorflow", "tf_keras", "quantizeml", "cnn2snn", "akida"):
        __import__(name)
    return time.monotonic() - start


def main(argv: list[str] | None = None) -> None:
    """Warm up, then run flwr's SuperExec loop with the chosen executor."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True,
                        help="The SuperNode's Runtime API, e.g. 127.0.0.1:9094.")
    parser.add_argument("--mode", choices=MODES, default="inprocess",
                        help="inprocess: run tasks here, caches kept (default); fork: fork "
                        "this warm process per task.")
    parser.add_argument("--max-rss-mb", type=float, default=DEFAULT_MAX_RSS_MB,
                        help="inprocess: re-execute above this resident size, in MB "
                        "(0: never; default %(default)g).")
    parser.add_argument("--task-timeout", type=float, default=DEFAULT_TASK_TIMEOUT_S,
                        help="inprocess: re-execute when a task runs longer than this, in s "
                        "(0: no limit; default %(default)g).")
    parser.add_argument("--input-timeout", type=float, default=DEFAULT_INPUT_TIMEOUT_S,
                        help="drop a task whose input is not complete in the SuperNode after "
                        "this many s; raise it on a slow link to the coordinator (0: flwr's "
                        "2 h; default %(default)g).")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="Exit when this process exits.")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stdout)  # the supervisor sends stdout to site.log
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    get_logger().addHandler(handler)
    get_logger().setLevel(logging.INFO)
    seconds = warm_up()
    from flwr.supercore.superexec import run_superexec as superexec

    executor: InProcessExecutor | ForkExecutor
    if args.mode == "inprocess":
        executor = InProcessExecutor(args.max_rss_mb or None,
                                     task_timeout=args.task_timeout or None,
                                     input_timeout=args.input_timeout or None)
    else:
        executor = ForkExecutor(input_timeout=args.input_timeout or None)
    print(f"qanafed warm ClientApp executor ({args.mode}): imports took {seconds:.1f} s; "
          f"pid {os.getpid()}, RSS {rss_mb():.0f} MB", flush=True)
    superexec.get_executor = lambda *a, **k: executor
    superexec.run_superexec(runtime_api_address=args.runtime_api_address, insecure=True,
                            parent_pid=args.parent_pid)


if __name__ == "__main__":
    main()
