"""`msae sweep`: one training run per point of a grid over any config fields, resumable; the points
that share their activations train in one pass (msae train-group), each its own run folder.

    msae sweep --base-config run.json --grid beta=0.9,0.95 tau=0.3,0.5 lam=0,0.1 \
        --root results/runs --name NAME [--parallel 2]

A grid key is a setting of the run config, dotted (`sae.momentum.beta`, `train.lr`) or bare (`beta`)
when the bare name is in one place only; `seeds=0,1,2` is the replicate axis (training seeds: the
SAE's initialisation and the data order, so each seed is a pass of its own). Each point is its own
run folder `ROOT/NAME-beta0.9-tau0.3-lam0`. The points that share an activation source (a store,
or one model's stream, at any of its layers), batch size, data seed and device train in one
`msae train-group` process, each batch read or streamed once for all of them; a point alone in its
group, and every point with `--separate`, in its own `msae train` process (`--parallel N` processes
at a time). Running the same sweep again skips the points that are done and resumes the
others from their checkpoints.
`ROOT/_sweeps/NAME/sweep.json` lists the points, their values, run folders and states.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from msae_core.artifacts import SWEEP_RECORD, SWEEPS_DIR, atomic_write_json
from msae_core.configutil import InvalidSettings
from msae_core.errors import MsaeError
from msae_core.paths import safe_run_name
from msae_core.procs import StopFlag
from msae_core.runs.config import RunConfig
from msae_core.runs.folder import read_run

log = logging.getLogger(__name__)

_SECTIONS = ("sae", "train", "data")


@dataclass
class SweepPoint:
    """One point of a grid: its run name, the values it sets (dotted key -> value), its config."""

    name: str
    values: dict
    config: RunConfig


# ------------------------------------------------------------------------------------------ grid
def _leaf_paths(obj: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Every setting under a config, nested ones included: path -> its type annotation."""
    hints = typing.get_type_hints(type(obj))
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            out.update(_leaf_paths(v, prefix + (f.name,)))
        else:
            out[prefix + (f.name,)] = hints[f.name]
    return out


def resolve_key(config: RunConfig, key: str) -> tuple[str, ...]:
    """The path of a grid key (("sae", "momentum", "lam")), dotted in full (`sae.momentum.lam`),
    dotted by section (`sae.lam`, as configs had it before sae.momentum) or bare (`lam`) when the
    bare name is in one place only; MsaeError when unknown or ambiguous."""
    key = key.strip().replace("-", "_")
    paths = [p for s in _SECTIONS for p in _leaf_paths(getattr(config, s), (s,))]
    if "." in key:
        parts = tuple(key.split("."))
        if parts[0] not in _SECTIONS:
            raise MsaeError(f"grid key {key!r}: unknown section {parts[0]!r} (sae, train, data)")
        found = [p for p in paths if p == parts or (len(parts) == 2 and p[0] == parts[0] and p[-1] == parts[1])]
        if len(found) != 1:
            raise MsaeError(f"grid key {key!r}: {parts[0]} has no field {'.'.join(parts[1:])!r}")
        return found[0]
    found = [p for p in paths if p[-1] == key]
    if not found:
        raise MsaeError(f"grid key {key!r} is not a field of the run config")
    if len(found) > 1:
        raise MsaeError(f"grid key {key!r} is in {' and '.join(p[0] for p in found)}: write "
                        + " or ".join(".".join(p) for p in found))
    return found[0]


def _replaced(obj: Any, path: tuple[str, ...], value: Any) -> Any:
    """A copy of the config `obj` with the setting at `path` (below it) set to `value`."""
    head, rest = path[0], path[1:]
    return dataclasses.replace(obj, **{head: _replaced(getattr(obj, head), rest, value) if rest else value})


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """A grid value (text from the command line, or already typed) as the field's type."""
    origin = get_origin(typ)
    if origin is typing.Union or str(origin) == "types.UnionType":
        args = [a for a in get_args(typ) if a is not type(None)]
        if isinstance(value, str) and value.lower() in ("none", "null"):
            return None
        typ = args[0] if args else str
        origin = get_origin(typ)
    if not isinstance(value, str):
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    text = value.strip()
    try:
        if typ is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if typ is int:
            return int(text)
        if typ is float:
            return float(text)
        if origin is Literal:
            if text not in [str(a) for a in get_args(typ)]:
                raise ValueError(f"choose one of {', '.join(map(str, get_args(typ)))}")
            return text
        if origin in (list, tuple):
            return [t for t in text.split("+") if t]
    except ValueError as exc:
        raise MsaeError(f"grid value {text!r} for {key} is not a valid {getattr(typ, '__name__', typ)}"
                        f" ({exc})") from None
    return text


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """['beta=0.9,0.95', 'tau=0.3'] -> {'beta': ['0.9', '0.95'], 'tau': ['0.3']}."""
    grid: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise MsaeError(f"grid item {item!r} must look like name=v1,v2")
        key, vals = item.split("=", 1)
        values = [v for v in (s.strip() for s in vals.split(",")) if v]
        if not key.strip() or not values:
            raise MsaeError(f"grid item {item!r} must look like name=v1,v2")
        grid[key.strip()] = values
    return grid


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return format(v, "g")
    if isinstance(v, (list, tuple)):
        return "+".join(map(str, v))
    return str(v)


