"""The momentum tracker: per-feature momentum, feature-competition detection and the competition
penalty of the momentum SAE (momentum.py composes it with a base SAE; ../shared/design/momentum-sae.md).

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
- Co-firing is counted sparsely: per token, only its `cofire_top` (M, default 8) strongest active
  latents form pairs, B * M (M - 1) / 2 occurrences per batch, never a dense F x F product.
  Co-firing among the weaker latents of a token is not counted, in the statistic nor in the
  penalty. M trades detection for cost: at k = 32, B = 1024 on a CPU, M = 32 (every active pair)
  made the momentum step about 3x its base's, M = 8 keeps it near the design's bound. Duplicates
  share their input, so both are usually among the strongest latents of the tokens they split;
  raise M (up to k) to count more.
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

Where the statistics change: only in `update_`, which `MomentumSAE.loss_terms` calls once per call,
right after `competition_loss` (the trainer calls `loss_terms` once per step, before the optimizer
step; the decoder-neighbour refresh therefore reads the decoder the loss saw). `post_step_` only
renormalises the decoder.

Host syncs (on a GPU, each one waits for the work queued before it). `loss_terms` and `update_`
read nothing back on purpose: the bias correction and the previous step are compared on the device.
What remains per step, each with its reason:
- `cofiring`: `key_BS[active_BS]`, a boolean mask of data-dependent size (the batch's co-firing
  occurrences); a fixed-size alternative pads to B * M (M - 1) / 2 entries per batch.
- `competition_loss`: two early exits (`bool(competing_N.any())`, `bool(hit_P.any())`) and the
  masks selecting the competing table pairs and the occurrences that hit them (data-dependent
  sizes); with no competing pair yet the early exit saves the whole penalty computation.
- `update_` and `batch_scores`: `torch.unique` over the batch's and the table's pair keys and the
  boolean masks of the screen (the table's new content has a data-dependent size); the events'
  `.tolist()` (the pairs that crossed tau, a data-dependent list, drained by the trainer).
- `_write_table_`: the masks keeping each row's strongest C partners.
These are the sparse table's design (a table of O(F * C) pairs instead of a dense F x F one): the
set of pairs changes every step. The TopK base has one, `int(dead_F.sum())` in its AuxK loss (the
number of latents AuxK takes must be a Python int for `topk`); the trainer has none between its
log, snapshot and checkpoint steps.

Shapes: B batch, F d_sae, D d_in, C candidates per feature, M cofire_top, S = M (M - 1) / 2 slot
pairs per token, P co-firing occurrences of a batch (slot pairs with both latents active),
N unordered pairs (the table's, or a union of keys), Q competing table pairs, H occurrences of
competing pairs, E = 2 N table entries (each pair in both of its rows). A pair (i, j) is keyed
once as min(i, j) * F + max(i, j).
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch
from torch import nn

from msae_core.sae.base import SAEConfig

_EPS = 1e-6


class CoFiring(NamedTuple):
    """A batch's co-firing occurrences: per token, the slot pairs of its M strongest latents."""

    top_BM: torch.Tensor  # (B, M) long, ids of each token's M strongest latents (unsorted)
    slot_a_S: torch.Tensor  # (S,) first slot of each slot pair
    slot_b_S: torch.Tensor  # (S,) second slot (slot_a < slot_b)
    active_BS: torch.Tensor  # (B, S) bool, both latents of the slot pair fire
    pair_key_P: torch.Tensor  # (P,) key of each active occurrence, in active_BS order


class TablePairs(NamedTuple):
    """The candidate table's unordered pairs, each once (i < j)."""

    i: torch.Tensor  # (N,) long
    j: torch.Tensor  # (N,) long
    kappa: torch.Tensor  # (N,)
    first_step: torch.Tensor  # (N,) int32, first step competing, -1 = never
    last_step: torch.Tensor  # (N,) int32, last step competing, -1 = never


