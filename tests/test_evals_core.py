"""SAEBench's core eval (msae_core.evals.core): the pure metric functions against direct computations
from the definitions, the splice / ablation through a tiny random LM, eval.json end to end, refusals,
and a killed eval leaving eval.json untouched."""

from __future__ import annotations

import os

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from msae_core.errors import MsaeError
from msae_core.evals import core

# ----------------------------------------------------------------------------------------------
# pure: reconstruction, sparsity, shrinkage, density


def _data(N=40, D=8, F=16, seed=0, offset=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g) + offset  # a large mean, so "about the mean" matters
    x_hat = x + 0.5 * torch.randn(N, D, generator=g)
    f = torch.relu(torch.randn(N, F, generator=g) - 0.8)
    return x, x_hat, f


def test_perfect_reconstruction_scores_one():
    x, _, f = _data()
    m = core.reconstruction_metrics(x, x.clone(), f)
    for k in ("explained_variance", "explained_variance_legacy", "cossim", "l2_ratio",
              "relative_reconstruction_bias"):
        assert m[k] == pytest.approx(1.0, abs=1e-9), k
    assert m["mse"] == 0 and m["mse_saebench_formula"] == 0
    assert m["l2_norm_in"] == pytest.approx(m["l2_norm_out"])


def test_predicting_the_mean_explains_no_variance():
    x, _, f = _data(offset=50.0)  # variance about zero would call this ~1
    x_hat = x.mean(0, keepdim=True).expand_as(x)
    m = core.reconstruction_metrics(x, x_hat, f)
    assert m["explained_variance"] == pytest.approx(0.0, abs=1e-6)  # float32 mean, float64 sums
    assert m["explained_variance_legacy"] == pytest.approx(0.0, abs=1e-6)
    assert m["cossim"] > 0.99  # and yet the direction is nearly right: why EV is about the mean


def test_accumulated_metrics_match_the_definitions():
    """Two batches of windows with masked tokens, against loops written from SAEBench's text."""
    torch.manual_seed(0)
    B, T, D, F = 3, 5, 6, 10
    batches = []
    for s in range(2):
        x = torch.randn(B, T, D) * 2 + 1
        x_hat = x + torch.randn(B, T, D) * 0.7
        f = torch.relu(torch.randn(B, T, F) - 0.5)
        keep = torch.rand(B, T) > 0.25
        keep[0, 0] = keep[1, 1] = True
        f[~keep] = 5.0  # would count as firing everywhere if masked tokens leaked into densities
        batches.append((x, x_hat, f, keep))
    acc = core.CoreAccumulator(F)
    for b in batches:
        acc.update(*b)
    m = acc.metrics()

    toks = []  # (batch, window, x, x_hat, f) per kept token
    for bi, (x, x_hat, f, keep) in enumerate(batches):
        for w in range(B):
            for t in range(T):
                if keep[w, t]:
                    toks.append((bi, w, x[w, t].double(), x_hat[w, t].double(), f[w, t].double()))
    N = len(toks)
    mean_all = sum(t[2] for t in toks) / N
    ssr = sum(float(((t[2] - t[3]) ** 2).sum()) for t in toks)
    sst = sum(float(((t[2] - mean_all) ** 2).sum()) for t in toks)
    assert m["explained_variance"] == pytest.approx(1 - ssr / sst, rel=1e-9)
    assert m["mse"] == pytest.approx(ssr / (N * D), rel=1e-9)
    legacy, saebench_mse, rrb = 0.0, 0.0, []
    for bi in range(2):
        bt = [t for t in toks if t[0] == bi]
        mb = sum(t[2] for t in bt) / len(bt)
        for t in bt:
            r2 = float(((t[2] - t[3]) ** 2).sum())
            legacy += 1 - r2 / float(((t[2] - mb) ** 2).sum())
            saebench_mse += r2 / len(bt)
        rrb.append(sum(float(t[3] @ t[3]) for t in bt) / sum(float(t[2] @ t[3]) for t in bt))
    assert m["explained_variance_legacy"] == pytest.approx(legacy / N, rel=1e-9)
    assert m["mse_saebench_formula"] == pytest.approx(saebench_mse / N, rel=1e-9)
    assert m["relative_reconstruction_bias"] == pytest.approx(sum(rrb) / 2, rel=1e-9)
    cos = sum(float(t[2] @ t[3] / (t[2].norm() * t[3].norm())) for t in toks) / N
    assert m["cossim"] == pytest.approx(cos, rel=1e-6)
    assert m["l2_norm_in"] == pytest.approx(sum(float(t[2].norm()) for t in toks) / N, rel=1e-9)
    assert m["l2_ratio"] == pytest.approx(sum(float(t[3].norm() / t[2].norm()) for t in toks) / N, rel=1e-9)
    assert m["l0"] == pytest.approx(sum(int((t[4] != 0).sum()) for t in toks) / N)
    assert m["l1"] == pytest.approx(sum(float(t[4].sum()) for t in toks) / N, rel=1e-6)
    fires = torch.stack([(t[4] > 0).double() for t in toks]).sum(0)
    windows = torch.zeros(F)
    for bi in range(2):
        for w in range(B):
            fired = [t[4] > 0 for t in toks if t[0] == bi and t[1] == w]
            if fired:
                windows += torch.stack(fired).any(0).float()
    assert torch.allclose(acc.feature_density().double(), fires / N, atol=1e-7)
    heur = acc.consistent_activation_heuristic().double()
    alive = fires > 0
    assert torch.allclose(heur[alive], fires[alive] / windows[alive].double(), atol=1e-6)
    assert torch.isnan(heur[~alive]).all()