SEEDS_KEY = "seeds"  # the replicate axis: a training seed, set as the SAE's init seed and the batch order's


def expand_grid(base: RunConfig | dict, grid: dict[str, Any], name: str = "sweep") -> list[SweepPoint]:
    """Every point of `grid` (key -> list of values, or a 'v1,v2' string) applied to `base`, in
    the order of the keys (the last key varies fastest). `seeds=0,1,2` is the replicate axis: each
    value sets sae.seed and train.seed, so the runs differing only there form a group of training
    seeds (inspect.groups). Each point's config is validated for its own fields only (the store is
    checked when a run starts). Raises MsaeError listing problems."""
    base = RunConfig.from_dict(base) if isinstance(base, dict) else base
    keys, value_lists = [], []
    for key, vals in grid.items():
        if isinstance(vals, str):
            vals = [v for v in (s.strip() for s in vals.split(",")) if v]
        if not isinstance(vals, (list, tuple)):
            vals = [vals]
        if not vals:
            raise MsaeError(f"grid key {key!r} has no values")
        if key.strip() == SEEDS_KEY:
            keys.append((SEEDS_KEY,))
            value_lists.append([_coerce(v, int, SEEDS_KEY) for v in vals])
            continue
        path = resolve_key(base, key)
        typ = _leaf_paths(base)[path]
        keys.append(path)
        value_lists.append([_coerce(v, typ, ".".join(path)) for v in vals])
    points: list[SweepPoint] = []
    problems: list[str] = []
    for combo in itertools.product(*value_lists):
        cfg, values = base, {}
        for path, v in zip(keys, combo):
            targets = [("sae", "seed"), ("train", "seed")] if path == (SEEDS_KEY,) else [path]
            for target in targets:
                try:
                    cfg = _replaced(cfg, target, v)
                except (TypeError, ValueError) as exc:
                    raise MsaeError(f"{'.'.join(target)}={v!r}: {exc}") from None
            values[".".join(path)] = v
        label = "-".join(f"{path[-1] if path != (SEEDS_KEY,) else 'seed'}{_fmt(v)}" for path, v in zip(keys, combo))
        pname = safe_run_name(f"{name}-{label}" if label else name)
        for p in _own_problems(cfg):
            if f"{pname}: {p}" not in problems:
                problems.append(f"{pname}: {p}")
        points.append(SweepPoint(pname, values, cfg))
    if len({p.name for p in points}) != len(points):
        raise MsaeError("two grid points map to the same run name: use values that differ in text")
    if problems:
        raise MsaeError("invalid sweep points: " + "; ".join(problems[:12]))
    return points


def _own_problems(cfg: RunConfig) -> list[str]:
    """The config's problems without opening the store (checked once per sweep, not per point)."""
    from msae_core.configutil import collect_problems
    from msae_core.runs.config import DataConfig

    bare = dataclasses.replace(cfg, data=DataConfig(acts=""))
    return [p for p in collect_problems(bare) if not p.startswith("data.")]


# ------------------------------------------------------------------------------------------- run
def sweep_dir(root: str | os.PathLike, name: str) -> Path:
    return Path(root) / SWEEPS_DIR / safe_run_name(name)


def spread_over_gpus(configs: list[RunConfig], n_gpus: int) -> list[RunConfig]:
    """Point i's device, where it says `auto` and the machine has several GPUs: cuda:(i mod n), so
    the runs a sweep has going at once train on different GPUs. One GPU or none: unchanged."""
    if n_gpus < 2:
        return configs
    return [dataclasses.replace(c, train=dataclasses.replace(c.train, device=f"cuda:{i % n_gpus}"))
            if c.train.device == "auto" else c for i, c in enumerate(configs)]


