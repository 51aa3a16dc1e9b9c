"""The standard L1 SAE (the research log's baseline): ReLU encoder, L1 penalty on activations
weighted by decoder-row norm, unit-norm decoder rows.

    loss = ||x - x_hat||^2 + l1_coeff * sum_i f_i * ||W_dec_i||
"""

from __future__ import annotations

import torch

from msae_core.sae.base import SAE, SAEOutput, StepOutput, mse_loss, register_sae


@register_sae("relu")
class ReluSAE(SAE):
    sparsity = "l1_coeff"
    saelens_architecture = "standard"

    def activation(self, pre_BF: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre_BF)

    def loss_terms(self, x_BD: torch.Tensor, step: int) -> StepOutput:
        x_n = x_BD * self.input_scale
        x_hat_n, f, pre = self._forward_n(x_n)
        mse = mse_loss(x_n, x_hat_n)
        l1 = (f * self.W_dec.norm(dim=1)).sum(-1).mean()
        self._track_firing_(f.detach())
        losses = {"loss": mse + self.cfg.l1_coeff * l1, "mse": mse, "l1": l1}
        return StepOutput(losses, SAEOutput(x_hat_n / self.input_scale, f, pre))
