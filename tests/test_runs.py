"""Run folders: config validation lists every problem, listing survives broken folders, names are
safe, and a launched (detached) run can be cancelled and relaunched to completion."""

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest
import torch

from msae_core.artifacts import RUN_CHECKPOINT_DIR, RUN_CONFIG, RUN_STATUS, SAE_WEIGHTS, TRAINER_STATE
from msae_core.errors import MsaeError
from msae_core.paths import safe_run_name
from msae_core.runs.folder import STATUS_VERSION, list_runs, read_status, write_status
from msae_core.runs.config import DataConfig, RunConfig, TrainConfig
from msae_core.runs.jobs import cancel_run, launch_run
from msae_core.sae import MomentumConfig, SAEConfig
from msae_core.data.store import StoreSettings, StoreWriter

D = 64


def make_store(path, n_rows=1024, d=D):
    g = torch.Generator().manual_seed(0)
    w = StoreWriter(path, StoreSettings(model="tiny", layer=0, target_tokens=n_rows, dtype="float32",
                                        context_size=8), {"d_model": d, "tokenizer": "tiny", "bos_token_id": 1})
    n_win = n_rows // 8
    w.write_shard(torch.randn(n_rows, d, generator=g), torch.zeros(n_rows, dtype=torch.int32),
                  torch.arange(n_win).repeat_interleave(8), torch.arange(8).repeat(n_win),
                  torch.zeros(n_win, 8, dtype=torch.int32), torch.arange(n_win), torch.arange(n_win))
    w.finish()
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("acts") / "store")


def test_validation_lists_every_problem_at_once(tmp_path):
    cfg = RunConfig(sae=SAEConfig(arch="momentum", base="topk", d_in=D, d_sae=0, k=0,
                                  momentum=MomentumConfig(beta=1.0, tau=1.5, lam=-0.1)),
                    train=TrainConfig(lr=0.0, steps=10),
                    data=DataConfig(acts=str(tmp_path / "nowhere")))
    with pytest.raises(MsaeError) as exc:
        cfg.check()
    msg = str(exc.value)
    assert "\n" not in msg
    for needle in ("beta", "tau", "lam", "d_sae", " k ", "lr", "nowhere"):
        assert needle in msg.replace("k must", " k must").replace("(k", "( k "), (needle, msg)
    # each problem says its field: a form marks the widget from it, not from the text
    assert sorted(p.field for p in exc.value.problems) == sorted(
        ["sae.momentum.beta", "sae.momentum.tau", "sae.momentum.lam", "sae.d_sae", "sae.k", "train.lr", "data.acts"])
    assert cfg.sae.d_in == D  # checking changed nothing


def test_store_width_must_match_and_d_in_comes_from_store(store):
    bad = RunConfig(sae=SAEConfig(arch="topk", d_in=32, d_sae=128, k=8), train=TrainConfig(steps=5),
                    data=DataConfig(acts=str(store)))
    with pytest.raises(MsaeError, match="32.*64|64.*32"):
        bad.check()
    given = RunConfig(sae=SAEConfig(arch="topk", d_in=0, d_sae=128, k=8),
                      train=TrainConfig(steps=5, batch_size=64), data=DataConfig(acts=str(store)))
    filled, opened = given.check()
    assert filled.sae.d_in == D and opened.d_in == D
    assert given.sae.d_in == 0  # a value: the check returned a resolved copy
    again = RunConfig.from_dict(json.loads(json.dumps(filled.to_dict())))
    assert again == filled
    with pytest.raises(MsaeError, match="unknown"):
        RunConfig.from_dict({"sae": {"d_sae": 4}, "trian": {}})


def _good_run(root, name):
    run = root / name
    run.mkdir(parents=True)
    (run / RUN_CONFIG).write_text(json.dumps({"sae": {"d_sae": 8}, "train": {}, "data": {}}))
    (run / SAE_WEIGHTS).write_bytes(b"x")
    (run / "sae_config.json").write_text("{}")
    write_status(run, state="done", step=5, total_steps=5)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n"
                                                for s in range(1, 6)) + '{"step": 6, "lo')
    return run


