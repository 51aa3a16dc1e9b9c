"""`msae demo`, the README's main job, end to end on a tiny random model (the embedded model's
parts are tested in test_lm, test_harvest and the evals' embedded tests)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from msae_core import cli, demo
from msae_core.artifacts import DEMO_STATUS
from msae_core.data.lm import save_tiny_model

REPO = Path(__file__).resolve().parents[1]


def _argv(tmp_path, root):
    model = tmp_path / "tiny"
    if not model.exists():
        save_tiny_model(model, family="llama", d_model=32, n_layers=2)
    return ["demo", "--root", str(root), "--model", str(model), "--layer", "1", "--tokens", "3000",
            "--steps", "30", "--d-sae", "64", "--batch-size", "128", "--evals", "core"]


def test_phases_put_a_scored_baseline_first():
    """Something useful early: the TopK run trains and gets its core eval before anything else."""
    labels = [p.label for p in demo.plan_phases(demo.DemoPlan())]
    assert labels[:5] == ["harvest activations", "train demo-topk", "core eval of demo-topk",
                          "train demo-momentum", "core eval of demo-momentum"]
    assert sorted(labels[5:]) == sorted(f"{e} eval of {r}" for e in ("absorption", "sparse_probing")
                                        for r in demo.DEMO_RUNS)
    cold = demo.plan_phases(demo.DemoPlan(), model_cached=False)
    assert cold[0].estimate_s > demo.plan_phases(demo.DemoPlan())[0].estimate_s


@pytest.mark.slow
def test_demo_harvests_trains_and_evaluates_then_skips_what_is_done(tmp_path, caplog):
    root = tmp_path / "results"
    argv = _argv(tmp_path, root)
    with caplog.at_level("INFO", logger="msae_core.demo"):
        assert cli.main(argv) == 0
    assert demo.demo_state(root) == {name: "done" for name in demo.DEMO_RUNS}
    for name in demo.DEMO_RUNS:
        ev = json.loads((root / "runs" / name / "eval.json").read_text())
        assert set(ev) == {"core", "msae_flags"} and isinstance(ev["msae_flags"], list)
        assert ev["core"]["eval_result_metrics"]["sparsity"]["l0"] > 0
    cfg = json.loads((root / "runs" / "demo-momentum" / "config.json").read_text())
    assert cfg["sae"]["arch"] == "momentum" and cfg["sae"]["momentum"]["lam"] == 0.3
    # the terminal got one line a phase with the time left; demo.json holds every phase, done
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("demo [")
             and "elapsed" in r.getMessage()]  # a phase's first line (a long one says more each minute)
    assert len(lines) == 5 and lines[0].startswith("demo [1/5] harvest activations")
    assert all("left" in line for line in lines)
    prog = demo.demo_progress(root)
    assert prog["state"] == "done" and [p["state"] for p in prog["phases"]] == ["done"] * 5
    assert all(p["seconds"] >= 0 for p in prog["phases"])
    # a second call finds everything done: the weights are not retrained
    mtime = (root / "runs" / "demo-topk" / "sae.safetensors").stat().st_mtime_ns
    assert cli.main(argv) == 0
    assert (root / "runs" / "demo-topk" / "sae.safetensors").stat().st_mtime_ns == mtime


def test_a_killed_demo_reads_as_failed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / DEMO_STATUS).write_text(json.dumps({"state": "running", "pid": dead.pid, "phase": 1,
                                                     "phases": [{"label": "a", "state": "done"}]}))
    prog = demo.demo_progress(tmp_path)
    assert prog["state"] == "failed" and "process gone" in prog["error"]
    (tmp_path / DEMO_STATUS).write_bytes(b"\x00garbage")
    assert demo.demo_progress(tmp_path) is None


def test_demo_refuses_bad_sizes(tmp_path, capsys):
    assert cli.main(["demo", "--root", str(tmp_path), "--steps", "0"]) == 2
    assert "must be >= 1" in capsys.readouterr().err
    assert cli.main(["demo", "--root", str(tmp_path), "--evals", "core,bogus"]) == 2
    assert "unknown eval(s) bogus" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_serve_shows_the_workbench_at_once_and_keeps_serving(tmp_path):
    """`msae demo --serve`: the workbench answers while the demo still runs, the demo finishes, and
    the server keeps serving until interrupted."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "results"
    log = tmp_path / "demo.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "msae_core.cli"] + _argv(tmp_path, root)
                                + ["--serve", "--port", str(port)], cwd=tmp_path, stdout=fh,
                                stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        end = time.monotonic() + 300
        while time.monotonic() < end:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).close()
                up = True
            except OSError:
                up = False
            prog = demo.demo_progress(root)
            if prog is not None and prog["state"] == "done" and up:
                break
            time.sleep(0.5)
        else:
            pytest.fail("the demo did not finish:\n" + log.read_text()[-3000:])
        text = log.read_text()
        # the server is started first: its line comes before the demo's first phase (with a tiny
        # model the demo can end before Streamlit has finished booting, so no timing is asserted)
        assert 0 <= text.index(f"workbench: http://127.0.0.1:{port}") < text.index("demo [1/5]")
        time.sleep(1)
        assert proc.poll() is None  # still serving after the demo
        urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=5).close()
        assert "keeps serving" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)  # SIGINT may be ignored: a shell's background job inherits that
        try:
            rc = proc.wait(timeout=90)  # the server gets 10 s to stop, then is killed
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0


