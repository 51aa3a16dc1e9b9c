"""Bad input and hostile moments, each with one clear line and nothing on disk lost: output paths
the OS refuses, a full disk while training, unknown evals, several trainers released on one folder,
SIGTERM before the first step, resumed metrics, orphaned temporary files, folders of the wrong kind."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from msae_core import cli
from msae_core.artifacts import (RUN_CHECKPOINT_DIR, RUN_METRICS, RUN_STATUS, TRAINER_STATE,
                                 atomic_write_json, read_jsonl)
from msae_core.errors import MsaeError
from msae_core.runs.folder import read_status
from msae_core.data.loader import BatchLoader
from msae_core.training.trainer import train
from test_train import REPO, make_config, make_store, strip_times


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("acts") / "store")


@pytest.fixture()
def cfg_path(store, tmp_path):
    p = tmp_path / "run.json"
    make_config(store, steps=12).save(p)
    return p


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("msae: error: ")
    return err


@pytest.fixture()
def small_fs(tmp_path):
    """A mounted tmpfs of 4 MiB (needs root and a kernel that lets us mount), else None."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    rc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                        capture_output=True).returncode
    if rc != 0:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# ------------------------------------------------------------------------------ output folders
def _out_cases(tmp_path, small_fs):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = {"an existing file": a_file, "below a file": a_file / "run",
             "a name too long": tmp_path / ("n" * 300)}
    if small_fs is not None:
        ro = small_fs / "ro"
        ro.mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
        cases["on a read-only file system"] = ro / "run"
    return cases


OS_CAUSES = ("File exists", "Not a directory", "File name too long", "Read-only file system")


def test_out_paths_the_os_refuses_are_one_line(store, cfg_path, tmp_path, small_fs, capsys):
    for what, out in _out_cases(tmp_path, small_fs).items():
        commands = {
            "train": ["train", "--config", str(cfg_path), "--out", str(out), "--no-progress"],
            "harvest": ["harvest", "--model", "/nonexistent-model", "--out", str(out), "--no-progress"],
            "sweep": ["sweep", "--base-config", str(cfg_path), "--grid", "lam=0,0.1", "--name", "s",
                      "--root", str(out)],
            "eval": ["eval", str(out), "--evals", "core"],
        }
        for cmd, argv in commands.items():
            assert cli.main(argv) == 2, (what, cmd)
            err = _one_error_line(capsys)
            if cmd == "eval":  # eval reads: it names the folder it cannot use
                assert str(out) in err, (what, cmd, err)
                continue
            assert str(out)[:60] in err, (what, cmd, err)
            assert any(c in err for c in OS_CAUSES), (what, cmd, err)
    assert (tmp_path / "a_file").read_text() == "x"  # nothing already on disk lost


def test_eval_of_a_regular_file_blames_the_file(tmp_path, capsys):
    f = tmp_path / "notarun"
    f.write_text("hello")
    assert cli.main(["eval", str(f), "--evals", "core"]) == 2
    err = _one_error_line(capsys)
    assert f"{f} is not a run folder (it is a file)" in err and "eval.json" not in err


# ------------------------------------------------------------------------------------ disk full
def _assert_failed_on_full_disk(run: Path, result_error: str):
    status = json.loads((run / RUN_STATUS).read_text())
    assert status["state"] == "failed" and "disk full" in status["error"], status
    assert "disk full" in result_error
    assert not list(run.glob(".checkpoint.tmp-*"))
    state = json.loads((run / RUN_CHECKPOINT_DIR / TRAINER_STATE).read_text())  # whole, readable
    assert state["step"] >= 5
    return state["step"]