def test_list_runs_never_raises_on_broken_folders(tmp_path):
    root = tmp_path / "runs"
    _good_run(root, "good")
    (root / "empty").mkdir()
    bad_json = _good_run(root, "corrupt-json")
    (bad_json / RUN_CONFIG).write_text("{not json")
    (bad_json / RUN_STATUS).write_bytes(b"\xff\xfe garbage")
    no_w = _good_run(root, "no-weights")
    (no_w / SAE_WEIGHTS).unlink()
    old = _good_run(root, "old-version")
    st = json.loads((old / RUN_STATUS).read_text())
    st["version"] = 0
    (old / RUN_STATUS).write_text(json.dumps(st))
    stale = _good_run(root, "stale")
    write_status(stale, state="running", pid=2 ** 22 + 12345)  # no such process
    (root / "not-a-dir.txt").write_text("hello")
    (root / "_sweeps").mkdir()
    weird = _good_run(root, "weird")
    (weird / RUN_CONFIG).write_text("[1, 2]")
    (weird / RUN_STATUS).write_text(json.dumps({"state": "exploded", "version": STATUS_VERSION}))

    runs = {r.name: r for r in list_runs(root)}
    assert sorted(runs) == ["corrupt-json", "empty", "good", "no-weights", "old-version", "stale", "weird"]
    assert runs["good"].problem is None and runs["good"].state == "done"
    assert [m["step"] for m in runs["good"].metrics] == [1, 2, 3, 4, 5]  # torn last line skipped
    assert runs["empty"].problem == "empty folder"
    assert "config.json is not valid json" in runs["corrupt-json"].problem
    assert "status.json is not valid json" in runs["corrupt-json"].problem
    assert "weights" in runs["no-weights"].problem
    assert "version" in runs["old-version"].problem
    assert "gone" in runs["stale"].problem
    assert "unknown state" in runs["weird"].problem and "not a json object" in runs["weird"].problem
    assert list_runs(tmp_path / "missing") == []


@pytest.mark.parametrize("text,expected", [
    ("../../etc/passwd", "etc-passwd"), ("a b/c", "a-b-c"), (".hidden", "hidden"),
    ("beta=0.9 tau=0.3", "beta-0.9-tau-0.3"), ("run_1.v2", "run_1.v2"), ("..", None), ("", None),
    ("///", None), ("\u00e9t\u00e9", "t"), ("x" * 300, "x" * 120),
])
def test_safe_run_name(text, expected):
    if expected is None:
        with pytest.raises(MsaeError):
            safe_run_name(text)
    else:
        name = safe_run_name(text)
        assert name == expected
        assert "/" not in name and ".." not in name and not name.startswith(".")


