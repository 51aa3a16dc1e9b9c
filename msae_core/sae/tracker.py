"""The momentum tracker: per-feature momentum, feature-competition detection and the competition
penalty of the momentum SAE (momentum.py composes it with a base SAE; ../shared/design/momentum-sae.md).
The tracker is state; the math is in competition.py, as pure functions.

Per step, under no_grad, with f the batch's latent activations (B, F):

    rate[i]  <- beta rate[i]  + (1 - beta) mean_b 1[f_bi > 0]       read as rate / (1 - beta^t)
    mag[i]   <- beta mag[i]   + (1 - beta) mean_b f_bi               read as mag  / (1 - beta^t)
    s_ij      = sum_b f_bi f_bj / sqrt(sum_b f_bi^2 sum_b f_bj^2)    (cosine of activation columns)
    kappa_ij <- beta kappa_ij + (1 - beta) s_ij                      for pairs in the candidate table
    competing(i, j)  <=>  kappa_ij >= tau;  crossing tau either way is an event

    loss = base loss + lam * L_comp
    L_comp = mean_b sum_{(i,j) competing} w_ij f_bi f_bj / (mag_i mag_j + eps),  w_ij = (kappa_ij - tau) / (1 - tau)

L_comp is the co-firing "lift" E[f_i f_j] / (E f_i E f_j) of competing pairs: about 1 for
independent features, about 1 / rate for duplicates, whatever the activation scale.

Deliberate choices where the note leaves room (the three knobs keep their meaning):
- The candidate table is symmetric: pair (i, j) sits in row i and in row j, each row holds at most
  C = n_candidates partners, and a pair is kept only while both rows keep it, so no feature is in
  more than C pairs. State is O(F * C): (F, C) partner ids, kappa, first and last competing step.
  A row ranks its candidates by kappa; on equal kappa the table's pairs come before the batch's
  new ones, and those before decoder neighbours (`competition.rank_into_slots`).
- Co-firing is counted sparsely: per token, only its `cofire_top` (M, default 8) strongest active
  latents form pairs, B * M (M - 1) / 2 occurrences per batch, never a dense F x F product.
  Co-firing among the weaker latents of a token is not counted, in the statistic nor in the
  penalty. M trades detection for cost: at k = 32, B = 1024 on a CPU, M = 32 (every active pair)
  made the momentum step about 3x its base's. Duplicates share their input, so both are usually
  among the strongest latents of the tokens they split; raise M (up to k) to count more.
- Pairs enter the table from the batch's co-firing when their batch statistic is at least
  `admit_frac * tau` (kappa starts at (1 - beta) s_ij, as if it had been 0): a pair whose s_ij stays
  below tau can never reach tau, and admitting every pair that co-fired once (about 500k per batch
  at k = 32, B = 1024) made the table update cost more than the SAE step. admit_frac = 0 admits all
  (the naive reference in the tests); pairs already in the table always take the batch in. Pairs
  also enter every `refresh_every` steps from decoder-cosine neighbours (kappa 0, so they only
  take free slots). When a row is full the weakest kappa leaves; a pair not co-firing in a batch
  decays by beta (s_ij = 0).
- The penalty uses the table as it stood before this batch's update, the statistics then take the
  batch in; with lam = 0 the loss and gradients are exactly the base's (the tracker reads detached
  activations, never the global RNG, and adds nothing to the loss).
- A base that keeps a few latents per token (TopK, BatchTopK, Matryoshka) hands them to the
  tracker as entries (`ActiveLatents`): the firing sums and each token's M strongest come from its
  B k entries instead of the dense (B, F) tensor, so the tracker's cost follows the base's sparse
  step. ReLU and JumpReLU bases are read densely.

Where the statistics change: only in `update_`, which `MomentumSAE.take_in_` calls once per step,
right after the penalty's `loss_terms` and before the optimizer step (the trainer calls both), so the
decoder-neighbour refresh reads the decoder the loss saw.

Work per step, counted by bench/train_step.py: one sort of the table's N keys (`table_of`), one
`topk` of M per token, two binary searches of the batch's P = B M (M - 1) / 2 occurrences (the
statistic's, the penalty's), one `unique` of the screened new pairs, one stable sort of the 2 N'
candidates' entries (`rank_into_slots`), O(F C) elementwise work, and no pass over the dense (B, F)
activations when the base has a sparse view. Host syncs (on a GPU each waits for the work queued
before it): six, all where the table's content has a data-dependent size: `table_of` one,
`batch_scores` three, the events two (which pairs crossed, and reading them). The sparse table's
pair set changes every step, so its size is data-dependent by design (a dense F x F table is what
the note forbids); decoder-neighbour refreshes add a few more on their steps.
"""

