"""Several SAEs trained in one pass over one activation source: each batch is read (and shuffled)
once and fed to every member in turn, and each member keeps its own run folder exactly as if it had
been trained alone (config, metrics, traces, events, checkpoints, status, final weights).

    msae train-group --config a.json b.json c.json --out RUNS/a RUNS/b RUNS/c

What members share, and what they may not differ in (runs.onepass): the activation source (the
`data` section; streamed, all of it but the layer), the batch size, the data order's seed
(`train.seed`), the device and bf16. Everything else may differ: architecture, width, k, lr, steps,
the momentum knobs and the SAE's initialisation seed (`sae.seed`: replicates of one setting on one
data order). Streamed runs at several layers of one model share one forward (each reads its
layer's columns of rows that hold them side by side; each layer's `--cache`, when its runs name
one, is written as that layer's store).

Under torchrun a group works as a single run does: each rank reads its share of every batch, every
member is data-parallel, rank 0 alone writes the run folders (and the group's stream state, every
rank's buffer gathered to it). There, an error in one member's step ends the whole group (the
ranks' collectives must stay in step); a divergence and a cancel still end their member alone (the
ranks agree on both).

Equal to alone: batch s of a store is a function of (seed, s) only, and no training step reads the
global RNG, so member i's weights, buffers, Adam state and metrics rows equal those of its config
trained alone by `msae train` (a test, bitwise on the CPU). Members that resume from different
checkpoints start together at the earliest one; a member skips the steps it has done.

Faults stay local: a member whose loss is not finite ends `diverged` with its last good checkpoint
while the others go on; an error in one member's step ends that member `failed`; a cancel file in
one member's folder (`runs.jobs.cancel_run` writes it for a group's member) stops that member alone,
after a checkpoint; SIGTERM or SIGINT to the process stops every member, each after a checkpoint.
Killed, the same command resumes every unfinished member from its own checkpoint.

Memory is planned before anything starts (runs.memory): the members' weights and Adam states, the
largest member's step, the source; a group that would not fit is refused in one line.

Streamed, the model runs once per batch for the whole group, and the stream (its corpus position
and mixing buffer) is checkpointed once for the group, in its first run's folder
(runs.checkpoint.write_group_stream), at the steps its members checkpoint; members resumed from
different steps start together at the earliest, from its stream state (or, when a kill came between
a member's checkpoint and the group's, by streaming again from the start while the members that
are further skip those batches).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
from pathlib import Path

from msae_core import dist
from msae_core.artifacts import GROUP_STREAM_DIR, RUN_CANCEL
from msae_core.data.loader import BatchLoader
from msae_core.errors import MsaeError
from msae_core.procs import FolderLock, StopFlag
from msae_core.data.stream import merge_rank_states
from msae_core.runs.checkpoint import (find_checkpoint, prune_group_streams, read_group_stream,
                                      write_group_stream)
from msae_core.runs.config import RunConfig
from msae_core.runs.folder import refuse_foreign_out, write_status
from msae_core.runs.memory import plan, source_size
from msae_core.runs.onepass import shared_source_problems
from msae_core.training.loop import RunResult, _Fit, input_sample_rows
from msae_core.training.trainer import (absolute_paths, accept_folder, failure_text, ranks_joined,
                                       refuse_other_settings, run_evals)

log = logging.getLogger(__name__)


class _MemberStop:
    """A member's stop flag: the process's (SIGTERM, SIGINT: every member) or its own cancel file."""

    def __init__(self, group: StopFlag, out_dir: Path):
        self.group, self.cancel_file = group, out_dir / RUN_CANCEL

    @property
    def signum(self) -> int | None:
        if self.group.signum is not None:
            return self.group.signum
        return int(signal.SIGTERM) if self.cancel_file.exists() else None


def train_group(configs: list[RunConfig], out_dirs: list[str | Path], progress: bool = True,
                stop: StopFlag | None = None, evals: bool = True) -> list[RunResult]:
    """Train (or resume) every member in one pass over their shared source; one RunResult per
    member, in order. MsaeError before anything is written when the configs do not share a source
    (`shared_source_problems`) or a member's settings are invalid. `evals`: then each member that
    is done runs its own `train.evals` (still under its folder's lock, as `msae train` does)."""
    if len(configs) != len(out_dirs) or not configs:
        raise MsaeError(f"train-group takes one --out per --config (got {len(configs)} and {len(out_dirs)})")
    out_dirs = [Path(p) for p in out_dirs]
    if len({p.resolve() for p in out_dirs}) != len(out_dirs):
        raise MsaeError("train-group: two members share one --out folder")
    problems = shared_source_problems(configs)
    if problems:
        raise MsaeError("these runs cannot train in one pass: " + "; ".join(problems))
    layers = tuple(dict.fromkeys(c.data.layer for c in configs)) if configs[0].data.source == "stream" else ()
    if len(layers) > 1:  # several layers from one forward: each run reads its layer's columns
        t = configs[0].train
        caches = {c.data.layer: c.data.cache for c in configs if c.data.cache}
        source = configs[0].data.open_source(t.batch_size, t.seed, t.device, layers, caches)
        shared = _SharedSource(source)
        views = [_LayerView(shared, layers.index(c.data.layer), c.data.layer) for c in configs]
        configs = [c.check(v)[0] for c, v in zip(configs, views)]
    else:
        first, source = configs[0].check()  # the source, opened once
        configs = [first] + [c.check(source)[0] for c in configs[1:]]
        shared = _SharedSource(source)
        views = [shared] * len(configs)
    lm_params, store_bytes = source_size(configs[0], source)
    plan(configs, [p.name for p in out_dirs], lm_params, store_bytes)
    with contextlib.ExitStack() as stack:
        stop = stack.enter_context(stop or StopFlag())
        fits: list[_Fit | None] = []
        results: list[RunResult | None] = []
        if dist.is_main():
            try:
                accepted = _accept_all(stack, configs, out_dirs)
            except BaseException:
                dist.all_max(1)  # refused: the other ranks stop too
                raise
            dist.all_max(0)
        else:  # data-parallel: rank 0 checks and writes the folders; the others follow
            if dist.all_max(0):
                raise MsaeError("rank 0 refused the group's run folders (its error says why)")
            accepted = [(absolute_paths(c), find_checkpoint(o)) for c, o in zip(configs, out_dirs)]
        configs = [c for c, _ in accepted]
        for (config, ckpt), out_dir, view in zip(accepted, out_dirs, views):
            try:
                fit = _Fit(config, out_dir, view, _MemberStop(stop, out_dir), ckpt, owns_source=False)
                ended = fit.begin(progress=False)
            except Exception as exc:  # noqa: BLE001 - this member fails, the others go on
                if dist.world_size() > 1:
                    raise
                fit, ended = None, _failed(out_dir, exc)
            if ended is not None and fit is not None:
                fit.close()
            fits.append(None if ended is not None else fit)
            results.append(ended)
        _run_together(fits, results, shared, configs[0], progress, out_dirs[0] / GROUP_STREAM_DIR,
                      [getattr(v, "columns", None) for v in views])
        if source.streamed and all(r is not None and r.state == "done" for r in results):
            source.finish_cache()
            dist.barrier()
            if dist.is_main():
                shutil.rmtree(out_dirs[0] / GROUP_STREAM_DIR, ignore_errors=True)
        for config, result in zip(configs, results):
            if evals and dist.is_main() and result is not None and result.state == "done" and config.train.evals:
                run_evals(result.out_dir, list(config.train.evals), config)
    return [r for r in results if r is not None]


def _accept_all(stack: contextlib.ExitStack, configs: list[RunConfig],
                out_dirs: list[Path]) -> list[tuple[RunConfig, Path | None]]:
    """Every run folder locked (for as long as `stack`) and checked before any is written, then each
    accepted (training.trainer.accept_folder): (config as recorded, checkpoint) per member."""
    for out_dir in out_dirs:
        refuse_foreign_out(out_dir)
    for out_dir in out_dirs:
        out_dir.mkdir(parents=True, exist_ok=True)
        stack.enter_context(FolderLock(out_dir, what="training"))
    for config, out_dir in zip(configs, out_dirs):
        refuse_other_settings(config, out_dir)
    accepted = []
    for config, out_dir in zip(configs, out_dirs):
        (out_dir / RUN_CANCEL).unlink(missing_ok=True)
        accepted.append(accept_folder(config, out_dir, group=len(configs)))
    return accepted


class _SharedSource:
    """The group's source as each member sees it: the input-scale sample drawn once for all (a
    stream's comes from its first fill, which happens once), the cache finished by the group."""

    def __init__(self, source):
        self.source = source
        self._sample: tuple | None = None

    def input_sample(self, n: int, seed: int = 0):
        if self._sample is None:
            self._sample = (n, seed, self.source.input_sample(n, seed))
        if self._sample[:2] != (n, seed):
            raise MsaeError("the group's members ask for different input samples: not one pass")
        return self._sample[2]

    def finish_cache(self) -> None:
        """The group finishes the stream's cache when every member is done."""

    def __getattr__(self, name):
        return getattr(self.source, name)


class _LayerView:
    """One layer of a stream that holds several side by side (StreamSettings.layers): what a run
    at that layer reads, as if the stream were its own (through the group's shared source)."""

    def __init__(self, shared: _SharedSource, index: int, layer: int):
        self.shared, self.layer = shared, layer
        self.d_in = shared.source.layer_width
        self.columns = slice(index * self.d_in, (index + 1) * self.d_in)

    def input_sample(self, n: int, seed: int = 0):
        return self.shared.input_sample(n, seed)[:, self.columns].contiguous()

    def outlier_summary(self) -> dict | None:
        return self.shared.source.outlier_summary(self.layer)

    def __getattr__(self, name):  # finish_cache among them: the group's to do
        return getattr(self.shared, name)


def _stream_start(fits: list[_Fit], shared: _SharedSource, config: RunConfig, state_dir: Path) -> int:
    """Where the stream starts for members resumed from their checkpoints: the earliest one's step,
    from the group's stream state there, else from the beginning (the members skip what they did)."""
    start = min(f.start for f in fits)
    if start == 0 or not shared.source.streamed:
        return start
    dist.barrier()  # rank 0 wrote it
    saved = read_group_stream(state_dir, start)
    if saved is not None:
        shared.source.restore(*saved)
        return start
    log.warning("no stream state of the group at step %d: streaming again from the start", start)
    shared.input_sample(input_sample_rows(config.train), config.train.seed)  # the same first fill
    return 0


def _run_together(fits: list[_Fit | None], results: list[RunResult | None], shared: _SharedSource,
                  config: RunConfig, progress: bool, state_dir: Path, columns: list[slice | None]) -> None:
    """The shared loop: batch s once, then every member still training at s takes its step (its
    layer's `columns` of it when the stream holds several); streamed, the stream's state is
    written for the group after a step where a member checkpointed."""
    live = [i for i, f in enumerate(fits) if f is not None]
    if not live:
        return
    source = shared.source
    start = _stream_start([fits[i] for i in live], shared, config, state_dir)
    end = max(fits[i].tc.steps for i in live)
    tc = config.train
    kept = {i: fits[i].start for i in live}  # each member's latest checkpoint step
    loader = BatchLoader(source, tc.batch_size, tc.seed, start, fits[live[0]].device,
                         part=(dist.rank(), dist.world_size()))
    try:
        from tqdm.auto import tqdm

        with tqdm(total=end, initial=start, disable=None if progress else True, desc="group", unit="step") as bar:
            for s in range(start, end):
                if not live:
                    break
                x_BD = loader.next(s)
                for i in list(live):
                    fit = fits[i]
                    if s < fit.start:
                        continue
                    try:
                        ended = fit.advance(s, x_BD if columns[i] is None else x_BD[:, columns[i]].contiguous())
                        if ended is None and s + 1 == fit.tc.steps:
                            ended = fit.complete()
                    except Exception as exc:  # noqa: BLE001 - this member fails, the others go on
                        fit.close()
                        if dist.world_size() > 1:  # the ranks' collectives must stay in step: all end
                            raise
                        ended = _failed(fit.out_dir, exc, s)
                    if ended is not None:
                        results[i] = ended
                        live.remove(i)
                        fit.close()
                # the checkpoints a later run of the group may resume from (not those of done runs)
                resumable = [i for i in kept if fits[i].checkpointed_at == s + 1
                             and (results[i] is None or results[i].state != "done")]
                if source.streamed and resumable:
                    ranks = dist.gather_objects(source.state(s + 1))
                    if ranks is not None:  # rank 0: every rank's buffer
                        write_group_stream(state_dir, s + 1, *merge_rank_states(ranks))
                    kept.update({i: s + 1 for i in resumable})
                    if dist.is_main():
                        prune_group_streams(state_dir, {kept[i] for i in kept
                                                        if results[i] is None or results[i].state != "done"})
                bar.update(1)
    finally:
        loader.close()
        for i in live:
            fits[i].close()


def _failed(out_dir: Path, exc: BaseException, step: int = 0) -> RunResult:
    """A member that failed at `step` (its status says why); the others go on."""
    err = failure_text(exc, out_dir)
    write_status(out_dir, state="failed", error=err, pid=None, eta_s=None)
    log.error("%s: %s", out_dir.name, err)
    return RunResult("failed", step, out_dir, {}, err)


# ------------------------------------------------------------------------------------------- CLI
def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "train-group", help="train several runs in one pass over their shared activations",
        description="Train (or resume) several runs that share an activation source (a store, or a "
                    "stream of one model: several layers from one forward), batch size and data seed "
                    "in one process: each batch is read or streamed once and fed to every run; each "
                    "run keeps its own folder, as `msae train --config C --out RUN` would write it.")
    p.add_argument("--config", nargs="+", required=True, help="run config json files, one per run")
    p.add_argument("--out", nargs="+", required=True, help="run folders, in the order of --config")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--max-parallel", type=int, default=None,
                   help="stay queued until fewer than this many training processes run under --queue-root "
                        "(the group takes one place)")
    p.add_argument("--queue-root", default=None, help="folder of runs counted by --max-parallel "
                                                      "(default: the parent of the first --out)")
    p.set_defaults(func=run_cli)


