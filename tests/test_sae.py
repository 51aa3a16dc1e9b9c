"""SAE modules: registry, the lam = 0 identity, the momentum tracker against a naive reference,
duplicate separation, the candidate cap, planted-direction recovery, save/load and export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from msae_core import sae_io
from msae_core.sae import MomentumConfig, SAEConfig, build_sae, registered_archs, sae_class
from msae_core.configutil import collect_problems, from_dict
from msae_core.sae.base import MOMENTUM_FIELDS, nest_momentum
from msae_core.runs.config import TrainConfig

GRAD_CLIP = TrainConfig().grad_clip


def _cfg(**kw) -> SAEConfig:
    """An SAE config; the momentum knobs (beta, lam, ...) given flat go to its MomentumConfig."""
    base = dict(arch="topk", d_in=16, d_sae=48, k=4, seed=0)
    base.update({k: v for k, v in kw.items() if k not in MOMENTUM_FIELDS})
    return SAEConfig(**base, momentum=MomentumConfig(**{k: v for k, v in kw.items() if k in MOMENTUM_FIELDS}))


def _sparse_data(n: int, dirs_TD: torch.Tensor, per_row: int, g: torch.Generator) -> torch.Tensor:
    """Rows that are sums of `per_row` ground-truth directions with magnitudes in [0.5, 1.5)."""
    T = dirs_TD.shape[0]
    idx = torch.rand(n, T, generator=g).argsort(1)[:, :per_row]
    mags = torch.rand(n, per_row, generator=g) + 0.5
    return (mags[..., None] * dirs_TD[idx]).sum(1)


def _train(sae, batches, lr=3e-3, start=0, clip=GRAD_CLIP):
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    losses = []
    for t, x in enumerate(batches, start):
        out = sae.training_loss(x, t)
        opt.zero_grad()
        out["loss"].backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), clip)  # as the trainer steps
        opt.step()
        sae.post_step_(t)
        losses.append({k: float(v.detach()) for k, v in out.items()})
    return losses


# ----------------------------------------------------------------------------------------- registry
def test_registry_builds_each_arch_and_refuses_unknown():
    assert {"relu", "topk", "batchtopk", "matryoshka", "jumprelu", "momentum"} <= set(registered_archs())
    for arch in ("relu", "topk", "batchtopk", "matryoshka", "jumprelu", "momentum"):
        sae = build_sae(_cfg(arch=arch))
        out = sae.forward(torch.randn(5, 16))
        assert out.x_hat.shape == (5, 16) and out.f.shape == (5, 48)
        assert torch.equal(sae.encode(torch.ones(2, 16)), sae.forward(torch.ones(2, 16)).f)
        assert "loss" in sae.training_loss(torch.randn(8, 16), 0)
    with pytest.raises(ValueError, match="unknown SAE architecture"):
        build_sae(_cfg(arch="gated"))


def test_sae_class_looks_up_the_registry_and_base_arch_names_the_sparsity():
    for arch in ("relu", "topk", "momentum"):
        assert type(build_sae(_cfg(arch=arch))) is sae_class(arch)
    with pytest.raises(ValueError, match="unknown SAE architecture"):
        sae_class("gated")
    assert _cfg(arch="relu", base="topk").base_arch == "relu"
    assert _cfg(arch="momentum", base="relu").base_arch == "relu"
    assert _cfg(arch="momentum", base="topk").base_arch == "topk"


def test_config_lists_every_problem_at_once():
    problems = collect_problems(_cfg(arch="momentum", k=0, beta=1.0, tau=1.5, lam=-1, d_sae=0))
    text = " | ".join(problems)
    for word in ("d_sae", "k must", "beta", "tau", "lam"):
        assert word in text, text
    # the momentum knobs' problems name their nested field (the Launch page marks the widget from it)
    assert {p.field for p in problems} == {"d_sae", "k", "momentum.beta", "momentum.tau", "momentum.lam"}


def test_momentum_knobs_written_flat_load_nested():
    """Configs before MomentumConfig wrote beta, tau, lam, ... beside arch: they load as today's."""
    flat = {"arch": "momentum", "d_in": 8, "d_sae": 16, "k": 2, "beta": 0.8, "lam": 0.2, "refresh_every": 7}
    nested = nest_momentum(flat)
    assert nested["momentum"] == {"beta": 0.8, "lam": 0.2, "refresh_every": 7} and "lam" not in nested
    assert from_dict(SAEConfig, nested) == _cfg(arch="momentum", d_in=8, d_sae=16, k=2, beta=0.8, lam=0.2,
                                                refresh_every=7)
    assert nest_momentum(nested) == nested  # today's format is left as it is


def test_topk_fires_exactly_k_and_relu_is_nonnegative():
    x = torch.randn(64, 16)
    f = build_sae(_cfg(arch="topk", k=5)).encode(x).detach()
    assert int((f > 0).sum(1).max()) <= 5 and float(f.min()) >= 0
    assert float(build_sae(_cfg(arch="relu")).encode(x).detach().min()) >= 0


def test_decoder_rows_stay_unit_norm_after_steps():
    g = torch.Generator().manual_seed(1)
    for arch in ("relu", "topk", "batchtopk", "matryoshka", "jumprelu"):
        sae = build_sae(_cfg(arch=arch))
        _train(sae, [torch.randn(32, 16, generator=g) for _ in range(5)], lr=1e-2)
        assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(48), atol=1e-5)


