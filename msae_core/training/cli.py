"""`msae train`: the command line of the trainer (msae_core.training.trainer).

    msae train --acts DIR --arch momentum --base topk --beta 0.95 --tau 0.4 --lam 0.3 \
        --d-sae 4096 --steps N --out RUN
    msae train --config run.json --out RUN        # flags given as well override the file
    msae train --out RUN                          # resume RUN with its own config.json
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Any

from msae_core import dist
from msae_core.artifacts import RUN_CONFIG
from msae_core.configutil import add_dataclass_args, overrides_from_args
from msae_core.errors import MsaeError
from msae_core.procs import FolderLock, StopFlag
from msae_core.runs.config import DataConfig, RunConfig, TrainConfig
from msae_core.runs.folder import refuse_foreign_out
from msae_core.sae import MomentumConfig, SAEConfig
from msae_core.training.trainer import ended_early, run_evals, train, train_data_parallel

log = logging.getLogger(__name__)



# -------------------------------------------------------------------------------------------- CLI
def _dataclass_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


_TRAIN_NAMES = _dataclass_names(TrainConfig) | _dataclass_names(DataConfig)


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train", help="train an SAE from an activation store (resumes an unfinished --out)",
        description="Train an SAE. Settings come from --config (a run.json with sae/train/data "
                    "sections), else from OUT/config.json when resuming; flags override both.")
    p.add_argument("--config", help="run config json (sections sae, train, data)")
    p.add_argument("--out", required=True, help="run folder (created; resumed when unfinished)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--max-parallel", type=int, default=None,
                   help="stay queued until fewer than this many runs under --queue-root are running")
    p.add_argument("--queue-root", default=None, help="folder of runs counted by --max-parallel "
                                                      "(default: the parent of --out)")
    g = p.add_argument_group("data")
    add_dataclass_args(g, DataConfig)
    g = p.add_argument_group("training")
    add_dataclass_args(g, TrainConfig)
    g = p.add_argument_group("SAE")
    add_dataclass_args(g, SAEConfig, skip=tuple(_TRAIN_NAMES))
    g = p.add_argument_group("momentum SAE (sae.momentum)")
    add_dataclass_args(g, MomentumConfig)
    p.set_defaults(func=run_cli)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """--config (or OUT/config.json), then flags on top."""
    if args.config:
        cfg = RunConfig.load(args.config)
    elif args.out and (Path(args.out) / RUN_CONFIG).exists():
        cfg = RunConfig.load(Path(args.out) / RUN_CONFIG, recorded=True)
    else:
        cfg = RunConfig()
    sae_over = {k: v for k, v in overrides_from_args(args, SAEConfig).items() if k not in _TRAIN_NAMES}
    momentum_over = overrides_from_args(args, MomentumConfig)
    if momentum_over:
        sae_over["momentum"] = dataclasses.replace(cfg.sae.momentum, **momentum_over)
    train_over = overrides_from_args(args, TrainConfig)
    data_over = overrides_from_args(args, DataConfig)
    for key in ("evals", "log_to"):  # --evals core,absorption or --evals core absorption
        if key in train_over:
            train_over[key] = [e for item in train_over[key] for e in str(item).split(",") if e]
    if "seed" in train_over and "seed" in _dataclass_names(SAEConfig):
        sae_over["seed"] = train_over["seed"]
    try:
        cfg = RunConfig(sae=dataclasses.replace(cfg.sae, **sae_over),
                        train=dataclasses.replace(cfg.train, **train_over),
                        data=dataclasses.replace(cfg.data, **data_over))
    except TypeError as exc:
        raise MsaeError(str(exc)) from exc
    return cfg


def run_cli(args: argparse.Namespace) -> int:
    if dist.launched_by_torchrun():
        if args.max_parallel:
            raise MsaeError("--max-parallel queues separate runs; under torchrun the ranks form one run: drop it")
        return train_data_parallel(config_from_args(args), Path(args.out), progress=not args.no_progress)
    out = Path(args.out)
    refuse_foreign_out(out)
    cfg = store = None
    if args.config or not out.exists():  # settings from outside the folder: checked before creating it
        cfg, store = config_from_args(args).check()
    out.mkdir(parents=True, exist_ok=True)
    # the folder lock and the signal handler first: one trainer per folder, cancellable at once
    with FolderLock(out, what="training"), StopFlag() as stop:
        if cfg is None:  # resuming from the folder's own config.json, read under the lock
            cfg, store = config_from_args(args).check()
        if args.max_parallel:
            from msae_core.runs.jobs import wait_for_slot

            root = Path(args.queue_root) if args.queue_root else out.resolve().parent
            if not wait_for_slot(out, root, args.max_parallel, stop=stop):
                return 130
        result = train(cfg, out, progress=not args.no_progress, stop=stop, store=store)
        if ended_early(result):
            return 130
        if cfg.train.evals:  # still under the lock: no trainer rewrites the weights being evaluated
            return run_evals(out, list(cfg.train.evals), cfg)
    return 0