def _interrupted_demo(tmp_path: Path) -> dict:
    """Run a small demo that must end in KeyboardInterrupt; its demo.json as Home reads it."""
    argv = _argv(tmp_path, tmp_path / "results")
    plan = demo.DemoPlan(model=argv[argv.index("--model") + 1], layer=1,
                         tokens=int(argv[argv.index("--tokens") + 1]), steps=5, d_sae=64, batch_size=32)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(tmp_path / "results", plan, progress=False)
    return demo.demo_progress(tmp_path / "results")


def test_a_signal_during_training_stops_the_demo(tmp_path, monkeypatch):
    """The trainer takes SIGTERM/SIGINT while it runs (its own StopFlag) and ends `cancelled`: the
    demo then stops as on Ctrl-C (with --serve, the server too) instead of reporting a failed
    phase and serving on."""
    from msae_core.training import trainer
    from msae_core.training.trainer import RunResult

    monkeypatch.setattr(trainer, "train", lambda cfg, run_dir, progress=True, stop=None: RunResult(
        "cancelled", 17, Path(run_dir), {}, "cancelled by signal SIGTERM at step 17; checkpoint written"))
    prog = _interrupted_demo(tmp_path)
    assert prog["state"] == "failed" and "cancelled at step 17" in prog["error"]
    assert "run the same command to continue" in prog["error"]


def test_a_signal_during_an_eval_reads_as_stopped_not_failed(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM in a phase other than training (here the first eval) ends the demo saying
    where it stopped and how to continue, not "failed: KeyboardInterrupt"."""
    import msae_core.evals
    from msae_core.training import trainer
    from msae_core.training.trainer import RunResult

    monkeypatch.setattr(trainer, "train", lambda cfg, run_dir, progress=True, stop=None: RunResult("done", 5, Path(run_dir)))

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(msae_core.evals, "run_evals", interrupted)
    prog = _interrupted_demo(tmp_path)
    assert prog["error"] == ("stopped during core eval of demo-topk (Ctrl-C or SIGTERM); "
                             "run the same command to continue")


def test_time_left_ignores_phases_a_rerun_finds_done(tmp_path):
    """A rerun skips the phases already done in no time: they must not make the estimate of the
    time left zero; phases that ran scale it."""
    phases = demo.plan_phases(demo.DemoPlan(), model_cached=True)
    prog = demo._Progress(tmp_path, phases)
    prog.start(0)
    prog.finish(0, time.time())  # found done
    assert prog.left_s(1) == pytest.approx(sum(p.estimate_s for p in phases[1:]))
    prog.start(1)
    prog.finish(1, time.time() - 2 * phases[1].estimate_s)  # twice the estimate
    assert prog.left_s(2) == pytest.approx(2 * sum(p.estimate_s for p in phases[2:]), rel=1e-3)


def test_a_signal_after_the_last_step_still_stops_the_demo(tmp_path, monkeypatch):
    """Ctrl-C that reaches the trainer after its last step leaves the run done; the demo must stop
    there all the same, not go on into the next phase (it did, and a second Ctrl-C was needed)."""
    from msae_core.training import trainer
    from msae_core.training.trainer import RunResult

    def done_but_signalled(cfg, run_dir, progress=True, stop=None):
        stop.signum = signal.SIGINT
        return RunResult("done", 5, Path(run_dir))

    monkeypatch.setattr(trainer, "train", done_but_signalled)
    prog = _interrupted_demo(tmp_path)
    assert prog["state"] == "failed" and "stopped after training demo-topk (done, step 5)" in prog["error"]
    assert [p["state"] for p in prog["phases"]][:2] == ["done", "running"]  # not on into the eval


def test_an_interrupted_demo_exits_130_with_serve_too(tmp_path, monkeypatch, capsys):
    """Ctrl-C stops the demo (and its server) with exit code 130 and a line saying how to go on;
    it ended 0 after "demo failed"."""
    class Server:
        def poll(self):
            return 0

    monkeypatch.setattr(demo, "serve_workbench", lambda root, port: Server())

    def interrupted(root, plan, progress=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_demo", interrupted)
    for extra in ([], ["--serve"]):
        assert cli.main(_argv(tmp_path, tmp_path / "results") + extra) == 130
        err = capsys.readouterr().err
        assert "run the same command" in err or "interrupted" in err


def test_time_left_moves_within_a_phase(tmp_path):
    """The estimate counts down while a phase runs (it stood still for a whole phase), in
    demo.json too, refreshed by the progress thread."""
    phases = demo.plan_phases(demo.DemoPlan(), model_cached=True)
    prog = demo._Progress(tmp_path, phases, tick_s=0.05)
    prog.start(0)
    first = json.loads((tmp_path / DEMO_STATUS).read_text())["eta_s"]
    prog.current = (0, time.time() - 20)  # 20 s into the harvest
    assert prog.left_s(0) == pytest.approx(first - 20, abs=0.5)
    for _ in range(100):
        eta = json.loads((tmp_path / DEMO_STATUS).read_text())["eta_s"]
        if eta < first - 19:
            break
        time.sleep(0.05)
    assert first - 21 < eta < first - 19
    prog.current = (0, time.time() - 10 * phases[0].estimate_s)  # far over its estimate: a floor
    assert prog.left_s(0) >= sum(p.estimate_s for p in phases[1:]) + 0.1 * phases[0].estimate_s - 1e-6
    prog.end("done")
