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
