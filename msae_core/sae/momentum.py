"""The momentum SAE: a base SAE (`relu` or `topk`, from the registry) and a `MomentumTracker`
(tracker.py: the equations and the design choices), composed.

    loss = base loss + lam * L_comp

The base keeps its parameters, initialisation, encode/decode and loss; the tracker adds the
per-feature momentum, the candidate pair table and the penalty. `loss_terms` is the one place the
tracker's statistics change: it computes the penalty from the table as it stands, then the tracker
takes the batch in (`MomentumTracker.update_`), once per call. `post_step_` is the base's (decoder
renormalisation) and leaves the statistics alone. With lam = 0 the loss, gradients and weights are
exactly the base's.

On disk (sae_io) the momentum SAE keeps the first format's flat names: the base's `W_enc`, `W_dec`,
`b_enc`, `b_dec`, `input_scale`, `tokens_since_fired` and the tracker's `rate`, `mag`, `n_updates`,
`last_update_step`, `cand_j`, `cand_kappa`, `cand_first`, `cand_last`. `state_dict()` writes those
names and `load_state_dict()` reads them (and the module paths `base.*`, `tracker.*`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from msae_core.sae.base import SAE, SAEConfig, SAEOutput, StepOutput, momentum_bases, register_sae, sae_class
from msae_core.sae.tracker import MomentumTracker


@register_sae("momentum")
class MomentumSAE(SAE):
    """A base SAE plus a momentum tracker. It holds no weights of its own: `W_enc`, `W_dec`,
    `b_enc`, `b_dec`, `input_scale` and `dead_mask` are the base's."""

    def __init__(self, cfg: SAEConfig):
        if cfg.base not in momentum_bases():
            raise ValueError(f"momentum base must be one of {', '.join(momentum_bases())}, got {cfg.base!r}")
        nn.Module.__init__(self)  # not SAE.__init__: the weights live in the base
        self.cfg = cfg
        self.base: SAE = sae_class(cfg.base_arch)(cfg)
        self.tracker = MomentumTracker(cfg)
        self._module_key = {_disk_key(k): k for k in self._module_keys()}  # disk name -> module path
        self.collectives = self.base.collectives
        self.register_state_dict_post_hook(_to_disk_keys)
        self.register_load_state_dict_pre_hook(_to_module_keys)

    # -- the base's weights and math ---------------------------------------------------------------
    @property
    def W_enc(self) -> torch.Tensor:
        return self.base.W_enc

    @property
    def W_dec(self) -> torch.Tensor:
        return self.base.W_dec

    @property
    def b_enc(self) -> torch.Tensor:
        return self.base.b_enc

    @property
    def b_dec(self) -> torch.Tensor:
        return self.base.b_dec

    @property
    def input_scale(self) -> torch.Tensor:
        return self.base.input_scale

    @property
    def tokens_since_fired(self) -> torch.Tensor:
        return self.base.tokens_since_fired

    @property
    def dead_mask(self) -> torch.Tensor:
        return self.base.dead_mask

    def pre_activation(self, x_n_BD: torch.Tensor) -> torch.Tensor:
        return self.base.pre_activation(x_n_BD)

    def jump_thresholds(self) -> torch.Tensor | None:
        return self.base.jump_thresholds()

    def activation(self, pre_BF: torch.Tensor) -> torch.Tensor:
        return self.base.activation(pre_BF)

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.base.encode(x_BD)

    def decode(self, f_BF: torch.Tensor) -> torch.Tensor:
        return self.base.decode(f_BF)

    def forward(self, x_BD: torch.Tensor) -> SAEOutput:
        return self.base(x_BD)

    # -- training ----------------------------------------------------------------------------------
    def loss_terms(self, x_BD: torch.Tensor, step: int) -> StepOutput:
        """The base's loss terms plus "comp" (L_comp; added as lam * comp to "loss" when lam > 0).
        The tracker then takes the batch in: call this once per training step."""
        losses, out = self.base.loss_terms(x_BD, step)
        cofiring = self.tracker.cofiring(out.f)
        if self.cfg.lam > 0:
            comp = self.tracker.competition_loss(out.f, cofiring)
            losses = {**losses, "loss": losses["loss"] + self.cfg.lam * comp, "comp": comp.detach()}
        else:
            with torch.no_grad():
                comp = self.tracker.competition_loss(out.f, cofiring)
            losses = {**losses, "comp": comp}
        if self.collectives.world > 1:  # the statistics take the whole batch in, every rank's rows
            f_all = self.collectives.gather_rows(out.f.detach())
            self.tracker.update_(f_all, self.tracker.cofiring(f_all), step, self.base.W_dec)
        else:
            self.tracker.update_(out.f.detach(), cofiring, step, self.base.W_dec)
        return StepOutput(losses, out)

    def set_collectives(self, collectives: Any) -> None:
        self.collectives = collectives
        self.base.set_collectives(collectives)

    @torch.no_grad()
    def unit_norm_decoder_(self) -> None:
        self.base.unit_norm_decoder_()

    @torch.no_grad()
    def post_step_(self, step: int) -> None:
        self.base.post_step_(step)

    @torch.no_grad()
    def fit_input_scale_(self, x_BD: torch.Tensor) -> None:
        self.base.fit_input_scale_(x_BD)

    # -- what the trainer reads --------------------------------------------------------------------
    def observables(self) -> dict[str, torch.Tensor]:
        return self.tracker.observables(self.base.W_dec)

    def drain_events(self) -> list[dict]:
        return self.tracker.drain_events()

    def step_counts(self) -> dict[str, float]:
        return {**self.base.step_counts(), **self.tracker.step_counts()}

    # -- the on-disk names -------------------------------------------------------------------------
    def _module_keys(self) -> list[str]:
        return ([f"base.{k}" for k in self.base.state_dict()] +
                [f"tracker.{k}" for k in self.tracker.state_dict()])


def _disk_key(module_key: str) -> str:
    """"base.W_enc" -> "W_enc", "tracker.partner_FC" -> "cand_j"."""
    owner, name = module_key.split(".", 1)
    return MomentumTracker.DISK_NAMES.get(name, name) if owner == "tracker" else name


def _to_disk_keys(module: MomentumSAE, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """state_dict post-hook: module paths -> disk names (in place, order kept)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        state_dict[prefix + _disk_key(key[len(prefix):])] = state_dict.pop(key)


def _to_module_keys(module: MomentumSAE, state_dict: dict, prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: disk names -> module paths (module paths pass through)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        name = key[len(prefix):]
        if name in module._module_key:
            state_dict[prefix + module._module_key[name]] = state_dict.pop(key)