def test_status_merges_and_cancel_without_process(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    write_status(run, state="queued", step=0, total_steps=10)
    write_status(run, step=3)
    s = read_status(run)
    assert s["state"] == "queued" and s["step"] == 3 and s["total_steps"] == 10 and s["version"] == STATUS_VERSION
    with pytest.raises(ValueError):
        write_status(run, state="exploded")
    assert cancel_run(run) is True and read_status(run)["state"] == "cancelled"
    assert cancel_run(run) is False


def _wait(run, pred, timeout=90):
    end = time.time() + timeout
    while time.time() < end:
        try:
            s = read_status(run)
        except MsaeError:
            s = {}
        if pred(s):
            return s
        time.sleep(0.1)
    raise AssertionError(f"timed out; status {s}; log:\n{(Path(run) / 'train.log').read_text()[-3000:]}")


def test_launch_cancel_and_relaunch(store, tmp_path):
    cfg = RunConfig(sae=SAEConfig(arch="topk", d_in=D, d_sae=128, k=8),
                    train=TrainConfig(steps=100_000, batch_size=64, warmup_steps=5, device="cpu",
                                      log_every=5, checkpoint_every=1000, snapshot_every=0),
                    data=DataConfig(acts=str(store)))
    run = launch_run(cfg, tmp_path / "runs", "my run/../x")
    assert run == tmp_path / "runs" / "my-run-.-x" or run.parent == tmp_path / "runs"
    assert run.parent == tmp_path / "runs" and ".." not in run.name
    s = _wait(run, lambda s: s.get("state") == "running" and s.get("step", 0) >= 5)
    assert s["pid"] > 0
    with pytest.raises(MsaeError, match="already running"):
        launch_run(cfg, tmp_path / "runs", run.name)
    assert cancel_run(run)
    s = _wait(run, lambda s: s.get("state") == "cancelled")
    step = json.loads((run / RUN_CHECKPOINT_DIR / TRAINER_STATE).read_text())["step"]
    assert step == s["step"] and 5 <= step < 100_000
    # relaunch with fewer steps: resumes from the checkpoint and finishes
    cfg.train.steps = step + 10
    launch_run(cfg, tmp_path / "runs", run.name)
    s = _wait(run, lambda s: s.get("state") in ("done", "failed", "diverged"))
    assert s["state"] == "done" and s["step"] == step + 10
    info = [r for r in list_runs(tmp_path / "runs") if r.name == run.name][0]
    assert info.problem is None and info.has_weights and info.metrics[-1]["step"] == step + 10
    with pytest.raises(MsaeError, match="done"):
        launch_run(cfg, tmp_path / "runs", run.name)


def test_queue_waits_for_a_free_slot(tmp_path):
    import threading

    from msae_core.runs.jobs import wait_for_slot

    root = tmp_path / "runs"
    busy, mine = root / "busy", root / "mine"
    for r in (busy, mine):
        r.mkdir(parents=True)
    write_status(busy, state="running", pid=os.getpid())  # alive
    out = []
    t = threading.Thread(target=lambda: out.append(wait_for_slot(mine, root, 1, poll_s=0.05)))
    t.start()
    time.sleep(0.4)
    assert read_status(mine)["state"] == "queued" and not out
    write_status(busy, state="done")
    t.join(5)
    assert out == [True] and read_status(mine)["state"] == "running"
    write_status(mine, state="running", pid=os.getpid())
    other = root / "other"
    other.mkdir()
    assert wait_for_slot(other, root, 1, poll_s=0.05, timeout_s=0.2) is False
    assert read_status(other)["state"] == "cancelled"


def test_run_folder_owns_the_logs_round_trip(tmp_path):
    """The trainer's writers and the workbench's readers meet in run_folder: events with 0-d tensors
    come back as numbers, a torn last line is skipped, resume's truncation keeps only what the
    checkpoint covers, and a ragged pair table is refused."""
    import numpy as np
    import torch

    from msae_core.runs.folder import (append_events, append_metrics, event_rows, metrics_rows,
                                               pair_columns, read_trace, trace_files, truncate_logs,
                                               write_trace)
    from msae_core.sae.competition import CompetitionEvent

    run = tmp_path / "r"
    run.mkdir()
    for step in (10, 20, 30):
        append_metrics(run, {"step": step, "loss": 1.0 / step})
        append_events(run, [CompetitionEvent(step - 1, 3, 5, 0.5, "up")])
        write_trace(run, step, {"rate": torch.full((4,), float(step))})
    with open(run / "events.jsonl", "a") as fh:
        fh.write('{"step": 31, "i"')  # torn by a kill
    ev = event_rows(run)
    assert [e["step"] for e in ev] == [9, 19, 29] and ev[0]["i"] == 3 and ev[0]["kappa"] == 0.5
    assert [s for s, _ in trace_files(run)] == [10, 20, 30]
    assert read_trace(trace_files(run)[1][1], ("rate",))["rate"].tolist() == [20.0] * 4

    truncate_logs(run, 20)  # resumed from the checkpoint of step 20
    assert [m["step"] for m in metrics_rows(run)] == [10, 20]
    assert [e["step"] for e in event_rows(run)] == [9, 19]
    assert [s for s, _ in trace_files(run)] == [10, 20]

    cols = {k: np.arange(3) for k in ("pair_i", "pair_j", "pair_kappa", "pair_dec_cos", "pair_first", "pair_last")}
    assert set(pair_columns(cols)) == {"i", "j", "kappa", "dec_cos", "first", "last"}
    assert pair_columns({**cols, "pair_j": np.arange(2)}) is None
    assert pair_columns({k: v for k, v in cols.items() if k != "pair_last"}) is None


def test_suspicious_values_are_flagged():
    """The rules of evals.flags: negative explained variance (eval, else training), L0 over a
    quarter of d_sae, most latents dead; a metric equal to another run's to 4 digits (not a
    saturated 0 or 1); a clean run has none."""
    from msae_core.evals.flags import interval_flags, run_flags, shared_value_flags

    assert run_flags({"explained_variance": 0.9, "l0": 30.0, "dead_fraction": 0.1}, 4096) == []
    flags = run_flags({"explained_variance": -0.3945, "l0": 8895.8, "dead_fraction": 0.6}, 16384)
    assert len(flags) == 3 and "worse than predicting the mean" in flags[0] and "not a sparse code" in flags[1]
    assert "60% of the latents are dead" in flags[2]
    assert "worse than predicting" in run_flags({"train_explained_variance": -8e12, "train_l0": 3.0}, 64)[0]
    assert run_flags({"explained_variance": 0.5, "train_explained_variance": -1.0}, 64) == []  # eval wins
    shared = shared_value_flags({"run3": {"kl_div_score": 0.47831, "explained_variance": -0.3945},
                                 "run4": {"kl_div_score": 0.47829, "explained_variance": -0.4043},
                                 "run5": {"kl_div_score": 0.5621, "ce_loss_score": 1.0},
                                 "run6": {"kl_div_score": 0.9, "ce_loss_score": 1.0}})
    assert len(shared["run3"]) == 1 and "kl_div_score 0.4783 equals run4's" in shared["run3"][0]
    assert "run3" in shared["run4"][0] and shared["run5"] == [] and shared["run6"] == []
    # the demo's two runs: 0.609 against 0.607, each with an interval 0.05 wide; a third run far off
    wide = interval_flags({"topk": {"absorption": 0.609, "absorption_ci_low": 0.58, "absorption_ci_high": 0.63},
                           "momentum": {"absorption": 0.607, "absorption_ci_low": 0.58, "absorption_ci_high": 0.63}})
    assert "wider than its spread over 2 runs (0.002)" in wide["topk"][0] and len(wide["momentum"]) == 1
    wide = interval_flags({"topk": {"absorption": 0.609, "absorption_ci_low": 0.58, "absorption_ci_high": 0.63},
                           "other": {"absorption": 0.2}, "alone": {"sae_probe_acc": 0.9, "sae_probe_acc_ci_low": 0.1,
                                                                  "sae_probe_acc_ci_high": 0.99}})
    assert wide == {"topk": [], "other": [], "alone": []}  # spread 0.409; one run has no spread
    lm_probe = {"ci_low": 0.8, "ci_high": 0.99}
    same_lm = interval_flags({n: {"llm_probe_acc": 0.9, **{f"llm_probe_acc_{k}": v for k, v in lm_probe.items()}}
                              for n in ("a", "b")})
    assert same_lm == {"a": [], "b": []}  # the LM's own probe is the same for every SAE: not flagged


def test_runs_table_and_eval_json_carry_the_flags(tmp_path):
    """The runs table's `flags` column holds each run's own lines (its values alone: adding runs
    never changes it); what runs show together is `cross_run_notes`, over the runs given. The
    fixture writes the same KL score for every run: that is noted too."""
    from fixtures_runs import make_run, make_store
    from msae_core.inspect.runs_table import cross_run_notes, runs_table

    store = make_store(tmp_path / "stores" / "s")
    make_run(tmp_path, "negative", str(store), arch="topk", ev=-0.4, absorption=0.01, umap=False)
    make_run(tmp_path, "twin-a", str(store), arch="topk", ev=0.81234, absorption=0.02, umap=False)
    make_run(tmp_path, "twin-b", str(store), arch="topk", ev=0.81231, absorption=0.03, umap=False)
    make_run(tmp_path, "clean", str(store), arch="topk", ev=0.7, absorption=0.04, umap=False)
    table = runs_table(tmp_path)
    df = table.set_index("name")
    assert "worse than predicting the mean" in df.loc["negative", "flags"]
    assert df.loc["twin-a", "flags"] == df.loc["twin-b", "flags"] == df.loc["clean", "flags"] == ""
    notes = cross_run_notes(table)
    assert "twin-a: explained_variance 0.8123 equals twin-b's to 4 digits: the same result twice?" in notes
    assert any(n.startswith("twin-b:") and "twin-a" in n for n in notes)
    assert "clean: kl_div_score 0.9 equals negative, twin-a, twin-b's to 4 digits: the same result twice?" in notes
    assert not [n for n in cross_run_notes(table[table["name"].isin(["clean", "negative"])]) if "twin" in n]
    assert (df["data"] == "s-tiny-model L0 · s").all() and (df["layer"] == 0).all()  # what each run trained on


def test_a_run_without_an_eval_has_no_flag(tmp_path):
    """A run not evaluated yet holds no eval numbers: it is not flagged as holding NaN."""
    from fixtures_runs import make_run, make_store
    from msae_core.inspect.runs_table import runs_table

    store = make_store(tmp_path / "stores" / "s")
    make_run(tmp_path, "pending", str(store), arch="topk", ev=None, umap=False)
    make_run(tmp_path, "scored", str(store), arch="topk", ev=0.8, absorption=0.1, umap=False)
    df = runs_table(tmp_path).set_index("name")
    assert df.loc["pending", "flags"] == "" and df.loc["scored", "flags"] == ""


def test_a_run_recorded_before_a_setting_existed_keeps_what_it_had():
    """A streamed run's config.json from before `separator` existed means EOS-joined documents:
    read back as a run's record it says eos, and resuming it with today's default is refused as
    other settings rather than silently packing its remaining windows another way."""
    from msae_core.runs.config import config_mismatch

    old = RunConfig(data=DataConfig(source="stream")).to_dict()
    del old["data"]["separator"]
    assert RunConfig.from_dict(old, recorded=True).data.separator == "eos"
    assert RunConfig.from_dict(old).data.separator == "bos"  # a config given by hand: today's default
    assert "separator 'eos' -> 'bos'" in config_mismatch(old, RunConfig(data=DataConfig(source="stream")).to_dict())
    assert config_mismatch(old, RunConfig(data=DataConfig(source="stream", separator="eos")).to_dict()) == ""


def test_a_run_recorded_with_flat_momentum_knobs_resumes_and_reads_as_nested(tmp_path):
    """Run folders written before sae.momentum hold beta, tau, lam, ... beside arch: the runs table
    reads their knobs, and resuming one under today's nested config is the same run (a changed knob
    is named by its nested field)."""
    from fixtures_runs import make_run, make_store
    from msae_core.inspect.runs_table import runs_table
    from msae_core.runs.config import config_mismatch

    store = make_store(tmp_path / "stores" / "s")
    make_run(tmp_path, "old", str(store), arch="momentum", lam=0.25, umap=False)
    path = tmp_path / "runs" / "old" / RUN_CONFIG
    old = json.loads(path.read_text())
    old["sae"].update(old["sae"].pop("momentum"))  # as an older msae wrote it
    path.write_text(json.dumps(old))
    assert "lam" in old["sae"] and "momentum" not in old["sae"]
    assert runs_table(tmp_path).set_index("name").loc["old", "lam"] == 0.25
    today = RunConfig.from_dict(old, recorded=True)  # as `msae train --out` reads the folder
    assert today.sae.momentum.lam == 0.25
    assert config_mismatch(old, today.to_dict()) == ""
    changed = dataclasses.replace(today, sae=dataclasses.replace(
        today.sae, momentum=dataclasses.replace(today.sae.momentum, lam=0.5)))
    assert config_mismatch(old, changed.to_dict()) == "sae.momentum.lam 0.25 -> 0.5"
