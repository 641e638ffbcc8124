"""A long-lived ClientApp executor: import TensorFlow once, fork one ClientApp per message.

By default ``flower-supernode`` starts ``flower-superexec``, which starts a fresh
``flwr-clientapp`` process for every message; each re-imports TensorFlow and the QANA code
(10-14 s on a busy 2-core machine). With ``flower-supernode --isolation process`` flwr
leaves that to an external executor: this one runs flwr's own SuperExec loop
(``run_superexec``) after importing the ClientApp once, with an executor that *forks* this warm
process for each task instead of starting a new interpreter. The child runs flwr's
``run_clientapp`` (same Runtime API protocol, same token) and exits, so state never leaks
between messages; only the imported modules are shared (copy-on-write).

Run as ``python -m deploy.warm_exec --runtime-api-address 127.0.0.1:PORT`` (``qanafed site
start --isolation warm`` does it).
"""

from __future__ import annotations

import argparse
import os
import signal
import time

from common.log import get_logger

log = get_logger("deploy.warm_exec")


class ForkExecutor:
    """A flwr SuperExec executor that forks the (warm) current process for each task."""

    def __init__(self) -> None:
        self.children: set[int] = set()

    def get_eligible_capacity(self, supported_task_types, *, insecure=False,
                              root_certificates_path=None):
        """Accept every task type at once (as flwr's subprocess executor does)."""
        return supported_task_types, set()

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure=False,
                          root_certificates_path=None) -> None:
        """Return at once: forking has no capacity gate."""

    def launch(self, spec):
        """Fork; the child runs flwr's ``run_clientapp`` for the task's token and exits."""
        from flwr.supercore.superexec.executor.types import LaunchResult

        pid = os.fork()
        if pid == 0:  # child: never returns into the SuperExec loop
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                _run_task(spec)
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


def _run_task(spec) -> None:
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    run_clientapp(
        runtime_api_address=spec.runtime_api_address,
        token=spec.token,
        insecure=spec.insecure,
        certificates=validate_and_resolve_root_certificates(
            spec.root_certificates_path, spec.insecure
        ),
        parent_pid=os.getppid(),
        runtime_dependency_install=False,
    )


def warm_up() -> float:
    """Import the ClientApp and everything it needs (TensorFlow, QANA); return the seconds."""
    start = time.monotonic()
    import flwr.supernode.runtime.run_clientapp  # noqa: F401

    import client.client_app  # noqa: F401
    import common.site  # noqa: F401

    return time.monotonic() - start


def main(argv: list[str] | None = None) -> None:
    """Warm up, then run flwr's SuperExec loop with :class:`ForkExecutor`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True,
                        help="The SuperNode's Runtime API, e.g. 127.0.0.1:9094.")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="Exit when this process exits.")
    args = parser.parse_args(argv)
    seconds = warm_up()
    from flwr.supercore.superexec import run_superexec as superexec

    print(f"qanafed warm ClientApp executor: imports took {seconds:.1f} s; "
          f"forking per message from pid {os.getpid()}", flush=True)
    executor = ForkExecutor()
    superexec.get_executor = lambda *a, **k: executor
    superexec.run_superexec(runtime_api_address=args.runtime_api_address, insecure=True,
                            parent_pid=args.parent_pid)


if __name__ == "__main__":
    main()