# ---------------------------------------------------------------------------- lam = 0 equals base
@pytest.mark.parametrize("base", ["topk", "relu", "batchtopk", "matryoshka", "jumprelu"])
def test_lambda_zero_momentum_equals_its_base_exactly(base):
    g = torch.Generator().manual_seed(2)
    dirs = torch.nn.functional.normalize(torch.randn(40, 16, generator=g), dim=1)
    batches = [_sparse_data(64, dirs, 3, g) for _ in range(30)]
    plain = build_sae(_cfg(arch=base, l1_coeff=0.01, dead_tokens_threshold=64))
    mom = build_sae(_cfg(arch="momentum", base=base, lam=0.0, l1_coeff=0.01, tau=0.1,
                         dead_tokens_threshold=64, refresh_every=10))
    for s in (plain, mom):
        s.fit_input_scale_(batches[0])
    lp = _train(plain, batches)
    lm = _train(mom, batches)
    assert [r["loss"] for r in lp] == [r["loss"] for r in lm]
    for name, p in plain.named_parameters():
        assert torch.equal(p, dict(mom.base.named_parameters())[name]), name
    # and the tracker did track something: lam = 0 is not "momentum switched off"
    tr = mom.tracker
    assert int(tr.n_updates) == 30 and float(tr.rate.sum()) > 0 and int((tr.partner_FC >= 0).sum()) > 0


# --------------------------------------------------------------------- tracker vs a naive reference
def test_momentum_buffers_match_a_naive_ema_reference():
    torch.manual_seed(0)
    F, beta, tau = 6, 0.8, 0.3
    sae = build_sae(_cfg(arch="momentum", base="relu", d_in=5, d_sae=F, beta=beta, tau=tau,
                         cofire_top=F, n_candidates=F - 1, refresh_every=0, admit_frac=0.0))
    g = torch.Generator().manual_seed(3)
    rate, mag = torch.zeros(F), torch.zeros(F)
    kappa = torch.zeros(F, F)
    was = torch.zeros(F, F, dtype=torch.bool)
    events = []
    for t in range(12):
        x = torch.randn(20, 5, generator=g)
        with torch.no_grad():
            f = sae.forward(x).f.double()
        sae.training_loss(x, t)  # no optimizer step: f is what the tracker saw
        rate = beta * rate + (1 - beta) * (f > 0).double().mean(0).float()
        mag = beta * mag + (1 - beta) * f.mean(0).float()
        s = torch.zeros(F, F)
        for i in range(F):
            for j in range(i + 1, F):
                den = (f[:, i].pow(2).sum() * f[:, j].pow(2).sum()).sqrt()
                if float((f[:, i] * f[:, j]).sum()) > 0:
                    s[i, j] = float((f[:, i] * f[:, j]).sum() / den)
        kappa = beta * kappa + (1 - beta) * s
        now = kappa >= tau
        for i, j in zip(*torch.where(now & ~was)):
            events.append((t, int(i), int(j), "up"))
        for i, j in zip(*torch.where(was & ~now)):
            events.append((t, int(i), int(j), "down"))
        was = now
    bias = 1 - beta ** 12
    assert torch.allclose(sae.tracker.rate_hat(), rate / bias, atol=1e-6)
    assert torch.allclose(sae.tracker.mag_hat(), mag / bias, atol=1e-5)
    table = torch.zeros(F, F)
    obs = sae.observables()
    for i, j, k in zip(obs.pair_i, obs.pair_j, obs.pair_kappa):
        table[int(i), int(j)] = float(k)
    assert torch.allclose(table, kappa, atol=1e-5)
    got = sorted((e.step, e.i, e.j, e.direction) for e in sae.drain_events())
    assert got == sorted(events) and len(events) > 0


