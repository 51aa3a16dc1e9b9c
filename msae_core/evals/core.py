"""SAEBench's core eval: reconstruction, sparsity, shrinkage and the LM's behaviour with the SAE spliced in.

Follows sae_bench/evals/core (main.py, eval_config.py, eval_output.py) of sae-bench 0.6.0:

One module of about 650 lines on purpose: the config, the metric definitions and the run that
accumulates them are one definition read against SAEBench's core eval, section by section.

1. Text: context windows of `context_size` tokens (BOS + context_size - 1 tokens of the EOS-joined
   documents), the same windowing as the harvest (msae_core.data.text.context_windows).
2. Reconstruction batches (`n_eval_reconstruction_batches` x `batch_size_prompts` windows): three
   full forwards each: clean; with block `layer`'s output (SAELens hook blocks.L.hook_resid_post)
   replaced by the SAE reconstruction; with it replaced by zeros (zero ablation, every position).
   Per token, KL(clean || other) over the whole vocabulary, and the next-token cross-entropy of each
   forward (T - 1 positions per window). Means over the tokens, then

       kl_div_score  = (kl_div_with_ablation - kl_div_with_sae) / kl_div_with_ablation
       ce_loss_score = (ce_loss_with_ablation - ce_loss_with_sae)
                       / (ce_loss_with_ablation - ce_loss_without_sae)

   so 1 is a perfect reconstruction and 0 is no better than zero ablation.
3. Special tokens: SAEBench passes ignore_tokens = {pad, eos, bos}. Positions holding one are left
   out of every mean (KL at that position; the CE of the prediction made at that position; all
   sparsity/variance statistics and feature densities). With
   `exclude_special_tokens_from_reconstruction` (SAEBench's flag) those positions also keep their
   original activation in the spliced forward instead of the reconstruction. Zero ablation zeroes
   every position, as SAEBench.
4. Sparsity and variance batches (`n_eval_sparsity_variance_batches`): the windows start again from
   the first one (SAEBench resets its activation store between the two parts), so their first
   batches reuse the activations captured by the clean forwards. Per kept token:
   l0 = #(f != 0), l1 = sum f (latents in SAEBench's units, see 6), l2_norm_in = ||x||,
   l2_norm_out = ||x_hat||, l2_ratio = ||x_hat|| / ||x|| (an input norm below 1e-4 divides by 1),
   cossim = cos(x, x_hat), all averaged over tokens;
   relative_reconstruction_bias = mean ||x_hat||^2 / mean <x, x_hat> per batch, averaged over
   batches (Eq. 10 of arXiv:2404.16014); explained_variance_legacy = mean over tokens of
   1 - ||x - x_hat||^2 / ||x - batch mean||^2 (SAEBench's "legacy" formula, the one its paper
   reports).
5. Feature density (SAEBench's featurewise statistics): per latent, the fraction of kept tokens
   with f > 0; consistent_activation_heuristic = firings / windows with at least one firing.
   misc_metrics holds SAEBench's frac_alive, freq_over_1_percent, freq_over_10_percent,
   normalized_freq_over_{1,10}_percent and average_max_{encoder,decoder}_cosine_sim, plus ours:
   frac_dead_features (density <= `dead_feature_threshold`, default 0 = never fired, so it is
   1 - frac_alive) and frac_dense_features (density > `dense_feature_threshold`, default 0.1, the
   threshold of SAEBench's freq_over_10_percent; SAEBench itself names no "dense" threshold),
   and dead_window_tokens, the number of tokens the densities were counted on: a dead latent
   fired on none of them, as a latent the trainer counts dead (its dead_features metric) was
   silent for its last dead_tokens_threshold training tokens (by default a twentieth of the run's
   tokens, 100,000 to 10M: msae_core.sae.base.auto_dead_tokens).
   The density window: SAEBench counts densities on the sparsity/variance batches (its README runs
   2000 batches of 16 x 128 tokens, 4M tokens). Our sparsity/variance default is sized for 2 CPU
   cores (8 x 4 x 128 = 4,096 tokens), too few to tell a dead latent from a rare one, so after those
   batches the eval goes on with forwards that stop at the layer and only count firings until
   `density_tokens` kept tokens are counted: by default the run's dead_tokens_threshold, so the
   eval's dead fraction and the trainer's count silence over the same number of tokens. The
   windows are held out from the store as the others; where the corpus has too few, the densities
   are over the tokens it has (dead_window_tokens says how many).
6. eval_result_details: one object per latent in SAEBench's CoreFeatureMetric layout (index,
   feature_density, consistent_activation_heuristic, encoder_bias, encoder_norm,
   encoder_decoder_cosine_sim, max_decoder_cosine_sim, max_encoder_cosine_sim), the weight-based
   ones on the weights in SAEBench's units (msae_core.sae_io.saebench_weights: acting on raw
   inputs, decoder rows of norm 1, each latent scaled by its decoder norm, as SAELens's
   fold_W_dec_norm leaves the SAEs SAEBench loads; what SAEBench sees through our SAEBenchSAE).
   eval_result_unstructured holds the histogram of log10 feature density (counts per bin, bin
   edges, dead latents counted apart), which windows were used, and the token counts the means ran
   over.

Where we differ, and why:
- explained_variance: sae-bench 0.6.0's code computes the total variance about zero, not about the
  mean (it squares E[x_d^2] and collapses the per-dimension means into one scalar; SAELens issue
  #659, SAELens PR #665). We compute the formula that code intends (SAEBench PR #61):
  1 - sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean_t x_t||^2 over all kept eval tokens, so that
  predicting the mean gives 0. explained_variance_legacy is SAEBench's, unchanged.
- mse: SAEBench divides each token's squared error by the number of tokens in its batch and then
  averages over tokens again, which makes the number shrink with the batch size. We report the
  batch-size-free mean squared error per element, sum ||x - x_hat||^2 / (tokens * d_in) (the same
  definition as msae_core.metrics.mse); SAEBench's number is kept in eval_result_unstructured as
  `mse_saebench_formula`.
- The language model is our Hugging Face LanguageModel, not TransformerLens; block L's output is
  the tensor TransformerLens calls blocks.L.hook_resid_post. Logits are float32, and KL is computed
  from log_softmax (SAEBench takes the log of a softmax, which gives -inf and then NaN for
  probabilities that underflow).
- Text is the run's own corpus (the activation store's) by default, not openwebtext: the machines
  this runs on have no network. The windows are held out from training when possible: the store
  holds the stream's first `n_windows` windows, so we skip that many tokens of the same stream and
  draw the eval windows (seeded by `random_seed`) from the next 4 x as many. A corpus too small for
  that falls back to windows from its beginning (which the SAE may have trained on), said in the
  result (`eval_result_unstructured.windows.held_out`).
- ignore_tokens is the LM's set of special ids (BOS/EOS/PAD and the tokenizer's other special
  tokens), a superset of SAEBench's {pad, eos, bos}; it is the set the harvest drops, so the SAE is
  measured on what it trained on. exclude_special_tokens_from_reconstruction defaults to True here
  (SAEBench's flag defaults to False, but the command lines in its README and main.py pass it).
- Latents that never fire have consistent_activation_heuristic 0/0: null here, -1 in SAEBench.
- token_stats count the tokens actually forwarded (windows x context_size, special tokens
  included, SAEBench's definition); fewer than asked when the corpus runs out.

Why one file of ~580 lines: it is one definition, read against SAEBench's in the order above. The
numbered steps map onto the code top to bottom (per-token KL and CE, the accumulator of the
sparsity and variance statistics, density and weight metrics, the windows, `run`), and none of its
pieces is used by another eval; split, a reader checking the definition would follow it across
files.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from msae_core.errors import MsaeError
from msae_core.evals.schema import make_result

log = logging.getLogger(__name__)

EVAL_TYPE_ID = "core"
POOL_FACTOR = 4          # held-out windows are drawn from this many times the windows needed,
POOL_EXTRA_MAX = 4096    # but from at most this many more (a 10M-token density window: not 40M tokenised)
HIST_BINS = 40           # bins of the log10 feature-density histogram
L2_IN_FLOOR = 1e-4       # SAEBench: an input norm below this divides l2_ratio by 1


@dataclass
class Config:
    """SAEBench's CoreEvalConfig fields (plus thresholds, seed, held-out), sized for 2 CPU cores."""

    model_name: str = field(default="", metadata={
        "help": "recorded from the run (the model its activations came from); leave empty"})
    llm_dtype: str = field(default="", metadata={
        "help": "recorded from the run's language model (as SAEBench records it); leave empty"})
    batch_size_prompts: int = field(default=4, metadata={
        "help": "context windows per forward; SAEBench: 16"})
    n_eval_reconstruction_batches: int = field(default=2, metadata={
        "help": "batches for KL and CE (3 full LM forwards each, the costly part); SAEBench: 10"})
    n_eval_sparsity_variance_batches: int = field(default=8, metadata={
        "help": "batches for sparsity, variance, shrinkage and feature density; SAEBench: 1 "
                "(its README runs 2000)"})
    dataset: str = field(default="", metadata={
        "help": "corpus to evaluate on (msae_core.data.text.load_corpus names); empty = the run's own "
                "corpus, with windows held out from the activation store"})
    context_size: int = field(default=128, metadata={
        "help": "tokens per window, BOS included: SAEBench's core eval uses 128 (a store harvested at 1,024 "
                "would make 8x the logits per window, 4.2 GB at gemma-2-2b's vocabulary); 0 = the "
                "activation store's context size"})
    compute_kl: bool = field(default=True, metadata={"help": "KL divergence with SAE / with ablation"})
    compute_ce_loss: bool = field(default=True, metadata={"help": "cross-entropy with SAE / ablation / clean"})
    compute_l2_norms: bool = field(default=True, metadata={"help": "shrinkage: l2 norms, ratio, bias"})
    compute_sparsity_metrics: bool = field(default=True, metadata={"help": "l0 and l1"})
    compute_variance_metrics: bool = field(default=True, metadata={
        "help": "explained variance (and legacy), mse, cossim"})
    compute_featurewise_density_statistics: bool = field(default=True, metadata={
        "help": "per-latent density, dead/dense fractions, density histogram"})
    compute_featurewise_weight_based_metrics: bool = field(default=True, metadata={
        "help": "per-latent encoder/decoder norms and max cosine similarity to other latents"})
    exclude_special_tokens_from_reconstruction: bool = field(default=True, metadata={
        "help": "keep BOS/EOS/PAD positions' original activations when splicing in the SAE "
                "(SAEBench's flag; the harvest never trains on those positions)"})
    density_tokens: int = field(default=0, metadata={
        "help": "kept tokens the per-latent densities (dead/dense fractions, density histogram) are "
                "counted on, with forwards that stop at the layer after the sparsity/variance "
                "batches; 0 = the run's dead_tokens_threshold, the window of the trainer's dead "
                "count (a twentieth of its training tokens, 100,000 to 10M); at most the "
                "sparsity/variance batches' tokens = SAEBench's window"})
    dead_feature_threshold: float = field(default=0.0, metadata={
        "help": "a latent with density <= this on the eval tokens counts as dead (0: never fired)"})
    dense_feature_threshold: float = field(default=0.1, metadata={
        "help": "a latent with density > this counts as dense (0.1 = SAEBench's freq_over_10_percent)"})
    random_seed: int = field(default=42, metadata={
        "help": "seed of the choice of eval windows (SAEBench shuffles its dataset with 42)"})
    held_out: bool = field(default=True, metadata={
        "help": "skip the windows the activation store holds (when evaluating on the run's corpus)"})

    def problems(self) -> list[str]:
        out = []
        for name in ("batch_size_prompts",):
            if getattr(self, name) < 1:
                out.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        for name in ("n_eval_reconstruction_batches", "n_eval_sparsity_variance_batches"):
            if getattr(self, name) < 0:
                out.append(f"{name} must be >= 0 (got {getattr(self, name)})")
        if self.context_size != 0 and self.context_size < 2:
            out.append(f"context_size must be 0 (the store's) or >= 2 (got {self.context_size})")
        if (self.compute_kl or self.compute_ce_loss) and self.n_eval_reconstruction_batches < 1:
            out.append("n_eval_reconstruction_batches must be >= 1 when compute_kl or compute_ce_loss")
        if self._needs_sv() and self.n_eval_sparsity_variance_batches < 1:
            out.append("n_eval_sparsity_variance_batches must be >= 1 when a sparsity, variance, "
                       "l2 or density metric is on")
        if self.density_tokens < 0:
            out.append(f"density_tokens must be >= 0 (got {self.density_tokens})")
        if not 0 <= self.dead_feature_threshold < 1:
            out.append(f"dead_feature_threshold must be in [0, 1) (got {self.dead_feature_threshold})")
        if not 0 <= self.dense_feature_threshold < 1:
            out.append(f"dense_feature_threshold must be in [0, 1) (got {self.dense_feature_threshold})")
        return out

    def _needs_sv(self) -> bool:
        return (self.compute_l2_norms or self.compute_sparsity_metrics or self.compute_variance_metrics
                or self.compute_featurewise_density_statistics)


