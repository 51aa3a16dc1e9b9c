"""`msae demo`: the main job on the embedded default, end to end, in phases a user can watch.

Harvests layer-6 activations of the embedded Gemma 3 270M on the embedded fortunes corpus, trains a
TopK baseline and a momentum SAE on them, and evaluates both. The phases are ordered so that
something useful is on screen early: the TopK run trains first and gets its core eval at once
(a trained, scored run within minutes), then the momentum run and its core eval, then the slower
evals. `msae demo --serve` serves the workbench first, so the runs appear on Home as they progress.

Progress goes to the terminal (one line a phase with the time left, and each phase's own progress
bar) and to `RESULTS/demo.json` (DEMO_STATUS), which the Home page polls. Every phase resumes or
skips what is already done, so running the demo again after a kill continues where it stopped.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from msae_core.artifacts import DEMO_LOG, DEMO_STATUS, RESULTS_RUNS, RESULTS_STORES, atomic_write_json
from msae_core.errors import MsaeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoPlan:
    model: str = "embedded"
    layer: int = 6
    tokens: int = 100_000
    d_sae: int = 2048
    k: int = 32
    steps: int = 500
    batch_size: int = 1024
    evals: tuple[str, ...] = ("core", "absorption", "sparse_probing")


# name -> SAE settings over the shared ones; the momentum run takes the defaults (beta 0.95, tau
# 0.4, lam 0.3: the research log's run 5)
DEMO_RUNS: dict[str, dict] = {
    "demo-topk": {"arch": "topk"},
    "demo-momentum": {"arch": "momentum", "base": "topk"},
}

# rough seconds on 2 CPU cores (`msae demo` in a fresh clone, 2026-11-25), scaled at run time by the
# speed the demo actually sees
_SECONDS_PER_TOKEN = 1 / 1200          # harvest with early stop, embedded model
_MODEL_CONVERSION_S = 90               # first use only: GGUF -> cached safetensors
_SECONDS_PER_STEP = 0.28               # TopK step at d_sae 2048, batch 1024, d_in 640
# core: KL/CE and sparsity/variance about 30 s, its 100k-token density window about 60 s (2026-12-05)
_EVAL_S = {"core": 90, "absorption": 70, "sparse_probing": 60}


@dataclass
class Phase:
    """One step of the demo: what it does and roughly how long it takes."""

    kind: str        # harvest | train | eval
    run: str         # run name ("" for the harvest)
    eval: str        # eval name ("" unless kind == "eval")
    estimate_s: float

    @property
    def label(self) -> str:
        if self.kind == "harvest":
            return "harvest activations"
        if self.kind == "train":
            return f"train {self.run}"
        return f"{self.eval} eval of {self.run}"


def plan_phases(plan: DemoPlan, model_cached: bool = True) -> list[Phase]:
    """The demo's phases in order: harvest; TopK train + core; momentum train + core; the rest."""
    scale = (plan.d_sae / 2048) * (plan.batch_size / 1024)
    phases = [Phase("harvest", "", "", plan.tokens * _SECONDS_PER_TOKEN
                    + (0 if model_cached else _MODEL_CONVERSION_S))]
    first, later = [e for e in plan.evals if e == "core"], [e for e in plan.evals if e != "core"]
    for name, over in DEMO_RUNS.items():
        cost = 1.2 if over.get("arch") == "momentum" else 1.0
        phases.append(Phase("train", name, "", plan.steps * _SECONDS_PER_STEP * scale * cost))
        phases += [Phase("eval", name, ev, _EVAL_S.get(ev, 60)) for ev in first]
    phases += [Phase("eval", name, ev, _EVAL_S.get(ev, 60)) for ev in later for name in DEMO_RUNS]
    return phases


def results_root() -> Path:
    from msae_core.paths import results_root as root

    return root()


def _fmt_s(s: float) -> str:
    s = int(round(max(0.0, s)))
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