def _naive_table_step(table, f, W_dec, t, cfg, prev):
    """One update of the candidate table by its definition (tracker.py's docstring), in plain Python:
    returns (new table {(i, j): [kappa, first, last]}, events)."""
    F, C, M, beta, tau = f.shape[1], cfg.n_candidates, cfg.cofire_top, cfg.beta, cfg.tau  # cfg: MomentumConfig
    q = f.pow(2).sum(0)
    s = {}
    for b in range(f.shape[0]):
        top = sorted(range(F), key=lambda i: -float(f[b, i]))[:M]
        for x in top:
            for y in top:
                if x < y and f[b, x] > 0 and f[b, y] > 0:
                    s[(x, y)] = s.get((x, y), 0.0) + float(f[b, x] * f[b, y] / (q[x] * q[y]).sqrt())
    s = {p: min(v, 1.0) for p, v in s.items()}
    cand = {p: (beta * v[0] + (1 - beta) * s.get(p, 0.0), v[1], v[2], 0) for p, v in table.items()}
    for p, v in s.items():
        if p not in cand and v >= cfg.admit_frac * tau:
            cand[p] = ((1 - beta) * v, -1, -1, 1)
    if cfg.refresh_every and t % cfg.refresh_every == 0:
        W = torch.nn.functional.normalize(W_dec.double(), dim=1)
        cos = W @ W.T
        for i in range(F):
            near = sorted((j for j in range(F) if j != i), key=lambda j: -float(cos[i, j]))[:C // 2]
            for j in near:
                p = (min(i, j), max(i, j))
                if cos[i, j] > 0 and p not in cand:
                    cand[p] = (0.0, -1, -1, 2)
    events = []
    for p, (k, first, last, group) in list(cand.items()):
        was, now = prev >= 0 and last == prev, k >= tau
        if now != was:
            events.append((t, p[0], p[1], "up" if now else "down"))
        cand[p] = (k, t if now and first < 0 else first, t if now else last, group)
    kept = set()
    for r in range(F):
        mine = sorted((p for p in cand if r in p), key=lambda p: (-cand[p][0], cand[p][3], p))
        kept |= {(r, p) for p in mine[:C]}
    return {p: list(v[:3]) for p, v in cand.items() if (p[0], p) in kept and (p[1], p) in kept}, events


@pytest.mark.parametrize("admit_frac", [0.0, 0.5])
def test_candidate_table_matches_a_naive_reference_with_eviction(admit_frac):
    """Rows of C = 2 slots among 10 features: most steps evict. The table (pairs, kappa, first and
    last competing step) and the events equal the definition's, step by step, with the batch's
    admission screen and the decoder-neighbour refresh."""
    F = 10
    cfg = _cfg(arch="momentum", base="relu", d_in=6, d_sae=F, beta=0.7, tau=0.25, cofire_top=4,
               n_candidates=2, refresh_every=3, admit_frac=admit_frac)
    sae = build_sae(cfg)
    g = torch.Generator().manual_seed(5)
    table, events, evicted = {}, [], 0
    for t in range(10):
        x = torch.randn(16, 6, generator=g)
        with torch.no_grad():
            f = sae.forward(x).f.double()
        sae.training_loss(x, t)  # no optimizer step: f is what the tracker saw
        before = set(table)
        table, ev = _naive_table_step(table, f, sae.W_dec.detach(), t, sae.cfg.momentum, t - 1)
        events += ev
        got = sae.tracker.table()
        got_pairs = {(int(k) // F, int(k) % F): (float(kap), int(a), int(b))
                     for k, kap, a, b in zip(got.key, got.kappa, got.first, got.last)}
        assert set(got_pairs) == set(table), t
        for p, (kap, first, last) in table.items():
            assert abs(got_pairs[p][0] - kap) < 1e-5 and got_pairs[p][1:] == (first, last), (t, p)
        evicted += len(before - set(table))
    assert evicted > 0 and any(e[3] == "up" for e in events)  # the cap bound and pairs competed
    assert sorted((e.step, e.i, e.j, e.direction) for e in sae.drain_events()) == sorted(events)


def test_candidate_table_never_exceeds_C_pairs_and_stays_symmetric():
    C = 3
    sae = build_sae(_cfg(arch="momentum", base="relu", d_in=8, d_sae=24, n_candidates=C,
                         cofire_top=24, refresh_every=5, tau=0.05))
    g = torch.Generator().manual_seed(4)
    _train(sae, [torch.randn(64, 8, generator=g) for _ in range(15)], lr=1e-2)
    obs = sae.observables()
    pairs = list(zip(obs.pair_i.tolist(), obs.pair_j.tolist()))
    assert len(pairs) > 24  # the table is busy: many features have partners
    degree = torch.zeros(24, dtype=torch.long)
    for i, j in pairs:
        degree[i] += 1
        degree[j] += 1
        assert j in sae.tracker.partner_FC[i].tolist() and i in sae.tracker.partner_FC[j].tolist()
    assert int(degree.max()) <= C
    assert int(degree.max()) == C  # the cap binds somewhere, so the check above means something


# ------------------------------------------------------------------------ duplicates get separated
def _duplicate_run(lam: float, steps: int = 200):
    """A ReLU-base momentum SAE whose features 0 and 1 start as near-duplicates of one planted
    direction. Returns (step the pair first crossed tau or None, co-firing of 0 and 1 at the end)."""
    g = torch.Generator().manual_seed(0)
    D, T = 32, 48
    dirs = torch.nn.functional.normalize(torch.randn(T, D, generator=g), dim=1)
    sae = build_sae(_cfg(arch="momentum", base="relu", d_in=D, d_sae=64, l1_coeff=0.01,
                         beta=0.9, tau=0.3, lam=lam, n_candidates=8, refresh_every=50,
                         cofire_top=64))  # the toy L1 SAE is dense: count all co-firing
    with torch.no_grad():
        sae.W_dec[0] = dirs[0]
        sae.W_enc[:, 0] = dirs[0]
        sae.W_dec[1] = torch.nn.functional.normalize(dirs[0] + 0.05 * torch.randn(D, generator=g), dim=0)
        sae.W_enc[:, 1] = sae.W_dec[1]
    opt = torch.optim.Adam(sae.parameters(), 3e-3)
    first_up, kappa_max = None, 0.0
    for t in range(steps):
        x = _sparse_data(256, dirs, 3, g)
        loss = sae.training_loss(x, t)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        sae.post_step_(t)
        for e in sae.drain_events():
            if {e.i, e.j} == {0, 1} and e.direction == "up" and first_up is None:
                first_up = t
        row = sae.tracker.kappa_FC[0][sae.tracker.partner_FC[0] == 1]
        kappa_max = max(kappa_max, float(row.max()) if len(row) else 0.0)
    x = _sparse_data(2048, dirs, 3, g)
    with torch.no_grad():
        f = sae.encode(x)
    both = ((f[:, 0] > 0) & (f[:, 1] > 0)).float().sum()
    either = ((f[:, 0] > 0) | (f[:, 1] > 0)).float().sum().clamp_min(1)
    return first_up, kappa_max, float(both / either)


@pytest.mark.slow
def test_penalty_separates_a_duplicated_pair_the_plain_loss_keeps():
    first_up, kappa_max, cofire_pen = _duplicate_run(lam=0.1)
    assert first_up is not None and first_up < 20 and kappa_max >= 0.3  # detected, early
    assert cofire_pen < 0.05  # separated: they (almost) never fire together any more
    _, _, cofire_plain = _duplicate_run(lam=0.0)
    assert cofire_plain > 0.15  # the control: without the penalty the duplicates keep co-firing


# --------------------------------------------------------------------------- known-answer recovery
@pytest.mark.slow
@pytest.mark.parametrize("arch,extra", [("topk", {}), ("relu", {"l1_coeff": 1.0}), ("batchtopk", {}),
                                        # a prefix narrower than the 32 independent planted directions must
                                        # reconstruct with mixtures of them ([8, 32]: 72 % recovered)
                                        ("matryoshka", {"matryoshka_widths": [32]}), ("jumprelu", {}),
                                        ("momentum", {"base": "topk", "lam": 0.3}),
                                        ("momentum", {"base": "batchtopk", "lam": 0.3})])
def test_each_arch_recovers_planted_sparse_directions(arch, extra):
    # 32 directions in 24 dims, 3 active per row. The L1 coefficient is in units of the normalised
    # input (mean norm sqrt(D)); below ~0.5 here the L1 SAE settles on a dense code (L0 ~ 30 of 64).
    g = torch.Generator().manual_seed(5)
    D, T = 24, 32
    dirs = torch.nn.functional.normalize(torch.randn(T, D, generator=g), dim=1)
    sae = build_sae(_cfg(arch=arch, d_in=D, d_sae=64, k=3, dead_tokens_threshold=2048, seed=1, **extra))
    data = [_sparse_data(512, dirs, 3, g) for _ in range(1500)]
    sae.fit_input_scale_(data[0])
    _train(sae, data, lr=3e-3)
    W = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)
    best = (dirs @ W.T).max(dim=1).values  # best decoder cosine of each planted direction
    assert float((best >= 0.9).float().mean()) >= 0.9, best
    if sae.cfg.base_arch in ("batchtopk", "matryoshka"):  # the learned threshold keeps about k per token
        sae.eval()
        l0 = float((sae.encode(_sparse_data(2048, dirs, 3, g)) > 0).sum(1).float().mean())
        assert 2.0 <= l0 <= 4.5, l0


# ------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "matryoshka", "jumprelu", "momentum"])
def test_save_load_round_trip_gives_identical_outputs_and_state(arch, tmp_path):
    g = torch.Generator().manual_seed(6)
    sae = build_sae(_cfg(arch=arch, lam=0.2, tau=0.1))
    batches = [torch.randn(32, 16, generator=g) for _ in range(12)]
    sae.fit_input_scale_(batches[0])
    _train(sae, batches[:6])
    sae_io.save_sae(sae, tmp_path)
    back = sae_io.load_sae(tmp_path)
    assert type(back).__name__ == type(sae).__name__
    for (n, a), (_, b) in zip(sorted(sae.state_dict().items()), sorted(back.state_dict().items())):
        assert torch.equal(a, b), n
    x = torch.randn(10, 16, generator=g)
    assert torch.equal(sae.forward(x).x_hat, back.forward(x).x_hat)
    # the momentum table and EMAs survive, so training continues the same way
    la = _train(sae, batches[6:], start=6)
    lb = _train(back, batches[6:], start=6)
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]


