"""SAE weights on disk: our format (safetensors + json, momentum buffers included), SAELens's
on-disk format, and a wrapper with SAEBench's custom-SAE interface.

Only safetensors and json are read; nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import load_file

from msae_core import __version__
from msae_core.artifacts import (SAE_CONFIG, SAE_WEIGHTS, SAELENS_CONFIG, SAELENS_WEIGHTS,
                                 atomic_save_safetensors, atomic_write_json)
from msae_core.configutil import from_dict
from msae_core.errors import MsaeError
from msae_core.sae import SAE, SAEConfig, build_sae, sae_class
from msae_core.sae.base import nest_momentum

SAE_FORMAT = "msae-sae/1"

# A momentum SAE's state dict has module paths (base.W_enc, tracker.rate); on disk it keeps the first
# format's flat names: the base's own (W_enc, ...), the tracker's, and its table under these names.
_TRACKER_DISK_NAMES = {"partner_FC": "cand_j", "kappa_FC": "cand_kappa", "first_step_FC": "cand_first",
                       "last_step_FC": "cand_last"}


def disk_name(module_key: str) -> str:
    """"base.W_enc" -> "W_enc", "tracker.partner_FC" -> "cand_j"; a plain SAE's keys unchanged."""
    owner, _, name = module_key.partition(".")
    if owner == "base" and name:
        return name
    if owner == "tracker" and name:
        return _TRACKER_DISK_NAMES.get(name, name)
    return module_key


def disk_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with the on-disk names (order kept)."""
    return {disk_name(k): v for k, v in state.items()}


def module_state(sae: SAE, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict read from disk with `sae`'s module paths (module paths pass through)."""
    to_module = {disk_name(k): k for k in sae.state_dict()}
    return {to_module.get(k, k): v for k, v in state.items()}


def save_sae(sae: SAE, folder: str | os.PathLike, extra: dict | None = None) -> None:
    """Write `sae.safetensors` (parameters and buffers, under their disk names) and `sae_config.json`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = disk_state({k: v.detach().cpu() for k, v in sae.state_dict().items()})
    atomic_save_safetensors(folder / SAE_WEIGHTS, state, metadata={"format": SAE_FORMAT})
    atomic_write_json(folder / SAE_CONFIG, {"format": SAE_FORMAT, "msae_version": __version__,
                                           "config": dataclasses.asdict(sae.cfg), **(extra or {})})


def read_sae_config(folder: str | os.PathLike) -> SAEConfig:
    path = Path(folder) / SAE_CONFIG
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MsaeError(f"no SAE weights in {folder} ({SAE_CONFIG} missing)") from None
    except (json.JSONDecodeError, OSError) as exc:
        raise MsaeError(f"{path} is unreadable: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != SAE_FORMAT:
        raise MsaeError(f"{path} is not an msae SAE config (format {data.get('format') if isinstance(data, dict) else None!r})")
    config = data["config"]
    return from_dict(SAEConfig, nest_momentum(config) if isinstance(config, dict) else config)


def load_sae(folder: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
    """Rebuild the SAE saved in `folder`; its outputs equal the saved module's."""
    cfg = read_sae_config(folder)
    path = Path(folder) / SAE_WEIGHTS
    if not path.exists():
        raise MsaeError(f"no SAE weights in {folder} ({SAE_WEIGHTS} missing)")
    try:
        state = load_file(str(path), device=str(device))
    except Exception as exc:  # safetensors raises its own error types on a torn file
        raise MsaeError(f"{path} is unreadable: {exc}") from exc
    sae = build_sae(cfg).to(device)
    missing, unexpected = sae.load_state_dict(module_state(sae, state), strict=False)
    if missing or unexpected:
        raise MsaeError(f"{path} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return sae


def folded_weights(sae: SAE) -> dict[str, torch.Tensor]:
    """Weights acting on raw (unscaled) inputs: the input scale folded into W_enc, W_dec and b_dec.

    pre = (x s - b_dec) W_enc + b_enc = (x - b_dec / s)(s W_enc) + b_enc
    x_hat = (f W_dec + b_dec) / s = f (W_dec / s) + b_dec / s
    """
    s = sae.input_scale.detach().float()
    return {"W_enc": (sae.W_enc.detach().float() * s).contiguous(),
            "W_dec": (sae.W_dec.detach().float() / s).contiguous(),
            "b_enc": sae.b_enc.detach().float().contiguous(),
            "b_dec": (sae.b_dec.detach().float() / s).contiguous()}


def saebench_weights(sae: SAE) -> dict[str, torch.Tensor]:
    """The weights in SAEBench's units: decoder rows of norm 1 in input units, each latent's
    decoder norm folded into its activation (SAELens's `fold_W_dec_norm`, which SAEBench applies to
    the SAEs it loads and assumes of custom ones).

    With n_j = ||row j of folded_weights' W_dec||: W_dec_j / n_j, W_enc[:, j] n_j, b_enc_j n_j, and
    a latent's activation f_j n_j (`latent_scale` = n). The reconstruction is unchanged; for a
    ReLU SAE encode(x) n equals relu(x W_enc' + b_enc') exactly; a TopK SAE keeps the latents its
    own pre-activations select (scaling them by n could change the top k)."""
    w = folded_weights(sae)
    n = w["W_dec"].norm(dim=1).clamp_min(1e-12)
    return {"W_enc": (w["W_enc"] * n[None, :]).contiguous(), "W_dec": (w["W_dec"] / n[:, None]).contiguous(),
            "b_enc": (w["b_enc"] * n).contiguous(), "b_dec": w["b_dec"], "latent_scale": n.contiguous()}


def export_saelens(sae: SAE, folder: str | os.PathLike, *, model_name: str = "",
                   hook_name: str = "", context_size: int = 128, dataset_path: str = "",
                   prepend_bos: bool = True) -> Path:
    """Write SAELens's on-disk format: `cfg.json` with its field names and
    `sae_weights.safetensors` with W_enc (d_in, d_sae), W_dec (d_sae, d_in), b_enc, b_dec.

    A momentum SAE is exported as its base architecture (the tracker is training-time state); a
    `relu` SAE as SAELens's "standard" architecture, a `batchtopk` one as "jumprelu" with its
    threshold for every latent (as SAELens saves its BatchTopK SAEs; folding the input scale leaves
    the pre-activations, so the threshold, unchanged)."""
    folder = Path(folder)
    architecture = sae_class(sae.cfg.base_arch).saelens_architecture
    w = folded_weights(sae)
    if architecture == "jumprelu":
        w["threshold"] = sae.jump_thresholds().float().contiguous()
    atomic_save_safetensors(folder / SAELENS_WEIGHTS, w)
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"model_name": model_name, "hook_name": hook_name, "hook_head_index": None,
                     "prepend_bos": prepend_bos, "context_size": context_size,
                     "dataset_path": dataset_path, "sae_lens_training_version": None,
                     "msae_arch": sae.cfg.arch, "msae_config": dataclasses.asdict(sae.cfg)},
        # SAELens 5.x flat field names, kept for older readers
        "model_name": model_name, "hook_name": hook_name, "hook_layer": _layer_of(hook_name),
        "context_size": context_size, "prepend_bos": prepend_bos, "dataset_path": dataset_path,
        "activation_fn_str": _activation_fn_str(architecture),
        "finetuning_scaling_factor": False,
    }
    if architecture == "topk":
        cfg["k"] = sae.cfg.k
        cfg["activation_fn_kwargs"] = {"k": sae.cfg.k}
    atomic_write_json(folder / SAELENS_CONFIG, cfg)
    return folder


