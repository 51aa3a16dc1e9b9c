"""The TopK SAE with the AuxK loss for dead latents (Gao et al. 2024).

    f     = scatter(TopK(ReLU(pre), k))
    e     = x - x_hat                                  (detached target)
    e_hat = W_dec^T TopK_{dead}(pre, k_aux)            k_aux = min(d_in // 2, #dead)
    loss  = ||x - x_hat||^2 + auxk_coeff * V_x * ||e - e_hat||^2 / V_e      V = batch variance: ||. - mean(.)||^2

Gao et al.'s loss is nmse(x, x_hat) + auxk_coeff * nmse(e, e_hat), both MSEs normalised by their
target's variance; msae's main term is the plain MSE (as SAELens's), so the AuxK term is multiplied
by V_x to keep Gao's balance (auxk_coeff 1/32 as theirs). Logged as "auxk": V_x * nmse(e, e_hat).
A latent is dead for AuxK after `dead_tokens_threshold` tokens without firing; by default a
twentieth of the run's tokens, 100,000 to 10M (msae_core.sae.base.auto_dead_tokens: bench/quality.py
measured 100,000 in 2M-token runs; Gao et al. use 10M tokens in runs of billions).

Sparse decoder: x_hat and e_hat are sums of the k (k_aux) active decoder rows per token, gathered
with `embedding_bag` (B k D multiply-adds and a gradient only for those rows' entries of the B x F
product), not a dense (B, F) @ (F, D) matmul: the decoder's forward and backward fall from 6 B F D
to about 6 B k D FLOPs. The dense f is still built (scatter) for what reads it (metrics, tracker).
Equal to the dense decoder up to float summation order (tests/test_sae.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from msae_core.sae.base import SAE, ActiveLatents, SAEOutput, StepOutput, mse_loss, register_sae


@register_sae("topk")
class TopKSAE(SAE):
    sparsity = "k"
    saelens_architecture = "topk"

    def activation(self, pre_BF: torch.Tensor) -> torch.Tensor:
        vals_BK, idx_BK = pre_BF.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre_BF).scatter_(-1, idx_BK, torch.relu(vals_BK))

    def _decode_rows_n(self, vals_BK: torch.Tensor, idx_BK: torch.Tensor) -> torch.Tensor:
        """sum_k vals[b, k] W_dec[idx[b, k]] per token: the sparse decoder (no bias)."""
        return F.embedding_bag(idx_BK, self.W_dec, per_sample_weights=vals_BK.to(self.W_dec.dtype),
                               mode="sum")

    def forward(self, x_BD: torch.Tensor) -> SAEOutput:
        pre = self.pre_activation(x_BD * self.input_scale)
        vals_BK, idx_BK = pre.topk(self.cfg.k, dim=-1, sorted=False)
        vals_BK = torch.relu(vals_BK)
        f = torch.zeros_like(pre).scatter_(-1, idx_BK, vals_BK)
        x_hat_n = self._decode_rows_n(vals_BK, idx_BK) + self.b_dec
        return SAEOutput(x_hat_n / self.input_scale, f, pre)

    def loss_terms(self, x_BD: torch.Tensor, step: int) -> StepOutput:
        x_n = x_BD * self.input_scale
        pre = self.pre_activation(x_n)
        vals_BK, idx_BK = pre.topk(self.cfg.k, dim=-1, sorted=False)
        vals_BK = torch.relu(vals_BK)
        f = torch.zeros_like(pre).scatter_(-1, idx_BK, vals_BK)
        x_hat_n = self._decode_rows_n(vals_BK, idx_BK) + self.b_dec
        B, K = idx_BK.shape
        tok_N = torch.arange(B, device=idx_BK.device).repeat_interleave(K)
        return self._topk_step(x_n, x_hat_n, f, pre, ActiveLatents(vals_BK.reshape(-1), tok_N, idx_BK.reshape(-1), K))

    def _topk_step(self, x_n: torch.Tensor, x_hat_n: torch.Tensor, f: torch.Tensor, pre: torch.Tensor,
                   active: ActiveLatents | None = None) -> StepOutput:
        """MSE plus AuxK of a step whose latents `f` (also as entries, `active`) reconstruct
        `x_hat_n` (shared with BatchTopK)."""
        mse = mse_loss(x_n, x_hat_n)
        auxk = self._auxk_loss(x_n, x_hat_n, pre)
        self._track_firing_(f.detach())
        losses = {"loss": mse + self.cfg.auxk_coeff * auxk, "mse": mse, "auxk": auxk}
        return StepOutput(losses, SAEOutput(x_hat_n / self.input_scale, f, pre, active))

    def _auxk_loss(self, x_n: torch.Tensor, x_hat_n: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        """AuxK: the k_aux strongest dead latents reconstruct the residual (0 with no dead latent)."""
        dead_F = self.dead_mask
        n_dead = self.dead_count()
        auxk = x_n.new_zeros(())
        if n_dead > 0 and self.cfg.auxk_coeff > 0:
            k_aux = min(self.cfg.d_in // 2, n_dead)
            e_BD = (x_n - x_hat_n).detach()
            dead_pre = pre.masked_fill(~dead_F, float("-inf"))
            vals, idx = dead_pre.topk(k_aux, dim=-1, sorted=False)
            e_hat_BD = self._decode_rows_n(torch.relu(vals), idx)
            var_e = (e_BD - e_BD.mean(0, keepdim=True)).pow(2).sum(-1).mean().clamp_min(1e-8)
            var_x = (x_n - x_n.mean(0, keepdim=True)).detach().pow(2).sum(-1).mean()
            auxk = (e_BD - e_hat_BD).pow(2).sum(-1).mean() * (var_x / var_e)
            auxk = torch.nan_to_num(auxk, nan=0.0)
        return auxk