LEGACY_DIR = Path(__file__).parent / "data" / "momentum_sae_v1"


def _legacy_recipe():
    """How tests/data/momentum_sae_v1 was made, with the code of commit 5c337f5 (before MomentumSAE
    composed a base SAE and a MomentumTracker; its state_dict keys were W_enc ..., rate, mag,
    n_updates, last_update_step, cand_j, cand_kappa, cand_first, cand_last): `sae_io.save_sae` of
    this SAE, and expected.safetensors with `forward(x)`, the observables ("obs_" + key, booleans
    as uint8) and the sorted loss terms of three more steps (Adam lr 3e-3, batches of
    torch.randn(32, 16) from a generator seeded 12, steps 10 to 12)."""
    sae = build_sae(_cfg(arch="momentum", base="topk", lam=0.2, tau=0.1, refresh_every=3, n_candidates=4))
    g = torch.Generator().manual_seed(11)
    batches = [torch.randn(32, 16, generator=g) for _ in range(10)]
    sae.fit_input_scale_(batches[0])
    _train(sae, batches)
    return sae, torch.randn(10, 16, generator=g)


def test_a_momentum_sae_saved_by_the_first_format_loads_with_identical_outputs(tmp_path):
    saved = load_file(str(LEGACY_DIR / "sae.safetensors"))
    want = load_file(str(LEGACY_DIR / "expected.safetensors"))
    sae = sae_io.load_sae(LEGACY_DIR)
    state = sae_io.disk_state(sae.state_dict())
    assert sorted(state) == sorted(saved)  # the module's state has the file's names on disk
    for name, t in saved.items():
        assert torch.equal(state[name], t), name
    with torch.no_grad():
        out = sae.forward(want["x"])
    torch.testing.assert_close(out.x_hat, want["x_hat"], rtol=1e-6, atol=1e-6)
    assert torch.equal(out.f != 0, want["f"] != 0)
    obs = sae.observables()._asdict()
    assert sorted(obs) == sorted(k.removeprefix("obs_") for k in want if k.startswith("obs_"))
    # the pair table is a set: compared in key order (the first format listed a row's pairs by kappa)
    F = sae.cfg.d_sae
    order_now = (obs["pair_i"] * F + obs["pair_j"]).argsort()
    order_then = (want["obs_pair_i"].long() * F + want["obs_pair_j"].long()).argsort()
    for k, v in obs.items():
        w = want["obs_" + k]
        if k.startswith("pair_"):
            v, w = v[order_now], w[order_then]
        torch.testing.assert_close(v.to(w.dtype), w, rtol=1e-6, atol=1e-6)
    g = torch.Generator().manual_seed(12)
    # the losses were recorded with an unclipped loop (before the trainer clipped gradients)
    losses = _train(sae, [torch.randn(32, 16, generator=g) for _ in range(3)], start=10, clip=0)
    got = torch.tensor([[r[k] for k in sorted(r)] for r in losses], dtype=torch.float64)
    torch.testing.assert_close(got, want["more_losses"], rtol=1e-5, atol=1e-6)
    # today's code writes the same names, shapes and dtypes
    sae_io.save_sae(_legacy_recipe()[0], tmp_path)
    now = load_file(str(tmp_path / "sae.safetensors"))
    assert {k: (v.shape, v.dtype) for k, v in now.items()} == {k: (v.shape, v.dtype) for k, v in saved.items()}


