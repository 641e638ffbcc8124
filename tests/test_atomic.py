"""Atomic output folders: complete or untouched, never half-written."""

from __future__ import annotations

import os

import pytest

from common.atomic import atomic_dir


def test_new_folder_appears_only_when_complete(tmp_path):
    # Prepare
    out = tmp_path / "run"
    # Execute
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("a")
        assert not out.exists()
    # Assert
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


def test_failure_leaves_the_old_folder_and_no_temporary(tmp_path):
    # Prepare
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    # Execute
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(out) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("boom")
    # Assert
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_success_replaces_the_old_folder(tmp_path):
    # Prepare
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("old")
    # Execute
    with atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    # Assert
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