class _Progress:
    """Writes demo.json and the terminal lines; estimates the time left from the phases done and
    the time spent in the phase in hand. A thread refreshes the estimate every `tick_s` seconds
    (demo.json, which Home polls) and says it on the terminal every `say_s` seconds."""

    def __init__(self, root: Path, phases: list[Phase], tick_s: float = 2.0, say_s: float = 60.0) -> None:
        import threading

        self.root, self.phases = root, phases
        self.started = time.time()
        self.done_est = self.done_real = 0.0
        self.current: tuple[int, float] | None = None  # (phase, its start)
        self.record = {"state": "running", "pid": os.getpid(), "started": self.started, "error": None,
                       "phases": [{"label": p.label, "kind": p.kind, "run": p.run, "eval": p.eval,
                                   "state": "pending", "estimate_s": p.estimate_s} for p in phases]}
        self._lock = threading.Lock()
        self._write()
        self._halt = threading.Event()
        self._ticker = threading.Thread(target=self._tick, args=(tick_s, say_s), name="demo-eta", daemon=True)
        self._ticker.start()

    def left_s(self, i: int) -> float:
        """Seconds left from phase i on: the estimates scaled by the speed seen so far, the phase in
        hand less the time it has already taken (never below a tenth of its estimate)."""
        speed = self.done_real / self.done_est if self.done_est > 0 else 1.0
        rest = speed * sum(p.estimate_s for p in self.phases[i + 1:])
        if i >= len(self.phases):
            return 0.0
        own = speed * self.phases[i].estimate_s
        if self.current is not None and self.current[0] == i:
            own = max(own - (time.time() - self.current[1]), 0.1 * own)
        return rest + own

    def _tick(self, tick_s: float, say_s: float) -> None:
        said = time.time()
        while not self._halt.wait(tick_s):
            cur = self.current
            if cur is None:
                continue
            left = self.left_s(cur[0])
            with self._lock:
                self.record["eta_s"] = left
                self._write_locked()
            if time.time() - max(said, cur[1]) >= say_s:  # a minute into the phase, then each minute
                said = time.time()
                log.info("demo [%d/%d] %s: %s in this phase, about %s left", cur[0] + 1, len(self.phases),
                         self.phases[cur[0]].label, _fmt_s(time.time() - cur[1]), _fmt_s(left))

    def start(self, i: int) -> float:
        self.current = (i, time.time())
        left = self.left_s(i)
        log.info("demo [%d/%d] %s; %s elapsed, about %s left", i + 1, len(self.phases),
                 self.phases[i].label, _fmt_s(time.time() - self.started), _fmt_s(left))
        with self._lock:
            self.record["phases"][i].update(state="running", started=time.time())
            self.record.update(phase=i, eta_s=left)
            self._write_locked()
        return time.time()

    def finish(self, i: int, t0: float, state: str = "done", error: str | None = None) -> None:
        took = time.time() - t0
        if took >= 1.0:  # a phase found done (a rerun skips it) says nothing of this machine's speed
            self.done_est += self.phases[i].estimate_s
            self.done_real += took
        self.current = None
        with self._lock:
            self.record["phases"][i].update(state=state, seconds=took, error=error)
            self.record.update(eta_s=self.left_s(i + 1))
            self._write_locked()

    def end(self, state: str, error: str | None = None) -> None:
        self._halt.set()
        self._ticker.join()
        self.current = None
        with self._lock:
            self.record.update(state=state, error=error, eta_s=0, finished=time.time())
            self._write_locked()
        log.info("demo %s in %s%s", state, _fmt_s(time.time() - self.started), f": {error}" if error else "")

    def _write(self) -> None:
        with self._lock:
            self._write_locked()

    def _write_locked(self) -> None:
        self.record["updated"] = time.time()
        atomic_write_json(self.root / DEMO_STATUS, self.record)


