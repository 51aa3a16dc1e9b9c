"""`msae study log`: the research log's study, reproduced as one sweep with training seeds.

The log this project grew from trained a TopK baseline and five momentum settings (beta, tau,
lambda; msae_core.evals.reference) on gemma-2-2b and reported one number each. This command trains
the same six settings on an activation store you give (`--acts`; by default the demo's store of the
embedded model), each with every seed of `--seeds`, evaluates every run (`--evals`), and writes
`study.md` and `study.csv` into `--out`: per setting its mean over seeds with a 95 % t interval,
the difference to the baseline paired by seed and its verdict (inspect.groups), and beside it what
the log reported, with the log's suspicious values marked (a baseline L0 that is not a sparse code,
negative explained variance, two runs with one KL score).

The runs are ordinary run folders under `--root` (`study-log-<setting>-seed<N>`): a killed study
resumes with the same command (finished runs and evals are skipped), and every page shows them.
The SAE shape (d_sae, k) and the schedule are yours to set: the log's (F 16384, gemma-2-2b) is a
GPU's; the defaults are the demo's.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from msae_core.errors import MsaeError

if TYPE_CHECKING:
    from msae_core.runs.config import RunConfig

log = logging.getLogger(__name__)

STUDY_METRICS = [("absorption", "absorption"), ("explained_variance", "explained variance"),
                 ("kl_div_score", "KL score"), ("l0", "L0"), ("sae_top1_acc", "top-1 probe acc")]


def settings() -> list[dict]:
    """The log's six settings: name, arch, beta, tau, lam (from evals.reference)."""
    from msae_core.evals.reference import REFERENCE_POINTS

    return [{k: p[k] for k in ("name", "arch", "beta", "tau", "lam")} for p in REFERENCE_POINTS]


def _slug(name: str) -> str:
    return name.replace("log ", "").replace(" ", "")  # "log run 3" -> "run3", "log baseline" -> "baseline"


def study_configs(base: "RunConfig", seeds: list[int], only: list[str] | None = None) -> list[tuple[str, dict, "RunConfig"]]:
    """(run name, setting, config) of every setting and seed; `only`: setting slugs to keep
    (baseline always kept: it is what the others are compared with)."""
    out = []
    for s in settings():
        slug = _slug(s["name"])
        if only and slug != "baseline" and slug not in only:
            continue
        sae = dataclasses.replace(base.sae, arch="topk") if s["arch"] == "topk" else dataclasses.replace(
            base.sae, arch="momentum", base="topk",
            momentum=dataclasses.replace(base.sae.momentum, beta=s["beta"], tau=s["tau"], lam=s["lam"]))
        for seed in seeds:
            cfg = dataclasses.replace(base, sae=dataclasses.replace(sae, seed=seed),
                                      train=dataclasses.replace(base.train, seed=seed))
            out.append((f"study-log-{slug}-seed{seed}", s, cfg))
    return out


