"""Hostile and careless inputs (issue #13): refusals name the problem and the fix, lose nothing.

Every command is run through the real entry point (``qanafed.cli.main``), which turns qanafed
errors into ``error:``/``fix:`` lines and exit code 2.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

HEADER = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset"]
CLASSES = ["nv", "nv", "nv", "mel", "bkl", "bcc"]
CORRUPT = "ISIC_05"


class Outcome(NamedTuple):
    """Exit code, stdout, and stderr with whitespace folded (rich wraps long lines)."""

    code: int
    out: str
    err: str


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> Callable[..., Outcome]:
    """Run ``qanafed ARGS...`` in this process through ``main`` (what the console script runs)."""
    from qanafed.cli import main
    from qanafed.cli._common import console

    monkeypatch.setattr(console, "_width", 1000)  # no folding of tmp paths mid-word

    def run(*args: str | Path) -> Outcome:
        monkeypatch.setattr(sys, "argv", ["qanafed", *map(str, args)])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        captured = capsys.readouterr()
        return Outcome(code, captured.out, " ".join(captured.err.split()))

    return run


def snapshot(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``, by relative path (folders listed as such)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return out


@pytest.fixture
def ham(tmp_path: Path) -> Path:
    """A 12-image HAM10000 folder (10 lesions, 2 sites) with one corrupt JPEG (ISIC_05)."""
    root = tmp_path / "ham"
    part = root / "HAM10000_images_part_1"
    part.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        site = "rosendahl" if i % 3 == 0 else "vidir_modern"
        rows.append([f"HAM_{min(i, 9):02d}", f"ISIC_{i:02d}", CLASSES[i % 6], "histo", "50",
                     "male", "back", site])
        Image.fromarray(rng.integers(30, 220, (64, 64, 3), dtype=np.uint8)).save(
            part / f"ISIC_{i:02d}.jpg", quality=90)
    (part / f"{CORRUPT}.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with (root / "HAM10000_metadata.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([HEADER, *rows])
    return root


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A folder shaped like a `qanafed model train` output (contents are placeholders)."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("float.h5", "quantized.h5", "model.fbz", "split.json"):
        (run / name).write_bytes(os.urandom(64))
    (run / "metrics.json").write_text(json.dumps({"size": 48, "class_names": ["a", "b"]}))
    return run


@pytest.fixture
def full_dir(tmp_path: Path) -> Path:
    """A non-empty folder holding someone's results."""
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "report.md").write_text("# precious\n")
    return folder


SCENARIO = """name: hostile
data: "synthetic:n=60,size=48,sites=2"
partition: {scheme: natural, sites: 2}
model: {variant: qana-akd1000, size: 48, width: 0.25, depth: 1}
rounds: {warmup: 1, qat: 0}
"""


@pytest.fixture
def scenario(tmp_path: Path) -> Path:
    path = tmp_path / "scenario.yaml"
    path.write_text(SCENARIO)
    return path


def _sim_run(folder: Path) -> Path:
    """A folder holding a finished run: progress, report and a checkpoint."""
    from common.checkpoint import Checkpoint, save_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "progress.jsonl").write_text('{"event": "done"}\n')
    (folder / "report.json").write_text("{}")
    save_checkpoint(folder / "checkpoints", Checkpoint(
        step=3, arrays={"w": np.ones(3)}, state={"scenario": {"name": "another"}}))
    return folder


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


_TRAIN = ["model", "train", "--data", "synthetic:n=60"]

# ---------------------------------------------------------------- refusals (one table)