# SAELens's architectures -> ours ("standard" is a ReLU SAE; SAELens saves BatchTopK and
# Matryoshka BatchTopK SAEs as "jumprelu" with their threshold)
SAELENS_IMPORT = {"standard": "relu", "relu": "relu", "topk": "topk", "jumprelu": "jumprelu"}


def _saelens_k(cfg: dict) -> Any:
    """A SAELens cfg's k: its own field, else activation_fn_kwargs.k (older versions)."""
    return cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))


def saelens_config_problems(cfg: Any) -> list[str]:
    """What is missing or inconsistent in a SAELens cfg.json (parsed), for one line."""
    if not isinstance(cfg, dict):
        return ["cfg.json is not a json object"]
    out = []
    arch = cfg.get("architecture", "standard")
    if arch not in SAELENS_IMPORT:
        out.append(f"architecture {arch!r} is not one msae reads ({', '.join(SAELENS_IMPORT)})")
    for name in ("d_in", "d_sae"):
        v = cfg.get(name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            out.append(f"{name} is missing or not a positive integer (got {json.dumps(v)})")
    k = _saelens_k(cfg)
    d_sae = cfg.get("d_sae")
    if arch == "topk" and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        out.append(f"a topk SAE needs k, a positive integer (cfg k or activation_fn_kwargs.k; got {json.dumps(k)})")
    elif arch == "topk" and isinstance(d_sae, int) and k > d_sae:
        out.append(f"k {k} is more than d_sae {d_sae}: a TopK SAE keeps at most d_sae latents")
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", None):
        out.append(f"normalize_activations {norm!r}: only SAEs that read raw activations are read ('none')")
    return out


def import_saelens(folder: str | os.PathLike) -> tuple[SAE, dict]:
    """An SAE of ours from a folder in SAELens's on-disk format (cfg.json + sae_weights.safetensors:
    W_enc (d_in, d_sae), W_dec (d_sae, d_in), b_enc, b_dec, and threshold for jumprelu), with input
    scale 1 and the weights as given, so that its encode and forward equal SAELens's. Also
    returns the cfg. MsaeError naming what is missing or inconsistent, in one line."""
    folder = Path(folder)
    cfg_path, w_path = folder / SAELENS_CONFIG, folder / SAELENS_WEIGHTS
    missing = [p.name for p in (cfg_path, w_path) if not p.is_file()]
    if missing:
        raise MsaeError(f"{folder} is not a SAELens SAE folder: {' and '.join(missing)} missing")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError) as exc:
        raise MsaeError(f"{cfg_path} is unreadable: {exc}") from exc
    problems = saelens_config_problems(cfg)
    if problems:
        raise MsaeError(f"{cfg_path}: " + "; ".join(problems))
    try:
        w = load_file(str(w_path))
    except Exception as exc:  # safetensors raises its own error types on a torn file
        raise MsaeError(f"{w_path} is unreadable: {exc}") from exc
    arch = SAELENS_IMPORT[cfg.get("architecture", "standard")]
    D, F = cfg["d_in"], cfg["d_sae"]
    want = {"W_enc": (D, F), "W_dec": (F, D), "b_enc": (F,), "b_dec": (D,)}
    if arch == "jumprelu":
        want["threshold"] = (F,)
    bad = [f"{k} {'missing' if k not in w else f'has shape {tuple(w[k].shape)}, cfg says {shape}'}"
           for k, shape in want.items() if k not in w or tuple(w[k].shape) != shape]
    if bad:
        raise MsaeError(f"{w_path} does not match its cfg.json: " + "; ".join(bad))
    broken = [f"{k} holds {n} NaN or infinite values" for k in want
              if (n := int((~torch.isfinite(w[k].float())).sum()))]
    if broken:
        raise MsaeError(f"{w_path}: " + "; ".join(broken) + ": a diverged or damaged SAE")
    if arch == "jumprelu" and (n_neg := int((w["threshold"] < 0).sum())):
        raise MsaeError(f"{w_path}: {n_neg} JumpReLU thresholds are negative (least "
                        f"{float(w['threshold'].min()):.3g}): a JumpReLU threshold is >= 0")
    k = _saelens_k(cfg)
    fields: dict[str, Any] = {"arch": arch, "d_in": D, "d_sae": F}
    if arch == "topk":
        fields["k"] = int(k)
    sae = build_sae(SAEConfig(**fields))
    W_enc, b_enc = w["W_enc"].float(), w["b_enc"].float()
    if cfg.get("apply_b_dec_to_input", True) is False:  # pre = x W_enc + b_enc: move b_dec into b_enc
        b_enc = b_enc + w["b_dec"].float() @ W_enc
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(w["W_dec"].float())
        sae.b_enc.copy_(b_enc)
        sae.b_dec.copy_(w["b_dec"].float())
        sae.input_scale.fill_(1.0)
        if arch == "jumprelu":
            sae.log_threshold.copy_(w["threshold"].float().log())  # thresholds are >= 0 (checked)
    return sae.eval(), cfg


