"""Data-parallel training with torchrun on the CPU (gloo): two ranks equal one process with the same
global batch and seed, the momentum statistics included; rank 0 alone writes; resume works."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from msae_core.runs.folder import metrics_rows, read_status
from msae_core.training.trainer import train
from test_train import REPO, make_config, make_store

pytestmark = pytest.mark.slow


def _torchrun(cfg_path, out, extra=(), timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "msae_core.cli", "train", "--config", str(cfg_path), "--out", str(out), "--no-progress", *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    store = make_store(root / "store")
    cfg = make_config(store, steps=16)
    cfg.train.log_every, cfg.train.checkpoint_every, cfg.train.snapshot_every = 4, 8, 8
    ref = root / "ref"
    assert train(cfg, ref, progress=False).state == "done"
    cfg_path = root / "run.json"
    cfg.save(cfg_path)
    return {"root": root, "cfg": cfg, "cfg_path": cfg_path, "ref": ref}


def _assert_same_run(run, ref):
    a, b = load_file(run / "sae.safetensors"), load_file(ref / "sae.safetensors")
    assert a.keys() == b.keys()
    for k in ("W_enc", "W_dec", "b_enc", "b_dec", "input_scale", "rate", "mag", "kappa"):
        for key in [x for x in a if x == k or x.startswith("cand_kappa") and k == "kappa"]:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    assert torch.equal(a["n_updates"], b["n_updates"]) and torch.equal(a["tokens_since_fired"], b["tokens_since_fired"])
    got, want = metrics_rows(run), metrics_rows(ref)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):  # losses are the global batch's means (averaged over the ranks)
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-4)


def test_two_ranks_equal_one_process(setup):
    run = setup["root"] / "two"
    r = _torchrun(setup["cfg_path"], run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_status(run)["state"] == "done"
    _assert_same_run(run, setup["ref"])
    assert (run / "traces").is_dir() and not list(run.glob("*rank*"))  # rank 0 alone wrote


def test_two_ranks_resume_from_their_checkpoint(setup):
    """Stopped at step 8 (the run's first --steps), then resumed to 16: equal to one process's 16."""
    run = setup["root"] / "resumed"
    r = _torchrun(setup["cfg_path"], run, ["--steps", "8"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_status(run)["step"] == 8
    r = _torchrun(setup["cfg_path"], run, ["--steps", "16"])
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_run(run, setup["ref"])


def test_refusals_are_one_line_on_every_rank(setup, tmp_path):
    r = _torchrun(setup["cfg_path"], tmp_path / "odd", ["--batch-size", "127"])
    assert r.returncode != 0
    assert r.stderr.count("msae: error: batch_size 127 must divide evenly over the 2 ranks") == 2
    assert "msae_core/" not in r.stderr  # no traceback through our code (torchrun prints its own)


def _streamed_config(tmp_path):
    """Momentum over TopK streamed from a tiny model (written under tmp_path): 16 steps of 32 rows,
    a checkpoint every 8."""
    from msae_core.sae import MomentumConfig, SAEConfig
    from msae_core.runs.config import DataConfig, RunConfig, TrainConfig
    from test_harvest import tiny_setup

    setup = tiny_setup(tmp_path / "tiny", n_docs=400)
    return RunConfig(sae=SAEConfig(arch="momentum", base="topk", d_sae=128, k=4, momentum=MomentumConfig(lam=0.1, tau=0.3)),
                     train=TrainConfig(steps=16, batch_size=32, lr=1e-3, warmup_steps=3, seed=2, device="cpu",
                                       log_every=4, checkpoint_every=8, snapshot_every=8),
                     data=DataConfig(source="stream", model=setup["model"], corpus=setup["corpus"], layer=2,
                                     context_size=16, lm_batch=4, buffer_batches=4))


def test_two_ranks_stream_and_resume(tmp_path):
    """--source stream under torchrun: each rank runs the model over its own windows; the run
    ends done, rank 0 records the windows read; stopped at step 8 and resumed to 16 it equals the
    uninterrupted two-rank run (each rank's mixing buffer is in the checkpoint); a --cache is
    refused in one line on every rank."""
    cfg = _streamed_config(tmp_path)
    cfg_path = tmp_path / "run.json"
    cfg.save(cfg_path)
    ref = tmp_path / "ref"
    r = _torchrun(cfg_path, ref)
    assert r.returncode == 0, r.stderr[-3000:]
    status = read_status(ref)
    assert status["state"] == "done" and status["stream_windows"] > 0
    assert not list(ref.glob("*rank*"))
    run = tmp_path / "resumed"
    r = _torchrun(cfg_path, run, ["--steps", "8"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_status(run)["step"] == 8
    r = _torchrun(cfg_path, run, ["--steps", "16"])
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(run / "sae.safetensors"), load_file(ref / "sae.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    r = _torchrun(cfg_path, tmp_path / "cached", ["--cache", str(tmp_path / "cache")])
    assert r.returncode != 0
    assert r.stderr.count("--cache is not supported under torchrun yet") == 2, r.stderr[-2000:]
    assert "msae_core/" not in r.stderr


def _group_alone_and_together(tmp_path, mom):
    """Momentum `mom` and TopK (another init seed) each trained alone on two ranks; returns the two
    config files, the group's run folders, and `group(*script)`: the two as one two-rank
    `train-group` (under `script` instead of `-m msae_core.cli` when given)."""
    import dataclasses

    topk = dataclasses.replace(mom, sae=dataclasses.replace(mom.sae, arch="topk", seed=1))
    paths = []
    for name, cfg in (("mom", mom), ("topk", topk)):
        paths.append(tmp_path / f"{name}.json")
        cfg.save(paths[-1])
        r = _torchrun(paths[-1], tmp_path / "alone" / name)
        assert r.returncode == 0, r.stderr[-3000:]
    outs = [tmp_path / "group" / "mom", tmp_path / "group" / "topk"]

    def group(*script):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *(script or ("-m", "msae_core.cli")), "train-group", "--config", *map(str, paths),
               "--out", *map(str, outs), "--no-progress"]
        return subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                              capture_output=True, text=True, timeout=300)

    return outs, group


def _assert_each_as_alone(tmp_path, outs):
    import json

    for out in outs:
        alone = tmp_path / "alone" / out.name
        assert read_status(out)["state"] == "done" and not list(out.glob("*rank*"))
        a, b = load_file(out / "sae.safetensors"), load_file(alone / "sae.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), out.name
        rows = [[{k: v for k, v in json.loads(line).items() if k not in ("step_time_s", "tokens_per_s", "time")}
                 for line in (p / "metrics.jsonl").read_text().splitlines()] for p in (out, alone)]
        assert rows[0] == rows[1]


@pytest.mark.slow  # three two-rank torchrun launches
def test_a_group_under_torchrun_trains_each_run_as_it_trains_alone(setup, tmp_path):
    """`torchrun --nproc_per_node 2 -m msae_core.cli train-group`: each rank reads its share of
    every batch once for both runs, each run data-parallel; each ends equal to its config trained
    data-parallel alone, and rank 0 alone wrote the folders."""
    outs, group = _group_alone_and_together(tmp_path, setup["cfg"])
    r = group()
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_each_as_alone(tmp_path, outs)


@pytest.mark.slow  # four two-rank torchrun launches of a streamed run
def test_a_streamed_group_under_torchrun_resumes_from_its_stream_state(tmp_path):
    """Two ranks stream for a group of two runs; killed at step 12 (the group's stream state at its
    checkpoint step 8: each rank's buffer, gathered to rank 0) and run again, each run equals its
    two-rank run alone."""
    import json

    from test_group import killer

    outs, group = _group_alone_and_together(tmp_path, _streamed_config(tmp_path))
    script = tmp_path / "killer.py"  # each rank kills itself at batch 12, past the checkpoints at 8
    script.write_text(killer(12))
    r = group(str(script))
    assert r.returncode != 0
    saved = json.loads((outs[0] / ".group-stream" / "stream-000000008.json").read_text())
    assert len(saved["ranks"]) == 2  # both ranks' buffers, once for the group
    r = group()
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_each_as_alone(tmp_path, outs)
    assert not (outs[0] / ".group-stream").exists()