#: id → (argv builder from the fixtures, words of the problem, words of the fix).
REFUSALS: dict[str, tuple[Callable[[dict[str, Path]], list], tuple[str, ...], tuple[str, ...]]] = {
    "explain into the model folder": (
        lambda f: ["model", "explain", "--model", f["model"], "--data", "synthetic:n=60",
                   "--out", f["model"]],
        ("is the input --model",), ("outside the inputs", "--force does not override")),
    "explain into the model folder with --force": (
        lambda f: ["model", "explain", "--model", f["model"], "--data", "synthetic:n=60",
                   "--out", f["model"], "--force"],
        ("is the input --model",), ("outside the inputs",)),
    "explain into a folder holding the model": (
        lambda f: ["model", "explain", "--model", f["model"], "--data", "synthetic:n=60",
                   "--out", f["model"].parent, "--force"],
        ("contains the input --model",), ("outside the inputs",)),
    "explain into a non-empty folder": (
        lambda f: ["model", "explain", "--model", f["model"], "--data", "synthetic:n=60",
                   "--out", f["full"]],
        ("is not empty", "report.md"), ("--force",)),
    "learn over its own model with --force": (
        lambda f: ["model", "learn", "--model", f["model"], "--data", "synthetic:n=60",
                   "--shots", "1", "--out", f["model"], "--force"],
        ("is the input --model",), ("outside the inputs",)),
    "learn over the folder of its model file": (
        lambda f: ["model", "learn", "--model", f["model"] / "model.fbz", "--data",
                   "synthetic:n=60", "--shots", "1", "--out", f["model"], "--force"],
        ("contains the input --model",), ("outside the inputs",)),
    "learn into a non-empty folder": (
        lambda f: ["model", "learn", "--model", f["model"], "--data", "synthetic:n=60",
                   "--shots", "1", "--out", f["full"]],
        ("is not empty",), ("--force",)),
    "train over its data folder": (
        lambda f: ["model", "train", "--data", f["ham"], "--out", f["ham"], "--force"],
        ("is the input --data",), ("outside the inputs",)),
    "train over a folder holding its split": (
        lambda f: ["model", "train", "--data", "synthetic:n=60", "--split",
                   f["model"] / "split.json", "--out", f["model"], "--force"],
        ("contains the input --split",), ("outside the inputs",)),
    "train into a finished run": (
        lambda f: ["model", "train", "--data", "synthetic:n=60", "--out", f["model"]],
        ("is not empty", "float.h5"), ("another --out folder", "--force")),
    "study into a non-empty folder": (
        lambda f: ["model", "study", "--data", "synthetic:n=60", "--out", f["full"]],
        ("is not empty",), ("--force",)),
    "study into a folder holding its data": (
        lambda f: ["model", "study", "--data", f["ham"], "--out", f["ham"].parent, "--force"],
        ("contains the input --data",), ("outside the inputs",)),
    "data split --out a folder": (
        lambda f: ["data", "split", f["ham"], "--out", f["full"]],
        ("is a folder",), ("give a file path", "split.json")),
    "data split over an existing file": (
        lambda f: ["data", "split", f["ham"], "--out", f["full"] / "report.md"],
        ("already exists",), ("--force",)),
    "data split over its metadata CSV": (
        lambda f: ["data", "split", f["ham"] / "HAM10000_metadata.csv", "--out",
                   f["ham"] / "HAM10000_metadata.csv", "--force"],
        ("is the input PATH",), ("outside the inputs",)),
    "provision into a non-empty folder without kits": (
        lambda f: ["provision", f["scenario"], "--out", f["full"]],
        ("is not empty",), ("--force",)),
    "provision over a folder holding PROJECT.yaml": (
        lambda f: ["provision", f["scenario"], "--out", f["scenario"].parent, "--force"],
        ("contains the input PROJECT",), ("outside the inputs",)),
    "sim into a finished run": (
        lambda f: ["sim", "--config", f["scenario"], "--out", _sim_run(f["root"] / "sim")],
        ("already holds a run", "checkpoints"), ("--resume", "--force", "another --out")),
    "sim into a folder holding its scenario": (
        lambda f: ["sim", "--config", f["scenario"], "--out", f["scenario"].parent, "--force"],
        ("contains the input --config",), ("outside the inputs",)),
    "sim --resume of another scenario": (
        lambda f: ["sim", "--config", f["scenario"], "--out", _sim_run(f["root"] / "sim"),
                   "--resume"],
        ("another scenario", "name"), ("same scenario", "--force")),
    "sim --resume of a folder without a run": (
        lambda f: ["sim", "--config", f["scenario"], "--out", f["full"], "--resume"],
        ("holds no qanafed run to resume", "report.md"), ("drop --resume",)),
    "sim --resume --force together": (
        lambda f: ["sim", "--config", f["scenario"], "--out", _sim_run(f["root"] / "sim"),
                   "--resume", "--force"],
        ("--resume and --force together",), ("pick one",)),
    "sim --out a file": (
        lambda f: ["sim", "--config", f["scenario"], "--out", f["full"] / "report.md"],
        ("is a file",), ("run folder",)),
    "sim with a data path that does not exist": (
        lambda f: ["sim", "--config", f["scenario"], "--out", f["root"] / "new",
                   "--data", f["root"] / "nowhere"],
        ("--data", "nowhere' does not exist"), ("ham10000:",)),
    "sim with no training rounds": (
        lambda f: ["sim", "--config", f["noround"], "--out", f["root"] / "new"],
        ("no training rounds", "rounds.warmup: 0"), ("--allow-no-training",)),
    "sim with a scenario that is not YAML": (
        lambda f: ["sim", "--config", _write(f["root"] / "bad.yaml", "name: x\nrounds: [1, 2\n"),
                   "--out", f["root"] / "new"],
        ("not valid YAML", "line 3"), ("indentation",)),
    "sim with an unknown scenario key": (
        lambda f: ["sim", "--config", _write(f["root"] / "u.yaml", "name: h\ndata: synthetic\n"
                                             "roundz: {warmup: 1}\n"), "--out", f["root"] / "new"],
        ("roundz", "Extra inputs are not permitted"), ("kebab-case", "simulations/demo.yaml")),
    "data inspect of a path that does not exist": (
        lambda f: ["data", "inspect", f["root"] / "nowhere"],
        ("nowhere' does not exist",), ("ham10000:", "synthetic")),
    "data inspect of a bad synthetic spec": (
        lambda f: ["data", "inspect", "synthetic:n=abc"],
        ("n='abc'", "not an integer"), ("whole number",)),
    "data split of a path that does not exist": (
        lambda f: ["data", "split", f["root"] / "nowhere", "--out", f["root"] / "s.json"],
        ("nowhere' does not exist",), ("ham10000:",)),
    "train an unknown variant": (
        lambda f: [*_TRAIN, "--out", f["root"] / "new", "--variant", "qana-nope"],
        ("unknown model variant 'qana-nope'",), ("qanafed model list",)),
    "train at a size the chip cannot run": (
        lambda f: [*_TRAIN, "--out", f["root"] / "new", "--size", "50"],
        ("size=50",), ("--size", "96")),
    "train with --tta 0": (
        lambda f: [*_TRAIN, "--out", f["root"] / "new", "--tta", "0"],
        ("--tta 0",), ("1 (no test-time augmentation) to 8",)),
    "train with an unknown colour constancy": (
        lambda f: [*_TRAIN, "--out", f["root"] / "new", "--colour", "sepia"],
        ("'sepia'",), ("shades-of-gray",)),
    "train with an unknown loss": (
        lambda f: [*_TRAIN, "--out", f["root"] / "new", "--loss", "focal"],
        ("loss='focal'",), ("logit-adjusted",)),
    "train with a sampling power above 1": (
        lambda f: [*_TRAIN, "--out", f["root"] / "new", "--sampling-power", "2"],
        ("sampling power 2.0",), ("class-balanced",)),
    "train with a distillation weight above 1": (
        lambda f: [*_TRAIN, "--out", f["root"] / "new", "--distill", "--distill-weight", "2"],
        ("distillation weight 2.0",), ("--distill-weight 0.5",)),
    "train with an unknown balancing": (
        lambda f: [*_TRAIN, "--out", f["root"] / "new", "--balance", "mixup"],
        ("balance='mixup'",), ("sampler",)),
    "evaluate a file that is not an Akida model": (
        lambda f: ["model", "evaluate", "--model", f["model"] / "model.fbz", "--data",
                   "synthetic:n=60"],
        ("not a readable Akida model",), ("save_akida",)),
    "evaluate a model file that does not exist": (
        lambda f: ["model", "evaluate", "--model", f["root"] / "nothere.fbz", "--data",
                   "synthetic:n=60"],
        ("nothere.fbz does not exist",), ("check the path",)),
    "map a file that is not an Akida model": (
        lambda f: ["model", "map", "--model", f["model"] / "model.fbz", "--device", "akd1000"],
        ("is not an Akida model file",), ("converted Akida model",)),
    "explain a folder that is not a training run": (
        lambda f: ["model", "explain", "--model", f["full"], "--data", "synthetic:n=60",
                   "--out", f["root"] / "new"],
        ("is not a QANA training run", "report.md"), ("--out folder of `qanafed model train`",)),
    "provision a project that is not YAML": (
        lambda f: ["provision", _write(f["root"] / "p.yaml", "name: x\nsites: [1, 2\n"),
                   "--out", f["root"] / "kits"],
        ("not valid YAML",), ("indentation",)),
    "provision a project with an unknown field": (
        lambda f: ["provision", _write(f["root"] / "p.yaml", "name: p\ncoordinator: "
                                       "{address: 127.0.0.1, port: 9}\nsites: []\nbogus: 1\n"),
                   "--out", f["root"] / "kits"],
        ("unknown field 'bogus'", "at least 1 item"), ("deploy/example-project.yaml",)),
    "site start with a kit folder that does not exist": (
        lambda f: ["site", "start", "--kit", f["root"] / "nokit"],
        ("site kit folder", "does not exist"), ("--kit",)),
    "site status of a folder that is not a kit": (
        lambda f: ["site", "status", "--kit", f["full"]],
        ("is missing site.yaml",), ("qanafed provision",)),
    "coord start with a kit folder that does not exist": (
        lambda f: ["coord", "start", "--kit", f["root"] / "nokit"],
        ("coordinator kit folder", "does not exist"), ("--kit",)),
    "coord status of a folder that is not a kit": (
        lambda f: ["coord", "status", "--kit", f["full"]],
        ("is missing coordinator.yaml",), ("qanafed provision",)),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusal_names_problem_and_fix_and_changes_nothing(
    case: str, cli, tmp_path: Path, ham: Path, model_dir: Path, full_dir: Path, scenario: Path,
) -> None:
    # Prepare
    noround = tmp_path / "noround.yaml"
    noround.write_text(SCENARIO.replace("warmup: 1", "warmup: 0"))
    fixtures = {"root": tmp_path, "ham": ham, "model": model_dir, "full": full_dir,
                "scenario": scenario, "noround": noround}
    build, problem, fix = REFUSALS[case]
    argv = build(fixtures)
    before = snapshot(tmp_path)

    # Execute
    result = cli(*argv)

    # Assert
    assert result.code == 2, result.err
    error, _, advice = result.err.partition("fix:")
    assert "error:" in error and "Traceback" not in result.err
    for word in problem:
        assert word in error, (word, result.err)
    for word in fix:
        assert word in advice, (word, result.err)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- unreadable files


def test_data_split_leaves_out_and_counts_unreadable_files(cli, ham: Path, tmp_path: Path):
    # Prepare
    from common.loaders import load_dataset

    out = tmp_path / "split.json"

    # Execute
    result = cli("data", "split", ham, "--out", out, "--val", "0.2", "--test", "0.2", "--json")

    # Assert
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["excluded_unreadable"] == 1 and sum(report["sizes"].values()) == 11
    saved = json.loads(out.read_text())
    ids = {i for part in saved["splits"].values() for i in part["image_ids"]}
    assert CORRUPT not in ids and len(ids) == 11
    assert len(load_dataset(ham)) == 12


def test_data_split_strict_stops_naming_the_file(cli, ham: Path, tmp_path: Path):
    # Execute
    result = cli("data", "split", ham, "--out", tmp_path / "s.json", "--strict")

    # Assert
    assert result.code == 2
    assert f"{CORRUPT}.jpg" in result.err and "drop --strict" in result.err
    assert not (tmp_path / "s.json").exists()


def test_data_inspect_names_the_first_dropped_files_without_verbose(cli, ham: Path):
    # Execute
    tables = cli("data", "inspect", ham)
    as_json = cli("data", "inspect", ham, "--json")

    # Assert
    assert tables.code == 0 and as_json.code == 0
    assert f"first dropped: {CORRUPT}: unreadable" in tables.err
    first = json.loads(as_json.out)["quality"]["first_dropped"]
    assert [(d["image_id"], d["reason"]) for d in first] == [(CORRUPT, "unreadable")]


def test_scoring_indices_skip_unreadable_with_a_split_of_either_dataset(ham: Path, tmp_path):
    # Prepare: one split of all 12 images, one of the 11 readable ones
    from common.errors import DataError
    from common.loaders import load_dataset
    from common.splits import grouped_split
    from qanafed.cli._readable import scoring_indices

    ds = load_dataset(ham)
    bad = int(np.flatnonzero(ds.image_ids == CORRUPT)[0])
    readable = np.setdiff1d(np.arange(len(ds)), [bad])
    whole = grouped_split(ds, val=0.2, test=0.2).save(tmp_path / "whole.json")
    part = grouped_split(ds.subset(readable), val=0.2, test=0.2).save(tmp_path / "part.json")

    # Execute
    everything, skipped = scoring_indices(ds, None, "test")
    from_part, none_skipped = scoring_indices(ds, part, "train")
    with pytest.raises(DataError) as strict:
        scoring_indices(ds, whole, "test", strict=True)

    # Assert
    assert everything.tolist() == readable.tolist() and [s[1] for s in skipped] == [CORRUPT]
    assert bad not in from_part and none_skipped == []
    assert f"{CORRUPT}.jpg" in strict.value.problem and "--strict" in strict.value.fix


# ---------------------------------------------------------------- secrets


def test_sim_keys_live_outside_the_run_folder_owner_only(tmp_path: Path):
    # Prepare
    from qanafed.cli.sim import _keys

    out = tmp_path / "runs" / "demo"
    out.mkdir(parents=True)

    # Execute
    private, public = _keys(out, None)
    again, _ = _keys(out, None)

    # Assert
    assert private.parent == tmp_path / "runs" / "demo.keys" and again == private
    assert out.resolve() not in private.parents and not any(out.iterdir())
    assert stat.S_IMODE(private.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and public.is_file()


def test_sim_keeps_the_keys_of_a_run_made_before_the_move(tmp_path: Path):
    # Prepare: an older run keeps OUT/keys/ (its checkpoints name that public key)
    from common.metrics_crypto import save_metrics_keypair
    from qanafed.cli.sim_checks import key_paths

    out = tmp_path / "old"
    save_metrics_keypair(out / "keys" / "metrics.key", out / "keys" / "metrics.pub")

    # Execute
    private, public = key_paths(out)

    # Assert
    assert private == (out / "keys" / "metrics.key").resolve()
    assert public == (out / "keys" / "metrics.pub").resolve()


def test_coordinator_run_folder_is_made_owner_only(tmp_path: Path):
    # Prepare: a run/ folder left 0755/0644 by an earlier start outside systemd
    from common.log import ensure_log_output
    from deploy.coord import coord_paths, private_run_dir
    from deploy.ledger import Ledger

    paths = coord_paths(tmp_path / "kit")
    (paths.run_dir / "runs" / "demo").mkdir(parents=True)
    for folder in (paths.run_dir, paths.run_dir / "runs", paths.run_dir / "runs" / "demo"):
        folder.chmod(0o755)
    (paths.run_dir / "coordinator.log").write_text("log\n")
    (paths.run_dir / "coordinator.log").chmod(0o644)

    # Execute
    private_run_dir(paths)
    Ledger(paths.ledger)
    ensure_log_output(paths.run_dir / "serverapp.log")

    # Assert
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in paths.run_dir.rglob("*")}
    assert stat.S_IMODE(paths.run_dir.stat().st_mode) == 0o700
    assert modes["coordinator.log"] == 0o600 and modes["runs"] == 0o700
    assert modes["ledger.sqlite"] == 0o600 and modes["serverapp.log"] == 0o600


def test_missing_metrics_key_points_to_a_command(tmp_path: Path):
    # Prepare
    from common.errors import SecurityError
    from common.metrics_crypto import load_metrics_private_key

    # Execute
    with pytest.raises(SecurityError) as err:
        load_metrics_private_key(tmp_path / "absent.key")

    # Assert
    assert "qanafed provision" in err.value.fix and "()" not in err.value.fix


# ---------------------------------------------------------------- edge learning shots


def test_shots_above_what_a_class_gives_is_said_naming_shots():
    # Prepare
    from qanafed.cli.model_edge import _shots_note

    # Execute
    note = _shots_note(5, {"nv": 5, "df": 1, "vasc": 2})

    # Assert
    assert "--shots 5" in note and "df 1" in note and "vasc 2" in note
    assert "--shots 1" in note and _shots_note(5, {"nv": 5}) is None


def test_a_class_with_one_lesion_names_shots():
    # Prepare
    from common.errors import DataError
    from common.loaders import load_dataset
    from qanafed.cli.model_edge import _split_shots

    ds = load_dataset("synthetic:n=60,size=32,seed=0")
    counts = {c: len(np.unique(ds.lesion_ids[ds.labels == c])) for c in range(ds.num_classes)}
    thin = min(counts, key=counts.get)

    # Execute
    with pytest.raises(DataError) as err:
        _split_shots(ds, [thin], 3, seed=0)

    # Assert
    assert counts[thin] < 2
    assert "--shots 3" in err.value.problem and ds.class_names[thin] in err.value.problem


# ---------------------------------------------------------------- on the shared tiny trained run


@pytest.fixture
def folders_with_a_corrupt_file(tmp_path: Path) -> Path:
    """A class-per-folder dataset (nv, mel: 4 images each) plus one corrupt nv file."""
    root = tmp_path / "folders"
    rng = np.random.default_rng(1)
    for name in ("nv", "mel"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(40, 200, (48, 48, 3), dtype=np.uint8)).save(
                root / name / f"{name}_{i}.png")
    (root / "nv" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def test_evaluate_skips_and_counts_an_unreadable_image(cli, tiny_run, folders_with_a_corrupt_file):
    # Prepare
    model = tiny_run.out / "model.fbz"
    before = snapshot(tiny_run.out)

    # Execute
    scored = cli("model", "evaluate", "--model", model, "--data", folders_with_a_corrupt_file,
                 "--json")
    strict = cli("model", "evaluate", "--model", model, "--data", folders_with_a_corrupt_file,
                 "--strict")

    # Assert
    assert scored.code == 0, scored.err
    result = json.loads(scored.out)
    assert result["skipped_unreadable"] == 1 and result["num_examples"] == 8
    assert "broken.jpg" in scored.err
    assert strict.code == 2 and "broken.jpg" in strict.err and "drop --strict" in strict.err
    assert snapshot(tiny_run.out) == before


def test_explain_with_force_replaces_only_the_out_folder(cli, tiny_run, tmp_path: Path):
    # Prepare
    out = tmp_path / "overlays"
    out.mkdir()
    (out / "old.png").write_bytes(b"old")
    before = snapshot(tiny_run.out)

    # Execute
    refused = cli("model", "explain", "--model", tiny_run.out, "--data", tiny_run.data,
                  "--out", out, "--n", "2", "--methods", "vanilla")
    replaced = cli("model", "explain", "--model", tiny_run.out, "--data", tiny_run.data,
                   "--out", out, "--n", "2", "--methods", "vanilla", "--force")

    # Assert
    assert refused.code == 2 and "--force" in refused.err
    assert replaced.code == 0, replaced.err
    assert not (out / "old.png").exists() and (out / "summary.json").is_file()
    assert snapshot(tiny_run.out) == before