def test_masked_tokens_change_the_numbers():
    """A special-token row (huge, badly reconstructed, as Gemma's BOS) must not count."""
    x, x_hat, f = _data(N=20)
    x[0], x_hat[0] = 1e3, 0.0
    keep = torch.ones(20, dtype=torch.bool)
    keep[0] = False
    masked = core.reconstruction_metrics(x, x_hat, f, keep)
    assert masked == pytest.approx(core.reconstruction_metrics(x[1:], x_hat[1:], f[1:]))
    unmasked = core.reconstruction_metrics(x, x_hat, f)
    assert unmasked["explained_variance"] < masked["explained_variance"] - 0.1


def test_misc_metrics_and_histogram():
    density = torch.tensor([0.0, 0.0, 0.005, 0.02, 0.05, 0.2, 0.5, 0.001])
    m = core.misc_metrics(density, dead_threshold=0.0, dense_threshold=0.1)
    assert m["frac_alive"] == pytest.approx(6 / 8)
    assert m["frac_dead_features"] == pytest.approx(1 - m["frac_alive"])
    assert m["freq_over_1_percent"] == pytest.approx(4 / 8)
    assert m["freq_over_10_percent"] == pytest.approx(2 / 8) == m["frac_dense_features"]
    assert m["normalized_freq_over_10_percent"] == pytest.approx(0.7 / float(density.sum()))
    assert core.misc_metrics(density, dead_threshold=0.002)["frac_dead_features"] == pytest.approx(3 / 8)
    h = core.density_histogram(density, n_tokens=1000)
    assert h["n_dead"] == 2 and sum(h["counts"]) == 6
    assert h["log10_bin_edges"][0] == -3.0 and h["log10_bin_edges"][-1] == 0.0
    edges = h["log10_bin_edges"]
    for d in density[density > 0].tolist():  # each alive latent lands in the bin holding log10(d)
        i = max(j for j in range(len(edges) - 1) if edges[j] <= math.log10(d) + 1e-9)
        assert h["counts"][min(i, len(h["counts"]) - 1)] >= 1


def test_weight_metrics_max_cosine_excludes_self():
    W_dec = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, -1.0]])
    wm = core.weight_metrics(W_dec.T.clone() * 2, W_dec, torch.tensor([0.1, 0.2, 0.3]))
    assert wm["max_decoder_cosine_sim"].tolist() == pytest.approx([0.6, 0.6, 0.0])
    assert wm["encoder_norm"].tolist() == pytest.approx([2.0, 2.0, 2.0])
    assert wm["encoder_decoder_cosine_sim"].tolist() == pytest.approx([1.0, 1.0, 1.0])


