"""Matched L0 for the evals: an SAE whose inference is a threshold (BatchTopK and Matryoshka: one
threshold learned as a running statistic; JumpReLU: one per latent) is set, for the evals only
(the run's weights are not changed), to the threshold at which its mean L0 on held-out rows
equals a target, so that architectures are compared at the same sparsity (BatchTopK's learned
threshold gave L0 about 8 where a TopK of the same k sits at 10).

    BatchTopK, Matryoshka: theta = the (N * target)-th largest pre-activation of N held-out rows,
                           so that exactly N * target entries exceed it (ties aside)
    JumpReLU:              theta_F' = theta_F exp(s), the one s (bisection) at which the mean
                           number of pre_F > theta_F' per row is the target

Held-out rows: fresh rows of a synthetic store's generator (its eval split, a chunk of its own);
for a language model, windows of the corpus after those the activation store holds, run up to
the layer, special tokens left out: held out from training, drawn from the same pool as the core
eval's windows with another seed (so the two may share a few windows). A TopK or
ReLU SAE has no inference threshold: calibrating one is refused in one line.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from msae_core.errors import MsaeError

THRESHOLDED = ("batchtopk", "matryoshka", "jumprelu")  # the architectures with an inference threshold
CALIBRATION_ROWS = 4096   # held-out rows the threshold is set on
CALIBRATION_SEED = 7      # their windows or generator chunk: not the evals' own


def thresholded_base(sae: Any) -> Any:
    """The module whose inference threshold sets the L0 (a momentum SAE's base), or None."""
    base = getattr(sae, "base", sae)
    return base if hasattr(base, "threshold") or hasattr(base, "log_threshold") else None


def check_calibratable(sae: Any, target_l0: float) -> Any:
    """The thresholded module of `sae` (thresholded_base); MsaeError in one line when it has none
    or the target is outside (0, d_sae]."""
    base = thresholded_base(sae)
    if base is None:
        raise MsaeError(f"a {sae.cfg.arch} SAE has no inference threshold to calibrate (its L0 is set by "
                        "training: k for TopK, the L1 coefficient for ReLU); match L0 with a thresholded "
                        "architecture (batchtopk, matryoshka, jumprelu) or retrain")
    F = sae.cfg.d_sae
    if not math.isfinite(target_l0) or not 0 < target_l0 <= F:
        raise MsaeError(f"target L0 must be in (0, d_sae={F}] (got {target_l0})")
    return base


def _count(pre_NF: torch.Tensor, theta_F: torch.Tensor) -> float:
    return float(((pre_NF > theta_F) & (pre_NF > 0)).sum(1).float().mean())


@torch.no_grad()
def calibrate_l0_(sae: Any, rows_ND: torch.Tensor, target_l0: float) -> dict:
    """Set `sae`'s inference threshold (in place) so that its mean L0 on `rows_ND` (raw
    activations) is `target_l0`; returns what was done: target, achieved and the previous L0,
    the threshold or scale, the rows. MsaeError for an SAE without a threshold or a target
    outside (0, d_sae]."""
    base = check_calibratable(sae, target_l0)
    dev = next(base.parameters()).device
    x = rows_ND.to(dev, torch.float32)
    pre = base.pre_activation(x * base.input_scale).float()
    before = float((sae.encode(x) > 0).sum(1).float().mean())
    N = pre.shape[0]
    if hasattr(base, "log_threshold"):
        theta = base.log_threshold.detach().exp().float()
        lo, hi = -30.0, 30.0
        for _ in range(60):  # L0 falls as s grows
            mid = (lo + hi) / 2
            if _count(pre, theta * math.exp(mid)) > target_l0:
                lo = mid
            else:
                hi = mid
        s = hi
        base.log_threshold.add_(s)
        info = {"method": "jumprelu thresholds scaled by one factor", "scale": math.exp(s)}
    else:
        flat = torch.relu(pre).flatten()
        k = max(1, min(int(round(N * target_l0)), flat.numel()))
        value = float(flat.topk(k + 1 if k < flat.numel() else k).values[-1])  # exactly k entries above it
        base.threshold.fill_(value)
        info = {"method": "batchtopk threshold at the (N x target)-th largest pre-activation", "threshold": value}
    after = float((sae.encode(x) > 0).sum(1).float().mean())
    return {**info, "target_l0": float(target_l0), "achieved_l0": after, "l0_before": before, "rows": int(N)}


def heldout_rows(ctx: Any, n: int = CALIBRATION_ROWS) -> torch.Tensor:
    """`n` held-out activation rows of the run in `ctx` (module docstring), raw (N, D) float32."""
    import numpy as np

    from msae_core.data.synth import load_features, sample_rows, synth_config

    synth = synth_config(ctx.manifest)
    if synth is not None:
        x, _ = sample_rows(synth, load_features(ctx.store_path), n, chunk=(CALIBRATION_SEED << 24) + 1, split="eval")
        return x
    from msae_core.data.text import corpus_of
    from msae_core.evals.core import _store_skip_tokens, eval_windows, keep_mask

    lm = ctx.lm
    per_window = max(ctx.context_size - 1, 1)
    windows, _ = eval_windows(corpus_of(ctx.manifest), lm.tokenizer, ctx.context_size,
                              math.ceil(1.2 * n / per_window), skip_tokens=_store_skip_tokens(ctx.manifest),
                              seed=CALIBRATION_SEED,
                              separator=ctx.separator)
    out, got = [], 0
    for i in range(0, len(windows), 8):
        ids = torch.from_numpy(np.stack(windows[i:i + 8]))
        with torch.inference_mode():
            h = lm.resid_post(ids, ctx.layer, stop_early=True).float()
        keep = keep_mask(ids, sorted(lm.special_ids)).to(h.device)
        rows = h[keep].cpu()
        out.append(rows)
        got += len(rows)
        if got >= n:
            break
    return torch.cat(out)[:n]