def test_load_refuses_missing_or_foreign_weights(tmp_path):
    from msae_core.errors import MsaeError

    with pytest.raises(MsaeError, match="missing"):
        sae_io.load_sae(tmp_path)
    sae_io.save_sae(build_sae(_cfg()), tmp_path)
    (tmp_path / "sae_config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(MsaeError, match="not an msae SAE config"):
        sae_io.load_sae(tmp_path)


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "matryoshka", "jumprelu", "momentum"])
def test_saelens_export_reconstructs_like_ours_with_saelens_math(arch, tmp_path):
    """Read the export back with SAELens's own forward (raw inputs, no normalisation):
    standard: f = relu((x - b_dec) W_enc + b_enc); topk: keep the k largest of that; jumprelu:
    relu(pre) where pre > threshold; x_hat = f W_dec + b_dec."""
    g = torch.Generator().manual_seed(7)
    sae = build_sae(_cfg(arch=arch))
    x = 7.0 * torch.randn(64, 16, generator=g) + 3.0  # raw activations far from unit scale
    sae.fit_input_scale_(x)
    _train(sae, [x] * 5)
    sae_io.export_saelens(sae, tmp_path, model_name="m", hook_name="blocks.3.hook_resid_post")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    w = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert {"d_in", "d_sae", "architecture", "apply_b_dec_to_input", "normalize_activations"} <= set(cfg)
    assert cfg["architecture"] == {"relu": "standard", "batchtopk": "jumprelu", "matryoshka": "jumprelu",
                                   "jumprelu": "jumprelu"}.get(arch, "topk")
    assert w["W_enc"].shape == (16, 48) and w["W_dec"].shape == (48, 16)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "topk":
        v, i = pre.topk(cfg["k"], dim=-1)
        f = torch.zeros_like(pre).scatter_(-1, i, torch.relu(v))
    elif cfg["architecture"] == "jumprelu":
        assert w["threshold"].shape == (48,)
        f = torch.relu(pre) * (pre > w["threshold"])
        assert 0 < float((f > 0).sum(1).float().mean()) < 48
    else:
        f = torch.relu(pre)
    x_hat = f @ w["W_dec"] + w["b_dec"]
    assert torch.allclose(x_hat, sae.forward(x).x_hat.detach(), atol=1e-4, rtol=1e-4)
    assert cfg["hook_layer"] == 3


@pytest.mark.parametrize("base", ["relu", "topk", "batchtopk", "jumprelu"])
def test_saebench_wrapper_has_the_custom_sae_interface(base):
    """SAEBench's units: unit-norm decoder rows in input units, latents times their decoder norms,
    the same reconstruction; a ReLU SAE's latents are relu((x - b_dec) W_enc + b_enc) exactly."""
    sae = build_sae(_cfg(arch="momentum", base=base))
    with torch.no_grad():
        sae.input_scale.fill_(0.25)  # a scale != 1 is what makes the units matter
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, 48)[:, None])  # rows of different norms
    w = sae_io.SAEBenchSAE(sae, model_name="m", hook_layer=2)
    x = torch.randn(4, 16) * 3
    assert torch.allclose(w(x), sae.forward(x).x_hat, atol=1e-5)
    assert w.W_enc.shape == (16, 48) and w.cfg.d_sae == 48 and w.cfg.hook_name == "blocks.2.hook_resid_post"
    assert torch.allclose(w.W_dec.norm(dim=1), torch.ones(48), atol=1e-5)
    raw_norm = (sae.W_dec.detach() / 0.25).norm(dim=1)
    assert torch.allclose(w.encode(x), sae.encode(x) * raw_norm, rtol=1e-5, atol=1e-6)
    assert torch.equal(w.encode(x) != 0, sae.encode(x) != 0)
    if base == "relu":
        assert torch.allclose(w.encode(x), torch.relu((x - w.b_dec) @ w.W_enc + w.b_enc), rtol=1e-5, atol=1e-5)
    if hasattr(w.cfg, "activation_fn_str"):
        assert w.cfg.activation_fn_str == {"relu": "relu", "topk": "topk"}.get(base, "jumprelu")