class MomentumTracker(nn.Module):
    """Per-feature momentum, the symmetric candidate table and the events not yet drained.

    Buffers (saved with the SAE's weights; `DISK_NAMES` gives their names in sae.safetensors):
        rate, mag         (F,)    EMAs of the firing frequency and the mean activation
        n_updates         ()      batches taken in (for the bias correction 1 - beta^t)
        last_update_step  ()      step of the last update, -1 before the first
        partner_FC        (F, C)  int32, partner j of row i, -1 = empty slot
        kappa_FC          (F, C)  pair score kappa_ij
        first_step_FC     (F, C)  int32, first step the pair was competing, -1 = never
        last_step_FC      (F, C)  int32, last step the pair was competing, -1 = never
    """

    # buffer name -> its name in sae.safetensors (the first format's, kept so old runs load)
    DISK_NAMES = {"partner_FC": "cand_j", "kappa_FC": "cand_kappa", "first_step_FC": "cand_first",
                  "last_step_FC": "cand_last"}

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        F, C = cfg.d_sae, min(cfg.n_candidates, max(cfg.d_sae - 1, 1))
        self.register_buffer("rate", torch.zeros(F))
        self.register_buffer("mag", torch.zeros(F))
        self.register_buffer("n_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_update_step", torch.full((), -1, dtype=torch.long))
        self.register_buffer("partner_FC", torch.full((F, C), -1, dtype=torch.int32))
        self.register_buffer("kappa_FC", torch.zeros(F, C))
        self.register_buffer("first_step_FC", torch.full((F, C), -1, dtype=torch.int32))
        self.register_buffer("last_step_FC", torch.full((F, C), -1, dtype=torch.int32))
        self._events: list[dict] = []

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

    def competition_weight(self, kappa: torch.Tensor) -> torch.Tensor:
        """w_ij = (kappa_ij - tau) / (1 - tau) where kappa_ij >= tau, else 0 (for tau = 1: 1 at 1)."""
        tau = self.cfg.tau
        if tau >= 1.0:
            return (kappa >= 1.0).to(kappa.dtype)
        return ((kappa - tau) / (1.0 - tau)).clamp_min(0.0) * (kappa >= tau)

    def pairs(self) -> TablePairs:
        """The table's unordered pairs, each once (from the row of its smaller id)."""
        F, C = self.partner_FC.shape
        row_FC = torch.arange(F, device=self.partner_FC.device)[:, None].expand(F, C)
        sel_FC = (self.partner_FC >= 0) & (row_FC < self.partner_FC.long())
        return TablePairs(row_FC[sel_FC], self.partner_FC[sel_FC].long(), self.kappa_FC[sel_FC],
                          self.first_step_FC[sel_FC], self.last_step_FC[sel_FC])

    @property
    def pressure(self) -> torch.Tensor:
        """Per feature, the sum of w_ij over its competing pairs. (F,)"""
        w_FC = self.competition_weight(self.kappa_FC) * (self.partner_FC >= 0)
        return w_FC.sum(dim=1)

    # -- a batch's co-firing -----------------------------------------------------------------------
    def cofiring(self, f_BF: torch.Tensor) -> CoFiring:
        """Per token, the pairs of its M strongest latents that both fire."""
        F = f_BF.shape[1]
        M = min(self.cfg.cofire_top, F)
        vals_BM, top_BM = f_BF.detach().topk(M, dim=1, sorted=False)
        slot_a_S, slot_b_S = _slot_pairs(M, f_BF.device)
        active_BS = (vals_BM[:, slot_a_S] > 0) & (vals_BM[:, slot_b_S] > 0)
        i_BS, j_BS = top_BM[:, slot_a_S], top_BM[:, slot_b_S]
        key_BS = torch.minimum(i_BS, j_BS) * F + torch.maximum(i_BS, j_BS)
        return CoFiring(top_BM, slot_a_S, slot_b_S, active_BS, key_BS[active_BS])

    def competition_loss(self, f_BF: torch.Tensor, cofiring: CoFiring) -> torch.Tensor:
        """L_comp of the batch, differentiable in f_BF, from the table as it stands (call it before
        `update_` takes the batch in)."""
        B, F = f_BF.shape
        table = self.pairs()
        w_N = self.competition_weight(table.kappa)
        competing_N = w_N > 0
        key_P = cofiring.pair_key_P
        if not bool(competing_N.any()) or key_P.numel() == 0:
            return f_BF.new_zeros(())
        key_Q, order_Q = (table.i[competing_N] * F + table.j[competing_N]).sort()
        w_Q = w_N[competing_N][order_Q]
        pos_P = torch.searchsorted(key_Q, key_P).clamp_max(len(key_Q) - 1)
        hit_P = key_Q[pos_P] == key_P
        if not bool(hit_P.any()):
            return f_BF.new_zeros(())
        g_BM = f_BF.gather(1, cofiring.top_BM)  # with grad
        prod_H = (g_BM[:, cofiring.slot_a_S] * g_BM[:, cofiring.slot_b_S])[cofiring.active_BS][hit_P]
        mag_F = self.mag_hat()
        i_H, j_H = key_P[hit_P] // F, key_P[hit_P] % F
        return (w_Q[pos_P[hit_P]] * prod_H / (mag_F[i_H] * mag_F[j_H] + _EPS)).sum() / B

    # -- the update --------------------------------------------------------------------------------
    @torch.no_grad()
    def update_(self, f_BF: torch.Tensor, cofiring: CoFiring, step: int, W_dec_FD: torch.Tensor) -> None:
        """Take the batch in: rate and mag, kappa of the table's and the batch's admitted pairs, the
        competition events, and (every `refresh_every` steps) W_dec_FD's decoder-cosine neighbours,
        all in one table write."""
        beta = self.cfg.beta
        F = f_BF.shape[1]
        self.rate.mul_(beta).add_((f_BF > 0).float().mean(0), alpha=1 - beta)
        self.mag.mul_(beta).add_(f_BF.float().mean(0), alpha=1 - beta)
        self.n_updates += 1

        # batch statistic s_ij of the co-firing pairs, as the sum over each pair's co-firing tokens
        # of c = f_bi f_bj / sqrt(q_i q_j), q_i = sum_b f_bi^2
        key_P = cofiring.pair_key_P
        vals_BM = f_BF.gather(1, cofiring.top_BM).float()
        sq_F = f_BF.float().pow(2).sum(0)
        c_P = (vals_BM[:, cofiring.slot_a_S] * vals_BM[:, cofiring.slot_b_S])[cofiring.active_BS]
        c_P = c_P / (sq_F[key_P // F] * sq_F[key_P % F]).sqrt().clamp_min(1e-12)
        old = self.pairs()
        old_key_N = old.i * F + old.j
        batch_key, batch_s = self.batch_scores(key_P, c_P, old_key_N, self.cfg.admit_frac * self.cfg.tau, F)

        # everything that may be in the table after this step, keyed once per unordered pair: the
        # table's pairs, the batch's admitted pairs, decoder neighbours
        keys = [old_key_N, batch_key]
        if self.cfg.refresh_every and step % self.cfg.refresh_every == 0:
            keys.append(self.decoder_neighbour_keys(W_dec_FD))
        key_N = torch.unique(torch.cat(keys))
        kappa_N = torch.zeros(len(key_N), device=f_BF.device)
        first_N = torch.full((len(key_N),), -1, dtype=torch.int32, device=f_BF.device)
        last_N = first_N.clone()
        if len(old_key_N):
            pos = torch.searchsorted(key_N, old_key_N)
            kappa_N[pos], first_N[pos], last_N[pos] = old.kappa, old.first_step, old.last_step
        s_N = torch.zeros_like(kappa_N)
        if len(batch_key):
            s_N[torch.searchsorted(key_N, batch_key)] = batch_s
        kappa_N = beta * kappa_N + (1 - beta) * s_N

        # competition and its events
        prev_step = self.last_update_step  # a tensor: compared on the device, never read
        was_N = (last_N == prev_step.to(last_N.dtype)) & (prev_step >= 0)
        now_N = kappa_N >= self.cfg.tau
        first_N = torch.where(now_N & (first_N < 0), torch.full_like(first_N, step), first_N)
        last_N = torch.where(now_N, torch.full_like(last_N, step), last_N)
        for direction, mask_N in (("up", now_N & ~was_N), ("down", was_N & ~now_N)):
            for key, kappa in zip(key_N[mask_N].tolist(), kappa_N[mask_N].tolist()):
                self._events.append({"step": int(step), "i": key // F, "j": key % F,
                                     "kappa": float(kappa), "direction": direction})
        self.last_update_step.fill_(step)
        self._write_table_(key_N, kappa_N, first_N, last_N)

    @staticmethod
    def batch_scores(key_P: torch.Tensor, c_P: torch.Tensor, old_key_N: torch.Tensor, admit: float,
                     F: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, s) of the batch's pairs that take part in the update: every table pair (s may be
        0) and every new pair with s >= admit (all new pairs when admit is 0); s is the sum of c_P
        over the pair's occurrences, clamped to [0, 1].

        Grouping ~B M^2 / 2 occurrences by pair with a sort cost more than the SAE step, so: table
        pairs are found by binary search in the (small) sorted table, and new pairs are screened by
        a hashed sum of c, an upper bound of s (colliding pairs only add, c >= 0); only the few
        that pass are grouped exactly."""
        dev = key_P.device
        if admit <= 0:
            key_U, inv_P = torch.unique(key_P, return_inverse=True)
            s_U = torch.zeros(len(key_U), device=dev).index_add_(0, inv_P, c_P)
            return key_U, s_U.clamp(0.0, 1.0)
        old_sorted_N = old_key_N.sort().values
        in_table_P = torch.zeros(len(key_P), dtype=torch.bool, device=dev)
        s_old_N = torch.zeros(len(old_sorted_N), device=dev)
        if len(old_sorted_N):
            pos_P = torch.searchsorted(old_sorted_N, key_P).clamp_max(len(old_sorted_N) - 1)
            in_table_P = old_sorted_N[pos_P] == key_P
            s_old_N.index_add_(0, pos_P[in_table_P], c_P[in_table_P])
        new_key, new_c = key_P[~in_table_P], c_P[~in_table_P]
        # about 8 buckets per occurrence (at most one per possible key): few collisions, and a
        # table that costs no more to clear than the occurrences (a fixed 4M-bucket table did)
        H = 1 << max(1, min(max(8 * len(new_key), 1), F * F - 1).bit_length())
        bucket = new_key if F * F <= H else (new_key * 2654435761) % 4294967291 % H
        bound = torch.zeros(H, device=dev).index_add_(0, bucket, new_c)[bucket]
        screened = bound >= admit
        key_U, inv = torch.unique(new_key[screened], return_inverse=True)
        s_U = torch.zeros(len(key_U), device=dev).index_add_(0, inv, new_c[screened])
        keep_U = s_U >= admit
        return (torch.cat([old_sorted_N, key_U[keep_U]]),
                torch.cat([s_old_N, s_U[keep_U]]).clamp(0.0, 1.0))

    @torch.no_grad()
    def _write_table_(self, key_N: torch.Tensor, kappa_N: torch.Tensor, first_N: torch.Tensor,
                      last_N: torch.Tensor) -> None:
        """Keep the C strongest partners of every row, and each pair only where both rows keep it."""
        F, C = self.partner_FC.shape
        lo_N, hi_N = key_N // F, key_N % F
        row_E = torch.cat([lo_N, hi_N])  # each pair in both of its rows
        col_E = torch.cat([hi_N, lo_N])
        kappa_E, first_E, last_E = kappa_N.repeat(2), first_N.repeat(2), last_N.repeat(2)
        pair_E = torch.arange(len(key_N), device=key_N.device).repeat(2)
        order = torch.argsort(-kappa_E, stable=True)
        order = order[torch.argsort(row_E[order], stable=True)]  # by row, strongest first
        row_sorted = row_E[order]
        starts = torch.searchsorted(row_sorted, row_sorted, side="left")
        rank = torch.arange(len(row_sorted), device=row_sorted.device) - starts
        kept_E = torch.zeros(len(row_sorted), dtype=torch.bool, device=row_sorted.device)
        kept_E[order] = rank < C
        both_N = torch.zeros(len(key_N), dtype=torch.long, device=key_N.device).index_add_(
            0, pair_E, kept_E.long()) == 2
        keep_E = both_N[pair_E]
        # rank again among the pairs both rows keep, so slots are packed from 0
        order = order[keep_E[order]]
        row_sorted = row_E[order]
        starts = torch.searchsorted(row_sorted, row_sorted, side="left")
        slot = torch.arange(len(row_sorted), device=row_sorted.device) - starts
        self.partner_FC.fill_(-1)
        self.kappa_FC.zero_()
        self.first_step_FC.fill_(-1)
        self.last_step_FC.fill_(-1)
        self.partner_FC[row_sorted, slot] = col_E[order].to(torch.int32)
        self.kappa_FC[row_sorted, slot] = kappa_E[order]
        self.first_step_FC[row_sorted, slot] = first_E[order]
        self.last_step_FC[row_sorted, slot] = last_E[order]

    @torch.no_grad()
    def decoder_neighbour_keys(self, W_dec_FD: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Keys of each feature's nearest decoder directions (C // 2 of them, cosine > 0), in chunks
        of rows."""
        W_FD = _unit_rows(W_dec_FD.detach())
        F = W_FD.shape[0]
        n = min(max(self.partner_FC.shape[1] // 2, 1), F - 1)
        if n < 1:
            return torch.zeros(0, dtype=torch.long, device=W_FD.device)
        out = []
        for s in range(0, F, chunk):
            cos = W_FD[s:s + chunk] @ W_FD.T  # (chunk, F)
            rows = torch.arange(s, min(s + chunk, F), device=W_FD.device)
            cos[torch.arange(len(rows)), rows] = -2.0
            v, j = cos.topk(n, dim=1)
            i = rows[:, None].expand_as(j)
            m = v > 0
            out.append(torch.minimum(i[m], j[m]) * F + torch.maximum(i[m], j[m]))
        return torch.cat(out)

    # -- what the trainer reads --------------------------------------------------------------------
    def observables(self, W_dec_FD: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-feature traces and the pair table, with each pair's decoder cosine under W_dec_FD."""
        table = self.pairs()
        W_FD = _unit_rows(W_dec_FD.detach())
        dec_cos = (W_FD[table.i] * W_FD[table.j]).sum(-1)
        return {"rate": self.rate_hat().clone(), "mag": self.mag_hat().clone(),
                "pressure": self.pressure,
                "pair_i": table.i, "pair_j": table.j, "pair_kappa": table.kappa,
                "pair_dec_cos": dec_cos, "pair_first": table.first_step.long(),
                "pair_last": table.last_step.long(),
                "pair_competing": (table.kappa >= self.cfg.tau)}

    def drain_events(self) -> list[dict]:
        """The competition events since the last drain: dicts of step, i, j, kappa, direction."""
        events, self._events = self._events, []
        return events

    def step_counts(self) -> dict[str, float]:
        table = self.pairs()
        competing = table.kappa >= self.cfg.tau
        feats = torch.unique(torch.cat([table.i[competing], table.j[competing]]))
        return {"competing_pairs": float(competing.sum()), "competing_features": float(len(feats)),
                "mean_kappa": float(table.kappa.mean()) if len(table.kappa) else 0.0}


def _unit_rows(W: torch.Tensor) -> torch.Tensor:
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-8)


@lru_cache(maxsize=None)
def _slot_pairs(M: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The S = M (M - 1) / 2 slot pairs (a, b), a < b, of M slots (cached: built once per M)."""
    ab = torch.triu_indices(M, M, 1, device=device)
    return ab[0], ab[1]