def run_demo(root: Path, plan: DemoPlan = DemoPlan(), progress: bool = True) -> list[Path]:
    """Run the demo's phases (module docstring). Ctrl-C or SIGTERM in any phase stops the demo
    there (KeyboardInterrupt), with what was done kept; the same call continues."""
    from msae_core.evals import run_evals
    from msae_core.procs import StopFlag
    from msae_core.data.harvest import harvest
    from msae_core.data.lm import embedded_is_cached
    from msae_core.runs.config import DataConfig, RunConfig, TrainConfig
    from msae_core.runs.folder import read_status
    from msae_core.sae import SAEConfig
    from msae_core.data.store import StoreSettings
    from msae_core.training.trainer import train

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    phases = plan_phases(plan, model_cached=plan.model != "embedded" or embedded_is_cached())
    prog = _Progress(root, phases)
    store_dir = root / RESULTS_STORES / f"{Path(plan.model).name}-L{plan.layer}-{plan.tokens // 1000}k"
    store = None
    failed: list[str] = []
    try:
        for i, ph in enumerate(phases):
            t0 = prog.start(i)
            run_dir = root / RESULTS_RUNS / ph.run
            if ph.kind == "harvest":
                store = harvest(StoreSettings(model=plan.model, layer=plan.layer, target_tokens=plan.tokens),
                                store_dir, progress=progress)
            elif ph.kind == "train":
                cfg = RunConfig(
                    sae=SAEConfig(d_in=store.d_in, d_sae=plan.d_sae, k=plan.k, **DEMO_RUNS[ph.run]),
                    train=TrainConfig(steps=plan.steps, batch_size=plan.batch_size,
                                      warmup_steps=min(200, plan.steps // 5),
                                      snapshot_every=max(1, plan.steps // 100)),
                    data=DataConfig(acts=str(store_dir)))
                if read_status(run_dir).get("state") != "done":
                    stop = StopFlag()  # the trainer takes Ctrl-C and SIGTERM at its safe points
                    result = train(cfg, run_dir, progress=progress, stop=stop)
                    if result.state == "cancelled":
                        raise KeyboardInterrupt(f"stopped: {ph.run} cancelled at step {result.step} "
                                                "(checkpoint written); run the same command to continue")
                    if stop.signum is not None:  # the signal came after its last step: it is trained
                        raise KeyboardInterrupt(f"stopped after training {ph.run} (done, step {result.step}); "
                                                "run the same command to continue with its evals")
                    if result.state != "done":
                        raise MsaeError(f"{ph.run} ended {result.state}: {result.error}")
            else:  # one eval failing does not cost the others
                try:
                    run_evals(run_dir, [ph.eval], progress=progress, skip_done=True)
                except MsaeError as exc:
                    log.error("demo: %s failed: %s", ph.label, exc)
                    failed.append(f"{ph.label}: {exc}")
                    prog.finish(i, t0, "failed", str(exc))
                    continue
            prog.finish(i, t0)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM, in any phase: nothing done is lost
        label = phases[prog.record.get("phase") or 0].label if phases else "the demo"
        if str(exc):
            log.warning("demo %s", str(exc).splitlines()[0])
        prog.end("failed", str(exc).splitlines()[0] if str(exc) else
                 f"stopped during {label} (Ctrl-C or SIGTERM); run the same command to continue")
        raise
    except BaseException as exc:
        prog.end("failed", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise
    if failed:
        msg = f"demo runs trained, but {len(failed)} eval(s) failed: " + "; ".join(failed)
        prog.end("failed", msg)
        raise MsaeError(msg)
    prog.end("done")
    return [root / RESULTS_RUNS / name for name in DEMO_RUNS]


def start_demo(root: Path | None = None) -> subprocess.Popen:
    """Start `msae demo` in its own process (for the workbench: the UI never trains in-process)."""
    from msae_core.procs import msae_command, spawn

    root = Path(root or results_root())
    root.mkdir(parents=True, exist_ok=True)
    return spawn(msae_command("demo", "--root", root), log=root / DEMO_LOG)


def demo_progress(root: Path | None = None) -> dict | None:
    """demo.json as the Home page shows it, None when no demo has run; never raises. A `running`
    demo whose process is gone reads as failed."""
    from msae_core.artifacts import read_json_object
    from msae_core.procs import pid_alive

    rec = read_json_object(Path(root or results_root()) / DEMO_STATUS)
    if rec is None or not isinstance(rec.get("phases"), list):
        return None
    if rec.get("state") == "running" and not pid_alive(rec.get("pid")):
        rec = {**rec, "state": "failed", "error": f"process gone (pid {rec.get('pid')}): run `msae demo` "
                                                   "again to continue where it stopped"}
    return rec


def demo_state(root: Path | None = None) -> dict:
    """The demo runs' states, for the Home page: name -> state, or "absent"."""
    from msae_core.runs.folder import read_run

    root = Path(root or results_root())
    return {name: (read_run(root / RESULTS_RUNS / name).state if (root / RESULTS_RUNS / name).is_dir()
                   else "absent") for name in DEMO_RUNS}


def serve_workbench(root: Path, port: int) -> subprocess.Popen:
    """Start `streamlit run workbench/Home.py` on 127.0.0.1:port showing `root`."""
    from msae_core.procs import spawn

    home = Path(__file__).resolve().parent.parent / "workbench" / "Home.py"
    if not home.is_file():
        raise MsaeError(f"the workbench is not beside this installation ({home} is missing): "
                        "run msae from a checkout (pip install -e .)")
    cmd = [sys.executable, "-m", "streamlit", "run", str(home), "--server.port", str(port),
           "--server.address", "127.0.0.1", "--server.headless", "true"]
    return spawn(cmd, detach=False, env={"MSAE_RESULTS": str(Path(root).resolve())})


def _cli(args: argparse.Namespace) -> int:
    if args.tokens < 1 or args.steps < 1 or args.d_sae < 1 or args.batch_size < 1:
        raise MsaeError("--tokens, --steps, --d-sae and --batch-size must be >= 1")
    from msae_core.evals import parse_evals

    plan = DemoPlan(model=args.model, layer=args.layer, tokens=args.tokens, steps=args.steps,
                    d_sae=args.d_sae, batch_size=args.batch_size, evals=tuple(parse_evals(args.evals)))
    root = Path(args.root)

    def _stop(signum, frame):  # SIGTERM stops the demo (and its server) as Ctrl-C does
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, _stop)
    server = None
    demo_over = False  # once the demo has ended, Ctrl-C only stops the server: exit as the demo ended
    rc = 0
    try:
        if args.serve:
            server = serve_workbench(root, args.port)
            log.info("workbench: http://127.0.0.1:%d (the demo's runs appear on Home as they progress)", args.port)
        try:
            run_demo(root, plan)
        except MsaeError as exc:
            if not args.serve:
                raise
            log.error("demo: %s", exc)
            rc = 2
        demo_over = True
        if server is not None:
            log.info("the workbench keeps serving at http://127.0.0.1:%d; Ctrl-C to stop", args.port)
            server.wait()
    except KeyboardInterrupt:
        if not demo_over:
            print("msae: demo stopped (Ctrl-C or SIGTERM); what was done is kept: run the same command "
                  "to continue", file=sys.stderr)
            rc = 130
    finally:
        signal.signal(signal.SIGTERM, old_term)
        if server is not None and server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    return rc


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="harvest, train and evaluate demo runs on the embedded default",
        description="Harvest layer-6 activations of the embedded Gemma 3 270M on the embedded fortunes "
                    "corpus, train a TopK SAE and a momentum SAE on them and evaluate both. The TopK run "
                    "trains and gets its core eval first, so a scored run is on the workbench's Home "
                    "within minutes; the slower evals come last. The terminal shows each phase with the "
                    "time left; with --serve the workbench shows the runs as they progress. Ctrl-C stops "
                    "the demo; running the same command again continues where it stopped.")
    p.add_argument("--root", default=str(results_root()), help="results folder (default: %(default)s)")
    p.add_argument("--serve", action="store_true",
                   help="serve the workbench on 127.0.0.1 first and keep serving when the demo is done")
    p.add_argument("--port", type=int, default=8501, help="workbench port with --serve (default: %(default)s)")
    p.add_argument("--model", default=DemoPlan.model, help="language model (default: %(default)s)")
    p.add_argument("--layer", type=int, default=DemoPlan.layer, help="layer (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=DemoPlan.batch_size,
                   help="training batch size (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=DemoPlan.tokens, help="tokens to harvest (default: %(default)s)")
    p.add_argument("--steps", type=int, default=DemoPlan.steps, help="training steps per run (default: %(default)s)")
    p.add_argument("--d-sae", type=int, default=DemoPlan.d_sae, help="dictionary size (default: %(default)s)")
    p.add_argument("--evals", default=",".join(DemoPlan.evals), help="evals to run (default: %(default)s)")
    p.set_defaults(func=_cli)
