"""`msae eval` against what can go wrong around it: two evals of one run at once (the second is
refused while the first holds the run's eval lock), a full disk while eval.json is written (the
path named, the status says failed, eval.json as it was), and the LM evals refused on a synthetic
run before anything is written."""

import errno
import json
import os
import subprocess
import sys

import pytest

from msae_core import cli
from msae_core.artifacts import EVAL_LOCK
from msae_core.data import synth as S
from msae_core.evals import run_evals
from msae_core.sae import SAEConfig
from msae_core.runs.config import DataConfig, RunConfig, TrainConfig
from msae_core.training.trainer import train

SMALL = S.SynthConfig(n_features=64, d_model=24, n_trees=3, depth=2, branching=3, n_correlated=6,
                      group_size=3, rows=3000, seed=2)
FAST = ["--set", "synthetic.n_eval_rows=1000"]


def _trained(store, run, arch: str = "topk", k: int = 4):
    """A 40-step run of `arch` on the synthetic `store`."""
    cfg = RunConfig(sae=SAEConfig(arch=arch, d_in=24, d_sae=64, k=k),
                    train=TrainConfig(steps=40, batch_size=128, lr=3e-3, warmup_steps=2, seed=0, device="cpu",
                                      log_every=20, checkpoint_every=1000),
                    data=DataConfig(acts=str(store.path)))
    train(cfg, run, progress=False)
    return run


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalruns")
    return _trained(S.synth(SMALL, root / "store", progress=False), root / "run")


def test_a_second_eval_of_one_run_is_refused_while_the_first_runs(synth_run, capsys):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(synth_run / EVAL_LOCK)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode())\n"
        "print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = (synth_run / "status.json").read_text()
        assert cli.main(["eval", str(synth_run), "--evals", "synthetic", "--no-progress"] + FAST) == 2
        err = capsys.readouterr().err
        assert f"locked by another eval process (pid {holder.pid})" in err and len(err.strip().splitlines()) == 1
        assert (synth_run / "status.json").read_text() == before and not (synth_run / "eval.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert cli.main(["eval", str(synth_run), "--evals", "synthetic", "--no-progress"] + FAST) == 0


def test_a_full_disk_while_eval_json_is_written_names_the_path_and_says_failed(synth_run, capsys, monkeypatch):
    assert cli.main(["eval", str(synth_run), "--evals", "synthetic", "--no-progress"] + FAST) == 0
    kept = (synth_run / "eval.json").read_text()
    real_fsync = os.fsync

    def fsync(fd):  # the disk fills while eval.json's new copy is written
        if ".eval.json." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    capsys.readouterr()
    assert cli.main(["eval", str(synth_run), "--evals", "synthetic", "--no-progress"] + FAST) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"msae: error: cannot use {synth_run / 'eval.json'}: No space left on device"
    status = json.loads((synth_run / "status.json").read_text())
    assert status["eval"].startswith("failed in synthetic:") and "No space left" in status["eval"]
    assert (synth_run / "eval.json").read_text() == kept  # the old results, whole
    assert not [p for p in synth_run.iterdir() if p.name.endswith(".tmp")]


def test_lm_evals_on_a_synthetic_run_are_refused_before_the_status_changes(synth_run, capsys):
    run_evals(synth_run, "synthetic", progress=False, overrides={"synthetic": {"n_eval_rows": 1000}})
    assert json.loads((synth_run / "status.json").read_text())["eval"] == "done"
    assert cli.main(["eval", str(synth_run), "--evals", "core,absorption"]) == 2
    assert "no language model for core, absorption" in capsys.readouterr().err
    assert json.loads((synth_run / "status.json").read_text())["eval"] == "done"


def test_calibrating_a_thresholded_sae_to_a_target_l0(tmp_path):
    """BatchTopK's and JumpReLU's inference threshold set for a mean L0 on rows: the L0 reached is
    the target; TopK has no threshold and is refused in one line."""
    import torch

    from msae_core.errors import MsaeError
    from msae_core.evals.calibrate import calibrate_l0_
    from msae_core.sae import build_sae

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 32, generator=g)
    for arch in ("batchtopk", "jumprelu", "matryoshka"):
        sae = build_sae(SAEConfig(arch=arch, d_in=32, d_sae=128, k=8))
        sae.fit_input_scale_(x)
        if arch != "jumprelu":
            sae.threshold.fill_(0.05)
        info = calibrate_l0_(sae, x, 6.0)
        l0 = float((sae.encode(x) > 0).sum(1).float().mean())
        assert l0 == pytest.approx(6.0, abs=0.05) and info["achieved_l0"] == pytest.approx(l0), arch
        assert info["l0_before"] != pytest.approx(6.0, abs=0.5)
    with pytest.raises(MsaeError, match="no inference threshold"):
        calibrate_l0_(build_sae(SAEConfig(arch="topk", d_in=32, d_sae=128, k=8)), x, 6.0)


def test_eval_at_a_matched_l0_says_so_in_eval_json(tmp_path, capsys):
    """`msae eval RUN --target-l0 L` on a BatchTopK run: its synthetic eval's L0 is L, and
    eval.json says the threshold was set; --match-l0 takes another run's L0."""
    store = S.synth(SMALL, tmp_path / "store", progress=False)
    run = _trained(store, tmp_path / "btk", "batchtopk")
    assert cli.main(["eval", str(run), "--evals", "synthetic", "--target-l0", "6", "--no-progress"] + FAST) == 0
    ev = json.loads((run / "eval.json").read_text())["synthetic"]
    cal = ev["eval_result_metrics"]["l0_calibration"]
    assert ev["eval_config"]["target_l0"] == 6.0 and cal["rows"] > 1000
    assert ev["eval_result_metrics"]["sparsity"]["l0"] == pytest.approx(6.0, rel=0.1)  # fresh rows, same L0
    topk = _trained(store, tmp_path / "topk", "topk", k=5)
    assert cli.main(["eval", str(topk), "--evals", "synthetic", "--no-progress"] + FAST) == 0
    assert cli.main(["eval", str(run), "--evals", "synthetic", "--match-l0", str(topk), "--no-progress"] + FAST) == 0
    ev = json.loads((run / "eval.json").read_text())["synthetic"]
    assert ev["eval_result_metrics"]["sparsity"]["l0"] == pytest.approx(5.0, rel=0.1)
    capsys.readouterr()
    assert cli.main(["eval", str(topk), "--evals", "synthetic", "--target-l0", "3"] + FAST) == 2
    assert "no inference threshold" in capsys.readouterr().err


def test_skip_done_is_refused_with_a_target_l0(synth_run, capsys):
    assert cli.main(["eval", str(synth_run), "--evals", "synthetic", "--skip-done", "--target-l0", "3"] + FAST) == 2
    assert "--skip-done would keep" in capsys.readouterr().err