def launch_sweep(base: RunConfig, grid: dict[str, Any], root: str | os.PathLike, name: str,
                 parallel: int = 1, evals: list[str] | tuple[str, ...] = (), one_pass: bool = True) -> dict:
    """Write the sweep record ROOT/_sweeps/NAME/sweep.json and start every point that is not done
    through the one run queue (queued until fewer than `parallel` training processes run under
    ROOT). `one_pass`: the points that share an activation source, batch size, data seed and device
    (runs.onepass) train as one `msae train-group` process, each batch read once for all of them
    (a group's memory is planned first: runs.memory); the others, and every point when not
    `one_pass`, as their own `msae train`. The Launch page and `msae sweep` both start sweeps here.
    On a machine with several GPUs the points whose device is `auto` are spread over them
    (spread_over_gpus), a group per GPU. Returns the record."""
    from msae_core.runs.jobs import launch_group, launch_run
    from msae_core.runs.memory import plan, source_size
    from msae_core.runs.onepass import one_pass_groups

    if parallel < 1:
        raise MsaeError(f"--parallel must be >= 1 (got {parallel})")
    name = safe_run_name(name)
    _, store = base.check()  # the store, once; each point is resolved (d_in, dead window) when launched
    points = expand_grid(base, grid, name)
    import torch

    for p, c in zip(points, spread_over_gpus([p.config for p in points], torch.cuda.device_count())):
        p.config = c
    for acts in sorted({p.config.data.acts for p in points} - {base.data.acts}):
        try:  # a store named by the grid: refused before any point is queued
            dataclasses.replace(base, data=dataclasses.replace(base.data, acts=acts)).check()
        except InvalidSettings as exc:
            store_problems = [q for q in exc.problems if q.field.startswith("data.")]
            if store_problems:
                raise MsaeError("invalid sweep points: " + "; ".join(store_problems)) from None
    root = Path(root)
    sdir = sweep_dir(root, name)
    sdir.mkdir(parents=True, exist_ok=True)
    record = {"name": name, "root": str(root), "base": base.to_dict(), "parallel": parallel,
              "grid": {k: (vs.split(",") if isinstance(vs, str) else list(vs)) for k, vs in grid.items()},
              "created": time.time(), "points": []}
    for p in points:
        p.config.save(sdir / f"{p.name}.json")
        record["points"].append({"name": p.name, "run": str(root / p.name), "values": p.values,
                                 "state": None})
    to_start = []
    for p, rec in zip(points, record["points"]):
        info = read_run(root / p.name)
        if info.problem is None and (info.state == "done" and info.has_weights
                                     or info.state in ("queued", "running")):
            rec["state"] = info.state  # done, or already on its way
            log.info("sweep %s: %s is %s, not started again", name, p.name, info.state)
            continue
        to_start.append((p, rec))
    groups = (one_pass_groups([p.config for p, _ in to_start]) if one_pass
              else [[i] for i in range(len(to_start))])
    for idx in groups:  # every group's memory planned before any point starts
        members = [to_start[i][0] for i in idx]
        if len(members) > 1 and members[0].config.data == base.data:
            plan([m.config.resolved(store) for m in members], [m.name for m in members],
                 *source_size(base, store))
    for gi, idx in enumerate(groups):
        members = [to_start[i] for i in idx]
        same_store = all(p.config.data.acts == base.data.acts for p, _ in members)
        if len(members) == 1:
            p, rec = members[0]
            launch_run(p.config, root, p.name, evals=evals, max_parallel=parallel,
                       store=store if same_store else None)
        else:
            launch_group([p.config for p, _ in members], root, [p.name for p, _ in members],
                         sdir / f"group-{gi}.log", evals=evals, max_parallel=parallel,
                         store=store if same_store else None)
            log.info("sweep %s: %d points in one pass: %s", name, len(members), ", ".join(p.name for p, _ in members))
        for _, rec in members:
            rec["state"], rec["group"] = "queued", gi if len(members) > 1 else None
    if one_pass and len(groups) > 1:
        log.info("sweep %s: %d processes (points that differ in their activation store, batch size, data "
                 "seed or device, or stream, train apart)", name, len(groups))
    _save_record(sdir, record)
    return record


