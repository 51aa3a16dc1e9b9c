"""`msae demo`: the main job on the embedded default, end to end.

Harvests layer-6 activations of the embedded Gemma 3 270M on the embedded fortunes corpus, trains a
TopK baseline and a momentum SAE on them, and evaluates both. Every stage resumes or skips what is
already done, so running it again after a kill continues where it stopped.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from msae_core.artifacts import RUN_STATUS
from msae_core.errors import MsaeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoPlan:
    model: str = "embedded"
    layer: int = 6
    tokens: int = 100_000
    d_sae: int = 2048
    k: int = 32
    steps: int = 1500
    batch_size: int = 1024
    evals: tuple[str, ...] = ("core", "absorption", "sparse_probing")


# name -> SAE settings over the shared ones; momentum values are the research log's run 5
DEMO_RUNS: dict[str, dict] = {
    "demo-topk": {"arch": "topk"},
    "demo-momentum": {"arch": "momentum", "base": "topk", "beta": 0.95, "tau": 0.4, "lam": 0.3},
}


def results_root() -> Path:
    return Path(os.environ.get("MSAE_RESULTS", "results"))


def run_demo(root: Path, plan: DemoPlan = DemoPlan(), progress: bool = True) -> list[Path]:
    from msae_core.evals import run_evals
    from msae_core.harvest import harvest
    from msae_core.runs import DataConfig, RunConfig, TrainConfig, read_status
    from msae_core.sae import SAEConfig
    from msae_core.store import StoreSettings
    from msae_core.train import train

    store_dir = root / "stores" / f"{plan.model}-L{plan.layer}-{plan.tokens // 1000}k"
    log.info("demo: harvesting %d tokens of layer %d into %s", plan.tokens, plan.layer, store_dir)
    store = harvest(StoreSettings(model=plan.model, layer=plan.layer, target_tokens=plan.tokens),
                    store_dir, progress=progress)
    runs, failed = [], []
    for name, sae_over in DEMO_RUNS.items():
        run_dir = root / "runs" / name
        cfg = RunConfig(
            sae=SAEConfig(d_in=store.d_in, d_sae=plan.d_sae, k=plan.k, **sae_over),
            train=TrainConfig(steps=plan.steps, batch_size=plan.batch_size,
                              warmup_steps=min(200, plan.steps // 5)),
            data=DataConfig(acts=str(store_dir)),
        )
        if read_status(run_dir).get("state") != "done":
            log.info("demo: training %s", name)
            train(cfg, run_dir, progress=progress)
        for ev in plan.evals:  # one eval failing does not cost the others
            log.info("demo: evaluating %s (%s)", name, ev)
            try:
                run_evals(run_dir, [ev], progress=progress, skip_done=True)
            except MsaeError as exc:
                log.error("demo: %s eval of %s failed: %s", ev, name, exc)
                failed.append(f"{name}/{ev}: {exc}")
        runs.append(run_dir)
    if failed:
        raise MsaeError(f"demo runs trained, but {len(failed)} eval(s) failed: " + "; ".join(failed))
    return runs


def start_demo(root: Path | None = None) -> subprocess.Popen:
    """Start `msae demo` in its own process (for the workbench: the UI never trains in-process)."""
    root = Path(root or results_root())
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / "demo.log"
    with open(log_path, "ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "msae_core.cli", "demo", "--root", str(root)],
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def demo_state(root: Path | None = None) -> dict:
    """Where a demo stands, for the Home page: the demo runs' states."""
    root = Path(root or results_root())
    out = {}
    for name in DEMO_RUNS:
        from msae_core.runs import read_status

        out[name] = read_status(root / "runs" / name).get("state", "absent") \
            if (root / "runs" / name / RUN_STATUS).exists() else "absent"
    return out


def _cli(args: argparse.Namespace) -> int:
    if args.tokens < 1 or args.steps < 1 or args.d_sae < 1 or args.batch_size < 1:
        raise MsaeError("--tokens, --steps, --d-sae and --batch-size must be >= 1")
    plan = DemoPlan(model=args.model, layer=args.layer, tokens=args.tokens, steps=args.steps,
                    d_sae=args.d_sae, batch_size=args.batch_size,
                    evals=tuple(e for e in args.evals.split(",") if e))
    run_demo(Path(args.root), plan)
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("demo", help="harvest, train and evaluate demo runs on the embedded default",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(results_root()), help="results folder (default: %(default)s)")
    p.add_argument("--model", default=DemoPlan.model, help="language model (default: %(default)s)")
    p.add_argument("--layer", type=int, default=DemoPlan.layer, help="layer (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=DemoPlan.batch_size,
                   help="training batch size (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=DemoPlan.tokens, help="tokens to harvest (default: %(default)s)")
    p.add_argument("--steps", type=int, default=DemoPlan.steps, help="training steps per run (default: %(default)s)")
    p.add_argument("--d-sae", type=int, default=DemoPlan.d_sae, help="dictionary size (default: %(default)s)")
    p.add_argument("--evals", default=",".join(DemoPlan.evals), help="evals to run (default: %(default)s)")
    p.set_defaults(func=_cli)
