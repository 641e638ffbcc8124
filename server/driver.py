"""The round protocol: warm-up → calibration → QAT → finalize, with checkpoints and quorum."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from common.aggregate import combine_ranges, screen
from common.checkpoint import Checkpoint, load_latest, save_checkpoint
from common.errors import SecurityError
from common.fedconfig import FedConfig, scenario_changes
from common.log import get_logger
from common.progress import append_event
from common.site import pact_arrays
from common.weights import is_quantizer_state

from . import protocol as P
from .binding import bind_sites
from .global_model import GlobalModel
from .reports import global_summary
from .rounds import QuorumError, RoundResult, RunInterrupted, run_round, wait_for_sites
from .strategies import (
    aggregate,
    load_strategy_state,
    make_strategy,
    reset_strategy_state,
    strategy_state,
)

log = get_logger("server.driver")


@dataclass(frozen=True)
class Step:
    """One round of the plan: its 1-based number, message type and index within its phase."""

    number: int
    message_type: str
    index: int

    @property
    def phase(self) -> str:
        """Phase name (``warmup``, ``calibrate``, ``qat``, ``finalize``)."""
        return P.PHASE_OF[self.message_type]


def plan(cfg: FedConfig) -> list[Step]:
    """List the run's rounds in order: warm-up, calibration + QAT (quantized variants), finalize."""
    types = [P.WARMUP] * cfg.rounds.warmup
    if cfg.model.variant != "qana-float":
        types += [P.CALIBRATE] + [P.QAT] * cfg.rounds.qat
    types += [P.FINALIZE]
    out, per_phase = [], {}
    for i, t in enumerate(types, start=1):
        per_phase[t] = per_phase.get(t, 0) + 1
        out.append(Step(i, t, per_phase[t]))
    return out


def expected_keys(phase: str, arrays: Mapping[str, np.ndarray]) -> set[str] | None:
    """Return the keys a site's reply must hold in ``phase`` (None: calibration, see below).

    Training rounds send back every global array but quantizer state (fixed at calibration)
    and, in QAT, the baked PACT clips (kept by the server, never exchanged). Calibration
    replies hold quantizer state the global model does not have yet: the guard then takes
    the key set most replies hold.
    """
    if phase == "calibrate":
        return None
    keys = {k for k in arrays if not is_quantizer_state(k)}
    if phase == "qat":
        keys -= set(pact_arrays(dict(arrays)))
    return keys


class Receiver:
    """Opens sealed site reports; anything but a valid report for (run, round, site) is refused."""

    def __init__(self, private_key, seen_ids: list[str] | tuple[str, ...] = ()) -> None:
        from common.metrics_crypto import ReportReceiver

        self._private_key = private_key
        self.inner = ReportReceiver(private_key, seen_ids=seen_ids)
        #: Why the last refused report was refused (error class and problem), else None.
        self.last_refusal: str | None = None

    def restore(self, seen_ids: list[str]) -> None:
        """Refuse, after a restart, the reports accepted before it."""
        from common.metrics_crypto import ReportReceiver

        self.inner = ReportReceiver(self._private_key, seen_ids=seen_ids)

    def seen_ids(self) -> list[str]:
        """Ids of the reports accepted so far."""
        return sorted(self.inner.seen_ids())

    def open(self, envelope: object, run_id: str, step: int, site: str) -> dict[str, Any] | None:
        """Return the decrypted metrics, or None (logged with the reason) if refused."""
        self.last_refusal = None
        if not isinstance(envelope, bytes):
            self.last_refusal = "no sealed report"
            log.warning("round %d: site %s sent no sealed report; refused", step, site)
            return None
        try:
            return self.inner.open(envelope, run_id=run_id, round=step, site_id=site)
        except SecurityError as err:
            self.last_refusal = f"{type(err).__name__}: {err.problem}"
            log.warning("round %d: report from site %s refused: %s", step, site, self.last_refusal)
            return None


