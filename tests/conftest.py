"""Test-wide settings: legacy Keras, one TensorFlow thread pool, shared data location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

#: The real HAM10000 subset shipped beside the repository (never copied into it).
HAM_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ham10000"


@pytest.fixture(scope="session")
def ham_dir() -> Path:
    """Path of the real HAM10000 subset; skips the test when it is absent."""
    if not (HAM_DIR / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"real HAM10000 subset not found at {HAM_DIR} (CI provides ../shared)")
    return HAM_DIR


@pytest.fixture
def flower_task_identity() -> None:
    """Give this process a Flower task identity, as Flower's simulation entry does.

    Building a ``flwr.app.Message`` outside a running app needs one.
    """
    from flwr.supercore.task_identity import TaskIdentity

    if TaskIdentity._run_id is None:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


#: Data of the one tiny trained run the training, evaluation and saliency tests share.
TINY_RUN_DATA = "synthetic:n=240,size=48,sites=3,seed=3"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """``qanafed model train`` of a tiny qana-akd1000 (48 px), run once for the whole session.

    Returns
    -------
    SimpleNamespace
        ``out`` (the run folder), ``payload`` (its metrics.json as printed by ``--json``) and
        ``data`` (the dataset spec it was trained on).
    """
    import json
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from qanafed.cli import app

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    result = CliRunner().invoke(app, [
        "model", "train", "--data", TINY_RUN_DATA, "--variant", "qana-akd1000", "--size", "48",
        "--out", str(out), "--width", "0.25", "--epochs", "2", "--qat-epochs", "1",
        "--balance", "oversample", "--no-augment", "--min-agreement", "0.05", "--json",
    ])
    assert result.exit_code == 0, result.output
    return SimpleNamespace(out=out, payload=json.loads(result.stdout), data=TINY_RUN_DATA)
