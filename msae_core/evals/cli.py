"""`msae eval RUN [RUN ...] --evals core,absorption,sparse_probing`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from msae_core.errors import MsaeError


DEFAULT_EVALS = "core,absorption,sparse_probing"  # on a language model's run (the Launch page's default too)


def _overrides(items: list[str]) -> dict[str, dict]:
    """['core.n_eval_reconstruction_batches=4', 'absorption.max_words=500'] -> {'core': {...}, ...} (json values)."""
    out: dict[str, dict] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        name, dot, field = key.partition(".")
        if not sep or not dot or not field:
            raise MsaeError(f"--set {item!r}: expected EVAL.FIELD=VALUE, e.g. core.n_eval_reconstruction_batches=4")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(name, {})[field] = value
    return out


def run_cli(args: argparse.Namespace) -> int:
    from msae_core.evals import parse_evals, run_evals

    evals = parse_evals(args.evals)
    overrides = _overrides(args.set or [])
    unknown = sorted(set(overrides) - set(evals))
    if unknown:
        raise MsaeError(f"--set names eval(s) not chosen: {', '.join(unknown)}")
    for run in args.runs:
        run_evals(Path(run), evals, progress=not args.no_progress, skip_done=args.skip_done,
                  device=args.device, overrides=overrides)
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate trained runs with SAEBench's metric definitions",
                       description="Evaluate runs; results go into RUN/eval.json in SAEBench's layout.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s)")
    p.add_argument("--evals", default=DEFAULT_EVALS,
                   help="comma list of core, absorption, sparse_probing, synthetic (a run on a `msae synth` "
                        "store) (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when present)")
    p.add_argument("--skip-done", action="store_true", help="skip evals already in eval.json")
    p.add_argument("--set", action="append", metavar="EVAL.FIELD=VALUE",
                   help="an eval setting, e.g. core.n_eval_reconstruction_batches=4 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_cli)
