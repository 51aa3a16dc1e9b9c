"""Trainer: run folder contents, resume after a kill equals an uninterrupted run, NaN -> diverged,
SIGTERM -> cancelled with a checkpoint, CLI flags over a config file."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from msae_core import cli
from msae_core.artifacts import (RUN_CHECKPOINT_DIR, RUN_EVENTS, RUN_METRICS, RUN_TRACES_DIR,
                                 SAE_CONFIG, SAE_WEIGHTS, TRAINER_STATE, read_jsonl)
from msae_core.errors import MsaeError
from msae_core.runs.config import RunConfig, TrainConfig, DataConfig
from msae_core.runs.folder import read_status
from msae_core.sae import MomentumConfig, SAEConfig
from msae_core.sae.base import MOMENTUM_FIELDS
from msae_core.data.loader import BatchLoader
from msae_core.data.store import StoreSettings, StoreWriter
from msae_core.training.cli import config_from_args
from msae_core.training.trainer import train

D, F, STEPS = 64, 128, 40
REPO = Path(__file__).resolve().parent.parent


def make_store(path, n_rows=2048, d=D, seed=0, nan_rows=()):
    """A tiny store of random activations with a little sparse structure (NaN in `nan_rows`)."""
    g = torch.Generator().manual_seed(seed)
    w = StoreWriter(path, StoreSettings(model="tiny", layer=0, target_tokens=n_rows, dtype="float32",
                                        context_size=8), {"d_model": d, "tokenizer": "tiny", "bos_token_id": 1})
    dirs = torch.randn(32, d, generator=g)
    codes = torch.rand(n_rows, 32, generator=g) * (torch.rand(n_rows, 32, generator=g) < 0.1)
    acts = codes @ dirs + 0.05 * torch.randn(n_rows, d, generator=g)
    acts[list(nan_rows), 3] = float("nan")
    n_win = n_rows // 8
    w.write_shard(acts, torch.zeros(n_rows, dtype=torch.int32), torch.arange(n_win).repeat_interleave(8),
                  torch.arange(8).repeat(n_win), torch.zeros(n_win, 8, dtype=torch.int32),
                  torch.arange(n_win), torch.arange(n_win))
    w.finish()
    return path


def make_config(store, steps=STEPS, **sae_kw):
    sae = dict(arch="momentum", base="topk", d_in=D, d_sae=F, k=8)
    momentum = dict(beta=0.9, tau=0.3, lam=0.1)
    for k, v in sae_kw.items():
        (momentum if k in MOMENTUM_FIELDS else sae)[k] = v
    return RunConfig(sae=SAEConfig(**sae, momentum=MomentumConfig(**momentum)),
                     train=TrainConfig(steps=steps, batch_size=128, lr=1e-3, warmup_steps=5, seed=3,
                                       device="cpu", log_every=5, checkpoint_every=10, snapshot_every=10),
                     data=DataConfig(acts=str(store)))


HOLD_LOCK = """
import sys, time
from msae_core.procs import FolderLock
with FolderLock(sys.argv[1], what="training"):
    print("locked", flush=True)
    time.sleep(60)
