"""Reconstruction and sparsity metrics on tensors (pure; SAEBench's definitions where it has one).

x, x_hat: (B, D); f: (B, F). Sums run over the whole batch, as SAEBench's core eval does."""

from __future__ import annotations

import torch


def fvu(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2."""
    resid = (x_BD - x_hat_BD).float().pow(2).sum()
    total = (x_BD - x_BD.mean(0, keepdim=True)).float().pow(2).sum()
    return resid / total.clamp_min(1e-12)


def explained_variance(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """1 - FVU: 1 for a perfect reconstruction, 0 for predicting the batch mean."""
    return 1.0 - fvu(x_BD, x_hat_BD)


def mse(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    return (x_BD - x_hat_BD).float().pow(2).mean()


def cossim(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(x_BD.float(), x_hat_BD.float(), dim=-1).mean()


def l0(f_BF: torch.Tensor) -> torch.Tensor:
    """Mean number of active latents per token."""
    return (f_BF != 0).float().sum(-1).mean()


def l1(f_BF: torch.Tensor) -> torch.Tensor:
    return f_BF.float().abs().sum(-1).mean()


def firing_frequency(f_BF: torch.Tensor) -> torch.Tensor:
    """Per latent, the fraction of tokens it fires on. (F,)"""
    return (f_BF != 0).float().mean(0)
