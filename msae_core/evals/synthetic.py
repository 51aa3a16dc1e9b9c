"""The `synthetic` eval: an SAE trained on a `msae synth` store, scored against the features that
generated it (msae_core.data.synth), on fresh rows of the same distribution (never the rows
trained on; `random_seed` picks them).

Definitions (G true features with unit directions d_g, F latents; a latent's activation and its
decoder row are taken in input units, decoder rows normalised: SAEBench's units, sae_io). Only
latents that fire on the eval rows take part in a matching (a first pass over the rows finds them):
a dictionary holding dead copies of the true directions matches nothing with them.

- matching: the one-to-one matching of alive latents to features that maximises the summed |cos|
  (Hungarian algorithm); a pair counts as a match only at cos >= `match_cosine`, else the feature
  is unmatched. `n_unmatched` says how many; `n_matched_dead_if_all` how many features the same
  matching over all latents (dead ones too, as SAELens's SynthSAEBench matches) gives a dead latent.
- recovery of feature g: max cos(W_dec_f, d_g) over alive latents; `frac_recovered`: recovery >=
  `recovered_cosine`.
- MCC: the summed |cos| of the matching over alive latents divided by G (a feature left without an
  alive latent counts 0). `mcc_all_latents` is SAELens's `mean_correlation_coefficient`: the same
  matching over every latent, averaged over its pairs.
- uniqueness: distinct features among each alive latent's best |cos| feature, over F (SAELens's
  `feature_uniqueness` over the alive latents).
- precision, recall, F1: SAELens's definition: each latent a detector of its best |cos| feature
  (fires > 0 against the feature on), per-latent values averaged over all F latents (a dead latent
  counts 0). `matched_f1`: the same for each feature's matched latent, averaged over G (an
  unmatched feature counts 0).
- a parent's firings (a parent: a feature with children), on the rows where p and at least one of
  its descendants fire, each one of:
  kept: p's matched latent carries at least `silent_fraction` of p's magnitude in that row along
  d_p (its activation times cos(its decoder row, d_p); a latent leaking a sliver counts silent);
  absorbed: not kept, and the matched latents of the firing descendants carry p's direction: the
  sum of their activations times cos(their decoder row, d_p) reaches `carry_fraction` of p's
  magnitude; lost: neither (no latent carries p: a method cannot score well by dropping parents).
  `mean_absorption`, `mean_lost` and `mean_kept` average each fraction over the parents with at
  least `min_parent_rows` such rows (they sum to 1); `by_level` gives them per depth of the parent
  (0: roots). An oracle SAE scores absorption 0 and kept 1; an SAE whose child latents hold child +
  parent and whose parent latent is silent when a child fires scores absorption 1. The
  absorption interval: a bootstrap over the parents and, within each, its rows
  (evals.stats.bootstrap_ci_counts), at `confidence`.
- explained variance 1 - sum ||x - x_hat||^2 / sum ||x - mean x||^2, mse per element, l2_ratio
  (mean ||x_hat|| / ||x||), l0 of the SAE and of the truth, frac_dead (never fired on the rows).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from msae_core.errors import MsaeError
from msae_core.evals.schema import make_result

log = logging.getLogger(__name__)

EVAL_TYPE_ID = "synthetic"
COMPUTED_BY = "msae synthetic ground truth (SAELens SynthSAEBench's MCC, uniqueness and F1 definitions)"


@dataclass
class Config:
    n_eval_rows: int = field(default=20_000, metadata={"help": "fresh rows drawn from the store's generator"})
    batch_size: int = field(default=4096, metadata={"help": "rows per forward"})
    random_seed: int = field(default=0, metadata={"help": "which fresh rows (never the training rows)"})
    recovered_cosine: float = field(default=0.9, metadata={"help": "recovery at or above this counts as recovered"})
    carry_fraction: float = field(default=0.5, metadata={
        "help": "absorbed when the children's latents carry this fraction of the parent's magnitude"})
    silent_fraction: float = field(default=0.1, metadata={
        "help": "a parent's latent carrying less than this fraction of its magnitude counts as silent"})
    match_cosine: float = field(default=0.5, metadata={
        "help": "a latent matches a feature only at this decoder cosine or above"})
    min_parent_rows: int = field(default=20, metadata={"help": "parents with fewer co-firing rows are left out"})
    confidence: float = field(default=0.95, metadata={
        "help": "level of the absorption interval (a bootstrap over parents and their co-firing rows)"})


def _cos(a_AD: torch.Tensor, b_BD: torch.Tensor) -> torch.Tensor:
    a = a_AD / a_AD.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b_BD / b_BD.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return a @ b.T


def hungarian(abs_cos_FG: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(latents, features) of the one-to-one matching maximising the summed |cos|."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(1.0 - abs_cos_FG.double().cpu().numpy())
    return rows, cols


class GroundTruthScorer:
    """Accumulates the metrics above over batches of (x, true magnitudes, latents, x_hat), given
    which latents fire on those rows (`alive_F`: the first pass; every latent when None)."""

    def __init__(self, W_dec_FD: torch.Tensor, feats: Any, cfg: Config, alive_F: torch.Tensor | None = None):
        self.cfg = cfg
        self.feats = feats
        dirs_GD = feats.directions_FD.to(W_dec_FD)
        F, G = W_dec_FD.shape[0], dirs_GD.shape[0]
        self.F, self.G = F, G
        cos_FG = _cos(W_dec_FD, dirs_GD)
        alive = torch.ones(F, dtype=torch.bool) if alive_F is None else alive_F.bool().cpu()
        self.alive_F = alive
        idx_A = torch.nonzero(alive).flatten()
        cos_AG = cos_FG[idx_A.to(cos_FG.device)]
        # SAELens's matching over every latent: how many features it gives a dead latent
        lat_all, feat_all = hungarian(cos_FG.abs())
        self.mcc_all = float(cos_FG.abs()[lat_all, feat_all].mean()) if len(lat_all) else 0.0
        self.n_matched_dead_if_all = int((~alive[torch.as_tensor(lat_all, dtype=torch.int64)]).sum()) \
            if len(lat_all) else 0
        self.recovery_G = cos_AG.max(dim=0).values.float().cpu() if len(idx_A) else torch.zeros(G)
        lat, feat = hungarian(cos_AG.abs()) if len(idx_A) else (np.zeros(0, int), np.zeros(0, int))
        lat_F = idx_A[torch.as_tensor(lat, dtype=torch.int64)]
        pair_cos = cos_FG[lat_F.to(cos_FG.device), torch.as_tensor(feat, device=cos_FG.device)].float().cpu()
        self.mcc = float(pair_cos.abs().sum()) / G if G else 0.0
        good = pair_cos >= cfg.match_cosine
        self.match_G = torch.full((G,), -1, dtype=torch.int64)
        self.match_G[torch.as_tensor(feat, dtype=torch.int64)[good]] = lat_F[good]
        self.match_cos_G = torch.zeros(G)
        self.match_cos_G[torch.as_tensor(feat, dtype=torch.int64)] = pair_cos  # also below the threshold
        self.best_F = cos_FG.abs().argmax(dim=1)
        self.uniqueness = len(torch.unique(self.best_F[idx_A.to(self.best_F.device)])) / F if F else 0.0
        # parents, their matched latents and what each latent carries along d_p
        kids = feats.children()
        self.parents = torch.tensor(sorted(kids), dtype=torch.int64)
        P = len(self.parents)
        carry_GP, desc_GP = torch.zeros(G, P), torch.zeros(G, P)
        own_P = torch.zeros(P)  # cos of p's own matched latent with d_p
        m = self.match_G
        for j, p in enumerate(self.parents.tolist()):
            if m[p] >= 0:
                own_P[j] = cos_FG[m[p], p]
            for c in feats.descendants(p):
                desc_GP[c, j] = 1
                if m[c] >= 0:
                    carry_GP[c, j] = cos_FG[m[c], p]
        self.carry_GP, self.desc_GP, self.own_P = carry_GP.to(W_dec_FD), desc_GP.to(W_dec_FD), own_P.to(W_dec_FD)
        # accumulators
        self.tp_F, self.fp_F, self.fn_F = (torch.zeros(F, dtype=torch.float64) for _ in range(3))
        self.mtp_G, self.mfp_G, self.mfn_G = (torch.zeros(G, dtype=torch.float64) for _ in range(3))
        self.rows_P, self.absorbed_P, self.kept_P = (torch.zeros(P, dtype=torch.float64) for _ in range(3))
        self.fired_F = torch.zeros(F, dtype=torch.bool)
        self.n = 0
        self.sq_err = self.sum_x2 = 0.0
        self.sum_x: torch.Tensor | None = None
        self.l0 = self.true_l0 = self.l2_ratio = 0.0

    def add(self, x_ND: torch.Tensor, mag_NG: torch.Tensor, lat_NF: torch.Tensor, x_hat_ND: torch.Tensor) -> None:
        x_ND, x_hat_ND = x_ND.double(), x_hat_ND.double()
        on_NG = mag_NG > 0
        fires_NF = lat_NF > 0
        self.n += x_ND.shape[0]
        self.sq_err += float(((x_ND - x_hat_ND) ** 2).sum())
        self.sum_x2 += float((x_ND ** 2).sum())
        s = x_ND.sum(0)
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.l0 += float(fires_NF.sum())
        self.true_l0 += float(on_NG.sum())
        self.l2_ratio += float((x_hat_ND.norm(dim=1) / x_ND.norm(dim=1).clamp_min(1e-12)).sum())
        self.fired_F |= fires_NF.any(0).cpu()
        # SAELens: each latent against its best |cos| feature
        gt_NF = on_NG[:, self.best_F]
        self.tp_F += (fires_NF & gt_NF).sum(0).double().cpu()
        self.fp_F += (fires_NF & ~gt_NF).sum(0).double().cpu()
        self.fn_F += (~fires_NF & gt_NF).sum(0).double().cpu()
        # each feature against its matched latent (an unmatched feature never detected)
        m = self.match_G.to(lat_NF.device)
        mf_NG = torch.where(m >= 0, fires_NF[:, m.clamp_min(0)], torch.zeros_like(on_NG))
        self.mtp_G += (mf_NG & on_NG).sum(0).double().cpu()
        self.mfp_G += (mf_NG & ~on_NG).sum(0).double().cpu()
        self.mfn_G += (~mf_NG & on_NG).sum(0).double().cpu()
        if len(self.parents):
            par = self.parents.to(lat_NF.device)
            desc_on_NP = (on_NG.to(self.desc_GP.dtype) @ self.desc_GP) > 0
            rows_NP = on_NG[:, par] & desc_on_NP
            lat_m_NG = torch.where(m >= 0, lat_NF[:, m.clamp_min(0)], torch.zeros_like(mag_NG))
            mag_NP = mag_NG[:, par]
            own_NP = lat_m_NG[:, par] * self.own_P  # what p's own latent carries along d_p
            kept_NP = rows_NP & (own_NP >= self.cfg.silent_fraction * mag_NP)
            carried_NP = (lat_m_NG * on_NG) @ self.carry_GP  # what the firing descendants' latents carry
            absorbed_NP = rows_NP & ~kept_NP & (carried_NP >= self.cfg.carry_fraction * mag_NP)
            self.rows_P += rows_NP.sum(0).double().cpu()
            self.kept_P += kept_NP.sum(0).double().cpu()
            self.absorbed_P += absorbed_NP.sum(0).double().cpu()

    @staticmethod
    def _prf(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> tuple[torch.Tensor, ...]:
        prec = torch.where(tp + fp > 0, tp / (tp + fp).clamp_min(1), torch.zeros_like(tp))
        rec = torch.where(tp + fn > 0, tp / (tp + fn).clamp_min(1), torch.zeros_like(tp))
        f1 = torch.where(prec + rec > 0, 2 * prec * rec / (prec + rec).clamp_min(1e-12), torch.zeros_like(tp))
        return prec, rec, f1

    def result(self) -> tuple[dict, list[dict]]:
        n, cfg = max(self.n, 1), self.cfg
        assert self.sum_x is not None, "no rows added"
        total_var = self.sum_x2 - float((self.sum_x ** 2).sum()) / n
        prec, rec, f1 = self._prf(self.tp_F, self.fp_F, self.fn_F)
        mprec, mrec, mf1 = self._prf(self.mtp_G, self.mfp_G, self.mfn_G)
        kept = self.rows_P >= cfg.min_parent_rows
        ci = (None, None)
        if kept.any():
            from msae_core.evals.stats import bootstrap_ci_counts

            ci = bootstrap_ci_counts(self.absorbed_P[kept].long().tolist(), self.rows_P[kept].long().tolist(),
                                     conf=cfg.confidence, seed=cfg.random_seed)
        frac = lambda c: torch.where(self.rows_P > 0, c / self.rows_P.clamp_min(1), torch.nan)  # noqa: E731
        absorption_P, kept_frac_P = frac(self.absorbed_P), frac(self.kept_P)
        lost_P = 1.0 - absorption_P - kept_frac_P
        mean = lambda v, sel: float(v[sel].mean()) if sel.any() else None  # noqa: E731
        levels = self.feats.level_F[self.parents] if len(self.parents) else torch.zeros(0, dtype=torch.int64)
        by_level = {str(int(lv)): {"mean_absorption": mean(absorption_P, kept & (levels == lv)),
                                   "mean_lost": mean(lost_P, kept & (levels == lv)),
                                   "mean_kept": mean(kept_frac_P, kept & (levels == lv)),
                                   "n_parents": int((kept & (levels == lv)).sum())}
                    for lv in sorted(set(levels.tolist()))}
        d_in = self.feats.directions_FD.shape[1]
        metrics = {
            "recovery": {"mcc": self.mcc, "mcc_all_latents": self.mcc_all,
                         "mean_max_cosine": float(self.recovery_G.mean()),
                         "frac_recovered": float((self.recovery_G >= cfg.recovered_cosine).float().mean()),
                         "uniqueness": self.uniqueness,
                         "n_unmatched": int((self.match_G < 0).sum()),
                         "n_matched_dead_if_all": self.n_matched_dead_if_all,
                         "n_alive_latents": int(self.alive_F.sum())},
            "classification": {"precision": float(prec.mean()), "recall": float(rec.mean()),
                               "f1": float(f1.mean()), "matched_f1": float(mf1.mean())},
            "absorption": {"mean_absorption": mean(absorption_P, kept),
                           "mean_lost": mean(lost_P, kept), "mean_kept": mean(kept_frac_P, kept),
                           "n_parents": int(kept.sum()),
                           "mean_absorption_ci_low": ci[0], "mean_absorption_ci_high": ci[1],
                           "by_level": by_level},
            "reconstruction": {"explained_variance": 1 - self.sq_err / total_var if total_var > 0 else None,
                               "mse": self.sq_err / (n * d_in), "l2_ratio": self.l2_ratio / n},
            "sparsity": {"l0": self.l0 / n, "true_l0": self.true_l0 / n,
                         "frac_dead": float((~self.fired_F).float().mean())},
        }
        par_index = {p: j for j, p in enumerate(self.parents.tolist())}
        f = self.feats
        details = []
        for g in range(self.G):
            j = par_index.get(g)
            details.append({
                "feature": g, "kind": ("hierarchy", "correlated", "independent")[int(f.kind_F[g])],
                "level": int(f.level_F[g]), "parent": int(f.parent_F[g]), "p_fire": float(f.p_fire_F[g]),
                "recovery": float(self.recovery_G[g]), "matched_latent": int(self.match_G[g]),
                "matched_cosine": float(self.match_cos_G[g]), "precision": float(mprec[g]),
                "recall": float(mrec[g]), "f1": float(mf1[g]),
                # the per-parent scores the means are taken over (None below min_parent_rows)
                "absorption": None if j is None or not kept[j] else float(absorption_P[j]),
                "lost": None if j is None or not kept[j] else float(lost_P[j]),
                "kept": None if j is None or not kept[j] else float(kept_frac_P[j]),
                "parent_rows": None if j is None else int(self.rows_P[j]),
                "parent_absorbed_rows": None if j is None else int(self.absorbed_P[j]),
            })
        return metrics, details


def alive_latents(batches: Iterable, F: int) -> torch.Tensor:
    """(F,) bool: the latents that fire on any row of `batches` (the first pass)."""
    alive = torch.zeros(F, dtype=torch.bool)
    for _, _, lat_NF, _ in batches:
        alive |= (lat_NF > 0).any(0).cpu()
    return alive


def score(W_dec_FD: torch.Tensor, feats: Any, batches: Any, cfg: Config) -> tuple[dict, list[dict]]:
    """The metrics of an SAE given its decoder rows (input units) and batches of (x, true
    magnitudes, latents in input units, x_hat): a list, or a callable giving the same batches each
    time it is called (two passes: which latents fire, then the metrics)."""
    if not callable(batches):  # an iterable: held, so that both passes see the same batches
        batches = list(batches)
    make = batches if callable(batches) else (lambda: batches)
    scorer = GroundTruthScorer(W_dec_FD, feats, cfg, alive_latents(make(), W_dec_FD.shape[0]))
    for x_ND, mag_NG, lat_NF, x_hat_ND in make():
        scorer.add(x_ND, mag_NG, lat_NF, x_hat_ND)
    return scorer.result()


def eval_batches(synth_cfg: Any, feats: Any, cfg: Config, encode: Callable, reconstruct: Callable,
                 progress: bool = False):
    """(x, magnitudes, latents, x_hat) for `cfg.n_eval_rows` fresh rows of the generator."""
    from msae_core.data.synth import sample_rows

    done, i = 0, 0
    bar = tqdm(total=cfg.n_eval_rows, unit="row", desc="synthetic eval", disable=not progress)
    while done < cfg.n_eval_rows:
        n = min(cfg.batch_size, cfg.n_eval_rows - done)
        x_ND, mag_NG = sample_rows(synth_cfg, feats, n, chunk=(cfg.random_seed << 20) + i, split="eval")
        yield x_ND, mag_NG, encode(x_ND).cpu(), reconstruct(x_ND).cpu()
        done, i = done + n, i + 1
        bar.update(n)
    bar.close()


def run(ctx: Any, cfg: Config) -> dict:
    from msae_core.data.synth import load_features, synth_config

    if cfg.n_eval_rows < 1 or cfg.batch_size < 1:
        raise MsaeError("synthetic: n_eval_rows and batch_size must be >= 1")
    synth_cfg = synth_config(ctx.manifest)
    if synth_cfg is None:
        raise MsaeError(f"run {ctx.run_dir.name} did not train on a synthetic store (`msae synth`): "
                        "the synthetic eval needs its ground truth")
    feats = load_features(ctx.store_path)
    W_dec_FD = ctx.saebench_weights["W_dec"].cpu()
    metrics, details = score(W_dec_FD, feats, lambda: eval_batches(
        synth_cfg, feats, cfg, ctx.sae_encode_saebench, ctx.sae_reconstruct, progress=ctx.progress), cfg)
    unstructured = {"generator": {"n_features": feats.n_features, "settings_hash": synth_cfg.settings_hash()},
                    "eval_rows": {"split": "eval", "seed": cfg.random_seed, "n": cfg.n_eval_rows}}
    return make_result(ctx, EVAL_TYPE_ID, cfg, metrics, details, unstructured, computed_by=COMPUTED_BY)