# ----------------------------------------------------------------------------------------------
# pure: KL and CE scores


def _logits(B=2, T=6, V=11, seed=0):
    return torch.randn(B, T, V, generator=torch.Generator().manual_seed(seed)) * 2


def test_kl_and_ce_match_torch():
    a, b = _logits(seed=0), _logits(seed=1)
    ids = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(2))
    la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl = core.kl_per_token(la, lb, chunk=5)  # a chunk that does not divide B*T
    ref = torch.nn.functional.kl_div(lb, la, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kl, ref, atol=1e-5)
    ce = core.ce_per_token(lb, ids)
    ref_ce = torch.nn.functional.cross_entropy(b[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1),
                                               reduction="none").reshape(2, 5)
    assert torch.allclose(ce, ref_ce, atol=1e-5)


def test_scores_perfect_ablation_and_formula():
    clean, abl = _logits(seed=0), _logits(seed=3)
    ids = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(4))
    lc, la = torch.log_softmax(clean, -1), torch.log_softmax(abl, -1)
    kl_abl, ce_abl, ce_clean = core.kl_per_token(lc, la), core.ce_per_token(la, ids), core.ce_per_token(lc, ids)
    perfect = core.downstream_scores(core.kl_per_token(lc, lc), kl_abl, ce_clean, ce_abl, ce_clean)
    assert perfect["kl_div_score"] == pytest.approx(1.0) and perfect["ce_loss_score"] == pytest.approx(1.0)
    ablated = core.downstream_scores(kl_abl, kl_abl, ce_abl, ce_abl, ce_clean)
    assert ablated["kl_div_score"] == pytest.approx(0.0) and ablated["ce_loss_score"] == pytest.approx(0.0)
    mid = _logits(seed=5)
    lm_ = torch.log_softmax(0.5 * clean + 0.5 * mid, -1)
    kl_sae, ce_sae = core.kl_per_token(lc, lm_), core.ce_per_token(lm_, ids)
    s = core.downstream_scores(kl_sae, kl_abl, ce_sae, ce_abl, ce_clean)
    k_s, k_a = float(kl_sae.mean()), float(kl_abl.mean())
    c_s, c_a, c_c = float(ce_sae.mean()), float(ce_abl.mean()), float(ce_clean.mean())
    assert s["kl_div_score"] == pytest.approx((k_a - k_s) / k_a, rel=1e-6)
    assert s["ce_loss_score"] == pytest.approx((c_a - c_s) / (c_a - c_c), rel=1e-6)
    assert s["kl_div_with_sae"] == pytest.approx(k_s) and s["ce_loss_without_sae"] == pytest.approx(c_c)


def test_special_positions_are_left_out_of_kl_and_ce():
    """Position 0 (BOS) and an EOS inside the window carry a huge KL; the mean must skip them.
    For CE the mask is that of the predicting position (SAEBench's mask[:, :-1])."""
    BOS, EOS = 2, 1
    ids = torch.tensor([[BOS, 7, 8, EOS, 9, 10]])
    keep = core.keep_mask(ids, {0, EOS, BOS})
    assert keep.tolist() == [[False, True, True, False, True, True]]
    kl = torch.tensor([[100.0, 1.0, 2.0, 50.0, 3.0, 4.0]])
    assert float(core.masked_values(kl, keep).mean()) == pytest.approx(2.5)
    assert float(kl.mean()) != pytest.approx(2.5)
    ce = torch.tensor([[100.0, 1.0, 2.0, 50.0, 3.0]])  # predictions made at positions 0..4
    assert core.masked_values(ce, keep).tolist() == [1.0, 2.0, 3.0]


# ----------------------------------------------------------------------------------------------
# windows


WORDS = ("alpha beta gamma delta river stone cloud lamp quick brown fox jumps over the lazy dog "
         "time saves nine country question answer").split()


