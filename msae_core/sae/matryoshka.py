"""The Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with
Matryoshka Sparse Autoencoders"): a BatchTopK SAE (batchtopk.py) whose first latents must also
reconstruct on their own, at each of a list of nested widths w_1 < w_2 < ... < w_M = F.

    f        = BatchTopK(pre)                                   (as batchtopk.py, one selection)
    x_hat_m  = f[:, :w_m] W_dec[:w_m] + b_dec                   (the prefix of the same latents)
    loss     = sum_m ||x - x_hat_m||^2 + auxk_coeff * AuxK      (x_hat_M is the full reconstruction)

The early latents are pushed to carry what is common (a parent feature), since they must
reconstruct without the later ones: the pressure that counters feature absorption. Each prefix is
decoded sparsely (embedding_bag over the kept latents below w_m). Where implementations differ:
the paper and dictionary_learning truncate the one batch selection, as here; SAELens's current
version re-selects the top B k within each prefix. Inference, the threshold and the SAELens
export (jumprelu) are BatchTopK's. `matryoshka_widths` empty means w = (F/16, F/4, F) (those of
them that are at least k); a list that does not end at F gets F appended.
"""

from __future__ import annotations

import torch

from msae_core.configutil import Problem
from msae_core.sae.base import SAEConfig, mse_loss, register_sae
from msae_core.sae.batchtopk import BatchTopKSAE


def matryoshka_levels(cfg: SAEConfig) -> list[int]:
    """The prefix widths trained, ending at d_sae."""
    if cfg.matryoshka_widths:
        widths = list(cfg.matryoshka_widths)
    else:  # the default levels that fit: at least k, below d_sae
        widths = [w for w in (cfg.d_sae // 16, cfg.d_sae // 4) if cfg.k <= w < cfg.d_sae]
    return widths if widths and widths[-1] == cfg.d_sae else widths + [cfg.d_sae]


def matryoshka_problems(cfg: SAEConfig) -> list[Problem]:
    levels = matryoshka_levels(cfg)
    out = []
    if any(b <= a for a, b in zip(levels, levels[1:])) or levels[-1] > cfg.d_sae:
        out.append(Problem("matryoshka_widths", f"matryoshka_widths must increase strictly up to d_sae={cfg.d_sae} (got {list(cfg.matryoshka_widths)})"))
    if levels[0] < cfg.k:
        out.append(Problem("matryoshka_widths", f"matryoshka_widths: the smallest width ({levels[0]}) must be >= k ({cfg.k})"))
    return out


@register_sae("matryoshka")
class MatryoshkaSAE(BatchTopKSAE):
    sparsity = "k"
    saelens_architecture = "jumprelu"

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.levels = matryoshka_levels(cfg)

    @classmethod
    def config_problems(cls, cfg: SAEConfig) -> list[Problem]:
        return matryoshka_problems(cfg)

    def _extra_losses(self, x_n: torch.Tensor, vals_N: torch.Tensor, tok_N: torch.Tensor,
                      lat_N: torch.Tensor) -> dict[str, torch.Tensor]:
        """The MSE of each inner prefix's reconstruction (the full one is BatchTopK's)."""
        B, inner = x_n.shape[0], {}
        for w in self.levels[:-1]:
            keep = lat_N < w
            inner[f"mse_w{w}"] = mse_loss(x_n, self._decode_kept_n(vals_N[keep], tok_N[keep], lat_N[keep], B))
        return inner