"""


def weights(run):
    return load_file(Path(run) / SAE_WEIGHTS)


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=f"tensor {k} differs")


def strip_times(rows):
    return [{k: v for k, v in r.items() if k not in ("time", "step_time_s", "tokens_per_s")} for r in rows]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("acts") / "store")


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory):
    """An uninterrupted run every fault test compares against."""
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("ref") / "run"
    result = train(make_config(store), run, progress=False)
    assert result.state == "done"
    return run


def _fail_at(monkeypatch, step, action):
    """`action` applied to the batch of `step` as the training step takes it (the loader's
    thread reads ahead; the fault belongs to the step that consumes the batch)."""
    orig = BatchLoader.next

    def next_batch(self, s):
        x = orig(self, s)
        return action(x) if s == step else x

    monkeypatch.setattr(BatchLoader, "next", next_batch)


def test_run_folder_holds_everything(reference):
    status = read_status(reference)
    assert status["state"] == "done" and status["step"] == STEPS and status["pid"] is None
    rows = read_jsonl(reference / RUN_METRICS)
    assert [r["step"] for r in rows] == list(range(5, STEPS + 1, 5))
    for key in ("loss", "l0", "explained_variance", "dead_features", "competing_pairs",
                "competing_features", "lr", "step_time_s"):
        assert key in rows[-1], key
    assert rows[0]["lr"] == pytest.approx(1e-3) and rows[-1]["explained_variance"] > 0.3
    assert 0 < rows[-1]["l0"] <= 8
    traces = sorted((reference / RUN_TRACES_DIR).glob("*.safetensors"))
    assert [t.name for t in traces] == [f"step_{s:09d}.safetensors" for s in (10, 20, 30, 40)]
    tr = load_file(traces[-1])
    assert {"rate", "mag", "pressure", "pair_i", "pair_j"} <= set(tr) and tr["rate"].shape == (F,)
    assert (reference / SAE_CONFIG).exists()
    state = json.loads((reference / RUN_CHECKPOINT_DIR / TRAINER_STATE).read_text())
    assert state["step"] == STEPS
    from msae_core.sae_io import load_sae
    sae = load_sae(reference)
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sae.forward(x).x_hat, load_sae(reference / RUN_CHECKPOINT_DIR).forward(x).x_hat)


def test_resume_after_exception_equals_uninterrupted(store, reference, tmp_path, monkeypatch):
    run = tmp_path / "run"

    def boom(x):
        raise RuntimeError("injected fault")

    _fail_at(monkeypatch, 25, boom)
    with pytest.raises(RuntimeError, match="injected"):
        train(make_config(store), run, progress=False)
    status = read_status(run)
    assert status["state"] == "failed" and "injected fault" in status["error"]
    assert max(r["step"] for r in read_jsonl(run / RUN_METRICS)) == 25  # logged past the checkpoint
    monkeypatch.undo()
    torch.manual_seed(123)  # a different global RNG must not matter: the checkpoint restores it
    result = train(make_config(store), run, progress=False)
    assert result.state == "done" and result.resumed_from == 20
    assert_same_weights(run, reference)
    assert strip_times(read_jsonl(run / RUN_METRICS)) == strip_times(read_jsonl(reference / RUN_METRICS))
    assert read_jsonl(run / RUN_EVENTS) == read_jsonl(reference / RUN_EVENTS)
    assert sorted(p.name for p in (run / RUN_TRACES_DIR).iterdir()) == \
        sorted(p.name for p in (reference / RUN_TRACES_DIR).iterdir())


KILLER = textwrap.dedent("""
    import os, signal, sys
    from msae_core import cli
    from msae_core.training import trainer as T
    from msae_core.data.loader import BatchLoader
    mode, run, config = sys.argv[1], sys.argv[2], sys.argv[3]
    orig_next, orig_rename = BatchLoader.next, os.rename
    def next_batch(self, s):
        if mode == "batch" and s == 25:
            os.kill(os.getpid(), signal.SIGKILL)
        return orig_next(self, s)
    def rename(src, dst):  # the second checkpoint, killed between its two renames
        if mode == "rename" and str(src).endswith(".checkpoint.old") is False \\
                and ".checkpoint.tmp" in str(src) and os.path.exists(os.path.join(run, ".checkpoint.old")):
            os.kill(os.getpid(), signal.SIGKILL)
        return orig_rename(src, dst)
    BatchLoader.next = next_batch
    T.os.rename = rename
    sys.exit(cli.main(["train", "--config", config, "--out", run, "--no-progress"]))
