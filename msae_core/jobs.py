"""Long work started from the workbench in its own process, which writes its own log and results
for the pages to poll."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from msae_core.artifacts import HARVEST_LOG
from msae_core.errors import MsaeError
from msae_core.inspect.paths import stores_root


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
    cmd = [sys.executable, "-m", "msae_core.cli", "harvest", "--model", str(model), "--layer", str(int(layer)),
           "--corpus", str(corpus), "--tokens", str(int(tokens)), "--out", str(out), "--no-progress"]
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    with open(out.parent / HARVEST_LOG.format(name=name), "ab") as fh:
        subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True, env=env)
    return out