def test_disk_full_while_training_injected(store, tmp_path, monkeypatch):
    """ENOSPC from the checkpoint writer at the second checkpoint: failed, first checkpoint kept,
    the same command resumes to the uninterrupted result."""
    from msae_core import sae_io

    run = tmp_path / "run"
    cfg = make_config(store, steps=30)
    real = sae_io.save_sae
    calls = {"n": 0}

    def save_sae(sae, folder):
        if ".checkpoint.tmp" in str(folder):
            calls["n"] += 1
            if calls["n"] == 2:
                (Path(folder) / "partial").write_bytes(b"x" * 100)
                raise OSError(errno.ENOSPC, "No space left on device", str(folder / "sae.safetensors"))
        return real(sae, folder)

    monkeypatch.setattr(sae_io, "save_sae", save_sae)
    with pytest.raises(MsaeError) as err:
        train(cfg, run, progress=False)
    assert _assert_failed_on_full_disk(run, str(err.value)) == 10
    assert "last whole checkpoint (step 10) is kept" in str(err.value)
    monkeypatch.undo()
    assert train(cfg, run, progress=False).state == "done"
    ref = tmp_path / "ref"
    assert train(cfg, ref, progress=False).state == "done"
    assert strip_times(read_jsonl(run / RUN_METRICS)) == strip_times(read_jsonl(ref / RUN_METRICS))


def test_disk_full_on_a_real_small_file_system(store, small_fs, tmp_path):
    """A 4 MiB tmpfs, 1 MiB of it left free, filled up by the run's own checkpoints and traces
    (the whole run takes about 2.3 MB)."""
    if small_fs is None:
        pytest.skip("cannot mount a tmpfs here; the injected ENOSPC test covers the same path")
    run = small_fs / "run"
    cfg = make_config(store, steps=400)  # checkpoints of ~250 KB, a 40 KB trace every 10 steps
    filler = small_fs / "filler"
    filler.write_bytes(b"\0" * (3 * 1024 * 1024))
    with pytest.raises(MsaeError) as err:
        train(cfg, run, progress=False)
    step = _assert_failed_on_full_disk(run, str(err.value))
    filler.unlink()  # space freed: the same command resumes
    res = train(cfg, run, progress=False)
    assert res.state == "done" and res.resumed_from == step


