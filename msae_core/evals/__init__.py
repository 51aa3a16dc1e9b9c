"""`msae eval`: SAEBench's metric definitions on our runs, written in SAEBench's result schema.

Each eval lives in its own module, found through `EVALS` (name -> module path). A module exposes
`EVAL_TYPE_ID`, a dataclass `Config` (SAEBench's eval_config fields; defaults sized for a CPU) and
`run(ctx: EvalContext, cfg: Config) -> dict`, the per-eval result built by `schema.make_result`.
`run_evals` runs the chosen ones and merges each into the run's `eval.json` atomically as soon as it
is done, so a killed eval keeps the evals finished before it and never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator

from msae_core.artifacts import EVAL_NAMES
from msae_core.errors import MsaeError
from msae_core.evals.context import EvalContext, open_run

log = logging.getLogger(__name__)

EVALS: dict[str, str] = {
    "core": "msae_core.evals.core",
    "absorption": "msae_core.evals.absorption",
    "sparse_probing": "msae_core.evals.sparse_probing",
    "synthetic": "msae_core.evals.synthetic",
}
assert tuple(EVALS) == EVAL_NAMES  # the training config checks names against artifacts.EVAL_NAMES

__all__ = ["EVALS", "EvalContext", "open_run", "eval_module", "parse_evals", "run_evals"]


def eval_module(name: str) -> Any:
    if name not in EVALS:
        raise MsaeError(f"unknown eval {name!r}; known: {', '.join(EVALS)}")
    return importlib.import_module(EVALS[name])


def parse_evals(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """'core,absorption' or ['core', 'absorption'] -> checked list, order kept, duplicates dropped."""
    items = text.split(",") if isinstance(text, str) else [p for t in text for p in str(t).split(",")]
    names = list(dict.fromkeys(s.strip() for s in items if s.strip()))
    unknown = [n for n in names if n not in EVALS]
    if unknown:
        raise MsaeError(f"unknown eval(s) {', '.join(unknown)}; known: {', '.join(EVALS)}")
    if not names:
        raise MsaeError(f"no eval chosen; known: {', '.join(EVALS)}")
    return names


def _eval_phase(run_dir: Path, text: str) -> None:
    """The run's status.json `eval`: which eval runs now, or how the evals ended."""
    from msae_core.runs.folder import write_status

    try:
        write_status(run_dir, eval=text)
    except OSError as exc:  # a read-only run folder still gets its evals computed
        log.debug("cannot write the eval phase into %s: %s", run_dir, exc)


def run_evals(run_dir: str | os.PathLike, evals: list[str] | str, *, progress: bool = True,
              skip_done: bool = False, device: str | None = None,
              overrides: dict[str, dict] | None = None, target_l0: float | None = None,
              model_dtype: str = "auto") -> dict:
    """Run `evals` on the run in `run_dir` and merge each result into its eval.json.

    `overrides` maps an eval name to Config field overrides. With `skip_done`, evals already in
    eval.json are not run again. `target_l0`: evaluate a thresholded SAE (BatchTopK, Matryoshka,
    JumpReLU) with its inference threshold set to that mean L0 on held-out rows (evals.calibrate;
    each result says so under `l0_calibration` and replaces that eval's result at the run's own
    threshold; evaluating again without it brings that back). `model_dtype`: the language model's (auto:
    bfloat16 on CUDA, float32 on the CPU). Returns the whole eval.json content.
    """
    from msae_core.configutil import from_dict
    from msae_core.evals.schema import read_eval_json

    names = parse_evals(evals)
    if skip_done and target_l0 is not None:
        raise MsaeError("--skip-done would keep the evals taken at the run's own threshold: drop it to "
                        "evaluate at a target L0")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MsaeError(f"{run_dir} is not a run folder" + (" (it is a file)" if run_dir.exists() else
                                                            " (no such folder)"))
    existing = read_eval_json(run_dir)
    todo = [n for n in names if not (skip_done and n in existing)]
    if not todo:
        return existing
    modules = {n: eval_module(n) for n in todo}
    configs = {}
    for n, mod in modules.items():
        over = dict((overrides or {}).get(n, {}))
        try:
            configs[n] = from_dict(mod.Config, over, prefix=f"{n}.") if over else mod.Config()
        except (TypeError, ValueError) as exc:
            raise MsaeError(f"{n}: bad eval setting: {exc}") from exc
    with _eval_lock(run_dir):
        return _run_locked(run_dir, todo, modules, configs, device, progress, skip_done, target_l0, model_dtype)


