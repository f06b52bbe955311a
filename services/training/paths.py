"""Confinement of user-supplied paths to the configured datasets and outputs roots.

The training API takes file paths from clients; it must never become a way to read or write arbitrary
files. A path is accepted only when it is relative to its root (or absolute and inside it), has no `..`
component, and still lies inside the root after every symlink is resolved.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from schemas.errors import invalid
from services.runtime import data_dir


@dataclass(frozen=True)
class Roots:
    datasets: Path
    outputs: Path

    @classmethod
    def from_settings(cls, datasets_dir: str = "", outputs_dir: str = "") -> Roots:
        """Empty settings mean `<data dir>/datasets` and `<data dir>/outputs` (created if missing)."""
        datasets = Path(datasets_dir) if datasets_dir else data_dir() / "datasets"
        outputs = Path(outputs_dir) if outputs_dir else data_dir() / "outputs"
        for root in (datasets, outputs):
            root.mkdir(parents=True, exist_ok=True)
        return cls(datasets=datasets.resolve(), outputs=outputs.resolve())


def confine(root: Path, value: str, field: str) -> Path:
    """The real path of `value` inside `root` (which must already be resolved).

    Raises CyError(INVALID_REQUEST) naming `field` for `..`, NUL bytes, absolute paths elsewhere and
    paths that a symlink leads out of the root.
    """
    if not value or "\x00" in value:
        raise invalid(field, "must be a non-empty path", type_="invalid_path")
    if ".." in PurePosixPath(value.replace("\\", "/")).parts:
        raise invalid(field, f"'{value}' contains '..'; give a path inside the configured root", type_="path_escape")
    candidate = Path(value) if os.path.isabs(value) else root / value
    resolved = candidate.resolve(strict=False)
    if not resolved.is_relative_to(root):
        what = "is outside" if os.path.isabs(value) else "leads (through a symlink) outside"
        raise invalid(field, f"'{value}' {what} the allowed root {root}", type_="path_escape")
    return resolved