def _write_corpus(path: Path, n_docs: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) + "." for _ in range(n_docs)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random LM, a text corpus, a harvested store (layer 0, so later blocks attend to the
    spliced positions; 16-token windows)."""
    from msae_core.data.harvest import harvest
    from msae_core.data.lm import load_lm, save_tiny_model
    from msae_core.data.store import StoreSettings

    root = tmp_path_factory.mktemp("core")
    save_tiny_model(root / "lm", family="llama", d_model=32, n_layers=2, seed=0)
    corpus = _write_corpus(root / "corpus.txt", 150)
    lm = load_lm(str(root / "lm"), device="cpu")
    settings = StoreSettings(model=str(root / "lm"), layer=0, corpus=str(corpus), target_tokens=300,
                             context_size=16, dtype="float32")
    store = harvest(settings, root / "store", batch_size=4, lm=lm, progress=False)
    return {"root": root, "lm": lm, "corpus": corpus, "store": root / "store", "manifest": store.manifest}


def test_eval_windows_are_held_out_and_seeded(tiny):
    from msae_core.data.text import context_windows, load_corpus

    corpus = load_corpus(str(tiny["corpus"]))
    n_store = tiny["manifest"]["n_windows"]
    skip = core._store_skip_tokens(tiny["manifest"])
    assert skip == n_store * 15
    wins, info = core.eval_windows(corpus, tiny["lm"].tokenizer, 16, 6, skip_tokens=skip, seed=1)
    assert info["held_out"] and len(wins) == 6 and all(len(w) == 16 and w[0] == 2 for w in wins)
    assert min(info["window_indices"]) >= n_store
    stream = [w for _, w in context_windows(corpus, tiny["lm"].tokenizer, 16)]
    wins = [w.tolist() for w in wins]
    assert wins == [stream[i] for i in info["window_indices"]]
    stored = {tuple(w) for w in stream[:n_store]}
    assert not stored & {tuple(w) for w in wins}
    # a streamed run's status says where its windows ended: the pool starts there, the same windows
    packed = context_windows(corpus, tiny["lm"].tokenizer, 16)
    for _ in range(n_store):
        next(packed)
    cursor = packed.cursor()._asdict()
    by_cursor, c_info = core.eval_windows(corpus, tiny["lm"].tokenizer, 16, 6, skip_tokens=skip, seed=1,
                                          cursor=cursor)
    assert [w.tolist() for w in by_cursor] == wins and c_info["from_cursor"] and not info["from_cursor"]
    assert c_info["window_indices"] == info["window_indices"]
    again, _ = core.eval_windows(corpus, tiny["lm"].tokenizer, 16, 6, skip_tokens=skip, seed=1)
    other, _ = core.eval_windows(corpus, tiny["lm"].tokenizer, 16, 6, skip_tokens=skip, seed=2)
    assert [w.tolist() for w in again] == wins and [w.tolist() for w in other] != wins
    # a large ask draws from at most POOL_EXTRA_MAX more windows than it needs, not 4x
    _, big = core.eval_windows(corpus, tiny["lm"].tokenizer, 16, 20, skip_tokens=skip, seed=1, pool_factor=4)
    assert big["pool_windows"] == 80
    core_extra, core.POOL_EXTRA_MAX = core.POOL_EXTRA_MAX, 5
    try:
        _, capped = core.eval_windows(corpus, tiny["lm"].tokenizer, 16, 20, skip_tokens=skip, seed=1)
    finally:
        core.POOL_EXTRA_MAX = core_extra
    assert capped["pool_windows"] == 25
    # a corpus with nothing left after the store's windows falls back to its beginning, and says so
    _, info = core.eval_windows(corpus, tiny["lm"].tokenizer, 16, 6, skip_tokens=10**7, seed=1)
    assert info["held_out"] is False and info["skipped_windows"] == 0


# ----------------------------------------------------------------------------------------------
# the eval through the tiny LM


def _identity_sae(d: int, zero: bool = False):
    """A ReLU SAE with x_hat = relu(x) - relu(-x) = x exactly (or x_hat = 0 when `zero`)."""
    from msae_core.sae import SAEConfig, build_sae

    sae = build_sae(SAEConfig(arch="relu", d_in=d, d_sae=2 * d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.zeros(2 * d, d) if zero else torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def _ctx(tiny, sae):
    from msae_core.evals.context import EvalContext
    from msae_core.runs.config import DataConfig, RunConfig

    config = RunConfig(sae=sae.cfg, data=DataConfig(acts=str(tiny["store"])))
    ctx = EvalContext(run_dir=tiny["root"], sae=sae, config=config, manifest=tiny["manifest"],
                      device=torch.device("cpu"), progress=False)
    ctx.lm = tiny["lm"]
    return ctx


# density_tokens=1: densities over the sparsity/variance batches only (SAEBench's window), not the
# run's dead window (test_densities_are_counted_over_the_trainers_dead_window)
SMALL = dict(batch_size_prompts=3, n_eval_reconstruction_batches=2, n_eval_sparsity_variance_batches=3,
             density_tokens=1, context_size=0)  # the tiny store's context (16), not SAEBench's 128


def test_the_core_eval_uses_saebenchs_context_unless_told(tiny):
    """SAEBench's core eval runs 128-token windows whatever the store's context (a store
    harvested at 1,024 made 8x the logits per window); context_size 0 takes the store's."""
    assert core.Config().context_size == 128
    res = core.run(_ctx(tiny, _identity_sae(32)), core.Config(**{**SMALL, "context_size": 128}))
    assert res["eval_result_unstructured"]["windows"]["context_size"] == 128
    assert res["eval_result_metrics"]["token_stats"]["total_tokens_eval_reconstruction"] == 2 * 3 * 128


