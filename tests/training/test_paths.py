"""User paths stay inside their root: `..`, absolute paths elsewhere and symlinks out are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.errors import CyError
from services.training.paths import confine


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.jsonl").write_text("{}")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.jsonl").write_text("{}")
    (root / "link-out").symlink_to(tmp_path / "outside")
    (root / "file-out.jsonl").symlink_to(tmp_path / "outside" / "secret.jsonl")
    (root / "link-in").symlink_to(root / "sub")
    return root.resolve()


def test_relative_and_absolute_paths_inside_the_root_are_accepted(root: Path) -> None:
    assert confine(root, "sub/a.jsonl", "datasetPath") == root / "sub" / "a.jsonl"
    assert confine(root, str(root / "sub" / "a.jsonl"), "datasetPath") == root / "sub" / "a.jsonl"
    assert confine(root, "new/dir", "outputDir") == root / "new" / "dir"  # need not exist yet
    assert confine(root, "link-in/a.jsonl", "datasetPath") == root / "sub" / "a.jsonl"  # symlink staying inside


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("../outside/secret.jsonl", "contains '..'"),
        ("sub/../../outside/secret.jsonl", "contains '..'"),
        ("sub/..", "contains '..'"),
        ("/etc/passwd", "is outside"),
        ("link-out/secret.jsonl", "symlink"),
        ("file-out.jsonl", "symlink"),
        ("link-out/new-dir", "symlink"),
        ("bad\x00name", "non-empty path"),
        ("", "non-empty path"),
    ],
)
def test_escaping_paths_are_refused_with_a_400_naming_the_field(root: Path, value: str, reason: str) -> None:
    with pytest.raises(CyError) as info:
        confine(root, value, "datasetPath")
    assert info.value.status == 400
    assert reason in info.value.body.message
    assert info.value.body.details[0].field == "datasetPath"
