"""eval.json (SAEBench layout, one entry per eval) -> the flat numbers the workbench shows."""

from __future__ import annotations

import math
from typing import Any

# workbench key -> (eval, metric group, metric) in SAEBench's names
PATHS: dict[str, tuple[str, str, str]] = {
    "explained_variance": ("core", "reconstruction_quality", "explained_variance"),
    "mse": ("core", "reconstruction_quality", "mse"),
    "cossim": ("core", "reconstruction_quality", "cossim"),
    "kl_div_score": ("core", "model_behavior_preservation", "kl_div_score"),
    "ce_loss_score": ("core", "model_performance_preservation", "ce_loss_score"),
    "l0": ("core", "sparsity", "l0"),
    "l1": ("core", "sparsity", "l1"),
    "l2_ratio": ("core", "shrinkage", "l2_ratio"),
    "relative_reconstruction_bias": ("core", "shrinkage", "relative_reconstruction_bias"),
    "dead_fraction": ("core", "misc_metrics", "frac_dead_features"),
    "dead_window_tokens": ("core", "misc_metrics", "dead_window_tokens"),
    "dense_fraction": ("core", "misc_metrics", "frac_dense_features"),
    "absorption": ("absorption", "mean", "mean_absorption_fraction_score"),
    "absorption_full": ("absorption", "mean", "mean_full_absorption_score"),
    "n_split_features": ("absorption", "mean", "mean_num_split_features"),
    "absorption_ci_low": ("absorption", "uncertainty", "mean_absorption_fraction_score_ci_low"),
    "absorption_ci_high": ("absorption", "uncertainty", "mean_absorption_fraction_score_ci_high"),
    "absorption_full_ci_low": ("absorption", "uncertainty", "mean_full_absorption_score_ci_low"),
    "absorption_full_ci_high": ("absorption", "uncertainty", "mean_full_absorption_score_ci_high"),
    "absorption_seeds": ("absorption", "uncertainty", "n_seeds"),
    "llm_probe_acc": ("sparse_probing", "llm", "llm_test_accuracy"),
    "sae_probe_acc": ("sparse_probing", "sae", "sae_test_accuracy"),
    "sae_top1_acc": ("sparse_probing", "sae", "sae_top_1_test_accuracy"),
    "sae_probe_acc_ci_low": ("sparse_probing", "uncertainty", "sae_test_accuracy_ci_low"),
    "sae_probe_acc_ci_high": ("sparse_probing", "uncertainty", "sae_test_accuracy_ci_high"),
    "sae_top1_acc_ci_low": ("sparse_probing", "uncertainty", "sae_top_1_test_accuracy_ci_low"),
    "sae_top1_acc_ci_high": ("sparse_probing", "uncertainty", "sae_top_1_test_accuracy_ci_high"),
    "llm_probe_acc_ci_low": ("sparse_probing", "uncertainty", "llm_test_accuracy_ci_low"),
    "llm_probe_acc_ci_high": ("sparse_probing", "uncertainty", "llm_test_accuracy_ci_high"),
    # a run trained on a synthetic store (msae synth), against its ground truth
    "synth_absorption": ("synthetic", "absorption", "mean_absorption"),
    "synth_absorption_ci_low": ("synthetic", "absorption", "mean_absorption_ci_low"),
    "synth_absorption_ci_high": ("synthetic", "absorption", "mean_absorption_ci_high"),
    "synth_lost": ("synthetic", "absorption", "mean_lost"),
    "synth_kept": ("synthetic", "absorption", "mean_kept"),
    "synth_f1": ("synthetic", "classification", "f1"),
    "synth_mcc": ("synthetic", "recovery", "mcc"),
    "synth_explained_variance": ("synthetic", "reconstruction", "explained_variance"),
    "synth_l0": ("synthetic", "sparsity", "l0"),
}


# a score's confidence interval: its (low, high) keys above
INTERVALS: dict[str, tuple[str, str]] = {
    key: (f"{key}_ci_low", f"{key}_ci_high") for key in PATHS if f"{key}_ci_low" in PATHS}


# the core eval's numbers that are always computed when present: null there means NaN (json has
# none); elsewhere null can be legitimate (no parent with enough rows, an interval of one seed)
ALWAYS_NUMBERS = ("explained_variance", "mse", "cossim", "l0", "l1", "synth_explained_variance")


def not_numbers(eval_json: Any) -> list[str]:
    """The workbench keys of ALWAYS_NUMBERS that an eval in `eval_json` reported as null, NaN or
    infinite (json has no NaN: an eval writes null for it), e.g. a SAE whose weights hold NaN."""
    out = []
    if not isinstance(eval_json, dict):
        return out
    for key in ALWAYS_NUMBERS:
        section, group, name = PATHS[key]
        try:
            v = eval_json[section]["eval_result_metrics"][group][name]
        except (KeyError, TypeError):
            continue
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            out.append(key)
    return out


def summarize(eval_json: Any) -> dict[str, float]:
    """The numbers present in `eval_json`; a missing or non-numeric one is left out."""
    out: dict[str, float] = {}
    if not isinstance(eval_json, dict):
        return out
    for key, (section, group, name) in PATHS.items():
        try:
            v = eval_json[section]["eval_result_metrics"][group][name]
        except (KeyError, TypeError):
            continue
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out