@pytest.mark.parametrize("ragged", [False, True])
def test_the_tracker_reads_a_bases_entries_as_it_reads_the_dense_latents(ragged):
    """TopK hands the tracker its k entries per token, BatchTopK a varying number: the firing sums,
    each token's co-firing pairs and the penalty's gradient equal those of the dense (B, F) tensor."""
    from msae_core.sae.base import ActiveLatents
    from msae_core.sae.competition import Table, cofiring, competition_loss, firing_sums, occurrence_scores

    g = torch.Generator().manual_seed(9)
    B, F, K, M = 12, 30, 6, 4
    pre = torch.rand(B, F, generator=g)
    idx_BK = pre.topk(K, dim=1).indices
    val_BK = torch.rand(B, K, generator=g) * (torch.rand(B, K, generator=g) > 0.2)  # some entries 0
    if ragged:  # drop some entries: tokens keep 2 to K
        keep = torch.arange(K)[None, :] < torch.randint(2, K + 1, (B, 1), generator=g)
        tok, slot = keep.nonzero(as_tuple=True)
        entries = (val_BK[tok, slot], tok, idx_BK[tok, slot], 0)
        val_BK = val_BK * keep
    else:
        entries = (val_BK.reshape(-1), torch.arange(B).repeat_interleave(K), idx_BK.reshape(-1), K)
    val_e = entries[0].clone().requires_grad_(True)
    f_dense = torch.zeros(B, F).scatter(1, idx_BK, val_BK).requires_grad_(True)
    f_from_e = torch.zeros(B, F).index_put((entries[1], entries[2]), val_e)
    active = ActiveLatents(val_e, entries[1], entries[2], entries[3])
    for a, b in zip(firing_sums(f_dense, None), firing_sums(f_from_e, active)):
        torch.testing.assert_close(a, b)
    dense, sparse = cofiring(f_dense, None, M), cofiring(f_from_e, active, M)

    def occurrences(cof):
        q = firing_sums(f_dense, None)[2]
        c = occurrence_scores(cof, q, F)
        tok = torch.arange(B).repeat_interleave(len(cof.slot_a_S))
        return sorted((int(t), int(k), round(float(x), 6)) for t, k, x, a in zip(tok, cof.key_P, c, cof.active_P) if a)

    assert occurrences(dense) == occurrences(sparse) and len(occurrences(dense)) > B
    keys = torch.unique(dense.key_P[dense.active_P])[:8]
    table = Table(keys, torch.full((len(keys),), 0.9), torch.zeros(len(keys), dtype=torch.int32),
                  torch.zeros(len(keys), dtype=torch.int32))
    mag = torch.rand(F, generator=g) + 0.1
    loss_d, loss_s = competition_loss(dense, table, mag, 0.4, B), competition_loss(sparse, table, mag, 0.4, B)
    torch.testing.assert_close(loss_d, loss_s)
    assert float(loss_d.detach()) > 0
    loss_d.backward()
    loss_s.backward()
    torch.testing.assert_close(f_dense.grad[entries[1], entries[2]], val_e.grad)


@pytest.mark.parametrize("F", [40, 5000])  # 5000^2 keys exceed the hash table: collisions happen
def test_admission_screen_equals_exact_grouping(F):
    """batch_scores keeps exactly the table pairs plus the new pairs whose summed s >= admit."""
    from msae_core.sae.competition import batch_scores

    g = torch.Generator().manual_seed(8)
    n_pairs = 3000 if F > 100 else 300
    lo = torch.randint(0, F - 1, (n_pairs,), generator=g)
    hi = lo + 1 + (torch.rand(n_pairs, generator=g) * (F - 1 - lo)).long()
    pair_keys = torch.unique(lo * F + hi)
    k_occ = pair_keys[torch.randint(0, len(pair_keys), (20 * len(pair_keys),), generator=g)]
    c = torch.rand(len(k_occ), generator=g) * 0.02
    o_key = pair_keys[torch.randperm(len(pair_keys), generator=g)[:50]].sort().values  # the table's, ascending
    active = torch.rand(len(k_occ), generator=g) < 0.9  # inactive occurrences (c = 0) count nowhere
    c = c * active
    s_old, new_keys, s_new = batch_scores(k_occ, c, active, o_key, 0.2, F)
    keys, s = torch.cat([o_key, new_keys]), torch.cat([s_old, s_new])
    assert not bool(torch.isin(new_keys, o_key).any())  # new pairs are new
    u, inv = torch.unique(k_occ, return_inverse=True)
    exact = torch.zeros(len(u)).index_add_(0, inv, c)
    want = {int(k): float(v) for k, v in zip(u, exact.clamp(0, 1)) if v >= 0.2 or bool((o_key == k).any())}
    for k in o_key.tolist():
        want.setdefault(k, 0.0)
    got = {int(k): float(v) for k, v in zip(keys, s)}
    assert got.keys() == want.keys()
    assert all(abs(got[k] - want[k]) < 1e-5 for k in want)
    assert 0 < sum(v >= 0.2 for v in want.values()) < len(u)  # the screen had something to do