# ------------------------------------------------------------------------------- unknown evals
def test_unknown_evals_refused_before_anything_is_written(cfg_path, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--config", str(cfg_path), "--out", str(out), "--evals", "core,bogus"]) == 2
    assert "unknown eval(s) bogus" in _one_error_line(capsys)
    assert not out.exists()
    root = tmp_path / "runs"
    assert cli.main(["sweep", "--base-config", str(cfg_path), "--grid", "evals=core,bogus", "--name", "s",
                     "--root", str(root)]) == 2
    assert "unknown eval(s) bogus" in _one_error_line(capsys)
    assert not root.exists() or not any(root.rglob("config.json"))


def test_sweep_naming_a_missing_store_queues_nothing(cfg_path, tmp_path, capsys):
    root = tmp_path / "runs"
    assert cli.main(["sweep", "--base-config", str(cfg_path), "--grid",
                     f"acts={cfg_path.parent / 'nostore'}", "lam=0,0.1", "--name", "s", "--root", str(root)]) == 2
    assert "no activation store at" in _one_error_line(capsys)
    assert not root.exists() or not any(root.rglob("status.json"))


# -------------------------------------------------------------------------- one trainer per folder
RACER = textwrap.dedent("""
    import os, sys, time
    from msae_core import cli
    go, out, config = sys.argv[1], sys.argv[2], sys.argv[3]
    while not os.path.exists(go):   # released together, after the imports
        time.sleep(0.001)
    sys.exit(cli.main(["train", "--config", config, "--out", out, "--no-progress"]))
""")


@pytest.mark.slow
def test_racing_trainers_on_one_folder(store, tmp_path):
    """Four processes released at one instant on one fresh --out, several times: exactly one
    trains, the others are refused naming its pid, and metrics.jsonl holds one run's rows."""
    cfg = make_config(store, steps=12)
    cfg.train.log_every = 1
    cfg_path = tmp_path / "run.json"
    cfg.save(cfg_path)
    for trial in range(5):
        out, go = tmp_path / f"run{trial}", tmp_path / f"go{trial}"
        procs = [subprocess.Popen([sys.executable, "-c", RACER, str(go), str(out), str(cfg_path)], cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
        time.sleep(6)  # let all four import torch and wait at the line
        go.write_text("go")
        results = [(p.wait(timeout=120), p.communicate()[1]) for p in procs]
        codes = sorted(rc for rc, _ in results)
        assert codes == [0, 2, 2, 2], results
        winner = next(p.pid for p, (rc, _) in zip(procs, results) if rc == 0)
        for rc, err in results:
            if rc == 2:
                assert f"locked by another training process (pid {winner})" in err.strip().splitlines()[-1]
        assert [r["step"] for r in read_jsonl(out / RUN_METRICS)] == list(range(1, 13))
        assert read_status(out)["state"] == "done"


# -------------------------------------------------------------------------------- cancel at once
SLOW_START = textwrap.dedent("""
    import sys, time
    from msae_core import cli
    from msae_core.data.store import ActivationStore
    orig = ActivationStore.__init__
    def slow(self, *a, **k):   # the trainer opens the store after the status says running
        orig(self, *a, **k)
        time.sleep(4)
    ActivationStore.__init__ = slow
    sys.exit(cli.main(["train", "--config", sys.argv[2], "--out", sys.argv[1], "--no-progress"]))
""")


def test_sigterm_before_the_first_step_ends_cancelled(cfg_path, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_START, str(run), str(cfg_path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if json.loads((run / RUN_STATUS).read_text()).get("state") == "running":
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the run never said running")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130, proc.communicate()
    status = read_status(run)
    assert status["state"] == "cancelled" and "before step 1" in status["error"]
    assert status["pid"] is None


# ---------------------------------------------------------------------------- resumed metrics
def test_resume_after_sigterm_equals_uninterrupted_metrics_too(store, tmp_path, monkeypatch):
    """SIGTERM at step 77 with log_every 10: the resumed run's row for step 80 averages steps 71-80
    like the uninterrupted run's, because the checkpoint kept the running sums."""

    def cfg():
        c = make_config(store, steps=90)
        c.train.log_every, c.train.checkpoint_every = 10, 50
        return c

    ref = tmp_path / "ref"
    assert train(cfg(), ref, progress=False).state == "done"
    orig = BatchLoader.next

    def next_batch(self, s):
        if s == 76:  # while step 77 takes its batch
            os.kill(os.getpid(), signal.SIGTERM)
        return orig(self, s)

    run = tmp_path / "run"
    monkeypatch.setattr(BatchLoader, "next", next_batch)
    assert train(cfg(), run, progress=False).step == 77
    monkeypatch.undo()
    assert train(cfg(), run, progress=False).state == "done"
    got, want = strip_times(read_jsonl(run / RUN_METRICS)), strip_times(read_jsonl(ref / RUN_METRICS))
    assert [r["step"] for r in got] == [10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert got == want


# -------------------------------------------------------------------------- orphan temporary files
def test_next_writer_removes_a_killed_writers_temporary_file(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f".status.json.{dead.pid}.abc123.tmp"
    orphan.write_text("{half")
    live = tmp_path / f".status.json.{os.getpid()}.zzz.tmp"  # a live writer's: left alone
    live.write_text("{")
    atomic_write_json(tmp_path / "status.json", {"state": "done"})
    assert not orphan.exists() and live.exists()
    assert json.loads((tmp_path / "status.json").read_text()) == {"state": "done"}


# ------------------------------------------------------------------------ folders of the wrong kind
def test_out_of_the_wrong_kind_is_refused(store, cfg_path, tmp_path, capsys):
    runs_root = tmp_path / "runs"
    assert train(make_config(store, steps=3), runs_root / "a", progress=False).state == "done"
    evals_out = tmp_path / "evals"
    evals_out.mkdir()
    (evals_out / "eval.json").write_text("{}")
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*")}
    for out, what in ((store, "is an activation store"), (store / "run", "is an activation store"),
                      (runs_root, "holds run folders"), (evals_out, "holds no run")):
        assert cli.main(["train", "--config", str(cfg_path), "--out", str(out), "--no-progress"]) == 2
        assert what in _one_error_line(capsys)
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*")} == before  # not written into
    assert not (store / "run").exists()