def _activation_fn_str(saelens_architecture: str) -> str:
    """SAELens's activation name of one of its architectures: relu for "standard", else its name."""
    return "relu" if saelens_architecture == "standard" else saelens_architecture


def _layer_of(hook_name: str) -> int | None:
    for part in hook_name.split("."):
        if part.isdigit():
            return int(part)
    return None


class SAEBenchSAE(torch.nn.Module):
    """SAEBench's custom-SAE interface (sae_bench/custom_saes/base_sae.py): W_enc (d_in, d_sae),
    W_dec (d_sae, d_in), b_enc, b_dec, encode, decode, forward, cfg, dtype, device.

    In SAEBench's units (`saebench_weights`): decoder rows of norm 1 in input units, latents
    scaled by their decoder norms, so SAEBench's probe projections, k-sparse probes and L1 see the
    numbers it assumes (it only warns about unnormalised decoders). Works without sae-bench
    installed; when it is, `cfg` is its CustomSAEConfig."""

    def __init__(self, sae: SAE, *, model_name: str, hook_layer: int, hook_name: str | None = None,
                 context_size: int = 128, device: str = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        self.inner = sae.to(device=device)
        w = saebench_weights(sae)
        self.register_buffer("latent_scale", w.pop("latent_scale").to(device=device, dtype=torch.float32))
        for k, v in w.items():
            setattr(self, k, torch.nn.Parameter(v.to(device=device, dtype=dtype), requires_grad=False))
        self.device = torch.device(device)
        self.dtype = dtype
        hook_name = hook_name or f"blocks.{hook_layer}.hook_resid_post"
        base = sae.cfg.base_arch
        fields = dict(model_name=model_name, d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae,
                      hook_layer=hook_layer, hook_name=hook_name, context_size=context_size,
                      architecture=sae.cfg.arch, dtype=str(dtype).removeprefix("torch."),
                      apply_b_dec_to_input=True, prepend_bos=True, normalize_activations="none",
                      dataset_path="", dataset_trust_remote_code=False, seqpos_slice=(None,),
                      device=str(device),
                      activation_fn_str=_activation_fn_str(sae_class(base).saelens_architecture))
        try:
            from sae_bench.custom_saes.custom_sae_config import CustomSAEConfig  # type: ignore

            self.cfg = CustomSAEConfig(model_name, d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae,
                                       hook_name=hook_name, hook_layer=hook_layer)
            self.cfg.architecture = sae.cfg.arch
            self.cfg.dtype = fields["dtype"]
        except ImportError:
            self.cfg = SimpleNamespace(**fields)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        f = self.inner.encode(x.to(self.inner.W_enc.dtype)).float() * self.latent_scale
        return f.to(self.dtype)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f.to(self.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
