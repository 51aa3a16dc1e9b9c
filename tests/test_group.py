"""One pass, several SAEs (msae train-group): each member ends bitwise equal to its config trained
alone, faults and cancels stay with their member, a killed group resumes every member."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from msae_core import cli
from msae_core.artifacts import RUN_CANCEL, RUN_EVENTS, RUN_METRICS, RUN_TRACES_DIR, SAE_WEIGHTS
from msae_core.data.loader import BatchLoader
from msae_core.errors import MsaeError
from msae_core.runs.config import DataConfig, RunConfig, TrainConfig
from msae_core.runs.folder import read_status
from msae_core.runs.jobs import cancel_run
from msae_core.sae import MomentumConfig, SAEConfig
from msae_core.training.group import train_group
from msae_core.training.loop import _Fit
from msae_core.training.trainer import train
from test_train import make_store

D = 64
REPO = Path(__file__).resolve().parent.parent
TIMES = ("step_time_s", "tokens_per_s", "time")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("group") / "store")


def _config(store, arch="topk", steps=30, seed=0, d_sae=128, **sae):
    base = {"momentum": "topk"}.get(arch)
    sae_cfg = SAEConfig(arch=arch, d_in=D, d_sae=d_sae, k=8, seed=seed, **({"base": base} if base else {}),
                        **({"matryoshka_widths": [32, 64]} if arch == "matryoshka" else {}),
                        **({"momentum": MomentumConfig(lam=0.1, tau=0.3, refresh_every=7)} if arch == "momentum" else {}),
                        **sae)
    return RunConfig(sae=sae_cfg,
                     train=TrainConfig(steps=steps, batch_size=128, lr=1e-3, warmup_steps=5, seed=3, device="cpu",
                                       log_every=5, checkpoint_every=10, snapshot_every=10),
                     data=DataConfig(acts=str(store)))


MEMBERS = {"topk": dict(arch="topk"), "matryoshka": dict(arch="matryoshka", steps=20),
           "momentum": dict(arch="momentum", seed=1)}


def _rows(run):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMES}
            for line in (run / RUN_METRICS).read_text().splitlines()]


def assert_same_run(a, b):
    """Weights and buffers bitwise, metrics rows (their timings aside), traces and events equal."""
    wa, wb = load_file(a / SAE_WEIGHTS), load_file(b / SAE_WEIGHTS)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), a.name
    assert _rows(a) == _rows(b)
    ta, tb = sorted((a / RUN_TRACES_DIR).glob("*")), sorted((b / RUN_TRACES_DIR).glob("*"))
    assert [p.name for p in ta] == [p.name for p in tb]
    for pa, pb in zip(ta, tb):
        xa, xb = load_file(pa), load_file(pb)
        assert all(torch.equal(xa[k], xb[k]) for k in xa)
    ea, eb = a / RUN_EVENTS, b / RUN_EVENTS
    assert (ea.read_text() if ea.exists() else "") == (eb.read_text() if eb.exists() else "")


@pytest.fixture(scope="module")
def alone(store, tmp_path_factory):
    root = tmp_path_factory.mktemp("alone")
    for name, kw in MEMBERS.items():
        assert train(_config(store, **kw), root / name, progress=False).state == "done"
    return root


def test_each_member_equals_its_config_trained_alone(store, alone, tmp_path):
    """TopK, Matryoshka (fewer steps) and momentum over TopK (another init seed) from one loader:
    each run folder is the one `msae train` writes for its config alone."""
    reads = []
    orig = BatchLoader.next
    monkey = pytest.MonkeyPatch()
    monkey.setattr(BatchLoader, "next", lambda self, s: reads.append(s) or orig(self, s))
    try:
        results = train_group([_config(store, **kw) for kw in MEMBERS.values()],
                              [tmp_path / name for name in MEMBERS], progress=False)
    finally:
        monkey.undo()
    assert [r.state for r in results] == ["done"] * 3
    assert reads == list(range(30))  # each batch read once for all three
    for name in MEMBERS:
        assert read_status(tmp_path / name)["state"] == "done"
        assert_same_run(tmp_path / name, alone / name)


def test_a_diverging_member_ends_alone_and_the_others_go_on(store, alone, tmp_path, monkeypatch):
    orig = _Fit._step
    monkeypatch.setattr(_Fit, "_step", lambda self, s, x: orig(
        self, s, x * 1e30 if (self.out_dir.name == "matryoshka" and s == 13) else x))
    results = train_group([_config(store, **kw) for kw in MEMBERS.values()],
                          [tmp_path / name for name in MEMBERS], progress=False)
    assert [r.state for r in results] == ["done", "diverged", "done"]
    status = read_status(tmp_path / "matryoshka")
    assert status["state"] == "diverged" and "at step 14" in status["error"]
    assert "last good checkpoint at step 10 kept" in status["error"]
    for name in ("topk", "momentum"):
        assert_same_run(tmp_path / name, alone / name)


def test_a_cancel_file_stops_its_member_alone_and_the_group_resumes_it(store, alone, tmp_path):
    outs = [tmp_path / name for name in MEMBERS]
    orig = _Fit.advance

    def advance(self, s, x):
        if s == 11 and self.out_dir.name == "topk":  # as the Launch page's cancel button asks
            assert read_status(outs[2])["group"] == 3 and cancel_run(outs[2])
        return orig(self, s, x)

    monkey = pytest.MonkeyPatch()
    monkey.setattr(_Fit, "advance", advance)
    try:
        results = train_group([_config(store, **kw) for kw in MEMBERS.values()], outs, progress=False)
    finally:
        monkey.undo()
    assert [r.state for r in results] == ["done", "done", "cancelled"]
    assert read_status(outs[2])["step"] == 12 and "checkpoint written" in read_status(outs[2])["error"]
    assert (outs[2] / RUN_CANCEL).exists()
    # the same command again: the done members stay done, the cancelled one resumes to the end (the
    # cancel file was for the group that read it, not this one)
    results = train_group([_config(store, **kw) for kw in MEMBERS.values()], outs, progress=False)
    assert [r.state for r in results] == ["done"] * 3
    for out in outs:
        assert_same_run(out, alone / out.name)


def killer(at_batch: int) -> str:
    """A script that runs `msae ARGV...` and kills itself (SIGKILL) when the loader is asked for
    batch `at_batch` (also a torchrun rank's script: each rank kills itself there)."""
    return textwrap.dedent(f"""
        import os, signal, sys
        from msae_core import cli
        from msae_core.data.loader import BatchLoader
        orig = BatchLoader.next
        def next_batch(self, s):
            if s == {at_batch}:
                os.kill(os.getpid(), signal.SIGKILL)
            return orig(self, s)
        BatchLoader.next = next_batch
        sys.exit(cli.main(sys.argv[1:]))
    """)


def test_a_killed_group_resumes_every_member_exactly(store, alone, tmp_path):
    """kill -9 of `msae train-group` at batch 25 (past the checkpoints at 10 and 20; the
    matryoshka member, 20 steps long, is done by then): the same command resumes every unfinished
    member from its own checkpoint, each equal to its run alone."""
    outs = [tmp_path / name for name in MEMBERS]
    argv = ["train-group", "--config"]
    for name, kw in MEMBERS.items():
        _config(store, **kw).save(tmp_path / f"{name}.json")
        argv.append(str(tmp_path / f"{name}.json"))
    argv += ["--out", *map(str, outs), "--no-progress"]
    proc = subprocess.run([sys.executable, "-c", killer(25), *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert read_status(outs[1])["state"] == "done"
    assert read_status(outs[0])["state"] == "failed" and "process gone" in read_status(outs[0])["error"]
    assert cli.main(argv) == 0
    for out in outs:
        assert read_status(out)["state"] == "done"
        assert_same_run(out, alone / out.name)


def test_runs_that_do_not_share_a_source_are_refused_in_one_line(store, tmp_path, capsys):
    a = _config(store)
    b = dataclasses.replace(a, train=dataclasses.replace(a.train, batch_size=64, seed=4))
    with pytest.raises(MsaeError, match=r"member 2 differs from member 1 in train\.batch_size, train\.seed"):
        train_group([a, b], [tmp_path / "a", tmp_path / "b"], progress=False)
    with pytest.raises(MsaeError, match="one --out per --config"):
        train_group([a, a], [tmp_path / "a"], progress=False)
    with pytest.raises(MsaeError, match="share one --out"):
        train_group([a, a], [tmp_path / "a", tmp_path / "a"], progress=False)
    assert not (tmp_path / "a").exists()


def test_memory_is_planned_before_a_group_starts(store, tmp_path):
    """A group holds every member's weights and Adam state but steps one member at a time: its
    estimate counts the states once each and the largest step; too little free memory refuses it
    in one line naming the largest members, before any folder is written."""
    from msae_core.runs.memory import group_bytes, plan, sae_bytes

    small, big = _config(store), _config(store, d_sae=1024)
    one, wide = sae_bytes(small), sae_bytes(big)
    assert wide.state > 7 * one.state and wide.step == 8 * one.step
    total, members = group_bytes([small, small, big], ["a", "b", "c"])
    alone_total, _ = group_bytes([big], ["c"])
    assert total == alone_total + 2 * one.state  # the small members add their states, not their steps
    assert [n for n, _ in members] == ["c", "a", "b"]
    with pytest.raises(MsaeError, match=r"need about .* GB on cpu where 0\.00 GB is free \(largest: c "):
        plan([small, big], ["a", "c"], free=1000)
    assert plan([small, big], ["a", "c"], free=1 << 40) == group_bytes([small, big], ["a", "c"])[0]
