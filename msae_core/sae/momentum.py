"""The momentum SAE: a base SAE (any registered one but momentum, from the registry) and a
`MomentumTracker` (tracker.py: the equations and the design choices), composed.

    loss = base loss + lam * L_comp

The base keeps its parameters, initialisation, encode/decode and loss; the tracker adds the
per-feature momentum, the candidate pair table and the penalty. `loss_terms` computes the penalty
from the table as it stands; `take_in_`, which the trainer calls next (with every rank's rows when
training data-parallel: the trainer gathers them), is the one place the tracker's statistics change
(`MomentumTracker.update_`), once per step. `post_step_` is the base's (decoder
renormalisation) and leaves the statistics alone. With lam = 0 the loss, gradients and weights are
exactly the base's.

It is not an `SAE` subclass: it holds a base instead of being one, and offers the trainer's
contract (`SAE`'s docstring) by handing the base's part to the base. Its state dict has module
paths (`base.W_enc`, `tracker.partner_FC`); msae_core.sae_io, the format's owner, writes the first
format's flat names on disk.
"""

from __future__ import annotations

import torch
from torch import nn

from msae_core.configutil import Problem
from msae_core.sae.base import SAE, SAEConfig, SAEOutput, StepOutput, momentum_bases, register_sae, sae_class
from msae_core.sae.competition import CompetitionEvent, Observables, cofiring, competition_loss, firing_sums
from msae_core.sae.tracker import MomentumTracker


@register_sae("momentum")
class MomentumSAE(nn.Module):
    """A base SAE plus a momentum tracker. It holds no weights of its own: `W_enc`, `W_dec`,
    `b_enc`, `b_dec`, `input_scale` and `dead_mask` are the base's."""

    sparsity = "k"  # the base's decides (SAEConfig.base_arch); these three keep the registry uniform
    saelens_architecture = ""

    @classmethod
    def config_problems(cls, cfg: SAEConfig) -> list[Problem]:
        return []

    def __init__(self, cfg: SAEConfig):
        if cfg.base not in momentum_bases():
            raise ValueError(f"momentum base must be one of {', '.join(momentum_bases())}, got {cfg.base!r}")
        super().__init__()
        self.cfg = cfg
        self.base: SAE = sae_class(cfg.base_arch)(cfg)
        self.tracker = MomentumTracker(cfg.d_sae, cfg.momentum)
        self._batch: tuple | None = None  # loss_terms' output, table and co-firing, for take_in_

    # -- the base's weights and math ---------------------------------------------------------------
    W_enc = property(lambda self: self.base.W_enc)
    W_dec = property(lambda self: self.base.W_dec)
    b_enc = property(lambda self: self.base.b_enc)
    b_dec = property(lambda self: self.base.b_dec)
    input_scale = property(lambda self: self.base.input_scale)
    tokens_since_fired = property(lambda self: self.base.tokens_since_fired)
    dead_mask = property(lambda self: self.base.dead_mask)
    collectives = property(lambda self: self.base.collectives)

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
    takes_whole_batch = True  # data-parallel, take_in_ wants every rank's rows (the trainer gathers them)

    def loss_terms(self, x_BD: torch.Tensor, step: int) -> StepOutput:
        """The base's loss terms plus "comp" (L_comp; added as lam * comp to "loss" when lam > 0),
        from the table as it stands. The tracker takes the batch in at `take_in_`, which the trainer
        calls next, before the optimizer step."""
        cfg, tracker = self.cfg.momentum, self.tracker
        losses, out = self.base.loss_terms(x_BD, step)
        table = tracker.table()  # as it stands before this batch: the penalty's, then the update's
        cof = cofiring(out.f, out.active, cfg.cofire_top)
        with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.lam > 0):
            comp = competition_loss(cof, table, tracker.mag_hat(), cfg.tau, out.f.shape[0])
        if cfg.lam > 0:
            losses = {**losses, "loss": losses["loss"] + cfg.lam * comp, "comp": comp.detach()}
        else:
            losses = {**losses, "comp": comp.detach()}
        self._batch = (out, table, cof)
        return StepOutput(losses, out)

    @torch.no_grad()
    def take_in_(self, out: SAEOutput, step: int, whole_BF: torch.Tensor | None = None) -> None:
        """The tracker takes in the batch `loss_terms` just scored (`out`), or, data-parallel,
        `whole_BF`: every rank's latent rows in rank order, which the trainer gathers. Once per step,
        after `loss_terms` and before the optimizer step (the decoder neighbours are read from the
        weights the batch was scored with)."""
        seen, table, cof = self._batch
        if seen is not out:
            raise RuntimeError("take_in_ takes the output of the last loss_terms call")
        self._batch = None
        cfg = self.cfg.momentum
        if whole_BF is not None:
            self.tracker.update_(firing_sums(whole_BF, None), whole_BF.shape[0],
                                 cofiring(whole_BF, None, cfg.cofire_top), table, step, self.base.W_dec)
        else:
            self.tracker.update_(firing_sums(out.f, out.active), out.f.shape[0], cof, table, step, self.base.W_dec)

    def training_loss(self, x_BD: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        losses, out = self.loss_terms(x_BD, step)
        self.take_in_(out, step)
        return losses

    def set_collectives(self, collectives) -> None:
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
    def observables(self) -> Observables:
        return self.tracker.observables(self.base.W_dec)

    def drain_events(self) -> list[CompetitionEvent]:
        return self.tracker.drain_events()

    def step_counts(self) -> dict[str, float]:
        return {**self.base.step_counts(), **self.tracker.step_counts()}
