"""The BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders"; as dictionary_learning
and SAELens train it): TopK over the whole batch in training, a learned threshold at inference.

    training:  f = the B k largest entries of ReLU(pre) over the batch (B x F), the rest 0
               (a token keeps a variable number of latents; the batch's mean L0 is k)
    inference: f = ReLU(pre) 1[pre > threshold]          (a JumpReLU with one threshold)
    threshold <- b threshold + (1 - b) min{f > 0 kept in the batch}
               b = min(threshold_beta, 1 - 1/n) at the n-th update: a running mean for the first
               1 / (1 - threshold_beta) steps, an EMA after (dictionary_learning starts its EMA
               at step 1000 instead; ours is usable from the first steps of a short run)
    loss      = ||x - x_hat||^2 + auxk_coeff * AuxK     (as TopK: topk.py)

Before the first training step (threshold unset, -1) inference falls back to per-token TopK.
The decoder is sparse as TopK's: `embedding_bag` over each token's kept latents (bags of
variable size, by offsets), never a dense (B, F) @ (F, D) product. Data-parallel, each rank keeps
the top k of its own rows, and the threshold takes the smallest kept value over all ranks.
Exported to SAELens as its `jumprelu` architecture (threshold per latent), as SAELens saves its
own BatchTopK SAEs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from msae_core.sae.base import SAE, ActiveLatents, SAEConfig, StepOutput, register_sae
from msae_core.sae.topk import TopKSAE


@register_sae("batchtopk")
class BatchTopKSAE(TopKSAE):
    sparsity = "k"
    saelens_architecture = "jumprelu"

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.full((), -1.0))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))

    def jump_thresholds(self) -> torch.Tensor:
        return self.threshold.detach().float().expand(self.cfg.d_sae)

    def activation(self, pre_BF: torch.Tensor) -> torch.Tensor:
        if float(self.threshold) < 0:  # never trained: per-token TopK
            return super().activation(pre_BF)
        return torch.relu(pre_BF) * (pre_BF > self.threshold)

    forward = SAE.forward  # through `activation` (the threshold), not TopK's per-token forward

    def batch_topk(self, pre_BF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch's B k largest entries of ReLU(pre): (dense f (B, F), values (N,), token (N,)
        and latent (N,) of each, N = B k, ordered by token)."""
        B, Fd = pre_BF.shape
        n = min(B * self.cfg.k, B * Fd)
        vals_N, flat_N = torch.relu(pre_BF).reshape(-1).topk(n, sorted=False)
        order = torch.argsort(flat_N)  # by token, then latent: bags for embedding_bag
        vals_N, flat_N = vals_N[order], flat_N[order]
        f = torch.zeros(B * Fd, dtype=pre_BF.dtype, device=pre_BF.device).scatter(0, flat_N, vals_N)
        return f.view(B, Fd), vals_N, flat_N // Fd, flat_N % Fd

    def loss_terms(self, x_BD: torch.Tensor, step: int) -> StepOutput:
        x_n = x_BD * self.input_scale
        pre = self.pre_activation(x_n)
        f, vals_N, tok_N, lat_N = self.batch_topk(pre)
        x_hat_n = self._decode_kept_n(vals_N, tok_N, lat_N, pre.shape[0])
        self._update_threshold_(vals_N.detach())
        losses, out = self._topk_step(x_n, x_hat_n, f, pre, ActiveLatents(vals_N, tok_N, lat_N, 0))
        extra = self._extra_losses(x_n, vals_N, tok_N, lat_N)
        if extra:
            losses = {**losses, **extra, "loss": losses["loss"] + sum(extra.values())}
        return StepOutput(losses, out)

    def _extra_losses(self, x_n: torch.Tensor, vals_N: torch.Tensor, tok_N: torch.Tensor,
                      lat_N: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms a subclass adds to the total, from the batch's kept entries ({} here)."""
        return {}

    def _decode_kept_n(self, vals_N: torch.Tensor, tok_N: torch.Tensor, lat_N: torch.Tensor, B: int) -> torch.Tensor:
        """sum of vals W_dec[lat] per token, plus b_dec: bags by offsets (entries ordered by token)."""
        counts_B = torch.bincount(tok_N, minlength=B)
        offsets_B = torch.cumsum(counts_B, 0) - counts_B
        return F.embedding_bag(lat_N, self.W_dec, offsets_B, mode="sum",
                               per_sample_weights=vals_N.to(self.W_dec.dtype)) + self.b_dec

    @torch.no_grad()
    def _update_threshold_(self, vals_N: torch.Tensor) -> None:
        """The EMA of the smallest positive kept activation (on the device: no host sync)."""
        m = torch.where(vals_N > 0, vals_N, torch.full_like(vals_N, float("inf"))).min().float()
        m = self.collectives.all_min_(m)
        ok = torch.isfinite(m)  # nothing kept was positive: no update
        self.threshold_updates += ok.long()
        n = self.threshold_updates.clamp_min(1).float()
        b = torch.clamp(1.0 - 1.0 / n, max=self.cfg.threshold_beta)
        new = torch.where(self.threshold < 0, m, b * self.threshold + (1 - b) * m)
        self.threshold.copy_(torch.where(ok, new, self.threshold))
