"""What the Launch page checks before it starts a run: every problem of the settings from its
widgets (msae_core.runs.config.RunConfig.check), each with the field it is about
(configutil.Problem), to show it beside that field's widget."""

from __future__ import annotations

from typing import Any

from msae_core.configutil import InvalidSettings, Problem
from msae_core.errors import MsaeError


def config_problems(config_dict: dict, source: Any = None) -> tuple[Any, list[Problem]]:
    """(RunConfig or None, every problem) for settings from widgets; never raises. Without problems
    the config is resolved against its source (d_in, the dead window), as it will run. `source`: the
    activation store the settings name, already opened (the page keeps it between reruns)."""
    from msae_core.runs.config import RunConfig

    try:
        cfg = RunConfig.from_dict(config_dict)
    except (MsaeError, ValueError, TypeError) as exc:
        return None, [Problem("", str(exc))]
    try:
        return cfg.check(source)[0], []
    except InvalidSettings as exc:
        return cfg, exc.problems
    except (MsaeError, ValueError, TypeError) as exc:
        return cfg, [Problem("", str(exc))]


def problem_widget(problem: Problem) -> str:
    """The widget a problem goes beside: its field's last part ("sae.k" -> "k"); every data field
    is the store picker's ("acts")."""
    if problem.field.startswith("data."):
        return "acts"
    return problem.field.rsplit(".", 1)[-1]