def test_topk_sparse_decoder_equals_the_dense_one():
    """TopK decodes with embedding_bag over the k active rows (and AuxK over the k_aux dead ones):
    losses and every gradient equal the dense f @ W_dec formulation up to float rounding."""
    import torch.nn.functional as Fn

    torch.manual_seed(0)
    sae = build_sae(_cfg(arch="topk", d_in=32, d_sae=96, k=6, dead_tokens_threshold=1))
    sae.tokens_since_fired[::3] = 5  # a third of the latents dead: AuxK on
    x = torch.randn(64, 32)
    dead = sae.dead_mask.clone()  # as the loss sees it (loss_terms then counts this batch's firing)
    losses, out = sae.loss_terms(x, 0)
    losses["loss"].backward()
    sparse_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()

    # the dense reference, from the same parameters
    x_n = x * sae.input_scale
    pre = (x_n - sae.b_dec) @ sae.W_enc + sae.b_enc
    v, i = pre.topk(6, dim=-1, sorted=False)
    f = torch.zeros_like(pre).scatter(-1, i, Fn.relu(v))
    x_hat_n = f @ sae.W_dec + sae.b_dec
    mse = (x_n - x_hat_n).pow(2).sum(-1).mean()
    e = (x_n - x_hat_n).detach()
    dv, di = pre.masked_fill(~dead, float("-inf")).topk(min(16, int(dead.sum())), dim=-1, sorted=False)
    aux_f = torch.zeros_like(pre).scatter(-1, di, Fn.relu(dv))
    var_x = (x_n - x_n.mean(0)).pow(2).sum(-1).mean()  # Gao's nmse(e, e_hat), in the main MSE's units
    auxk = var_x * (e - aux_f @ sae.W_dec).pow(2).sum(-1).mean() / (e - e.mean(0)).pow(2).sum(-1).mean()
    ref = mse + sae.cfg.auxk_coeff * auxk
    ref.backward()
    torch.testing.assert_close(losses["loss"], ref)
    torch.testing.assert_close(out.f, f)
    torch.testing.assert_close(out.x_hat, x_hat_n / sae.input_scale)
    for n, p in sae.named_parameters():
        torch.testing.assert_close(sparse_grads[n], p.grad, rtol=1e-4, atol=1e-6)
    assert auxk > 0


def test_batchtopk_keeps_the_batchs_largest_and_learns_its_threshold():
    """Training keeps the B k largest ReLU(pre) entries of the whole batch (a naive sort of every
    entry), decodes them sparsely with the dense formulation's loss and gradients; the threshold
    is the running mean, then the EMA, of the smallest kept value; inference applies it."""
    g = torch.Generator().manual_seed(21)
    sae = build_sae(_cfg(arch="batchtopk", k=3, threshold_beta=0.5, dead_tokens_threshold=10_000))
    x = torch.randn(20, 16, generator=g)
    sae.fit_input_scale_(x)
    pre = sae.pre_activation(x * sae.input_scale).detach()
    f, vals, tok, lat = sae.batch_topk(pre)
    flat = torch.relu(pre).reshape(-1)
    keep = flat >= flat.sort(descending=True).values[20 * 3 - 1]  # naive: the 60 largest
    assert torch.equal(f.reshape(-1) > 0, keep & (flat > 0))
    assert int((f > 0).sum()) == 60 and len(set((f > 0).sum(1).tolist())) > 1  # per token varies
    assert torch.equal(f[tok, lat], vals)
    # the sparse decoder: loss and gradients of the dense f @ W_dec formulation
    dense = build_sae(sae.cfg)
    dense.load_state_dict(sae.state_dict())
    loss = sae.training_loss(x, 0)["loss"]
    loss.backward()
    x_n = x * dense.input_scale
    f_d = dense.batch_topk(dense.pre_activation(x_n))[0]
    loss_d = (x_n - (f_d @ dense.W_dec + dense.b_dec)).pow(2).sum(-1).mean()
    loss_d.backward()
    torch.testing.assert_close(loss, loss_d, rtol=1e-5, atol=1e-6)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(sae, name).grad, getattr(dense, name).grad, rtol=1e-4, atol=1e-5)
    # the threshold: the first kept minimum, a running mean while 1 - 1/n < beta, then the EMA
    sae = build_sae(_cfg(arch="batchtopk", k=3, threshold_beta=0.5, dead_tokens_threshold=10_000))
    sae.fit_input_scale_(x)
    assert float(sae.threshold) == -1
    want = None
    for t in range(4):
        xb = torch.randn(20, 16, generator=g)
        kept = sae.batch_topk(sae.pre_activation(xb * sae.input_scale).detach())[1]
        m = float(kept[kept > 0].min())
        sae.training_loss(xb, t)
        b = min(0.5, 1 - 1 / (t + 1))
        want = m if want is None else b * want + (1 - b) * m
        assert float(sae.threshold) == pytest.approx(want, rel=1e-5)
    sae.eval()
    pre = sae.pre_activation(x * sae.input_scale).detach()
    assert torch.equal(sae.encode(x).detach(), torch.relu(pre) * (pre > sae.threshold))


def test_matryoshka_adds_each_prefix_reconstruction_to_the_loss():
    """Each prefix w of the one batch selection reconstructs on its own: its MSE equals the dense
    f[:, :w] @ W_dec[:w] formulation, and the loss is the BatchTopK loss plus these."""
    g = torch.Generator().manual_seed(22)
    sae = build_sae(_cfg(arch="matryoshka", k=3, matryoshka_widths=[6, 24], dead_tokens_threshold=10_000))
    assert sae.levels == [6, 24, 48]
    x = torch.randn(20, 16, generator=g)
    sae.fit_input_scale_(x)
    losses = sae.training_loss(x, 0)
    x_n = x * sae.input_scale
    f = sae.batch_topk(sae.pre_activation(x_n))[0].detach()
    for w in (6, 24):
        want = (x_n - (f[:, :w] @ sae.W_dec[:w] + sae.b_dec)).pow(2).sum(-1).mean()
        torch.testing.assert_close(losses[f"mse_w{w}"], want, rtol=1e-5, atol=1e-6)
    total = losses["mse"] + sae.cfg.auxk_coeff * losses["auxk"] + losses["mse_w6"] + losses["mse_w24"]
    torch.testing.assert_close(losses["loss"], total)
    assert _cfg(arch="matryoshka", k=3, matryoshka_widths=[24, 6]).problems()
    assert any("must be >= k" in p for p in _cfg(arch="matryoshka", k=8, matryoshka_widths=[4, 24]).problems())
    assert build_sae(_cfg(arch="matryoshka", k=3)).levels == [3, 12, 48]  # the defaults that fit