def test_identity_sae_is_perfect_and_zero_sae_is_ablation(tiny):
    ident = core.run(_ctx(tiny, _identity_sae(32)), core.Config(**SMALL))
    m = ident["eval_result_metrics"]
    assert m["model_behavior_preservation"]["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-6)
    assert m["model_behavior_preservation"]["kl_div_score"] == pytest.approx(1.0, abs=1e-6)
    assert m["model_behavior_preservation"]["kl_div_with_ablation"] > 0
    perf = m["model_performance_preservation"]
    assert perf["ce_loss_score"] == pytest.approx(1.0, abs=1e-5)
    assert perf["ce_loss_with_sae"] == pytest.approx(perf["ce_loss_without_sae"], abs=1e-6)
    assert m["reconstruction_quality"]["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert m["reconstruction_quality"]["cossim"] == pytest.approx(1.0, abs=1e-6)
    assert m["token_stats"] == {"total_tokens_eval_reconstruction": 2 * 3 * 16,
                                "total_tokens_eval_sparsity_variance": 3 * 3 * 16}
    u = ident["eval_result_unstructured"]
    assert u["windows"]["held_out"] and u["windows"]["used_windows"] == 9
    assert u["kept_tokens_sparsity_variance"] < 3 * 3 * 16  # BOS (and EOS separators) left out

    # a zero reconstruction spliced everywhere is exactly zero ablation: score 0
    zero_all = core.run(_ctx(tiny, _identity_sae(32, zero=True)),
                        core.Config(**SMALL, exclude_special_tokens_from_reconstruction=False))
    mb = zero_all["eval_result_metrics"]["model_behavior_preservation"]
    assert mb["kl_div_with_sae"] == pytest.approx(mb["kl_div_with_ablation"], rel=1e-6)
    assert mb["kl_div_score"] == pytest.approx(0.0, abs=1e-6)
    assert zero_all["eval_result_metrics"]["model_performance_preservation"]["ce_loss_score"] == \
        pytest.approx(0.0, abs=1e-5)
    # keeping the special positions' own activations changes the spliced forward
    zero_kept = core.run(_ctx(tiny, _identity_sae(32, zero=True)), core.Config(**SMALL))
    kept = zero_kept["eval_result_metrics"]["model_behavior_preservation"]["kl_div_with_sae"]
    assert abs(kept - mb["kl_div_with_sae"]) > 1e-4


def test_densities_are_counted_over_the_trainers_dead_window(tiny):
    """By default the densities go on past the sparsity/variance batches until the run's
    dead_tokens_threshold kept tokens are counted, and equal a direct count over those windows."""
    from msae_core.data.text import context_windows, load_corpus
    from msae_core.sae import SAEConfig, build_sae

    target = 400
    sae = build_sae(SAEConfig(arch="topk", d_in=32, d_sae=64, k=4, seed=3, dead_tokens_threshold=target)).eval()
    res = core.run(_ctx(tiny, sae), core.Config(**{**SMALL, "density_tokens": 0}))
    un, misc = res["eval_result_unstructured"], res["eval_result_metrics"]["misc_metrics"]
    n_kept = un["kept_tokens_feature_density"]
    assert un["kept_tokens_sparsity_variance"] < target <= n_kept  # SMALL's 3 x 3 windows keep < 150
    assert misc["dead_window_tokens"] == n_kept and un["feature_density_histogram"]["n_tokens"] == n_kept
    assert un["windows"]["held_out"] is True and len(un["windows"]["window_indices"]) > 3 * 3

    stream = [w for _, w in context_windows(load_corpus(str(tiny["corpus"])), tiny["lm"].tokenizer, 16)]
    windows = [stream[i] for i in un["windows"]["window_indices"]]
    fires, kept, bs = torch.zeros(64, dtype=torch.float64), 0, SMALL["batch_size_prompts"]
    for s in range(0, len(windows), bs):
        if kept >= target:
            break
        ids = torch.tensor(windows[s:s + bs])
        keep = core.keep_mask(ids, tiny["lm"].special_ids)
        with torch.no_grad():
            x = tiny["lm"].resid_post(ids, 0, stop_early=True).float()
            f = sae.forward(x.reshape(-1, 32)).f.reshape(*ids.shape, 64)
        fires += ((f > 0) & keep[..., None]).sum((0, 1)).double()
        kept += int(keep.sum())
    assert kept == n_kept
    dens = torch.tensor([d["feature_density"] for d in res["eval_result_details"]], dtype=torch.float64)
    assert torch.allclose(dens, fires / kept, atol=1e-6)
    assert misc["frac_dead_features"] == pytest.approx(float((fires == 0).double().mean()))

    # density_tokens at most the sparsity/variance batches' tokens: SAEBench's window
    small = core.run(_ctx(tiny, sae), core.Config(**SMALL))["eval_result_unstructured"]
    assert small["kept_tokens_feature_density"] == small["kept_tokens_sparsity_variance"] < target


def test_bad_config_is_one_line():
    with pytest.raises(MsaeError, match="batch_size_prompts"):
        from msae_core.configutil import validate

        validate(core.Config(batch_size_prompts=0))
    assert core.Config(density_tokens=-1).problems() == ["density_tokens must be >= 0 (got -1)"]
    assert core.Config(n_eval_reconstruction_batches=0).problems()
    assert not core.Config(n_eval_reconstruction_batches=0, compute_kl=False, compute_ce_loss=False).problems()


# ----------------------------------------------------------------------------------------------
# end to end: run folders, eval.json, refusals, a killed eval


def _run_folder(tiny, name: str, state: str = "done", weights: bool = True, seed: int = 0) -> Path:
    from msae_core.artifacts import RUN_CONFIG
    from msae_core.runs.config import DataConfig, RunConfig
    from msae_core.runs.folder import write_status
    from msae_core.sae import SAEConfig, build_sae
    from msae_core.sae_io import save_sae

    run = tiny["root"] / "runs" / name
    run.mkdir(parents=True, exist_ok=True)
    cfg = SAEConfig(arch="topk", d_in=32, d_sae=64, k=4, seed=seed)
    RunConfig(sae=cfg, data=DataConfig(acts=str(tiny["store"]))).save(run / RUN_CONFIG)
    write_status(run, state=state, step=10 if state == "done" else 5, total_steps=10,
                 pid=os.getpid() if state == "running" else None,  # a live trainer for "running"
                 error="loss is nan at step 5" if state == "diverged" else None)
    if weights:
        sae = build_sae(cfg)
        with torch.no_grad():
            sae.input_scale.fill_(0.5)  # decoder rows of norm 2 in input units
        save_sae(sae, run)
    return run


def test_run_evals_writes_core_eval_json(tiny):
    from msae_core.evals import run_evals
    from msae_core.evals.schema import check_result, read_eval_json
    from msae_core.evals.summary import PATHS, summarize

    run = _run_folder(tiny, "e2e")
    out = run_evals(run, ["core"], progress=False, device="cpu", overrides={"core": SMALL})
    res = read_eval_json(run)["core"]
    assert res == out["core"] and check_result(res) == []
    assert res["eval_type_id"] == "core" and res["sae_lens_id"] == "msae/e2e"
    assert res["eval_config"]["dataset"] == str(tiny["corpus"]) and res["eval_config"]["context_size"] == 16
    assert res["eval_config"]["batch_size_prompts"] == 3
    details = res["eval_result_details"]
    assert [d["index"] for d in details] == list(range(64))
    dens = torch.tensor([d["feature_density"] for d in details])
    assert res["eval_result_metrics"]["sparsity"]["l0"] == pytest.approx(4.0)  # TopK k=4 fires 4 per token
    assert float(dens.sum()) == pytest.approx(4.0, rel=1e-5)  # the densities sum to L0
    # weight metrics in SAEBench's units: decoder norms folded into the encoder columns
    from msae_core.sae_io import load_sae, saebench_weights

    w = saebench_weights(load_sae(run))
    assert float(w["latent_scale"].mean()) == pytest.approx(2.0, rel=1e-4)
    assert [d["encoder_norm"] for d in details] == pytest.approx(w["W_enc"].norm(dim=0).tolist(), rel=1e-5)
    misc = res["eval_result_metrics"]["misc_metrics"]
    assert misc["frac_dead_features"] == pytest.approx(float((dens == 0).float().mean()))
    hist = res["eval_result_unstructured"]["feature_density_histogram"]
    assert sum(hist["counts"]) + hist["n_dead"] == 64
    s = summarize(read_eval_json(run))
    core_keys = {k for k, (ev, _, _) in PATHS.items() if ev == "core"}
    assert set(s) == core_keys
    from msae_core.evals.flags import run_flags

    # eval.json keeps the suspicious values of the run (an untrained SAE: its explained variance)
    assert read_eval_json(run)["msae_flags"] == run_flags(s, 64)
    assert (s["explained_variance"] < 0) == any("worse than predicting" in f for f in out["msae_flags"])


@pytest.mark.parametrize("state,weights,message", [
    ("running", False, "is still training"),
    ("running", True, "is still training"),
    ("diverged", True, "diverged"),
    ("done", False, "has no final weights"),
])
def test_refusals_are_one_line_and_exit_2(tiny, state, weights, message, capsys):
    from msae_core.cli import main
    from msae_core.evals import run_evals

    run = _run_folder(tiny, f"refuse-{state}-{weights}", state=state, weights=weights)
    with pytest.raises(MsaeError, match=message) as err:
        run_evals(run, ["core"], progress=False, device="cpu")
    assert "\n" not in str(err.value)
    assert main(["eval", str(run), "--evals", "core", "--no-progress"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("msae: error: run ") and message in line
    assert not (run / "eval.json").exists()


def test_the_eval_loads_the_model_in_the_dtype_asked(tiny):
    """msae eval --model-dtype: the model of the eval in bfloat16 (auto on CUDA, as SAEBench
    evaluates and as msae harvests there); it was always float32. The eval says which."""
    from msae_core.evals import run_evals
    from msae_core.evals.context import open_run

    run = _run_folder(tiny, "bf16")
    out = run_evals(run, ["core"], progress=False, device="cpu", overrides={"core": SMALL}, model_dtype="bfloat16")
    assert out["core"]["eval_config"]["llm_dtype"] == "bfloat16"
    assert open_run(run, device="cpu").lm.dtype == torch.float32  # auto on the CPU
    with pytest.raises(MsaeError, match="model dtype must be one of"):
        open_run(run, device="cpu", model_dtype="fp8")


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_an_eval_killed_midway_leaves_eval_json_untouched(tiny, monkeypatch, exc):
    from msae_core.evals import run_evals

    run = _run_folder(tiny, f"killed-{type(exc).__name__}")
    run_evals(run, ["core"], progress=False, device="cpu", overrides={"core": SMALL})
    before = (run / "eval.json").read_bytes()
    calls = {"n": 0}
    real = core.CoreAccumulator.update

    def dying(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise exc
        return real(self, *a, **kw)

    monkeypatch.setattr(core.CoreAccumulator, "update", dying)
    with pytest.raises(type(exc)):
        run_evals(run, ["core"], progress=False, device="cpu",
                  overrides={"core": {**SMALL, "random_seed": 7}})
    assert calls["n"] == 2
    assert (run / "eval.json").read_bytes() == before
    hidden = sorted(p.name for p in run.iterdir() if p.name.startswith("."))
    assert hidden in ([], [".eval.lock"])  # no temp file left (the lock file stays, as a flock's must)


# ----------------------------------------------------------------------------------------------
# the real embedded model, through the command line


@pytest.mark.embedded
def test_embedded_core_eval_through_the_cli(tmp_path):
    """Harvest a little of layer 6, train a small TopK SAE, `msae eval RUN --evals core`."""
    from msae_core.data.harvest import harvest
    from msae_core.data.lm import load_lm
    from msae_core.runs.config import DataConfig, RunConfig, TrainConfig
    from msae_core.sae import SAEConfig
    from msae_core.data.store import StoreSettings
    from msae_core.training.trainer import train

    lm = load_lm("embedded", device="cpu")
    store = tmp_path / "store"
    harvest(StoreSettings(layer=6, target_tokens=1200, context_size=64), store, lm=lm, progress=False)
    del lm
    run = tmp_path / "run"
    cfg = RunConfig(sae=SAEConfig(arch="topk", d_in=0, d_sae=512, k=16),
                    train=TrainConfig(steps=100, batch_size=256, lr=1e-3, warmup_steps=10, device="cpu",
                                      checkpoint_every=1000, log_every=50, snapshot_every=0),
                    data=DataConfig(acts=str(store)))
    assert train(cfg, run, progress=False).state == "done"
    sets = ["core.batch_size_prompts=2", "core.n_eval_reconstruction_batches=1",
            "core.n_eval_sparsity_variance_batches=2", "core.context_size=32", "core.density_tokens=2000"]
    cmd = [sys.executable, "-m", "msae_core.cli", "eval", str(run), "--evals", "core", "--no-progress",
           "--device", "cpu"] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((run / "eval.json").read_text())["core"]
    m = res["eval_result_metrics"]
    assert res["eval_config"]["model_name"] == "embedded" and res["eval_config"]["context_size"] == 32
    assert res["eval_result_unstructured"]["windows"]["held_out"] is True
    perf = m["model_performance_preservation"]
    # Gemma 3 turns an all-zero residual stream into all-zero logits: ablation predicts uniformly
    assert perf["ce_loss_with_ablation"] == pytest.approx(math.log(262144), rel=1e-4)
    # zero-ablating layer 6 of a real LM wrecks it; a trained SAE does better than that
    assert perf["ce_loss_with_ablation"] > perf["ce_loss_without_sae"] + 1.0
    assert 0.0 < m["model_behavior_preservation"]["kl_div_score"] <= 1.0
    assert 0.0 < perf["ce_loss_score"] <= 1.0
    assert 0.0 < m["reconstruction_quality"]["explained_variance"] < 1.0
    assert m["sparsity"]["l0"] == pytest.approx(16.0)
    assert m["token_stats"]["total_tokens_eval_reconstruction"] == 2 * 32
    # the densities ran past the 2 x 2 x 32 sparsity/variance tokens, to the 2,000 asked for
    assert m["misc_metrics"]["dead_window_tokens"] >= 2000
    assert res["eval_result_unstructured"]["kept_tokens_sparsity_variance"] < 2 * 2 * 32
