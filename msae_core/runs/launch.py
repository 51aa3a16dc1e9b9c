"""What the Launch page checks before it starts a run: every problem of the settings from its
widgets (msae_core.runs.config.RunConfig), and the field each problem is about, to show it beside that
widget."""

from __future__ import annotations

import re
from typing import Any

from msae_core.errors import MsaeError


def problem_field(problem: str) -> str:
    """The config field a validation problem is about: 'sae.k must be ...' -> 'k'."""
    text = re.sub(r"^(sae|train|data)\.", "", problem.strip())
    m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)", text)
    return m.group(1) if m else ""


def config_problems(config_dict: dict) -> tuple[Any, list[str]]:
    """(RunConfig or None, every problem) for settings from widgets; never raises."""
    from msae_core.runs.config import RunConfig

    try:
        cfg = RunConfig.from_dict(config_dict)
    except (MsaeError, ValueError, TypeError) as exc:
        return None, [str(exc)]
    try:
        return cfg, list(cfg.problem_list())
    except (MsaeError, ValueError, TypeError) as exc:
        return cfg, [str(exc)]