def test_jumprelu_straight_through_gradients_equal_the_rectangle_kernel():
    """f = pre H(pre - theta): d f/d pre = H, d f/d theta = -(theta/eps) 1[|pre - theta| < eps/2];
    L0's d/d theta = -(1/eps) 1[...], and none for pre; the loss is MSE + l0_coeff L0, or
    l0_coeff (L0 / target - 1)^2 with a target."""
    from msae_core.sae.jumprelu import _JumpReLU, _Step

    eps = 0.1
    theta = torch.tensor([0.5, 1.0, 2.0])
    pre = torch.tensor([[0.46, 1.2, 1.0], [0.7, 0.97, 2.04], [0.2, 1.06, 3.0]], requires_grad=True)
    th = theta.clone().requires_grad_(True)
    g = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    f = _JumpReLU.apply(pre, th, eps)
    assert torch.equal(f.detach(), pre.detach() * (pre.detach() > theta))
    f.backward(g)
    near = ((pre.detach() - theta).abs() < eps / 2).float()
    torch.testing.assert_close(pre.grad, g * (pre.detach() > theta))
    torch.testing.assert_close(th.grad, (-(theta / eps) * near * g).sum(0))
    pre.grad, th.grad = None, None
    _Step.apply(pre, th, eps).backward(g)
    assert pre.grad is None
    torch.testing.assert_close(th.grad, (-(1 / eps) * near * g).sum(0))
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(23))
    for target in (0.0, 5.0):
        sae = build_sae(_cfg(arch="jumprelu", l0_coeff=0.5, target_l0=target))
        sae.fit_input_scale_(x)
        losses = {k: v.detach() for k, v in sae.training_loss(x, 0).items()}
        l0 = float((sae.encode(x) > 0).sum(1).float().mean())
        assert float(losses["l0_loss"]) == pytest.approx(l0)
        sparsity = (l0 / target - 1) ** 2 if target else l0
        assert float(losses["loss"]) == pytest.approx(float(losses["mse"]) + 0.5 * sparsity, rel=1e-5)


def test_dead_window_follows_the_run_length():
    """0 = from the run: a twentieth of its tokens, 100,000 to 10M; resolved (and so recorded in the
    run's config) when a run config is checked; an SAE built outside a trainer uses the floor."""
    from msae_core.sae.base import auto_dead_tokens, dead_window
    from msae_core.runs.config import DataConfig, RunConfig, TrainConfig

    assert auto_dead_tokens(2000 * 1024) == 102_400  # the CPU benchmark's 2M-token runs
    assert auto_dead_tokens(500 * 1024) == 100_000 and auto_dead_tokens(10 ** 12) == 10_000_000
    assert auto_dead_tokens(100_000_000) == 5_000_000
    assert dead_window(_cfg()) == 100_000 and dead_window(_cfg(dead_tokens_threshold=7)) == 7
    sae = build_sae(_cfg(d_in=4, d_sae=8, k=2))
    sae.tokens_since_fired.fill_(99_999)
    assert not sae.dead_mask.any()
    sae.tokens_since_fired[3] = 100_000
    assert sae.dead_mask.tolist() == [i == 3 for i in range(8)]
    assert _cfg(dead_tokens_threshold=-1).problems()

    class Store:  # what RunConfig's check reads of an activation store
        d_in, n_rows, manifest, streamed = 4, 10 ** 9, {}, False

    cfg = RunConfig(sae=_cfg(d_in=4, d_sae=8, k=2), train=TrainConfig(steps=25_000, batch_size=4096), data=DataConfig(acts="a-store"))
    assert cfg.check(Store())[0].sae.dead_tokens_threshold == 5_120_000
    assert cfg.sae.dead_tokens_threshold == 0  # the config itself is a value
    fixed = RunConfig(sae=_cfg(d_in=4, d_sae=8, k=2, dead_tokens_threshold=300),
                      train=TrainConfig(steps=25_000, batch_size=4096), data=DataConfig(acts="a-store"))
    assert fixed.check(Store())[0].sae.dead_tokens_threshold == 300


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka", "jumprelu", "relu", "momentum"])
def test_bf16_autocast_keeps_the_batch_by_latent_tensors_in_bf16(arch):
    """Under bf16 autocast (--bf16 on CUDA; the CPU's autocast here) the (B, F) pre-activations and
    latents of every architecture come out bf16: an fp32 bias added to the bf16 product made them
    fp32, so --bf16 saved no activation memory."""
    torch.manual_seed(0)
    kw = {"k": 8} if arch in ("topk", "batchtopk", "matryoshka", "momentum") else {}
    sae = build_sae(SAEConfig(arch=arch, d_in=32, d_sae=128, **kw))
    x = torch.randn(64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        step = sae.loss_terms(x, 0)
    assert step.out.pre_acts.dtype == torch.bfloat16 and step.out.f.dtype == torch.bfloat16, \
        (step.out.pre_acts.dtype, step.out.f.dtype)
    assert torch.isfinite(step.losses["loss"]).all()