@contextlib.contextmanager
def _eval_lock(run_dir: Path) -> Iterator[None]:
    """The run's eval lock: one `msae eval` of a run at a time (MsaeError naming the other's pid);
    none where the folder cannot hold a lock file (read-only: evals are still computed)."""
    from msae_core.artifacts import EVAL_LOCK
    from msae_core.procs import FolderLock

    lock = FolderLock(run_dir, what="eval", lock_file=EVAL_LOCK)
    try:
        lock.acquire()
    except OSError as exc:
        log.debug("no eval lock in %s: %s", run_dir, exc)
        yield
        return
    try:
        yield
    finally:
        lock.release()


def _run_locked(run_dir: Path, todo: list[str], modules: dict, configs: dict, device: str | None,
                progress: bool, skip_done: bool, target_l0: float | None = None, model_dtype: str = "auto") -> dict:
    """run_evals' work under the eval lock (evals another process finished meanwhile are skipped
    with skip_done)."""
    from msae_core.evals.flags import run_flags
    from msae_core.evals.schema import read_eval_json, write_eval_result, write_flags
    from msae_core.evals.summary import not_numbers, summarize

    existing = read_eval_json(run_dir)
    if skip_done:
        todo = [n for n in todo if n not in existing]
        if not todo:
            return existing
    ctx = open_run(run_dir, device=device, progress=progress, model_dtype=model_dtype)
    synthetic = isinstance(ctx.manifest.get("synthetic"), dict)
    wrong = [n for n in todo if (n == "synthetic") != synthetic]
    if wrong:  # refused before any phase is written: the run's status keeps what its evals said
        raise MsaeError(f"run {run_dir.name} " + (
            "trained on synthetic activations (msae synth): there is no language model for "
            f"{', '.join(wrong)}; score it with --evals synthetic" if synthetic else
            "trained on a language model's activations: the synthetic eval needs a run on a msae synth store"))
    calibration = None
    if target_l0 is not None:
        from msae_core.evals.calibrate import calibrate_l0_, check_calibratable, heldout_rows

        check_calibratable(ctx.sae, target_l0)  # refused before held-out rows are computed
        calibration = calibrate_l0_(ctx.sae, heldout_rows(ctx), target_l0)
        log.info("%s: inference threshold set for L0 %.2f on %d held-out rows (L0 %.2f before)", run_dir.name,
                 calibration["achieved_l0"], calibration["rows"], calibration["l0_before"])
    for i, n in enumerate(todo, 1):
        log.info("eval %d/%d: %s on %s", i, len(todo), n, run_dir.name)
        _eval_phase(run_dir, f"running {n} ({i} of {len(todo)})")  # Home and Launch show it
        try:
            result = modules[n].run(ctx, configs[n])
            if calibration is not None:  # the threshold these numbers were taken at, said beside them
                result["eval_config"] = {**result.get("eval_config", {}), "target_l0": calibration["target_l0"]}
                result["eval_result_metrics"]["l0_calibration"] = calibration
            existing = write_eval_result(run_dir, n, result)  # a full disk fails here: said too
        except BaseException as exc:
            _eval_phase(run_dir, f"failed in {n}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            raise
    _eval_phase(run_dir, "done")
    flags = run_flags(summarize(existing), ctx.sae.cfg.d_sae, not_numbers(existing))
    existing = write_flags(run_dir, flags)
    for line in flags:
        log.warning("%s: %s", run_dir.name, line)
    return existing
