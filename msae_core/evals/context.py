"""What an eval needs about one run: its trained SAE, its run config, the activation store's manifest
(model, layer, corpus, context size) and, loaded once and shared by every eval, the language model."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from msae_core.artifacts import RUN_CONFIG, SAE_CONFIG, SAE_WEIGHTS
from msae_core.devices import resolve_device
from msae_core.errors import MsaeError
from msae_core.data.store import read_manifest

_NOT_FINISHED = {"queued": "is queued and has not trained yet",
                 "running": "is still training",
                 "diverged": "diverged (its loss became NaN or inf)",
                 "failed": "failed",
                 "cancelled": "was cancelled before it finished"}


@dataclass
class EvalContext:
    """One run, ready to evaluate. `lm` loads the run's language model on first use."""

    run_dir: Path
    sae: Any                       # msae_core.sae.SAE, eval mode, on `device`
    config: Any                    # msae_core.runs.config.RunConfig
    manifest: dict                 # the activation store's manifest.json
    device: torch.device
    progress: bool = True
    model_dtype: str = "auto"  # the language model's: auto = bfloat16 on CUDA (as SAEBench and training), float32 on CPU
    _lm: Any = field(default=None, repr=False)

    @property
    def model_name(self) -> str:
        return str(self.manifest.get("model", "embedded"))

    @property
    def layer(self) -> int:
        return int(self.manifest["layer"])

    @property
    def hook_name(self) -> str:
        """SAELens/TransformerLens name of the hook point the SAE reads."""
        return f"blocks.{self.layer}.hook_resid_post"

    @property
    def context_size(self) -> int:
        return int(self.manifest.get("context_size", 128))

    @property
    def separator(self) -> str:
        """The token the store's windows joined documents with (text.context_windows); a store
        harvested before the setting joined them with EOS."""
        from msae_core.data.text import LEGACY_SEPARATOR

        return str(self.manifest.get("separator", LEGACY_SEPARATOR))

    @property
    def corpus_name(self) -> str:
        c = self.manifest.get("corpus", "embedded")
        return str(c.get("name", "embedded")) if isinstance(c, dict) else str(c)

    @property
    def store_path(self) -> Path:
        return Path(self.config.data.store_path)

    @property
    def lm(self) -> Any:
        if self._lm is None:
            from msae_core.data.lm import load_lm

            if isinstance(self.manifest.get("synthetic"), dict):
                raise MsaeError(f"run {self.run_dir.name} trained on synthetic activations (msae synth): "
                                "there is no language model to run; score it with --evals synthetic")

            from msae_core.data.lm import model_dtype

            if self.device.type == "cuda":  # TF32 matmuls, as in training
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
            self._lm = load_lm(self.model_name, device=self.device, dtype=model_dtype(self.model_dtype, self.device))
        return self._lm

    @lm.setter
    def lm(self, value: Any) -> None:
        self._lm = value

    def sae_encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.sae.encode(x_BD.to(self.device, torch.float32))

    @cached_property
    def saebench_weights(self) -> dict[str, torch.Tensor]:
        """The SAE's weights in SAEBench's units, on `device` (msae_core.sae_io.saebench_weights:
        SAEBench folds decoder norms into the SAEs it loads)."""
        from msae_core.sae_io import saebench_weights

        return {k: v.to(self.device) for k, v in saebench_weights(self.sae).items()}

    def sae_encode_saebench(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Latents in SAEBench's units: each scaled by its decoder norm in input units."""
        return self.sae_encode(x_BD) * self.saebench_weights["latent_scale"]

    def sae_reconstruct(self, x_BD: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.sae.forward(x_BD.to(self.device, torch.float32)).x_hat

    def sae_info(self) -> dict:
        """The SAE's settings for `sae_cfg_dict` of SAEBench's schema."""
        import dataclasses

        cfg = dataclasses.asdict(self.sae.cfg)
        return {**cfg, "model_name": self.model_name, "hook_name": self.hook_name,
                "hook_layer": self.layer, "context_size": self.context_size,
                "dataset_path": self.corpus_name, "architecture": cfg.get("arch")}


def open_run(run_dir: str | os.PathLike, device: str | torch.device | None = None,
             progress: bool = True, model_dtype: str = "auto") -> EvalContext:
    """Check that `run_dir` holds a finished run with weights, and load it. Refusals are one line."""
    from msae_core.runs.config import RunConfig
    from msae_core.runs.folder import read_status
    from msae_core.sae_io import load_sae

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MsaeError(f"no run folder at {run_dir}")
    status = read_status(run_dir)
    state = status.get("state")
    if state in _NOT_FINISHED and not (run_dir / SAE_WEIGHTS).exists():
        raise MsaeError(f"run {run_dir.name} {_NOT_FINISHED[state]}: nothing to evaluate yet")
    if state == "running":
        raise MsaeError(f"run {run_dir.name} is still training (step {status.get('step')} of "
                        f"{status.get('total_steps')}); evaluate it when it is done")
    if state in ("diverged", "failed"):
        raise MsaeError(f"run {run_dir.name} {_NOT_FINISHED[state]}; its weights are not a trained SAE "
                        f"({status.get('error') or 'see train.log'})")
    if not (run_dir / SAE_WEIGHTS).exists() or not (run_dir / SAE_CONFIG).exists():
        raise MsaeError(f"run {run_dir.name} has no final weights ({SAE_WEIGHTS} missing)")
    config = RunConfig.load(run_dir / RUN_CONFIG, recorded=True)
    manifest = read_manifest(config.data.store_path) if config.data.store_path else None
    if manifest is None and config.data.source == "stream":  # no cache: a manifest's fields, from the run
        d = config.data
        manifest = {"model": d.model, "layer": d.layer, "context_size": d.context_size, "corpus": d.corpus,
                    "prepend_bos": True, "n_windows": int(status.get("stream_windows") or 0),
                    "cursor": status.get("stream_cursor"), "source": "stream"}
    elif manifest is not None and config.data.source == "stream":  # the evals skip every window the
        # run read (its cache holds them all once finished; a cache cut short holds fewer)
        streamed, cached = int(status.get("stream_windows") or 0), int(manifest.get("n_windows") or 0)
        manifest = {**manifest, "n_windows": max(cached, streamed),
                    "cursor": status.get("stream_cursor") if streamed >= cached else None}
    if manifest is None:
        raise MsaeError(f"run {run_dir.name}: its activation store {config.data.store_path} is gone "
                        f"(needed for the model, layer and corpus)")
    dev = resolve_device(device)
    sae = load_sae(run_dir, device=dev).eval()
    from msae_core.data.lm import MODEL_DTYPES

    if model_dtype not in MODEL_DTYPES:
        raise MsaeError(f"model dtype must be one of {', '.join(MODEL_DTYPES)} (got {model_dtype!r})")
    return EvalContext(run_dir=run_dir, sae=sae, config=config, manifest=manifest, device=dev,
                       progress=progress, model_dtype=model_dtype)
