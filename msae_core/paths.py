"""Where results live: the results folder ($MSAE_RESULTS, else ./results) and its runs/, stores/ and
exports/ folders, the folder of one run by name, and what a run name may be (`safe_run_name`)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from msae_core.artifacts import (
    RESULTS_DIR,
    RESULTS_EXPORTS,
    RESULTS_RUNS,
    RESULTS_STORES,
)
from msae_core.errors import MsaeError

RESULTS_ENV = "MSAE_RESULTS"


def results_root(root: str | os.PathLike | None = None) -> Path:
    """The results folder: `root`, else $MSAE_RESULTS, else ./results."""
    return Path(root if root is not None else os.environ.get(RESULTS_ENV) or RESULTS_DIR)


def runs_root(root: str | os.PathLike | None = None) -> Path:
    return results_root(root) / RESULTS_RUNS


def stores_root(root: str | os.PathLike | None = None) -> Path:
    return results_root(root) / RESULTS_STORES


def exports_root(root: str | os.PathLike | None = None) -> Path:
    return results_root(root) / RESULTS_EXPORTS


def run_path(root: str | os.PathLike | None, name: str) -> Path:
    """The folder of run `name` under the runs root; refuses names that are not a plain run name
    (no separators, no '..'), so a widget value can never point outside the results."""
    if not name or safe_run_name(name) != name:
        raise MsaeError(f"{name!r} is not a run name")
    return runs_root(root) / name


_NAME_BAD = re.compile(r"[^A-Za-z0-9._-]+")


def safe_run_name(text: str, max_len: int = 120) -> str:
    """A folder name from free text: [A-Za-z0-9._-] only, no '..', not starting with '.', '_' or
    '-', not empty. Raises MsaeError when nothing usable is left."""
    name = _NAME_BAD.sub("-", str(text).strip())
    name = re.sub(r"\.{2,}", ".", name)
    name = re.sub(r"-{2,}", "-", name)
    name = name.lstrip("._-").rstrip(".-")[:max_len].rstrip(".-")
    if not name:
        raise MsaeError(f"{text!r} is not a usable run name: use letters, digits, '.', '_' or '-'")
    return name