""")


@pytest.mark.parametrize("mode", ["batch", "rename"])
def test_sigkill_then_resume_equals_uninterrupted(store, reference, tmp_path, mode):
    run, cfg_path = tmp_path / "run", tmp_path / "run.json"
    make_config(store).save(cfg_path)
    proc = subprocess.run([sys.executable, "-c", KILLER, mode, str(run), str(cfg_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    raw = json.loads((run / "status.json").read_text())
    assert raw["state"] == "running"  # nobody got to say otherwise on disk ...
    status = read_status(run)  # ... but a dead process never reads as running
    assert status["state"] == "failed" and "process gone" in status["error"]
    if mode == "rename":
        assert not (run / RUN_CHECKPOINT_DIR).exists() and (run / ".checkpoint.old").exists()
    assert cli.main(["train", "--out", str(run), "--no-progress"]) == 0  # resumes from its own config
    assert read_status(run)["state"] == "done"
    assert_same_weights(run, reference)
    assert strip_times(read_jsonl(run / RUN_METRICS)) == strip_times(read_jsonl(reference / RUN_METRICS))


def test_nan_loss_marks_diverged_and_keeps_last_checkpoint(store, tmp_path, monkeypatch, capsys):
    run, cfg_path = tmp_path / "run", tmp_path / "run.json"
    make_config(store).save(cfg_path)
    _fail_at(monkeypatch, 23, lambda x: x * 1e30)  # finite inputs, a loss that overflows
    rc = cli.main(["train", "--config", str(cfg_path), "--out", str(run), "--no-progress"])
    assert rc != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert re.match(r"msae: error: loss became (nan|inf) at step 24", err[-1]), err[-1]
    assert "last good checkpoint at step 20 kept" in err[-1]
    status = read_status(run)
    assert status["state"] == "diverged" and "loss became" in status["error"]
    state = json.loads((run / RUN_CHECKPOINT_DIR / TRAINER_STATE).read_text())
    assert state["step"] == 20
    ck = load_file(run / RUN_CHECKPOINT_DIR / SAE_WEIGHTS)
    assert all(torch.isfinite(v).all() for v in ck.values() if v.is_floating_point())
    assert not (run / SAE_WEIGHTS).exists()


def test_divergence_before_any_checkpoint_says_so(store, tmp_path, monkeypatch):
    _fail_at(monkeypatch, 3, lambda x: x * 1e30)
    result = train(make_config(store), tmp_path / "run", progress=False)
    assert result.state == "diverged"
    assert "no checkpoint was written before it" in result.error and "step 0" not in result.error


def test_non_finite_store_rows_are_named(tmp_path):
    """NaN in the data is the store's fault, not a divergence: the run names the rows."""
    bad = {5, 77, 1500}
    store = make_store(tmp_path / "store", nan_rows=sorted(bad))
    with pytest.raises(MsaeError) as err:
        train(make_config(store), tmp_path / "run", progress=False)
    result_error = str(err.value)
    assert "holds non-finite values" in result_error and "diverged" not in result_error
    assert "in 3 row(s): 5, 77, 1500;" in result_error
    assert read_status(tmp_path / "run")["state"] == "failed"


def test_sigterm_finishes_step_checkpoints_and_resumes(store, reference, tmp_path, monkeypatch):
    run = tmp_path / "run"

    def term(x):
        os.kill(os.getpid(), signal.SIGTERM)
        return x

    _fail_at(monkeypatch, 15, term)
    result = train(make_config(store), run, progress=False)
    assert result.state == "cancelled" and result.step == 16
    status = read_status(run)
    assert status["state"] == "cancelled" and "SIGTERM" in status["error"]
    assert json.loads((run / RUN_CHECKPOINT_DIR / TRAINER_STATE).read_text())["step"] == 16
    assert signal.getsignal(signal.SIGTERM) is not None  # handler restored
    monkeypatch.undo()
    assert train(make_config(store), run, progress=False).state == "done"
    assert_same_weights(run, reference)


def test_flags_override_config_file_and_bad_settings_refused(store, reference, tmp_path):
    cfg_path = tmp_path / "run.json"
    make_config(store).save(cfg_path)
    parser = cli.build_parser()
    args = parser.parse_args(["train", "--config", str(cfg_path), "--out", str(tmp_path / "r"),
                              "--beta", "0.5", "--steps", "7", "--seed", "9", "--evals", "core,absorption"])
    cfg = config_from_args(args)
    assert cfg.sae.momentum.beta == 0.5 and cfg.train.steps == 7 and cfg.train.seed == 9 and cfg.sae.seed == 9
    assert cfg.train.evals == ["core", "absorption"]
    assert cfg.sae.momentum.tau == 0.3 and cfg.train.batch_size == 128  # from the file
    # the reference run folder refuses other settings rather than mixing two runs
    with pytest.raises(MsaeError, match="other settings"):
        train(make_config(store, beta=0.5), reference, progress=False)
    # a folder another live process holds is refused, naming that process
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(reference)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(MsaeError, match=rf"locked by another training process \(pid {holder.pid}\)"):
            train(make_config(store), reference, progress=False)
    finally:
        holder.kill()
        holder.wait()
    # a done run asked again does nothing but report done
    assert train(make_config(store), reference, progress=False).state == "done"