class FederatedRun:
    """Drive one federated run over a Flower grid.

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid.
    cfg : FedConfig
        The scenario.
    model_factory : Callable[[FedConfig, list[str]], GlobalModel]
        Builds the server-side model operations once the sites told the class names.
    receiver : Receiver
        Opens the sites' sealed metrics.
    out_dir : Path
        Where checkpoints, the report and the model go.
    resume : bool (default: False)
        Continue from the last complete round in ``out_dir/checkpoints``.
    stop_after : int | None (default: None)
        Stop (as if interrupted) after this many complete rounds; for tests and drills.
    registered : Mapping[int, str] | None (default: None)
        Node id → site of each registered SuperNode key (deployment); a node whose ``hello``
        claims another site is refused. None in simulation (see :func:`bind_sites`).
    stop : threading.Event | None (default: None)
        When set (Ctrl-C), the run abandons the round in progress and raises
        :class:`RunInterrupted`; the checkpoint of the last complete round stays.
    release_key : Path | None (default: None)
        The coordinator's release private key: the global model sent in the finalize round
        is signed (``<model>.release.json``) and the signed document goes with it, for the
        sites to check (:mod:`common.received_release`). None: sent unsigned.
    """

    def __init__(
        self,
        grid: Grid,
        cfg: FedConfig,
        model_factory: Callable[[FedConfig, list[str]], GlobalModel],
        receiver: Receiver,
        out_dir: Path,
        resume: bool = False,
        stop_after: int | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        registered: Mapping[int, str] | None = None,
        stop: threading.Event | None = None,
        release_key: Path | None = None,
    ) -> None:
        self.grid = grid
        self.cfg = cfg
        self.model_factory = model_factory
        self.model: GlobalModel | None = None
        self.class_names: list[str] = []
        self.receiver = receiver
        self.out_dir = Path(out_dir)
        self.resume = resume
        self.stop_after = stop_after
        self.on_event = on_event
        self.registered = None if registered is None else dict(registered)
        self.stop = stop
        self.release_key = release_key
        self.strategy = make_strategy(cfg.strategy)
        self.sites: dict[int, str] = {}
        self.ckpt_dir = self.out_dir / "checkpoints"
        self._quantized_here = False  # whether self.model built the quantized model
        self.progress_file = self.out_dir / "progress.jsonl"

    # -- bookkeeping -----------------------------------------------------------------------------
    def _event(self, **event: Any) -> None:
        event = append_event(self.progress_file, **event)
        if self.on_event is not None:
            self.on_event(event)

    def _label(self, node: int) -> str:
        return self.sites.get(node, f"node {node} (site id not known yet)")

    def _fresh_state(self) -> tuple[dict[str, np.ndarray] | None, dict[str, Any]]:
        state = {
            "run-id": uuid.uuid4().hex,
            "scenario": self.cfg.dump(),
            "step": 0,
            "rounds": [],
            "sites": {},
            "seen-ids": [],
            "seed": self.cfg.seed,
            "phase-seconds": {},
        }
        return None, state

    def _restore(self) -> tuple[dict[str, np.ndarray] | None, dict[str, Any]]:
        ckpt = load_latest(self.ckpt_dir)
        if ckpt is None:
            log.info("no checkpoint in %s: starting a new run", self.ckpt_dir)
            return self._fresh_state()
        if ckpt.state.get("scenario") != self.cfg.dump():
            from common.errors import ConfigError

            changed = scenario_changes(ckpt.state.get("scenario") or {}, self.cfg.dump())
            raise ConfigError(
                f"checkpoint in {self.ckpt_dir} was made with a different scenario; changed "
                f"since: {'; '.join(changed)}",
                "resume with the same scenario file and --data (undo those changes), or use a "
                "new --out folder",
            )
        load_strategy_state(self.strategy, ckpt.groups)
        self.receiver.restore(ckpt.state.get("seen-ids", []))
        log.info("resuming run %s after round %d", ckpt.state["run-id"], ckpt.step)
        return ckpt.arrays, ckpt.state

    def _checkpoint(self, arrays: dict[str, np.ndarray], state: dict[str, Any]) -> None:
        state["seen-ids"] = self.receiver.seen_ids()
        save_checkpoint(
            self.ckpt_dir,
            Checkpoint(step=state["step"], arrays=arrays, groups=strategy_state(self.strategy),
                       state=state),
        )

    # -- protocol --------------------------------------------------------------------------------
    def _config(self, state: dict[str, Any], step: int, phase: str) -> dict[str, Any]:
        cfg = self.cfg
        lr = cfg.qat_lr if phase == "qat" else cfg.lr
        epochs = cfg.qat_local_epochs if phase == "qat" else cfg.local_epochs
        return {
            "run-id": state["run-id"],
            "server-round": step,
            "phase": phase,
            "scenario": json.dumps(state["scenario"]),
            "seed": int(cfg.seed),
            "lr": float(lr),
            "local-epochs": int(epochs),
            "proximal-mu": float(getattr(self.strategy, "proximal_mu", 0.0)),
            # Simulated sites keep their own files (overlays) under OUT/sites/<site-id>;
            # deployed sites use their node config out-dir and ignore this.
            "sim-sites-dir": str((self.out_dir / "sites").resolve()),
        }

    def _open_reports(
        self, result: RoundResult, state: dict[str, Any], step: int
    ) -> dict[str, dict[str, Any]]:
        reports = {}
        for node, msg in sorted(result.replies.items()):
            site = self._label(node)
            sealed = msg.content.config_records.get(P.REPORT)
            claimed = sealed.get(P.SITE_ID) if sealed is not None else None
            if claimed != site:
                log.warning("round %d: node %d claims site %r, known as %r; report refused",
                            step, node, claimed, site)
                continue
            metrics = self.receiver.open(sealed.get(P.ENVELOPE), state["run-id"], step, site)
            if metrics is not None:
                reports[site] = metrics
        return reports

    def _hello(self, nodes: list[int], state: dict[str, Any]) -> list[int]:
        contents = {n: P.request_content(None, self._config(state, 0, "hello")) for n in nodes}
        # Saying hello is part of connecting: a site's first message may start its process
        # (and TensorFlow), so it gets the connect timeout, not the round timeout.
        timeout = max(self.cfg.timeouts.connect, self.cfg.timeouts.round)
        result = run_round(self.grid, contents, P.HELLO, timeout, self.cfg.quorum.min_replies,
                           label=self._label, what="hello",
                           timeout_key="timeouts.connect (hello waits for it)", stop=self.stop)
        # Sites that refused (their policy) or failed at hello take no part: say why in the report.
        state["hello-dropped"] = {self._label(n): why for n, why in result.failures.items()}
        claims = {node: str(msg.content.config_records[P.REPORT][P.SITE_ID])
                  for node, msg in result.replies.items()}
        admitted, refused = bind_sites(claims, self.registered)
        for node in refused:
            del result.replies[node]
        if len(admitted) < self.cfg.quorum.min_replies:
            raise SecurityError(
                f"hello: {len(admitted)} site(s) left after refusing "
                + "; ".join(refused.values())
                + f" (quorum.min-replies={self.cfg.quorum.min_replies})",
                "give every SuperNode its own site's kit (site-id and supernode.key belong "
                "together), or revoke the key of the site that poses as another",
            )
        self.sites.update(admitted)
        for site, metrics in self._open_reports(result, state, 0).items():
            state["sites"][site] = metrics
        names = {tuple(m.get("class_names", ())) for m in state["sites"].values()}
        if len(names) != 1 or not next(iter(names)):
            raise SecurityError(
                f"sites disagree on (or did not report) the class vocabulary: {sorted(names)}",
                "every site must load data with the same class names",
            )
        self.class_names = list(next(iter(names)))
        new_class = self.cfg.edge.new_class
        if new_class is not None and new_class not in self.class_names:
            from common.errors import ConfigError

            raise ConfigError(
                f"edge.new-class {new_class!r} is not one of the sites' classes "
                f"({', '.join(self.class_names)})",
                "name one of those classes, or remove edge.new-class",
            )
        return sorted(result.replies)

    def run(self) -> dict[str, Any]:
        """Run (or resume) the plan; return the report.

        Raises
        ------
        RunInterrupted
            If ``stop`` was set; names the last complete (checkpointed) round.
        """
        self.out_dir.mkdir(parents=True, exist_ok=True)
        arrays, state = self._restore() if self.resume else self._fresh_state()
        steps = plan(self.cfg)
        self._event(event="start", run_id=state["run-id"], total=len(steps), done=state["step"])
        try:
            return self._run(arrays, state, steps)
        except RunInterrupted:
            self._event(event="interrupted", run_id=state["run-id"], done=state["step"])
            n = state["step"]
            done = (f"round{'s 1-' if n > 1 else ' '}{n} of {len(steps)} checkpointed in "
                    f"{self.ckpt_dir}" if n else "no round was complete yet")
            raise RunInterrupted(f"run interrupted: {done}",
                                 "rerun with --resume to continue from there") from None

    def _run(
        self, arrays: dict[str, np.ndarray] | None, state: dict[str, Any], steps: list[Step]
    ) -> dict[str, Any]:
        nodes = wait_for_sites(self.grid, self.cfg.quorum.min_sites, self.cfg.timeouts.connect,
                               settle=min(2.0, self.cfg.timeouts.connect / 4), stop=self.stop)
        nodes = self._hello(nodes, state)
        self._event(event="sites", sites=[self.sites[n] for n in nodes])
        self.model = self.model_factory(self.cfg, self.class_names)
        if arrays is None:
            arrays = self.model.initial_arrays()
        for step in steps[state["step"]:]:
            if self.stop is not None and self.stop.is_set():
                raise RunInterrupted(f"before round {step.number}: interrupted")
            if self.stop_after is not None and state["step"] >= self.stop_after:
                log.info("stopping after round %d as asked", state["step"])
                return state
            arrays = self._round(step, nodes, arrays, state)
            state["step"] = step.number
            self._checkpoint(arrays, state)
        self._event(event="done", run_id=state["run-id"])
        return state

    def _finalize_arrays(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Return the arrays the server model converts from.

        A model that quantized in this process converts the quantized model it built (whose
        ReLU bounds are already the baked PACT clips), by variable: it gets the arrays without
        the clips. After a resume it rebuilds the quantized model from the arrays, clips
        included (:func:`common.site.quantized_model_from`).
        """
        return {k: v for k, v in arrays.items() if k not in pact_arrays(arrays)} \
            if self._quantized_here else arrays

    def _guard(
        self, step: Step, what: str, result: RoundResult, arrays: dict[str, np.ndarray]
    ) -> tuple[list[Message], dict[str, str]]:
        """Screen the replies (:func:`common.aggregate.screen`): keep some, refuse others.

        Returns the kept replies in site order, and site → reason for the refused ones.

        Raises
        ------
        QuorumError
            If fewer than ``quorum.min-replies`` replies pass.
        """
        sites = {self._label(n): m for n, m in result.replies.items()}
        decoded, weights, refused = {}, {}, {}
        for site, msg in sorted(sites.items()):
            try:
                decoded[site] = P.from_record(msg.content[P.ARRAYS])
                weights[site] = float(msg.content[P.METRICS][P.NUM_EXAMPLES])
            except (KeyError, TypeError, ValueError) as err:
                refused[site] = f"unreadable reply ({type(err).__name__})"
        ratio = self.cfg.guard.max_norm_ratio if step.phase != "calibrate" else None
        refused.update(screen(decoded, arrays, expected_keys(step.phase, arrays), ratio,
                              weights))
        for site, why in sorted(refused.items()):
            log.warning("%s: reply of site %s refused by the guard: %s", what, site, why)
        kept = [msg for site, msg in sorted(sites.items()) if site not in refused]
        if len(kept) < self.cfg.quorum.min_replies:
            raise QuorumError(
                f"{what}: only {len(kept)} of {len(sites)} replies passed the guard; "
                f"quorum.min-replies={self.cfg.quorum.min_replies}. Refused: "
                + "; ".join(f"{s}: {w}" for s, w in sorted(refused.items())),
                "fix the refused sites (see their logs), loosen guard.max-norm-ratio if the "
                "refused updates were honest, or lower quorum.min-replies; then rerun with "
                "--resume",
            )
        return kept, dict(sorted(refused.items()))

    def _sign_for_sites(
        self, arrays: dict[str, np.ndarray], state: dict[str, Any], step: Step, akida_hash: str
    ) -> str:
        """Sign the global model and the arrays sent with it; return the release (JSON)."""
        from common.received_release import sign_for_sites

        return sign_for_sites(self.out_dir / "global_model.fbz", self.release_key, arrays,
                              run_id=state["run-id"], round=step.number,
                              scenario=self.cfg.name, variant=self.cfg.model.variant,
                              akida_hash=akida_hash)

    def _round(
        self, step: Step, nodes: list[int], arrays: dict[str, np.ndarray], state: dict[str, Any]
    ) -> dict[str, np.ndarray]:
        what = f"round {step.number} ({step.phase} {step.index})"
        self._event(event="round-start", step=step.number, phase=step.phase, index=step.index)
        start = time.monotonic()
        config = self._config(state, step.number, step.phase)
        server_hash = None
        if step.phase == "finalize":
            server_hash = self.model.finalize(self._finalize_arrays(arrays), self.out_dir)
            config["server-hash"] = server_hash or ""
            if self.release_key is not None and server_hash:
                config["release"] = self._sign_for_sites(arrays, state, step, server_hash)
        contents = {n: P.request_content(arrays, config) for n in nodes}
        sent = sum(P.record_nbytes(c) for c in contents.values())
        result = run_round(self.grid, contents, step.message_type, self.cfg.timeouts.round,
                           self.cfg.quorum.min_replies, label=self._label, what=what,
                           stop=self.stop)
        # Sum in site order: float addition order must not depend on (random) node ids.
        replies = [result.replies[n] for n in sorted(result.replies, key=self._label)]
        received = sum(P.record_nbytes(m.content) for m in replies)
        refused: dict[str, str] = {}
        if step.phase in ("warmup", "qat", "calibrate"):
            replies, refused = self._guard(step, what, result, arrays)
        if step.phase in ("warmup", "qat"):
            arrays = {**arrays, **aggregate(self.strategy, step.number, replies, arrays)}
        elif step.phase == "calibrate":
            ranges = combine_ranges([P.from_record(m.content[P.ARRAYS]) for m in replies])
            # The baked PACT clips stay in the global arrays: they shape the quantized model.
            arrays = {**pact_arrays(arrays), **self.model.quantize(arrays, ranges)}
            self._quantized_here = True
            reset_strategy_state(self.strategy)
        # A refused site's sealed report still counts: it scores the global model it received.
        reports = self._open_reports(result, state, step.number)
        if server_hash is not None:
            for site, rep in reports.items():
                rep["hash_matches"] = rep.get("akida_hash") == server_hash
                if not rep["hash_matches"]:
                    log.warning("site %s converted a different Akida model (%s != %s)",
                                site, rep.get("akida_hash"), server_hash)
        seconds = time.monotonic() - start
        entry = {
            "step": step.number,
            "phase": step.phase,
            "index": step.index,
            "seconds": round(seconds, 2),
            "bytes_sent": sent,
            "bytes_received": received,
            "sites": reports,
            "replied": sorted(self._label(n) for n in result.replies),  # privacy accounting
            "dropped": {**{self._label(n): why for n, why in result.failures.items()},
                        **{site: f"refused by the guard: {why}" for site, why in refused.items()}},
            "refused": refused,
            "global": global_summary(reports),
        }
        if server_hash is not None:
            entry["server_hash"] = server_hash
        if "release" in config:
            entry["weights_sha256"] = json.loads(config["release"])["manifest"]["weights_sha256"]
        state["rounds"].append(entry)
        phase_seconds = state["phase-seconds"]
        phase_seconds[step.phase] = round(phase_seconds.get(step.phase, 0.0) + seconds, 2)
        self._event(event="round-end", step=step.number, phase=step.phase,
                    seconds=round(seconds, 2), replies=len(replies),
                    dropped=len(result.failures) + len(refused),
                    summary=entry["global"], site_scores=_site_scores(reports))
        return arrays


def _site_scores(reports: dict[str, dict]) -> dict[str, float]:
    """Each site's balanced accuracy in a round (Akida's where the round converted)."""
    scores = {}
    for site, rep in reports.items():
        for key in ("akida", "test"):
            value = (rep.get(key) or {}).get("balanced_accuracy")
            if isinstance(value, int | float):
                scores[site] = round(float(value), 4)
                break
    return scores