# ----------------------------------------------------------------------------------------------
# pure computations: downstream (logits) metrics


def keep_mask(ids_BT: torch.Tensor, ignore_ids: Iterable[int]) -> torch.Tensor:
    """True where the token is not one of `ignore_ids` (SAEBench's ignore_tokens mask). (B, T)"""
    ignore = torch.tensor(sorted({int(i) for i in ignore_ids}), dtype=torch.long, device=ids_BT.device)
    return ~torch.isin(ids_BT.long(), ignore)


def kl_per_token(logp_clean_BTV: torch.Tensor, logp_new_BTV: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """KL(clean || new) per position, from log-probabilities over the vocabulary. (B, T)

    Computed over chunks of positions so the (B, T, V) temporaries stay small."""
    B, T, V = logp_clean_BTV.shape
    a_NV = logp_clean_BTV.reshape(B * T, V)
    b_NV = logp_new_BTV.reshape(B * T, V)
    out = torch.empty(B * T, dtype=torch.float32, device=a_NV.device)
    for s in range(0, B * T, chunk):
        a, b = a_NV[s:s + chunk].float(), b_NV[s:s + chunk].float()
        out[s:s + chunk] = (a.exp() * (a - b)).sum(-1)
    return out.reshape(B, T)


def ce_per_token(logp_BTV: torch.Tensor, ids_BT: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts token t + 1. (B, T - 1)"""
    target = ids_BT[:, 1:].long().to(logp_BTV.device)
    return -logp_BTV[:, :-1].gather(-1, target[..., None]).squeeze(-1).float()


def masked_values(per_token_BT: torch.Tensor, keep_BT: torch.Tensor) -> torch.Tensor:
    """The values at kept positions; for CE's T - 1 positions the mask of the predicting position
    (SAEBench's mask[:, :-1])."""
    if per_token_BT.shape[1] != keep_BT.shape[1]:
        keep_BT = keep_BT[:, :per_token_BT.shape[1]]
    return per_token_BT[keep_BT.to(per_token_BT.device)]


def downstream_scores(kl_with_sae: torch.Tensor | None = None, kl_with_ablation: torch.Tensor | None = None,
                      ce_with_sae: torch.Tensor | None = None, ce_with_ablation: torch.Tensor | None = None,
                      ce_without_sae: torch.Tensor | None = None) -> dict[str, float]:
    """SAEBench's KL and CE scores from per-token values (already restricted to kept tokens)."""
    out: dict[str, float] = {}
    if kl_with_sae is not None and kl_with_ablation is not None:
        kl_sae, kl_abl = float(kl_with_sae.double().mean()), float(kl_with_ablation.double().mean())
        out["kl_div_score"] = (kl_abl - kl_sae) / kl_abl if kl_abl != 0 else math.nan
        out["kl_div_with_ablation"] = kl_abl
        out["kl_div_with_sae"] = kl_sae
    if ce_with_sae is not None and ce_with_ablation is not None and ce_without_sae is not None:
        sae, abl, clean = (float(v.double().mean()) for v in (ce_with_sae, ce_with_ablation, ce_without_sae))
        out["ce_loss_score"] = (abl - sae) / (abl - clean) if abl != clean else math.nan
        out["ce_loss_with_ablation"] = abl
        out["ce_loss_with_sae"] = sae
        out["ce_loss_without_sae"] = clean
    return out


# ----------------------------------------------------------------------------------------------
# pure computations: reconstruction, sparsity and density statistics


class CoreAccumulator:
    """Running sums of the sparsity/variance statistics over batches (SAEBench's definitions, module
    docstring). `update` takes one batch; `metrics()` and `feature_density()` read the totals."""

    def __init__(self, d_sae: int):
        self.d_sae = d_sae
        self.n_tokens = 0           # kept tokens
        self.density_tokens = 0     # kept tokens the fire counts ran over (n_tokens + update_density's)
        self.n_prompts = 0
        self.n_batches = 0
        self.d_in: int | None = None
        self.sum_sq_x = 0.0         # sum_t ||x_t||^2
        self.sum_x: torch.Tensor | None = None  # (D,) sum_t x_t
        self.sum_sq_resid = 0.0     # sum_t ||x_t - x_hat_t||^2
        self.sums = dict.fromkeys(("l0", "l1", "l2_norm_in", "l2_norm_out", "l2_ratio", "cossim",
                                   "explained_variance_legacy", "mse_saebench_formula"), 0.0)
        self.rrb: list[float] = []  # relative reconstruction bias, one per batch
        self.fire_count = torch.zeros(d_sae, dtype=torch.float64)
        self.fire_prompts = torch.zeros(d_sae, dtype=torch.float64)

    @torch.no_grad()
    def update(self, x_BTD: torch.Tensor, x_hat_BTD: torch.Tensor, f_BTF: torch.Tensor,
               keep_BT: torch.Tensor | None = None) -> None:
        """One batch: inputs, reconstructions and latents of B windows; keep_BT marks the tokens
        that count (None: all). 2-D inputs (N, D) are one window of N tokens."""
        if x_BTD.dim() == 2:
            x_BTD, x_hat_BTD, f_BTF = x_BTD[None], x_hat_BTD[None], f_BTF[None]
            keep_BT = None if keep_BT is None else keep_BT[None]
        B, T, D = x_BTD.shape
        if f_BTF.shape[-1] != self.d_sae:
            raise ValueError(f"latents have width {f_BTF.shape[-1]}, expected {self.d_sae}")
        if keep_BT is None:
            keep_BT = torch.ones(B, T, dtype=torch.bool)
        keep_BT = keep_BT.to(x_BTD.device)
        self.n_prompts += B
        x = x_BTD[keep_BT].double()        # (N, D)
        x_hat = x_hat_BTD[keep_BT].double()
        f = f_BTF[keep_BT].float()          # (N, F)
        N = x.shape[0]
        if N == 0:
            return
        self.d_in = D
        self.n_batches += 1
        self.n_tokens += N
        resid_sq_N = (x - x_hat).pow(2).sum(-1)
        self.sum_sq_resid += float(resid_sq_N.sum())
        self.sum_sq_x += float(x.pow(2).sum())
        sx = x.sum(0).cpu()
        self.sum_x = sx if self.sum_x is None else self.sum_x + sx
        n_in, n_out = x.norm(dim=-1), x_hat.norm(dim=-1)
        s = self.sums
        s["l2_norm_in"] += float(n_in.sum())
        s["l2_norm_out"] += float(n_out.sum())
        s["l2_ratio"] += float((n_out / torch.where(n_in.abs() < L2_IN_FLOOR, torch.ones_like(n_in), n_in)).sum())
        dot_N = (x * x_hat).sum(-1)
        self.rrb.append(float(n_out.pow(2).mean() / dot_N.mean()) if float(dot_N.mean()) != 0 else math.nan)
        s["cossim"] += float((dot_N / (n_in * n_out).clamp_min(1e-12)).sum())
        batch_var_N = (x - x.mean(0, keepdim=True)).pow(2).sum(-1)
        s["explained_variance_legacy"] += float((1 - resid_sq_N / batch_var_N.clamp_min(1e-12)).sum())
        s["mse_saebench_formula"] += float((resid_sq_N / N).sum())
        s["l0"] += float((f != 0).float().sum())
        s["l1"] += float(f.double().sum())
        self.update_density(f_BTF, keep_BT)

    @torch.no_grad()
    def update_density(self, f_BTF: torch.Tensor, keep_BT: torch.Tensor | None = None) -> None:
        """Count firings only (the density window beyond the sparsity/variance batches). (B, T, F)"""
        if keep_BT is None:
            keep_BT = torch.ones(f_BTF.shape[:2], dtype=torch.bool)
        keep_BT = keep_BT.to(f_BTF.device)
        fired_BTF = (f_BTF > 0) & keep_BT[..., None]
        self.density_tokens += int(keep_BT.sum())
        self.fire_count += fired_BTF.sum(dim=(0, 1)).double().cpu()
        self.fire_prompts += fired_BTF.any(dim=1).sum(0).double().cpu()

    def metrics(self) -> dict[str, float]:
        """Flat metric values (nan where there were no tokens)."""
        if self.n_tokens == 0:
            return {k: math.nan for k in ("explained_variance", "mse", *self.sums,
                                          "relative_reconstruction_bias")}
        N = self.n_tokens
        out = {k: v / N for k, v in self.sums.items()}
        total_var = self.sum_sq_x - float(self.sum_x.pow(2).sum()) / N
        out["explained_variance"] = 1 - self.sum_sq_resid / total_var if total_var > 0 else math.nan
        out["mse"] = self.sum_sq_resid / (N * self.d_in)
        out["relative_reconstruction_bias"] = sum(self.rrb) / len(self.rrb)
        return out

    def feature_density(self) -> torch.Tensor:
        """Per latent, the fraction of kept tokens with f > 0 (over the density window). (F,)"""
        return (self.fire_count / max(self.density_tokens, 1)).float()

    def consistent_activation_heuristic(self) -> torch.Tensor:
        """Per latent, firings per window it fired in at all (nan when it never fired). (F,)"""
        return (self.fire_count / self.fire_prompts).float()


def reconstruction_metrics(x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor,
                           keep: torch.Tensor | None = None) -> dict[str, float]:
    """The sparsity/variance metrics of one batch ((N, D) or (B, T, D) inputs)."""
    acc = CoreAccumulator(f.shape[-1])
    acc.update(x, x_hat, f, keep)
    return acc.metrics()


def misc_metrics(density_F: torch.Tensor, dead_threshold: float = 0.0, dense_threshold: float = 0.1,
                 max_encoder_cos_F: torch.Tensor | None = None,
                 max_decoder_cos_F: torch.Tensor | None = None, n_tokens: int | None = None) -> dict[str, float]:
    """SAEBench's calculate_misc_metrics on feature densities, plus frac_dead/dense_features and
    dead_window_tokens: the `n_tokens` the densities were counted on (a dead latent was silent on
    all of them, as the trainer's dead latents were silent for their last dead_tokens_threshold)."""
    d = density_F.double()
    total = float(d.sum())
    out: dict[str, float] = {}
    if max_encoder_cos_F is not None:
        out["average_max_encoder_cosine_sim"] = float(max_encoder_cos_F.double().mean())
    if max_decoder_cos_F is not None:
        out["average_max_decoder_cosine_sim"] = float(max_decoder_cos_F.double().mean())
    out["frac_alive"] = float((d > 0).double().mean())
    out["freq_over_1_percent"] = float((d > 0.01).double().mean())
    out["freq_over_10_percent"] = float((d > 0.1).double().mean())
    out["normalized_freq_over_1_percent"] = float(d[d > 0.01].sum()) / total if total > 0 else 0.0
    out["normalized_freq_over_10_percent"] = float(d[d > 0.1].sum()) / total if total > 0 else 0.0
    out["frac_dead_features"] = float((d <= dead_threshold).double().mean())
    out["frac_dense_features"] = float((d > dense_threshold).double().mean())
    if n_tokens is not None:
        out["dead_window_tokens"] = int(n_tokens)
    return out


def density_histogram(density_F: torch.Tensor, n_tokens: int, bins: int = HIST_BINS) -> dict:
    """Histogram of log10 feature density over latents that fired; the lowest edge is
    log10(1 / n_tokens) rounded down (the smallest non-zero density possible), the highest 0."""
    d = density_F.double()
    alive = d[d > 0]
    lo = math.floor(math.log10(1.0 / max(n_tokens, 1))) if n_tokens > 1 else -1.0
    edges = torch.linspace(lo, 0.0, bins + 1, dtype=torch.float64)
    counts = torch.histc(alive.log10().clamp(lo, 0.0), bins=bins, min=lo, max=0.0) if len(alive) \
        else torch.zeros(bins, dtype=torch.float64)
    return {"log10_bin_edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts],
            "n_dead": int((d == 0).sum()), "n_latents": int(d.numel()), "n_tokens": int(n_tokens)}


def max_cosine_to_others(U_FD: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Per row, the largest cosine similarity with any other row (SAEBench's calculate_max_cosine_sim,
    rows instead of columns). (F,)"""
    U = torch.nn.functional.normalize(U_FD.float(), dim=1)
    F_ = U.shape[0]
    out = torch.empty(F_, dtype=torch.float32)
    for s in range(0, F_, chunk):
        sims_CF = U[s:s + chunk] @ U.T
        idx = torch.arange(s, min(s + chunk, F_))
        sims_CF[idx - s, idx] = -math.inf
        out[s:s + chunk] = sims_CF.max(dim=1).values.cpu()
    return out


def weight_metrics(W_enc_DF: torch.Tensor, W_dec_FD: torch.Tensor, b_enc_F: torch.Tensor) -> dict[str, torch.Tensor]:
    """SAEBench's get_featurewise_weight_based_metrics: per-latent (F,) tensors."""
    enc_FD = W_enc_DF.T.float()
    dec_FD = W_dec_FD.float()
    return {
        "encoder_bias": b_enc_F.float().cpu(),
        "encoder_norm": enc_FD.norm(dim=1).cpu(),
        "encoder_decoder_cosine_sim": torch.nn.functional.cosine_similarity(enc_FD, dec_FD, dim=1).cpu(),
        "max_encoder_cosine_sim": max_cosine_to_others(enc_FD),
        "max_decoder_cosine_sim": max_cosine_to_others(dec_FD),
    }


# ----------------------------------------------------------------------------------------------
# text


def eval_windows(corpus: Any, tokenizer: Any, context_size: int, n_windows: int, *, skip_tokens: int = 0,
                 seed: int = 42, pool_factor: int = POOL_FACTOR, min_windows: int | None = None,
                 separator: str = "bos", cursor: dict | None = None) -> tuple[list[list[int]], dict]:
    """`n_windows` context windows of `corpus` (int64 arrays), chosen (seeded) from the
    `pool_factor * n_windows` windows (at most POOL_EXTRA_MAX more than asked) that follow the first
    `skip_tokens` tokens of the packed stream; from the stream's beginning when fewer than
    `min_windows` (default `n_windows`) follow, fewer than asked (with a warning) when at least that
    many do. `separator`: the token between packed documents (the store's, for windows held out
    from it). `cursor`: where the packed stream stood after those `skip_tokens` (a streamed run's
    status.json `stream_cursor`, text.WindowCursor): the pool starts there, without tokenising the
    prefix. Returns (windows in stream order, provenance)."""
    from msae_core.data.text import WindowCursor, context_windows

    body = context_size - 1
    skip = math.ceil(skip_tokens / body) if skip_tokens > 0 else 0
    want = max(min(n_windows * pool_factor, n_windows + POOL_EXTRA_MAX), n_windows)

    def pool_from(start: int) -> list[np.ndarray]:
        at = WindowCursor.of(cursor) if cursor and start == skip > 0 else None
        stream = context_windows(corpus, tokenizer, context_size, prepend_bos=True, separator=separator, start=at)
        first = 0 if at is not None else start
        return [np.asarray(w, dtype=np.int64) for _, w in itertools.islice(stream, first, first + want)]

    pool, start = pool_from(skip), skip
    held_out = skip > 0
    need = n_windows if min_windows is None else min(min_windows, n_windows)
    if len(pool) < need and skip > 0:
        log.warning("corpus %s has only %d windows after the %d the activation store holds: the core "
                    "eval uses windows from its beginning (not held out)", corpus.name, len(pool), skip)
        pool, start, held_out = pool_from(0), 0, False
    if not pool:
        raise MsaeError(f"corpus {corpus.name!r} gives no window of {context_size} tokens to evaluate on")
    picked = sorted(random.Random(seed).sample(range(len(pool)), min(n_windows, len(pool))))
    if len(picked) < n_windows:
        log.warning("corpus %s gives only %d of the %d windows asked for", corpus.name, len(picked), n_windows)
    info = {"corpus": corpus.name, "context_size": context_size, "held_out": held_out,
            "skipped_windows": start, "from_cursor": bool(cursor) and start == skip > 0,
            "pool_windows": len(pool), "used_windows": len(picked),
            "window_indices": [start + i for i in picked], "seed": seed}
    return [pool[i] for i in picked], info


def _store_skip_tokens(manifest: dict) -> int:
    """Tokens of the packed stream the activation store's windows cover (0 when unknown)."""
    n_windows = int(manifest.get("n_windows") or 0)
    ctx_size = int(manifest.get("context_size") or 0)
    if n_windows <= 0 or ctx_size <= 1:
        return 0
    return n_windows * (ctx_size - (1 if manifest.get("prepend_bos", True) else 0))


# ----------------------------------------------------------------------------------------------
# the eval


def _log_probs(logits_BTV: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits_BTV.float(), dim=-1)


def run(ctx: Any, cfg: Config) -> dict:
    """The core eval on the run in `ctx` (module docstring); SAEBench's result layout."""
    from msae_core.configutil import validate
    from msae_core.data.text import corpus_of, load_corpus
    from msae_core.sae.base import dead_window

    validate(cfg)
    if cfg.model_name and cfg.model_name != ctx.model_name:
        raise MsaeError(f"model_name {cfg.model_name!r} is not the run's model {ctx.model_name!r}; "
                        "leave it empty")
    t0 = time.time()
    lm = ctx.lm
    lm.check_layer(ctx.layer)
    sae = ctx.sae
    if lm.d_model != sae.cfg.d_in:
        raise MsaeError(f"the SAE reads width {sae.cfg.d_in} but {ctx.model_name} block {ctx.layer} "
                        f"gives {lm.d_model}")
    context_size = cfg.context_size or ctx.context_size
    dataset = cfg.dataset or ctx.corpus_name
    own_corpus = dataset == ctx.corpus_name
    skip = _store_skip_tokens(ctx.manifest) if cfg.held_out and own_corpus else 0
    # the run's own corpus is packed as its store was (stores before the setting: EOS); another, as
    # SAEBench packs it (BOS)
    separator = ctx.separator if own_corpus else "bos"
    n_rec = cfg.n_eval_reconstruction_batches if (cfg.compute_kl or cfg.compute_ce_loss) else 0
    n_sv = cfg.n_eval_sparsity_variance_batches if cfg._needs_sv() else 0
    bs = cfg.batch_size_prompts
    density_target = (cfg.density_tokens or dead_window(sae.cfg)) if cfg.compute_featurewise_density_statistics else 0
    # a window keeps at most context_size - 1 tokens (its BOS is left out; 10 % spare for the EOS
    # between documents); the density loop stops once it has counted density_target kept tokens
    n_density = max(n_sv, math.ceil(1.1 * density_target / (max(context_size - 1, 1) * bs)))
    corpus = corpus_of(ctx.manifest) if own_corpus else load_corpus(dataset)
    windows, win_info = eval_windows(corpus, lm.tokenizer, context_size, max(n_rec, n_density) * bs,
                                     skip_tokens=skip, seed=cfg.random_seed,
                                     min_windows=max(n_rec, n_sv) * bs, separator=separator,
                                     cursor=ctx.manifest.get("cursor") if skip else None)
    batches = [torch.from_numpy(np.stack(windows[i:i + bs])) for i in range(0, len(windows), bs)]
    ignore = sorted(lm.special_ids)
    layer, device = ctx.layer, lm.device
    acc = CoreAccumulator(sae.cfg.d_sae)
    per_token: dict[str, list[torch.Tensor]] = {k: [] for k in (
        "kl_with_sae", "kl_with_ablation", "ce_with_sae", "ce_with_ablation", "ce_without_sae")}

    latent_scale_F = ctx.saebench_weights["latent_scale"]

    def encode(x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, D = x_BTD.shape
        with torch.no_grad():
            out = sae.forward(x_BTD.reshape(B * T, D).to(ctx.device, torch.float32))
        # latents in SAEBench's units (decoder norm folded in): what l1 is summed over
        return out.x_hat.reshape(B, T, D), (out.f * latent_scale_F).reshape(B, T, -1)

    rec_tokens = sv_tokens = 0
    t_setup = time.time()
    disable = None if ctx.progress else True
    rec_batches = batches[:n_rec]
    with tqdm(rec_batches, desc="core: KL/CE (3 forwards/batch)", unit="batch", disable=disable) as bar:
        for i, ids_BT in enumerate(bar):
            keep_BT = keep_mask(ids_BT, ignore)
            captured: dict[str, torch.Tensor] = {}

            def capture(h: torch.Tensor) -> torch.Tensor:
                captured["h"] = h
                return h

            logp_clean = _log_probs(lm.logits_with_hook(ids_BT, layer, capture))
            x_BTD = captured.pop("h").float()
            x_hat_BTD, f_BTF = encode(x_BTD)
            x_hat_BTD = x_hat_BTD.to(x_BTD.device)
            splice = (torch.where(keep_BT.to(x_BTD.device)[..., None], x_hat_BTD, x_BTD)
                      if cfg.exclude_special_tokens_from_reconstruction else x_hat_BTD)
            for name, fn in (("sae", lambda h: splice.to(h.dtype)), ("ablation", torch.zeros_like)):
                logp = _log_probs(lm.logits_with_hook(ids_BT, layer, fn))
                per_token[f"kl_with_{name}"].append(masked_values(kl_per_token(logp_clean, logp).cpu(), keep_BT))
                per_token[f"ce_with_{name}"].append(masked_values(ce_per_token(logp, ids_BT).cpu(), keep_BT))
                del logp
            per_token["ce_without_sae"].append(masked_values(ce_per_token(logp_clean, ids_BT).cpu(), keep_BT))
            del logp_clean
            rec_tokens += ids_BT.numel()
            if i < n_sv:
                acc.update(x_BTD, x_hat_BTD, f_BTF, keep_BT)
                sv_tokens += ids_BT.numel()
            bar.set_postfix(tok_s=f"{rec_tokens / max(time.time() - t_setup, 1e-9):.0f}")
    t_rec = time.time()
    with tqdm(batches[len(rec_batches):n_sv], desc="core: sparsity/variance", unit="batch",
              disable=disable) as bar:
        for ids_BT in bar:
            keep_BT = keep_mask(ids_BT, ignore)
            with torch.no_grad():
                x_BTD = lm.resid_post(ids_BT.to(device), layer, stop_early=True).float()
            x_hat_BTD, f_BTF = encode(x_BTD)
            acc.update(x_BTD, x_hat_BTD.to(x_BTD.device), f_BTF, keep_BT)
            sv_tokens += ids_BT.numel()
    t_sv = time.time()
    n_read = max(n_rec, n_sv)
    with tqdm(batches[n_sv:n_density], desc="core: feature density", unit="batch",
              disable=disable if n_density > n_sv else True) as bar:
        for i, ids_BT in enumerate(bar, start=n_sv):
            if acc.density_tokens >= density_target:
                break
            with torch.no_grad():  # firing is all it counts: the encoder alone (no decoder, no units)
                x_BTD = lm.resid_post(ids_BT.to(device), layer, stop_early=True).float()
                B, T, D = x_BTD.shape
                f_BTF = sae.encode(x_BTD.reshape(B * T, D).to(ctx.device, torch.float32)).reshape(B, T, -1)
            acc.update_density(f_BTF, keep_mask(ids_BT, ignore))
            n_read = max(n_read, i + 1)
    t_density = time.time()
    read = min(n_read * bs, len(windows))  # windows drawn for the density window but not needed drop out
    win_info = {**win_info, "used_windows": read, "window_indices": win_info["window_indices"][:read]}

    metrics: dict[str, dict] = {}
    scores = downstream_scores(**{k: torch.cat(v) for k, v in per_token.items() if v}) if rec_batches else {}
    if cfg.compute_kl:
        metrics["model_behavior_preservation"] = {k: scores[k] for k in (
            "kl_div_score", "kl_div_with_ablation", "kl_div_with_sae")}
    if cfg.compute_ce_loss:
        metrics["model_performance_preservation"] = {k: scores[k] for k in (
            "ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae", "ce_loss_without_sae")}
    sv = acc.metrics()
    if cfg.compute_variance_metrics:
        metrics["reconstruction_quality"] = {k: sv[k] for k in (
            "explained_variance", "explained_variance_legacy", "mse", "cossim")}
    if cfg.compute_l2_norms:
        metrics["shrinkage"] = {k: sv[k] for k in (
            "l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias")}
    if cfg.compute_sparsity_metrics:
        metrics["sparsity"] = {"l0": sv["l0"], "l1": sv["l1"]}
    metrics["token_stats"] = {"total_tokens_eval_reconstruction": rec_tokens,
                              "total_tokens_eval_sparsity_variance": sv_tokens}

    feature: dict[str, torch.Tensor] = {}
    if cfg.compute_featurewise_density_statistics:
        feature["feature_density"] = acc.feature_density()
        feature["consistent_activation_heuristic"] = acc.consistent_activation_heuristic()
    if cfg.compute_featurewise_weight_based_metrics:
        w = ctx.saebench_weights
        feature.update(weight_metrics(w["W_enc"], w["W_dec"], w["b_enc"]))
    if feature:
        misc = misc_metrics(acc.feature_density(), cfg.dead_feature_threshold, cfg.dense_feature_threshold,
                            feature.get("max_encoder_cosine_sim"), feature.get("max_decoder_cosine_sim"),
                            acc.density_tokens)
        if not cfg.compute_featurewise_density_statistics:
            misc = {k: v for k, v in misc.items() if k.startswith("average_max")}
        metrics["misc_metrics"] = misc
    order = ("feature_density", "consistent_activation_heuristic", "encoder_bias", "encoder_norm",
             "encoder_decoder_cosine_sim", "max_decoder_cosine_sim", "max_encoder_cosine_sim")
    cols = {k: feature[k].tolist() for k in order if k in feature}
    details = [{"index": j, **{k: v[j] for k, v in cols.items()}} for j in range(sae.cfg.d_sae)] if cols else []

    unstructured: dict[str, Any] = {
        "windows": win_info,
        "ignored_token_ids": ignore,
        "kept_tokens_reconstruction": int(sum(len(v) for v in per_token["kl_with_sae"])),
        "kept_tokens_sparsity_variance": acc.n_tokens,
        "kept_tokens_feature_density": acc.density_tokens,
        "mse_saebench_formula": sv["mse_saebench_formula"],
        "seconds": {"setup": round(t_setup - t0, 3), "reconstruction": round(t_rec - t_setup, 3),
                    "sparsity_variance": round(t_sv - t_rec, 3), "feature_density": round(t_density - t_sv, 3),
                    "total": round(time.time() - t0, 3)},
    }
    if cfg.compute_featurewise_density_statistics:
        unstructured["feature_density_histogram"] = density_histogram(acc.feature_density(), acc.density_tokens)
    recorded = dataclasses.replace(cfg, model_name=ctx.model_name,
                                   llm_dtype=str(lm.dtype).replace("torch.", ""),
                                   dataset=dataset, context_size=context_size)
    return make_result(ctx, EVAL_TYPE_ID, recorded, metrics, details, unstructured)