def test_steps_between_logs_never_read_the_device(store, tmp_path, monkeypatch):
    """A bad loss is flagged on the device and read at log, snapshot and checkpoint steps only: the
    trainer's reads of tensor values (host syncs on a GPU) do not grow with the steps between them.
    (The loss check used to read `bool(isfinite(loss))` at every step.)"""
    from msae_core.training import loop as T  # the loop's own reads

    reads = {"n": 0}
    for name in ("__bool__", "__int__", "__float__", "item", "tolist"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **k):
            if sys._getframe(1).f_code.co_filename == T.__file__:
                reads["n"] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def reads_for(steps):
        cfg = make_config(store, steps=steps, arch="topk")
        cfg.train.log_every = cfg.train.checkpoint_every = steps
        cfg.train.snapshot_every = 0
        reads["n"] = 0
        assert train(cfg, tmp_path / f"run{steps}", progress=False).state == "done"
        return reads["n"]

    few, many = reads_for(10), reads_for(30)
    assert few > 0 and many == few


def test_checkpoints_are_written_beside_training(store, reference, tmp_path, monkeypatch):
    """A checkpoint is copied out and written by another thread while the next steps run (here a
    write that takes 0.3 s sees steps taken meanwhile); the run ends equal to the reference, and
    checkpoint_minutes adds checkpoints at log steps by the clock."""
    import threading
    import time as _time

    from msae_core.training import loop as T

    real = T.write_checkpoint
    writes, taken = [], []
    orig_next = BatchLoader.next

    def slow_write(run_dir, sae, opt_state, state, stream=None):
        writes.append((threading.current_thread().name, state["step"], len(taken)))
        _time.sleep(0.3)
        out = real(run_dir, sae, opt_state, state, stream)
        writes[-1] = writes[-1] + (len(taken),)
        return out

    def counting_next(self, s):
        taken.append(s)
        return orig_next(self, s)

    monkeypatch.setattr(T, "write_checkpoint", slow_write)
    monkeypatch.setattr(BatchLoader, "next", counting_next)
    run = tmp_path / "run"
    assert train(make_config(store), run, progress=False).state == "done"
    assert [w[1] for w in writes] == [10, 20, 30, 40] and all(w[0] == "msae-checkpoint" for w in writes)
    assert any(after > before for _, step, before, after in writes if step < STEPS)  # steps ran meanwhile
    assert_same_weights(run, reference)

    writes.clear()
    cfg = make_config(store)
    cfg.train.checkpoint_every, cfg.train.checkpoint_minutes = 10 ** 6, 1e-6  # every log step, by the clock
    assert train(cfg, tmp_path / "clock", progress=False).state == "done"
    assert [w[1] for w in writes] == list(range(5, STEPS + 1, 5))


def test_default_snapshots_are_about_100_per_run(tmp_path):
    """snapshot_every -1 (the default): every run's traces have about 100 points, whatever its length."""
    assert TrainConfig(steps=3000).snapshot_interval == 30 and TrainConfig(steps=50).snapshot_interval == 1
    assert TrainConfig(steps=3000, snapshot_every=0).snapshot_interval == 0
    store = make_store(tmp_path / "store")
    cfg = make_config(store, steps=200)
    cfg = RunConfig(sae=cfg.sae, train=dataclasses.replace(cfg.train, snapshot_every=-1), data=cfg.data)
    train(cfg, tmp_path / "run", progress=False)
    assert len(list((tmp_path / "run" / RUN_TRACES_DIR).glob("step_*.safetensors"))) == 100  # every 2 steps
    bad = dataclasses.replace(cfg.train, snapshot_every=-2)
    assert any("snapshot_every must be -1" in p for p in bad.problems())


