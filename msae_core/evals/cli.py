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
    target = _target_l0(args)
    for run in args.runs:
        run_evals(Path(run), evals, progress=not args.no_progress, skip_done=args.skip_done,
                  device=args.device, overrides=overrides, target_l0=target, model_dtype=args.model_dtype)
    return 0


def _target_l0(args: argparse.Namespace) -> float | None:
    """--target-l0 L, or --match-l0 RUN (that run's L0 from its eval.json), or None."""
    if args.target_l0 is not None and args.match_l0:
        raise MsaeError("give --target-l0 or --match-l0, not both")
    if args.match_l0:
        from msae_core.evals.schema import read_eval_json
        from msae_core.evals.summary import summarize

        m = summarize(read_eval_json(Path(args.match_l0)))
        l0 = m.get("l0", m.get("synth_l0"))
        if l0 is None:
            raise MsaeError(f"{args.match_l0} has no L0 in its eval.json: run `msae eval {args.match_l0} "
                            "--evals core` (or synthetic) first")
        return float(l0)
    return args.target_l0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate trained runs with SAEBench's metric definitions",
                       description="Evaluate runs; results go into RUN/eval.json in SAEBench's layout.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s)")
    p.add_argument("--evals", default=DEFAULT_EVALS,
                   help="comma list of core, absorption, sparse_probing, synthetic (a run on a `msae synth` "
                        "store) (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when present)")
    p.add_argument("--model-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="the language model's dtype: auto = bfloat16 on CUDA (as SAEBench evaluates and msae "
                        "harvests and streams there), float32 on the CPU (default: %(default)s)")
    p.add_argument("--skip-done", action="store_true", help="skip evals already in eval.json")
    p.add_argument("--set", action="append", metavar="EVAL.FIELD=VALUE",
                   help="an eval setting, e.g. core.n_eval_reconstruction_batches=4 (repeatable)")
    p.add_argument("--target-l0", type=float, default=None, metavar="L",
                   help="evaluate a thresholded SAE (batchtopk, matryoshka, jumprelu) with its inference "
                        "threshold set to mean L0 L on held-out rows; the results replace those at its own "
                        "threshold in eval.json and say so (l0_calibration)")
    p.add_argument("--match-l0", default="", metavar="RUN",
                   help="the same, at the L0 in RUN's eval.json: compare architectures at matched L0")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_cli)