from __future__ import annotations

import torch
from torch import nn

from msae_core.sae.base import MomentumConfig
from msae_core.sae.competition import (CoFiring, CompetitionEvent, Observables, Slots, Table, batch_scores,
                                       competition_weight, crossings, decoder_neighbour_keys, occurrence_scores,
                                       rank_into_slots, table_of, unit_rows)


class MomentumTracker(nn.Module):
    """Per-feature momentum, the symmetric candidate table and the events not yet drained.

    Buffers (saved with the SAE's weights; msae_core.sae_io names them on disk):
        rate, mag         (F,)    EMAs of the firing frequency and the mean activation
        n_updates         ()      batches taken in (for the bias correction 1 - beta^t)
        last_update_step  ()      step of the last update, -1 before the first
        partner_FC        (F, C)  int32, partner j of row i, -1 = empty slot
        kappa_FC          (F, C)  pair score kappa_ij
        first_step_FC     (F, C)  int32, first step the pair was competing, -1 = never
        last_step_FC      (F, C)  int32, last step the pair was competing, -1 = never
    """

    def __init__(self, d_sae: int, cfg: MomentumConfig):
        super().__init__()
        self.cfg = cfg
        F, C = d_sae, min(cfg.n_candidates, max(d_sae - 1, 1))
        self.register_buffer("rate", torch.zeros(F))
        self.register_buffer("mag", torch.zeros(F))
        self.register_buffer("n_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_update_step", torch.full((), -1, dtype=torch.long))
        self.register_buffer("partner_FC", torch.full((F, C), -1, dtype=torch.int32))
        self.register_buffer("kappa_FC", torch.zeros(F, C))
        self.register_buffer("first_step_FC", torch.full((F, C), -1, dtype=torch.int32))
        self.register_buffer("last_step_FC", torch.full((F, C), -1, dtype=torch.int32))
        self._events: list[CompetitionEvent] = []

    # -- reads -------------------------------------------------------------------------------------
    def _bias(self) -> torch.Tensor:
        """1 - beta^t after t updates (1 before any), on the device: reading t would be a host sync.
        Computed in float64 and rounded once, as a Python float divisor would be."""
        t = self.n_updates.double()
        beta = torch.tensor(self.cfg.beta, dtype=torch.float64, device=t.device)
        return torch.where(t > 0, 1.0 - beta ** t, torch.ones_like(t)).to(self.rate.dtype)

    def rate_hat(self) -> torch.Tensor:
        """Bias-corrected firing frequency. (F,)"""
        return self.rate / self._bias()

    def mag_hat(self) -> torch.Tensor:
        """Bias-corrected mean activation. (F,)"""
        return self.mag / self._bias()

    def slots(self) -> Slots:
        return Slots(self.partner_FC, self.kappa_FC, self.first_step_FC, self.last_step_FC)

    def table(self) -> Table:
        """The table's unordered pairs, each once, in key order."""
        return table_of(self.slots())

    @property
    def pressure(self) -> torch.Tensor:
        """Per feature, the sum of w_ij over its competing pairs. (F,)"""
        w_FC = competition_weight(self.kappa_FC, self.cfg.tau) * (self.partner_FC >= 0)
        return w_FC.sum(dim=1)

    # -- the update --------------------------------------------------------------------------------
    @torch.no_grad()
    def update_(self, sums: tuple[torch.Tensor, torch.Tensor, torch.Tensor], n_rows: int, cof: CoFiring,
                table: Table, step: int, W_dec_FD: torch.Tensor) -> None:
        """Take the batch in: `sums` = (n, m, q) per latent (`competition.firing_sums`) over its
        `n_rows` rows, `cof` its co-firing, `table` the table before it (`table()`). Updates rate and
        mag, kappa of the table's pairs and of the batch's admitted new pairs, records the pairs
        that crossed tau, and (every `refresh_every` steps) adds W_dec_FD's decoder-cosine
        neighbours; then every row keeps its strongest C."""
        cfg, beta = self.cfg, self.cfg.beta
        F, C = self.partner_FC.shape
        n_F, m_F, q_F = sums
        self.rate.mul_(beta).add_(n_F / n_rows, alpha=1 - beta)
        self.mag.mul_(beta).add_(m_F / n_rows, alpha=1 - beta)
        self.n_updates += 1

        c_P = occurrence_scores(cof, q_F, F)
        s_N, new_key, new_s = batch_scores(cof.key_P, c_P, cof.active_P, table.key, cfg.admit_frac * cfg.tau, F)
        # the candidates, disjoint, in tie order: the table's pairs, the batch's new ones, neighbours
        keys = [table.key, new_key]
        kappas = [beta * table.kappa + (1 - beta) * s_N, (1 - beta) * new_s]
        if cfg.refresh_every and step % cfg.refresh_every == 0:
            near = torch.unique(decoder_neighbour_keys(W_dec_FD, max(C // 2, 1)))
            near = near[~_member(near, table.key) & ~_member(near, new_key)]
            keys.append(near)
            kappas.append(torch.zeros(len(near), device=near.device))
        key_N, kappa_N = torch.cat(keys), torch.cat(kappas)
        n_new = len(key_N) - len(table.key)
        never = torch.full((n_new,), -1, dtype=torch.int32, device=key_N.device)
        first_N, last_N = torch.cat([table.first, never]), torch.cat([table.last, never])

        up_N, down_N = crossings(kappa_N, last_N, self.last_update_step, cfg.tau)
        now_N = kappa_N >= cfg.tau
        first_N = torch.where(now_N & (first_N < 0), torch.full_like(first_N, step), first_N)
        last_N = torch.where(now_N, torch.full_like(last_N, step), last_N)
        crossed = (up_N | down_N).nonzero().squeeze(1)  # read back together: two host syncs
        for key, kappa, up in torch.stack([key_N[crossed].double(), kappa_N[crossed].double(),
                                           up_N[crossed].double()], 1).tolist():
            key = int(key)  # < F^2 <= 2^53: exact in a double
            self._events.append(CompetitionEvent(int(step), key // F, key % F, kappa, "up" if up else "down"))
        self.last_update_step.fill_(step)
        new = rank_into_slots(key_N, kappa_N, first_N, last_N, F, C)
        for buf, value in zip(self.slots(), new):
            buf.copy_(value)

    # -- what the trainer reads --------------------------------------------------------------------
    def observables(self, W_dec_FD: torch.Tensor) -> Observables:
        """Per-feature traces and the pair table, with each pair's decoder cosine under W_dec_FD."""
        table = self.table()
        F = self.partner_FC.shape[0]
        i, j = table.key // F, table.key % F
        W_FD = unit_rows(W_dec_FD.detach())
        return Observables(rate=self.rate_hat().clone(), mag=self.mag_hat().clone(), pressure=self.pressure,
                           pair_i=i, pair_j=j, pair_kappa=table.kappa, pair_dec_cos=(W_FD[i] * W_FD[j]).sum(-1),
                           pair_first=table.first.long(), pair_last=table.last.long(),
                           pair_competing=table.kappa >= self.cfg.tau)

    def drain_events(self) -> list[CompetitionEvent]:
        """The competition events since the last drain."""
        events, self._events = self._events, []
        return events

    def step_counts(self) -> dict[str, float]:
        table = self.table()
        F = self.partner_FC.shape[0]
        competing = table.kappa >= self.cfg.tau
        feats = torch.unique(torch.cat([table.key[competing] // F, table.key[competing] % F]))
        return {"competing_pairs": float(competing.sum()), "competing_features": float(len(feats)),
                "mean_kappa": float(table.kappa.mean()) if len(table.kappa) else 0.0}


def _member(q: torch.Tensor, sorted_keys: torch.Tensor) -> torch.Tensor:
    """Per entry of q, whether it is in `sorted_keys` (ascending)."""
    if len(sorted_keys) == 0:
        return torch.zeros(len(q), dtype=torch.bool, device=q.device)
    pos = torch.searchsorted(sorted_keys, q).clamp_max(len(sorted_keys) - 1)
    return sorted_keys[pos] == q
