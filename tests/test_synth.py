"""Synthetic ground truth: the generator's structure (children never without their parent, siblings
exclusive, correlated groups correlated), its files and resume, the exact absorption metric on an
oracle and on a constructed absorbing SAE, and the `synthetic` eval end to end on a trained run."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from msae_core import cli
from msae_core.artifacts import SYNTH_ROWS
from msae_core.data import synth as S
from msae_core.data.store import ActivationStore
from msae_core.errors import MsaeError
from msae_core.evals import run_evals
from msae_core.evals.synthetic import Config as EvalConfig, score
from msae_core.sae import SAEConfig
from msae_core.runs.config import DataConfig, RunConfig, TrainConfig
from msae_core.training.trainer import train

SMALL = S.SynthConfig(n_features=96, d_model=32, n_trees=4, depth=2, branching=3, n_correlated=8,
                      group_size=4, rows=6000, seed=1)


def test_hierarchy_children_never_without_parent_and_exclusive():
    cfg = dataclasses.replace(SMALL, p_root=0.3)
    feats = S.make_features(cfg)
    _, mag = S.sample_rows(cfg, feats, 20_000, chunk=0)
    on = mag > 0
    kids = feats.children()
    assert len(kids) == 4 * (1 + 3)  # roots and level-1 nodes are parents
    for p, cs in kids.items():
        assert not (on[:, cs].any(1) & ~on[:, p]).any(), f"a child of {p} fired without it"
        assert on[:, cs].sum(1).max() <= 1, f"two children of {p} fired together"
        # given the parent, one child fires with probability p_child
        rate = on[on[:, p]][:, cs].any(1).float().mean()
        assert abs(rate - cfg.p_child) < 0.05
    roots = [p for p in kids if feats.parent_F[p] < 0]
    assert abs(on[:, roots].float().mean() - cfg.p_root) < 0.02


def test_correlated_groups_fire_together_more_than_independent_ones():
    cfg = dataclasses.replace(SMALL, p_min=0.05, p_max=0.05, correlation=0.8)
    feats = S.make_features(cfg)
    _, mag = S.sample_rows(cfg, feats, 40_000, chunk=0)
    on = (mag > 0).float()
    corr = torch.corrcoef(on.T)
    grp = feats.group_F
    same = [(i, j) for i in range(96) for j in range(i + 1, 96) if grp[i] >= 0 and grp[i] == grp[j]]
    indep = torch.nonzero(feats.kind_F == S.KIND_INDEPENDENT).flatten().tolist()
    assert min(corr[i, j] for i, j in same) > 0.2
    assert max(abs(corr[i, j]) for i in indep[:10] for j in indep[10:20]) < 0.05


def test_store_truth_matches_rows_and_resume_is_bit_equal(tmp_path, monkeypatch):
    cfg = dataclasses.replace(SMALL, rows=S.SHARD_WINDOWS * S.WINDOW_ROWS + 500)  # two shards
    whole = S.synth(cfg, tmp_path / "whole", progress=False)
    feats = S.load_features(whole.path)
    mag = S.load_row_truth(whole.path, 1, feats.n_features)
    x = whole.rows(torch.arange(whole.n_rows - 500, whole.n_rows))
    resid = x - mag @ feats.directions_FD
    assert resid.std() == pytest.approx(cfg.noise, rel=0.1)  # only the noise is left
    real = S.sample_rows
    calls = []

    def dies_on_second_shard(*a, **kw):
        calls.append(kw["chunk"])
        if kw["chunk"] == 1:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(S, "sample_rows", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        S.synth(cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(S, "sample_rows", real)
    cut = S.synth(cfg, tmp_path / "cut", progress=False)
    assert cut.complete and cut.n_rows == whole.n_rows
    for name in ("shard_00000.safetensors", "shard_00001.safetensors", SYNTH_ROWS.format(index=1)):
        a, b = load_file(str(whole.path / name)), load_file(str(cut.path / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_bad_settings_and_a_taken_folder_get_one_line(tmp_path, capsys):
    assert cli.main(["synth", "--out", str(tmp_path / "s"), "--branching", "1"]) == 2
    assert "branching must be >= 2" in capsys.readouterr().err
    assert cli.main(["synth", "--out", str(tmp_path / "s"), "--n-trees", "40"]) == 2
    assert "more than n_features" in capsys.readouterr().err
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "notes.txt").write_text("mine")
    assert cli.main(["synth", "--out", str(tmp_path / "t"), "--rows", "300"]) == 2
    assert "not empty" in capsys.readouterr().err


def _one_level(**kw):
    return dataclasses.replace(SMALL, depth=1, magnitude_spread=0.0, magnitude_std=0.0, noise=0.0,
                               p_root=0.3, **kw)


def _batches(x, mag, lat, x_hat):
    return [(x, mag, lat, x_hat)]


def _absorber(feats, mag, leak: float = 0.0):
    """An absorbing SAE: each child latent holds child + parent, the parent latent is silent when a
    child fires (or leaks `leak` of its magnitude then). (decoder rows unit, latents in input units)."""
    D = feats.directions_FD
    kids = feats.children()
    W, lat = D.clone(), mag.clone()
    for p, cs in kids.items():
        for c in cs:
            W[c] = D[c] + D[p]
            lat[:, c] = mag[:, c] * W[c].norm()  # in input units: activation times decoder norm
        with_child = mag[:, cs].gt(0).any(1)
        lat[with_child, p] = leak * mag[with_child, p]
    return W / W.norm(dim=1, keepdim=True), lat


def test_constructed_saes_score_as_they_should_and_cannot_game_absorption():
    """Oracle: nothing absorbed, all kept. Full absorber: all absorbed. Dead copies of the true
    directions beside an absorber: matched to nothing (they never fire), so they neither hide the
    absorption nor lift MCC. A parent leaking 1 % of its magnitude: still silent, still absorbed.
    A dropped parent (its latent gone, no child carrying it): lost, not "not absorbed"."""
    cfg = _one_level()
    feats = S.make_features(cfg)
    x, mag = S.sample_rows(cfg, feats, 8000, chunk=0, split="eval")
    D = feats.directions_FD
    kids = feats.children()
    ecfg = EvalConfig(min_parent_rows=5)
    a = lambda m: m["absorption"]  # noqa: E731

    oracle, details = score(D, feats, _batches(x, mag, mag, mag @ D), ecfg)
    assert (a(oracle)["mean_absorption"], a(oracle)["mean_lost"], a(oracle)["mean_kept"]) == (0.0, 0.0, 1.0)
    assert oracle["recovery"]["mcc"] == pytest.approx(1.0) and oracle["recovery"]["n_unmatched"] == 0
    assert oracle["classification"]["f1"] == pytest.approx(1.0)
    assert a(oracle)["n_parents"] == 4 and a(oracle)["by_level"]["0"]["n_parents"] == 4

    W, lat = _absorber(feats, mag)
    full, details = score(W, feats, _batches(x, mag, lat, lat @ W), ecfg)
    assert (a(full)["mean_absorption"], a(full)["mean_kept"]) == (1.0, 0.0)
    assert {d["feature"] for d in details if d["absorption"] is not None} == set(kids)

    # dead copies: the true directions again as extra latents that never fire
    W_dead = torch.cat([W, D])
    lat_dead = torch.cat([lat, torch.zeros(len(x), D.shape[0])], dim=1)
    dead, _ = score(W_dead, feats, _batches(x, mag, lat_dead, lat_dead @ W_dead), ecfg)
    assert a(dead)["mean_absorption"] == 1.0  # decoder cosine alone matched the copies: 0
    assert dead["recovery"]["n_matched_dead_if_all"] > 0
    assert dead["recovery"]["mcc"] == pytest.approx(full["recovery"]["mcc"])  # the copies lift nothing

    # a parent latent leaking 1 % of its magnitude when a child fires is silent all the same
    W, lat = _absorber(feats, mag, leak=0.01)
    leaking, _ = score(W, feats, _batches(x, mag, lat, lat @ W), ecfg)
    assert a(leaking)["mean_absorption"] == 1.0

    # dropped parents: their latents removed, their children plain: every parent firing is lost
    keep = [g for g in range(D.shape[0]) if g not in kids]
    lat_drop = mag[:, keep]
    dropped, _ = score(D[keep], feats, _batches(x, mag, lat_drop, lat_drop @ D[keep]), ecfg)
    assert (a(dropped)["mean_absorption"], a(dropped)["mean_lost"], a(dropped)["mean_kept"]) == (0.0, 1.0, 0.0)
    assert dropped["recovery"]["n_unmatched"] == len(kids)

    # the parent latent firing beside its children: kept, nothing absorbed
    W, lat = _absorber(feats, mag)
    lat[:, list(kids)] = mag[:, list(kids)]
    beside, _ = score(W, feats, _batches(x, mag, lat, lat @ W), ecfg)
    assert (a(beside)["mean_absorption"], a(beside)["mean_kept"]) == (0.0, 1.0)


def test_score_takes_a_generator_of_batches_too():
    cfg = _one_level()
    feats = S.make_features(cfg)
    x, mag = S.sample_rows(cfg, feats, 2000, chunk=0, split="eval")
    D = feats.directions_FD
    ecfg = EvalConfig(min_parent_rows=5)
    listed, _ = score(D, feats, _batches(x, mag, mag, mag @ D), ecfg)
    gen, _ = score(D, feats, (b for b in _batches(x, mag, mag, mag @ D)), ecfg)  # one pass only
    assert gen == listed


def test_a_match_needs_the_stated_cosine():
    """A latent whose decoder row is mostly another direction matches no feature."""
    cfg = _one_level()
    feats = S.make_features(cfg)
    x, mag = S.sample_rows(cfg, feats, 4000, chunk=0, split="eval")
    D = feats.directions_FD.clone()
    g = torch.Generator().manual_seed(0)
    W = D.clone()
    W[0] = D[0] + 3.0 * torch.randn(D.shape[1], generator=g) / D.shape[1] ** 0.5  # cos with d_0 about 0.3
    W = W / W.norm(dim=1, keepdim=True)
    m, details = score(W, feats, _batches(x, mag, mag, mag @ D), EvalConfig(min_parent_rows=5))
    assert details[0]["matched_latent"] == -1 and 0 < details[0]["matched_cosine"] < 0.5
    assert m["recovery"]["n_unmatched"] == 1
    m, details = score(W, feats, _batches(x, mag, mag, mag @ D), EvalConfig(min_parent_rows=5, match_cosine=0.1))
    assert details[0]["matched_latent"] == 0


def test_synthetic_eval_on_a_trained_run_and_the_lm_evals_refused(tmp_path):
    store = S.synth(dataclasses.replace(SMALL, rows=4096), tmp_path / "store", progress=False)
    run = tmp_path / "run"
    cfg = RunConfig(sae=SAEConfig(arch="topk", d_in=32, d_sae=96, k=4),
                    train=TrainConfig(steps=150, batch_size=256, lr=3e-3, warmup_steps=5, seed=0,
                                      device="cpu", log_every=50, checkpoint_every=1000),
                    data=DataConfig(acts=str(store.path)))
    with pytest.raises(MsaeError, match="train.evals: core cannot score a run on a synthetic store"):
        train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, evals=["core"])), run, progress=False)
    train(cfg, run, progress=False)
    out = run_evals(run, "synthetic", progress=False, overrides={"synthetic": {"n_eval_rows": 3000}})
    m = out["synthetic"]["eval_result_metrics"]
    assert 0.5 < m["reconstruction"]["explained_variance"] <= 1.0
    assert 0.3 < m["recovery"]["mcc"] <= 1.0  # 150 steps: well above chance (about 0.2 at d 32)
    a = m["absorption"]
    assert a["n_parents"] > 0 and a["mean_absorption_ci_low"] <= a["mean_absorption"] <= a["mean_absorption_ci_high"]
    assert m["sparsity"]["l0"] == pytest.approx(4.0, abs=0.01)
    assert len(out["synthetic"]["eval_result_details"]) == 96
    again = run_evals(run, "synthetic", progress=False, overrides={"synthetic": {"n_eval_rows": 3000}})
    assert again["synthetic"]["eval_result_metrics"] == m  # fresh rows, but the same ones each time
    assert json.loads((run / "status.json").read_text())["eval"] == "done"
    with pytest.raises(MsaeError, match="synthetic activations.*--evals synthetic"):
        run_evals(run, "core", progress=False)
    assert json.loads((run / "status.json").read_text())["eval"] == "done"  # refused before it began: not "failed"
    assert json.loads((run / "eval.json").read_text())["synthetic"]["eval_result_metrics"] == m


@pytest.mark.parametrize("args, said", [
    (["--noise", "nan"], "noise must be a finite number (got nan)"),
    (["--magnitude", "inf"], "magnitude must be a finite number (got inf)"),
    (["--magnitude", "nan"], "magnitude must be a finite number (got nan)"),
    (["--depth", "100000"], "trees of depth 100000 and branching 3 hold more than 256 features"),
    (["--d-model", "10000000", "--n-features", "10000000"], "GiB at once, more than the"),
])
def test_synth_refuses_settings_that_cannot_make_a_store(tmp_path, capsys, args, said):
    out = tmp_path / "s"
    assert cli.main(["synth", "--out", str(out), "--no-progress"] + args) == 2
    err = capsys.readouterr().err
    assert said in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