def study_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per setting: ours (mean [interval] n, paired difference to the baseline and its
    verdict) beside the log's reported value, per metric; the log's notes."""
    from msae_core.evals.reference import reference_frame
    from msae_core.inspect.groups import group_score, paired_difference

    ref = reference_frame().set_index("name")
    base = runs[runs["setting"] == "log baseline"]
    rows = []
    for name in ref.index:
        sub = runs[runs["setting"] == name]
        if sub.empty:
            continue
        knob = lambda k: "-" if pd.isna(ref.loc[name, k]) else f"{ref.loc[name, k]:g}"  # noqa: E731
        row = {"setting": name, "beta": knob("beta"), "tau": knob("tau"), "lam": knob("lam"), "seeds": len(sub)}
        for key, label in STUDY_METRICS:
            a = group_score(sub, key) if key in sub else {"mean": None, "n": 0, "by_seed": {}}
            cell = "-" if a["mean"] is None else f"{a['mean']:.4g}" + (
                f" [{a['ci_low']:.4g}, {a['ci_high']:.4g}]" if a["ci_low"] is not None else "")
            if name != "log baseline" and a["mean"] is not None and key in base:
                d = paired_difference(a, group_score(base, key))
                if d["diff"] is not None:
                    ci = (f" [{d['diff_ci_low']:+.3g}, {d['diff_ci_high']:+.3g}]"
                          if d["diff_ci_low"] is not None else "")
                    cell += f" ({d['diff']:+.3g}{ci}, {d['verdict']})"
            row[f"{label} (ours)"] = cell
            reported = ref.loc[name, key] if key in ref.columns else None
            row[f"{label} (log)"] = "-" if reported is None or pd.isna(reported) else f"{reported:.4g}"
        row["the log's values to read with care"] = ref.loc[name, "notes"] or ""
        rows.append(row)
    return pd.DataFrame(rows)


def write_study(table: pd.DataFrame, out: Path, header: str) -> Path:
    from msae_core.artifacts import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    cols = list(table.columns)
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in r) + " |" for r in table.itertuples(index=False)]
    lines += ["", "Ours: mean over the training seeds [95 % t interval over them]; in brackets the "
              "difference to the baseline paired by seed, its interval and the verdict (resolved: the "
              "interval of the same-seed differences excludes zero). The log: one number each, on "
              "gemma-2-2b layer 12 at F 16384, not reproduced here."]
    atomic_write_text(out / "study.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "study.csv", table.to_csv(index=False))
    return out


def run_study(base: "RunConfig", root: Path, out: Path, seeds: list[int], evals: list[str],
              only: list[str] | None = None, overrides: dict | None = None, progress: bool = True) -> Path:
    """Train and evaluate every setting and seed (skipping what is done), then write the table."""
    from msae_core.evals import run_evals
    from msae_core.evals.summary import summarize
    from msae_core.runs.folder import read_status
    from msae_core.training.trainer import train

    _, store = base.check()  # once: every point reads the same store (train resolves each point)
    points = study_configs(base, seeds, only)
    rows = []
    for i, (name, setting, cfg) in enumerate(points, 1):
        run = root / name
        log.info("study [%d/%d] %s", i, len(points), name)
        if read_status(run).get("state") != "done":
            result = train(cfg, run, progress=progress, store=store)
            if result.state == "cancelled":  # Ctrl-C or SIGTERM: stopped as msae train stops (exit 130)
                raise KeyboardInterrupt(f"{name} cancelled at step {result.step}; run the same command to continue")
            if result.state != "done":
                raise MsaeError(f"{name} ended {result.state}: {result.error}; run the same command to continue")
        ev = run_evals(run, evals, progress=progress, skip_done=True, overrides=overrides)
        rows.append({"name": name, "setting": setting["name"], "seed": cfg.train.seed, **summarize(ev)})
    table = study_table(pd.DataFrame(rows))
    data = base.data.acts or f"{base.data.model} layer {base.data.layer} (streamed)"
    header = (f"# The research log's study on {data}\n\n{len(points)} runs: {len(table)} settings x "
              f"{len(seeds)} seeds ({', '.join(map(str, seeds))}), d_sae {base.sae.d_sae}, k {base.sae.k}, "
              f"{base.train.steps} steps of {base.train.batch_size}; evals {', '.join(evals)}.")
    return write_study(table, out, header)


def _cli(args: argparse.Namespace) -> int:
    from msae_core.evals import parse_evals
    from msae_core.evals.cli import _overrides
    from msae_core.paths import runs_root, stores_root
    from msae_core.sae import SAEConfig
    from msae_core.runs.config import DataConfig, RunConfig, TrainConfig

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise MsaeError(f"--seeds {args.seeds!r}: give seeds as 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise MsaeError("--seeds: give one or more distinct seeds, e.g. 0,1,2")
    acts = args.acts or str(stores_root() / "embedded-L6-100k")
    if not Path(acts).is_dir():
        raise MsaeError(f"no activation store at {acts}: give --acts STORE (msae harvest, or msae demo, makes one)")
    only = [s.strip().replace(" ", "") for s in args.only.split(",") if s.strip()] if args.only else None
    known = {_slug(s["name"]) for s in settings()}
    if only and set(only) - known:
        raise MsaeError(f"--only: unknown setting(s) {', '.join(sorted(set(only) - known))} (known: {', '.join(sorted(known))})")
    evals = parse_evals(args.evals)
    base = RunConfig(sae=SAEConfig(d_in=0, d_sae=args.d_sae, k=args.k),
                     train=TrainConfig(steps=args.steps, batch_size=args.batch_size, warmup_steps=min(200, args.steps // 5),
                                       snapshot_every=max(1, args.steps // 100)),
                     data=DataConfig(acts=acts))
    out = run_study(base, Path(args.root) if args.root else runs_root(), Path(args.out), seeds, evals,
                    only, _overrides(args.set or []), progress=not args.no_progress)
    print(f"written: {out / 'study.md'} and study.csv")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("study", help="reproduce a reference study as one sweep with seeds",
                              description="Reproduce a reference study with training seeds as replicates.")
    sub = p.add_subparsers(dest="study", metavar="STUDY", required=True)
    q = sub.add_parser("log", help="the research log's baseline and five momentum settings",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("--out", required=True, help="folder for study.md and study.csv")
    q.add_argument("--acts", default="", help="activation store (default: the demo's, results/stores/embedded-L6-100k)")
    q.add_argument("--root", default="", help="folder of the run folders (default: results/runs)")
    q.add_argument("--seeds", default="0,1,2", help="training seeds (default: %(default)s)")
    q.add_argument("--only", default="", help="settings besides the baseline, e.g. run1,run5 (default: all five)")
    q.add_argument("--evals", default="core,absorption,sparse_probing", help="(default: %(default)s)")
    q.add_argument("--set", action="append", metavar="EVAL.FIELD=VALUE", help="an eval setting (as msae eval)")
    q.add_argument("--d-sae", type=int, default=2048, help="(default: %(default)s)")
    q.add_argument("--k", type=int, default=32, help="(default: %(default)s)")
    q.add_argument("--steps", type=int, default=500, help="(default: %(default)s)")
    q.add_argument("--batch-size", type=int, default=1024, help="(default: %(default)s)")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=_cli)