def _save_record(sdir: Path, record: dict) -> None:
    record["updated"] = time.time()
    atomic_write_json(sdir / SWEEP_RECORD, record)


def wait_sweep(root: str | os.PathLike, name: str, poll_s: float = 0.5, stop: Any = None) -> dict:
    """Follow a launched sweep until every point has ended, keeping its record's states current.
    When `stop` (a procs.StopFlag) is raised, every point still queued or running is cancelled
    (each checkpoints and ends `cancelled`)."""
    from msae_core.runs.jobs import cancel_run
    from msae_core.runs.folder import FINAL_STATES

    sdir = sweep_dir(root, name)
    record = json.loads((sdir / SWEEP_RECORD).read_text())
    cancelled = False
    while True:
        changed = False
        for rec in record["points"]:
            state = read_run(Path(rec["run"])).state
            if state != rec["state"]:
                rec["state"], changed = state, True
                log.info("sweep %s: %s is %s", name, rec["name"], state)
        if changed:
            _save_record(sdir, record)
        live = [rec for rec in record["points"] if rec["state"] not in FINAL_STATES]
        if not live:
            return record
        if stop is not None and stop.signum is not None and not cancelled:
            for rec in live:
                cancel_run(Path(rec["run"]))
            cancelled = True
        time.sleep(poll_s)


def run_sweep(base: RunConfig, grid: dict[str, Any], root: str | os.PathLike, name: str,
              parallel: int = 1, poll_s: float = 0.2, one_pass: bool = True) -> dict:
    """Launch every point (skipping those done) and wait for all of them; SIGTERM cancels them.
    Returns the sweep record; its points carry their final state."""
    with StopFlag() as stop:
        record = launch_sweep(base, grid, root, name, parallel, one_pass=one_pass)
        return wait_sweep(root, record["name"], poll_s, stop)


# -------------------------------------------------------------------------------------------- CLI
def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sweep", help="train one run per grid point (resumable)",
        description="Train one run per point of a grid over run-config fields. Running it again "
                    "skips finished points and resumes unfinished ones.")
    p.add_argument("--base-config", required=True, help="run config json every point starts from")
    p.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2",
                   help="setting (dotted sae.momentum.beta, or bare beta) and its values")
    p.add_argument("--root", default="results/runs", help="folder of the run folders (default: results/runs)")
    p.add_argument("--name", default="", help="sweep name; run folders are NAME-<values> "
                   "(default: sweep-<the grid's fields>, e.g. sweep-lam-tau)")
    p.add_argument("--parallel", "--processes", type=int, default=1, dest="parallel",
                   help="training processes at a time; a one-pass group is one, and on a machine with several "
                        "GPUs each GPU's points form their own group (default: 1)")
    p.add_argument("--separate", action="store_true",
                   help="every point its own process, reading the data again (default: the points that "
                        "share an activation source, batch size, data seed and device train in one pass)")
    p.add_argument("--log-to", nargs="+", default=[], metavar="TRACKER",
                   help="also mirror every run's metrics to tensorboard (RUN/tensorboard: tensorboard --logdir "
                        "ROOT) and/or wandb (when installed, offline by default)")
    p.set_defaults(func=run_cli)


def default_name(grid: dict[str, Any]) -> str:
    """sweep-<the grid's fields, bare>: `lam=... tau=...` -> sweep-lam-tau."""
    return "sweep-" + "-".join(k.rsplit(".", 1)[-1] for k in grid)


def run_cli(args: argparse.Namespace) -> int:
    base = RunConfig.load(args.base_config)
    if args.log_to:
        base = dataclasses.replace(base, train=dataclasses.replace(
            base.train, log_to=[t for item in args.log_to for t in item.split(",") if t]))
    grid = parse_grid(args.grid)
    args.name = args.name or default_name(grid)
    record = run_sweep(base, grid, args.root, args.name, parallel=args.parallel, one_pass=not args.separate)
    bad = [f"{p['name']} ({p['state']})" for p in record["points"] if p["state"] != "done"]
    if bad:
        raise MsaeError(f"{len(bad)} of {len(record['points'])} sweep points did not finish: "
                        + ", ".join(bad[:6]) + (" ..." if len(bad) > 6 else "")
                        + f"; run the same command again to resume")
    log.info("sweep %s: all %d points done", args.name, len(record["points"]))
    return 0
