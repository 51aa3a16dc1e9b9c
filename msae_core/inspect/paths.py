"""Where results live: the results folder ($MSAE_RESULTS, else ./results) and its runs/, stores/ and
exports/ folders, and the folder of one run by name."""

from __future__ import annotations

import os
from pathlib import Path

from msae_core.artifacts import RESULTS_DIR, RESULTS_EXPORTS, RESULTS_RUNS, RESULTS_STORES
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
    from msae_core.runs import safe_run_name

    if not name or safe_run_name(name) != name:
        raise MsaeError(f"{name!r} is not a run name")
    return runs_root(root) / name
