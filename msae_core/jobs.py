"""Long work started from the workbench in its own process, which writes its own log and results
for the pages to poll."""

from __future__ import annotations

import os
from pathlib import Path

from msae_core.artifacts import HARVEST_LOG
from msae_core.errors import MsaeError
from msae_core.inspect.paths import stores_root
from msae_core.procs import msae_command, spawn


def start_harvest(root: str | os.PathLike | None, name: str, model: str = "embedded", layer: int = 6,
                  corpus: str = "embedded", tokens: int = 100_000) -> Path:
    """Start `msae harvest` into results/stores/<name> in its own process (output in
    <name>.harvest.log next to the store). Returns the store folder."""
    from msae_core.runs import safe_run_name

    name = safe_run_name(name)
    if layer < 0 or tokens < 1:
        raise MsaeError(f"layer must be >= 0 and tokens >= 1 (got layer {layer}, tokens {tokens})")
    out = stores_root(root) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    spawn(msae_command("harvest", "--model", model, "--layer", int(layer), "--corpus", corpus,
                       "--tokens", int(tokens), "--out", out, "--no-progress"),
          log=out.parent / HARVEST_LOG.format(name=name))
    return out