def run_cli(args) -> int:
    configs = [RunConfig.load(c) for c in args.config]
    if dist.launched_by_torchrun():  # torchrun --nproc_per_node N -m msae_core.cli train-group ...
        if args.max_parallel:
            raise MsaeError("--max-parallel queues separate processes; under torchrun the ranks form one group: drop it")
        with ranks_joined(configs) as configs, StopFlag() as stop:
            results = train_group(configs, args.out, progress=not args.no_progress and dist.is_main(), stop=stop)
            dist.barrier()
        return _exit_code(results)
    with StopFlag() as stop:
        if args.max_parallel:
            from msae_core.runs.jobs import wait_for_slot

            outs = [Path(o) for o in args.out]
            root = Path(args.queue_root) if args.queue_root else outs[0].resolve().parent
            if not wait_for_slot(outs, root, args.max_parallel, stop=stop):
                return 130
        results = train_group(configs, args.out, progress=not args.no_progress, stop=stop)
    return _exit_code(results)


def _exit_code(results: list[RunResult]) -> int:
    for r in results:
        log.info("%s: %s at step %d%s", r.out_dir.name, r.state, r.step, f" ({r.error})" if r.error else "")
    if any(r.state in ("failed", "diverged") for r in results):
        return 1
    return 130 if any(r.state == "cancelled" for r in results) else 0
