"""SAE modules: pure torch math, no file paths, no IO.

Architectures register themselves by name (`register_sae("topk")`); `build_sae(cfg)` looks the
name up. `relu` is the standard L1 SAE, `topk` the TopK SAE with AuxK, `batchtopk` TopK over the
batch with a learned inference threshold, `matryoshka` BatchTopK with nested prefix losses,
`jumprelu` learned per-latent thresholds,
`momentum` wraps any one
with per-feature momentum tracking, competition detection and the competition penalty.
"""

from __future__ import annotations

from msae_core.sae.base import (SAE, MomentumConfig, SAEConfig, SAEOutput, StepOutput, build_sae, momentum_bases,
                                 register_sae, registered_archs, sae_class)
from msae_core.sae import relu as _relu  # noqa: F401  (registers "relu")
from msae_core.sae import topk as _topk  # noqa: F401  (registers "topk")
from msae_core.sae import batchtopk as _batchtopk  # noqa: F401  (registers "batchtopk")
from msae_core.sae import matryoshka as _matryoshka  # noqa: F401  (registers "matryoshka")
from msae_core.sae import jumprelu as _jumprelu  # noqa: F401  (registers "jumprelu")
from msae_core.sae import momentum as _momentum  # noqa: F401  (registers "momentum")

__all__ = ["SAE", "MomentumConfig", "SAEConfig", "SAEOutput", "StepOutput", "build_sae", "momentum_bases",
           "register_sae", "registered_archs", "sae_class"]