def test_decoder_bias_starts_at_the_store_mean(tmp_path):
    """A fresh run's b_dec (in input units) is the mean of the store's rows, on a store whose mean
    is far from 0; the input scale makes the mean row norm sqrt(d_in)."""
    store = make_store(tmp_path / "store", n_rows=1024)
    from msae_core.data.store import ActivationStore
    from msae_core.sae_io import load_sae

    rows = ActivationStore(store).rows(torch.arange(1024)).float()
    cfg = make_config(store, steps=1, arch="topk")
    cfg = RunConfig(sae=cfg.sae, train=dataclasses.replace(cfg.train, lr=1e-12), data=cfg.data)  # Adam moves by ~lr
    assert train(cfg, tmp_path / "run", progress=False).state == "done"
    sae = load_sae(tmp_path / "run")
    torch.testing.assert_close(sae.b_dec.detach() / sae.input_scale, rows.mean(0), rtol=1e-4, atol=1e-4)
    assert float((rows * sae.input_scale).norm(dim=1).mean()) == pytest.approx(D ** 0.5, rel=1e-4)


def test_dead_latents_logged_equal_a_direct_count_on_the_same_window(tmp_path, monkeypatch):
    """The trainer's dead_features (latents silent for dead_tokens_threshold tokens) equals a count
    made directly from what fired in each step's batch, over the last threshold's worth of tokens."""
    from msae_core.sae.base import SAE

    fired_per_step = []
    orig = SAE._track_firing_

    def record(self, f_BF):
        fired_per_step.append((f_BF > 0).any(dim=0).clone())
        return orig(self, f_BF)

    monkeypatch.setattr(SAE, "_track_firing_", record)
    store = make_store(tmp_path / "store")
    window_batches = 3
    cfg = make_config(store, steps=30, arch="topk", d_sae=512, k=2, dead_tokens_threshold=window_batches * 128)
    cfg = RunConfig(sae=cfg.sae, train=dataclasses.replace(cfg.train, log_every=1), data=cfg.data)
    train(cfg, tmp_path / "run", progress=False)
    rows = read_jsonl(tmp_path / "run" / RUN_METRICS)
    assert len(fired_per_step) == 30 and len(rows) == 30
    checked = 0
    for r in rows:  # a row's "step" is the number of steps done
        done = r["step"]
        if done < window_batches:
            assert r["dead_features"] == 0  # nothing has been silent for a whole window yet
            continue
        recent = torch.stack(fired_per_step[done - window_batches:done]).any(dim=0)
        assert r["dead_features"] == int((~recent).sum()), done
        checked += int(r["dead_features"] > 0)
    assert checked > 0  # the window was short enough for some latents to count as dead


def test_a_relative_store_path_is_recorded_absolute_and_resumes(tmp_path, monkeypatch):
    """`msae train --acts results/stores/x` from one folder: the run's config names the store
    absolutely (the workbench, served from another folder, found nothing), and the same relative
    command resumes it."""
    make_store(tmp_path / "stores" / "s")
    monkeypatch.chdir(tmp_path)
    cfg = make_config("stores/s", steps=20)
    assert train(cfg, tmp_path / "run", progress=False).state == "done"
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["data"]["acts"]
    assert saved == str(tmp_path / "stores" / "s")
    more = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=30))
    assert train(more, tmp_path / "run", progress=False).state == "done"  # the same store, said relatively


def test_rng_state_written_seeing_eight_gpus_restores_seeing_one(monkeypatch):
    """A checkpoint's CUDA generator states are restored per visible device (derived from torch's
    set_rng_state_all, which indexes one device per saved state): 8 saved, 1 visible, no error."""
    from msae_core.runs import checkpoint as C

    restored = []

    def set_one(state, device=0):
        if device >= 1:  # what torch does for a device that does not exist
            raise RuntimeError(f"Invalid device index {device}")
        restored.append((device, state.numel()))

    def set_all(states):  # torch's own: one device per saved state
        for i, st in enumerate(states):
            set_one(st, i)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_one)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)
    state = {"torch": C._b64(torch.get_rng_state()), "cuda": [C._b64(torch.zeros(16, dtype=torch.uint8))] * 8}
    C.set_rng_state(state)
    assert restored == [(0, 16)]


def test_the_eval_after_training_runs_on_the_runs_device_and_dtype(monkeypatch, tmp_path):
    """A run trained on cuda:1 is evaluated there (it was spawned without --device: cuda:0), and a
    streamed run's model in the dtype its activations came in."""
    from msae_core import devices
    from msae_core.training.trainer import eval_command

    monkeypatch.setattr(devices, "resolve_device", lambda d: torch.device("cuda:1") if d == "cuda:1" else torch.device("cpu"))
    cfg = make_config(tmp_path / "s")
    gpu = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device="cuda:1"),
                              data=DataConfig(source="stream", model="embedded", model_dtype="bfloat16"))
    cmd = eval_command(tmp_path / "run", ["core", "absorption"], gpu)
    assert cmd[cmd.index("--device") + 1] == "cuda:1" and cmd[cmd.index("--model-dtype") + 1] == "bfloat16"
    assert cmd[cmd.index("--evals") + 1] == "core,absorption"
    cmd = eval_command(tmp_path / "run", ["core"], cfg)  # from a store: the eval's auto (bf16 on CUDA)
    assert cmd[cmd.index("--device") + 1] == "cpu" and cmd[cmd.index("--model-dtype") + 1] == "auto"


def test_a_checkpoint_copies_the_sae_to_the_host_only(store, tmp_path, monkeypatch):
    """The checkpoint's copy of the SAE is made tensor by tensor on the host: no deep copy of the
    module on its device first (1.2 GB more on a GPU at F 65,536); the checkpoint still resumes."""
    import copy as copy_mod

    from torch import nn

    real = copy_mod.deepcopy

    def no_module_copies(obj, *a, **kw):
        assert not isinstance(obj, nn.Module), "a whole SAE was deep-copied for a checkpoint"
        return real(obj, *a, **kw)

    monkeypatch.setattr(copy_mod, "deepcopy", no_module_copies)
    cfg = make_config(store, steps=20)
    assert train(cfg, tmp_path / "run", progress=False).state == "done"
    from msae_core.runs.checkpoint import find_checkpoint, load_checkpoint

    run = tmp_path / "run"
    ck = load_checkpoint(run, find_checkpoint(run), torch.device("cpu"))  # whole and readable
    assert ck is not None


def test_msae_train_validates_its_settings_once_and_opens_the_store_once(store, tmp_path, monkeypatch):
    """From the command line to the loss: one validation (configutil.collect_problems over the run
    config) and one opening of the store per process, for a fresh run and for a resumed one."""
    from msae_core import configutil
    from msae_core.data import store as store_module
    from msae_core.runs import config as config_module

    calls = {"validations": 0, "opens": 0}
    real_collect, real_init = configutil.collect_problems, store_module.ActivationStore.__init__

    def counting_collect(cfg, prefix=""):
        if prefix == "" and isinstance(cfg, RunConfig):
            calls["validations"] += 1
        return real_collect(cfg, prefix)

    def counting_init(self, *a, **kw):
        calls["opens"] += 1
        real_init(self, *a, **kw)

    monkeypatch.setattr(config_module, "collect_problems", counting_collect)
    monkeypatch.setattr(store_module.ActivationStore, "__init__", counting_init)
    out = tmp_path / "run"
    argv = ["train", "--acts", str(store), "--out", str(out), "--arch", "momentum", "--d-sae", str(F),
            "--k", "8", "--lam", "0.2", "--steps", "6", "--batch-size", "128", "--device", "cpu",
            "--log-every", "3", "--checkpoint-every", "3", "--no-progress"]
    assert cli.main(argv) == 0
    assert calls == {"validations": 1, "opens": 1}
    calls.update(validations=0, opens=0)
    resume = [a if a != "6" else "9" for a in argv]  # the same run resumed for more steps
    assert cli.main(resume) == 0
    assert calls == {"validations": 1, "opens": 1}
    assert read_status(out)["step"] == 9
