"""The momentum SAE: per-feature momentum, feature-competition detection and a competition penalty,
wrapped around a base SAE (`relu` or `topk`) whose loss it keeps (../shared/design/momentum-sae.md).

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
"""

from __future__ import annotations

from functools import lru_cache

import torch

from msae_core.sae.base import SAE, SAEConfig, SAEOutput, register_sae, sae_class

_EPS = 1e-6


class MomentumMixin:
    """Mixed in front of a base SAE class (see `build_momentum`)."""

    cfg: SAEConfig

    def _init_momentum(self) -> None:
        F, C = self.cfg.d_sae, min(self.cfg.n_candidates, max(self.cfg.d_sae - 1, 1))
        reg = self.register_buffer  # type: ignore[attr-defined]
        reg("rate", torch.zeros(F))
        reg("mag", torch.zeros(F))
        reg("n_updates", torch.zeros((), dtype=torch.long))
        reg("last_update_step", torch.full((), -1, dtype=torch.long))
        reg("cand_j", torch.full((F, C), -1, dtype=torch.int32))  # partner of row i, -1 = empty
        reg("cand_kappa", torch.zeros(F, C))
        reg("cand_first", torch.full((F, C), -1, dtype=torch.int32))  # first step competing
        reg("cand_last", torch.full((F, C), -1, dtype=torch.int32))  # last step competing
        self._events: list[dict] = []

    # -- reads -------------------------------------------------------------------------------------
    def _bias(self) -> float:
        t = int(self.n_updates)
        return 1.0 - self.cfg.beta ** t if t > 0 else 1.0

    def rate_hat(self) -> torch.Tensor:
        return self.rate / self._bias()

    def mag_hat(self) -> torch.Tensor:
        return self.mag / self._bias()

    def _weights(self, kappa: torch.Tensor) -> torch.Tensor:
        tau = self.cfg.tau
        if tau >= 1.0:
            return (kappa >= 1.0).to(kappa.dtype)
        return ((kappa - tau) / (1.0 - tau)).clamp_min(0.0) * (kappa >= tau)

    def _pairs(self) -> dict[str, torch.Tensor]:
        """The table's unordered pairs (each once, i < j)."""
        F, C = self.cand_j.shape
        rows = torch.arange(F, device=self.cand_j.device)[:, None].expand(F, C)
        sel = (self.cand_j >= 0) & (rows < self.cand_j.long())
        return {"i": rows[sel], "j": self.cand_j[sel].long(), "kappa": self.cand_kappa[sel],
                "first": self.cand_first[sel], "last": self.cand_last[sel]}

    def pressure(self) -> torch.Tensor:
        """Per feature, the sum of w_ij over its competing pairs. (F,)"""
        w = self._weights(self.cand_kappa) * (self.cand_j >= 0)
        return w.sum(dim=1)

    # -- the co-firing occurrences of a batch -------------------------------------------------------
    def _occurrences(self, f_BF: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per token, pairs of its strongest active latents: (key = lo * F + hi, value index pairs)."""
        F = f_BF.shape[1]
        M = min(self.cfg.cofire_top, F)
        vals_BM, idx_BM = f_BF.detach().topk(M, dim=1, sorted=False)
        tp, tq = _triu(M, f_BF.device)
        valid = (vals_BM[:, tp] > 0) & (vals_BM[:, tq] > 0)  # (B, P0)
        ii, jj = idx_BM[:, tp], idx_BM[:, tq]
        key = torch.minimum(ii, jj) * F + torch.maximum(ii, jj)
        return idx_BM, tp, tq, valid, key

    def _competition_loss(self, f_BF: torch.Tensor, occ: tuple[torch.Tensor, ...]) -> torch.Tensor:
        idx_BM, tp, tq, valid, key = occ
        pairs = self._pairs()
        w = self._weights(pairs["kappa"])
        comp = w > 0
        if not bool(comp.any()) or not bool(valid.any()):
            return f_BF.new_zeros(())
        F = f_BF.shape[1]
        c_key, order = (pairs["i"][comp] * F + pairs["j"][comp]).sort()
        c_w = w[comp][order]
        k = key[valid]
        pos = torch.searchsorted(c_key, k).clamp_max(len(c_key) - 1)
        hit = c_key[pos] == k
        if not bool(hit.any()):
            return f_BF.new_zeros(())
        g_BM = f_BF.gather(1, idx_BM)  # with grad
        prod = (g_BM[:, tp] * g_BM[:, tq])[valid][hit]
        m = self.mag_hat()
        i, j = k[hit] // F, k[hit] % F
        return (c_w[pos[hit]] * prod / (m[i] * m[j] + _EPS)).sum() / f_BF.shape[0]

    # -- the update --------------------------------------------------------------------------------
    @torch.no_grad()
    def _update_stats_(self, f_BF: torch.Tensor, occ: tuple[torch.Tensor, ...], step: int) -> None:
        beta = self.cfg.beta
        F = f_BF.shape[1]
        self.rate.mul_(beta).add_((f_BF > 0).float().mean(0), alpha=1 - beta)
        self.mag.mul_(beta).add_(f_BF.float().mean(0), alpha=1 - beta)
        self.n_updates += 1

        # batch statistic s_ij of the co-firing pairs, as the sum over each pair's co-firing tokens
        # of c = f_bi f_bj / sqrt(q_i q_j), q_i = sum_b f_bi^2
        _, tp, tq, valid, key = occ
        idx_BM = occ[0]
        vals_BM = f_BF.gather(1, idx_BM).float()
        k_occ = key[valid]
        sq_F = f_BF.float().pow(2).sum(0)
        c = (vals_BM[:, tp] * vals_BM[:, tq])[valid]
        c = c / (sq_F[k_occ // F] * sq_F[k_occ % F]).sqrt().clamp_min(1e-12)
        old = self._pairs()
        o_key = old["i"] * F + old["j"]
        b_key, s = self._batch_scores(k_occ, c, o_key, self.cfg.admit_frac * self.cfg.tau, F)

        # everything that may be in the table after this step, keyed once per unordered pair: the
        # table's pairs, the batch's admitted pairs, decoder neighbours
        keys = [o_key, b_key]
        if self.cfg.refresh_every and step % self.cfg.refresh_every == 0:
            keys.append(self._decoder_neighbour_keys())
        u_key = torch.unique(torch.cat(keys))
        kappa = torch.zeros(len(u_key), device=f_BF.device)
        first = torch.full((len(u_key),), -1, dtype=torch.int32, device=f_BF.device)
        last = first.clone()
        if len(o_key):
            p = torch.searchsorted(u_key, o_key)
            kappa[p], first[p], last[p] = old["kappa"], old["first"], old["last"]
        s_u = torch.zeros_like(kappa)
        if len(b_key):
            s_u[torch.searchsorted(u_key, b_key)] = s
        kappa = beta * kappa + (1 - beta) * s_u

        # competition and its events
        prev_step = int(self.last_update_step)
        was = (last == prev_step) & (prev_step >= 0)
        now = kappa >= self.cfg.tau
        first = torch.where(now & (first < 0), torch.full_like(first, step), first)
        last = torch.where(now, torch.full_like(last, step), last)
        for direction, mask in (("up", now & ~was), ("down", was & ~now)):
            for kk, kv in zip(u_key[mask].tolist(), kappa[mask].tolist()):
                self._events.append({"step": int(step), "i": kk // F, "j": kk % F,
                                     "kappa": float(kv), "direction": direction})
        self.last_update_step.fill_(step)
        self._write_table_(u_key, kappa, first, last)

    @staticmethod
    def _batch_scores(k_occ: torch.Tensor, c: torch.Tensor, o_key: torch.Tensor, admit: float,
                      F: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, s) of the batch's pairs that take part in the update: every table pair (s may be
        0) and every new pair with s >= admit (all new pairs when admit is 0).

        Grouping ~B M^2 / 2 occurrences by pair with a sort cost more than the SAE step, so: table
        pairs are found by binary search in the (small) sorted table, and new pairs are screened by
        a hashed sum of c, an upper bound of s (colliding pairs only add, c >= 0); only the few
        that pass are grouped exactly."""
        dev = k_occ.device
        if admit <= 0:
            b_key, inv = torch.unique(k_occ, return_inverse=True)
            s = torch.zeros(len(b_key), device=dev).index_add_(0, inv, c)
            return b_key, s.clamp(0.0, 1.0)
        o_sorted = o_key.sort().values
        in_tab = torch.zeros(len(k_occ), dtype=torch.bool, device=dev)
        s_old = torch.zeros(len(o_sorted), device=dev)
        if len(o_sorted):
            pos = torch.searchsorted(o_sorted, k_occ).clamp_max(len(o_sorted) - 1)
            in_tab = o_sorted[pos] == k_occ
            s_old.index_add_(0, pos[in_tab], c[in_tab])
        k_new, c_new = k_occ[~in_tab], c[~in_tab]
        H = 1 << min(22, max(1, (F * F - 1).bit_length()))
        h = k_new if F * F <= H else (k_new * 2654435761) % 4294967291 % H
        bound = torch.zeros(H, device=dev).index_add_(0, h, c_new)[h]
        cand = bound >= admit
        n_key, inv = torch.unique(k_new[cand], return_inverse=True)
        s_new = torch.zeros(len(n_key), device=dev).index_add_(0, inv, c_new[cand])
        keep = s_new >= admit
        return torch.cat([o_sorted, n_key[keep]]), torch.cat([s_old, s_new[keep]]).clamp(0.0, 1.0)

    @torch.no_grad()
    def _write_table_(self, u_key: torch.Tensor, kappa: torch.Tensor, first: torch.Tensor,
                      last: torch.Tensor) -> None:
        """Keep the C strongest partners of every row, and each pair only where both rows keep it."""
        F, C = self.cand_j.shape
        lo, hi = u_key // F, u_key % F
        row = torch.cat([lo, hi])
        col = torch.cat([hi, lo])
        k2, f2, l2 = kappa.repeat(2), first.repeat(2), last.repeat(2)
        pid = torch.arange(len(u_key), device=u_key.device).repeat(2)
        order = torch.argsort(-k2, stable=True)
        order = order[torch.argsort(row[order], stable=True)]  # by row, strongest first
        row_s = row[order]
        starts = torch.searchsorted(row_s, row_s, side="left")
        rank = torch.arange(len(row_s), device=row_s.device) - starts
        kept = torch.zeros(len(row_s), dtype=torch.bool, device=row_s.device)
        kept[order] = rank < C
        both = torch.zeros(len(u_key), dtype=torch.long, device=u_key.device).index_add_(
            0, pid, kept.long()) == 2
        keep = both[pid]
        # rank again among the pairs both rows keep, so slots are packed from 0
        order = order[keep[order]]
        row_s = row[order]
        starts = torch.searchsorted(row_s, row_s, side="left")
        slot = torch.arange(len(row_s), device=row_s.device) - starts
        self.cand_j.fill_(-1)
        self.cand_kappa.zero_()
        self.cand_first.fill_(-1)
        self.cand_last.fill_(-1)
        self.cand_j[row_s, slot] = col[order].to(torch.int32)
        self.cand_kappa[row_s, slot] = k2[order]
        self.cand_first[row_s, slot] = f2[order]
        self.cand_last[row_s, slot] = l2[order]

    @torch.no_grad()
    def _decoder_neighbour_keys(self, chunk: int = 4096) -> torch.Tensor:
        """Unordered keys of each feature's nearest decoder directions (cosine > 0), in chunks."""
        W = self.W_dec.detach()  # type: ignore[attr-defined]
        W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-8)
        F = W.shape[0]
        n = min(max(self.cand_j.shape[1] // 2, 1), F - 1)
        if n < 1:
            return torch.zeros(0, dtype=torch.long, device=W.device)
        out = []
        for s in range(0, F, chunk):
            cos = W[s:s + chunk] @ W.T  # (c, F)
            rows = torch.arange(s, min(s + chunk, F), device=W.device)
            cos[torch.arange(len(rows)), rows] = -2.0
            v, j = cos.topk(n, dim=1)
            i = rows[:, None].expand_as(j)
            m = v > 0
            out.append(torch.minimum(i[m], j[m]) * F + torch.maximum(i[m], j[m]))
        return torch.cat(out)

    # -- the SAE interface --------------------------------------------------------------------------
    def loss_terms(self, x_BD: torch.Tensor, step: int) -> tuple[dict[str, torch.Tensor], SAEOutput]:
        losses, out = super().loss_terms(x_BD, step)  # type: ignore[misc]
        occ = self._occurrences(out.f)
        if self.cfg.lam > 0:
            comp = self._competition_loss(out.f, occ)
            losses = {**losses, "loss": losses["loss"] + self.cfg.lam * comp, "comp": comp.detach()}
        else:
            with torch.no_grad():
                comp = self._competition_loss(out.f, occ)
            losses = {**losses, "comp": comp}
        self._update_stats_(out.f.detach(), occ, step)
        return losses, out

    def observables(self) -> dict[str, torch.Tensor]:
        pairs = self._pairs()
        W = self.W_dec.detach()  # type: ignore[attr-defined]
        W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-8)
        dec_cos = (W[pairs["i"]] * W[pairs["j"]]).sum(-1)
        return {"rate": self.rate_hat().clone(), "mag": self.mag_hat().clone(),
                "pressure": self.pressure(),
                "pair_i": pairs["i"], "pair_j": pairs["j"], "pair_kappa": pairs["kappa"],
                "pair_dec_cos": dec_cos, "pair_first": pairs["first"].long(),
                "pair_last": pairs["last"].long(),
                "pair_competing": (pairs["kappa"] >= self.cfg.tau)}

    def drain_events(self) -> list[dict]:
        ev, self._events = self._events, []
        return ev

    def step_counts(self) -> dict[str, float]:
        counts = super().step_counts()  # type: ignore[misc]
        pairs = self._pairs()
        comp = pairs["kappa"] >= self.cfg.tau
        feats = torch.unique(torch.cat([pairs["i"][comp], pairs["j"][comp]]))
        return {**counts, "competing_pairs": float(comp.sum()), "competing_features": float(len(feats)),
                "mean_kappa": float(pairs["kappa"].mean()) if len(pairs["kappa"]) else 0.0}


@lru_cache(maxsize=None)
def _momentum_class(base_cls: type[SAE]) -> type[SAE]:
    def __init__(self, cfg: SAEConfig) -> None:
        base_cls.__init__(self, cfg)
        self._init_momentum()

    return type(f"Momentum{base_cls.__name__}", (MomentumMixin, base_cls),
                {"__init__": __init__, "arch_name": "momentum"})


@register_sae("momentum")
def build_momentum(cfg: SAEConfig) -> SAE:
    """A momentum SAE over `cfg.base`: the base's parameters, initialisation and loss, plus the tracker."""
    if cfg.base not in ("topk", "relu"):
        raise ValueError(f"momentum base must be topk or relu, got {cfg.base!r}")
    return _momentum_class(sae_class(cfg.base))(cfg)


_TRIU: dict = {}


def _triu(M: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (M, str(device))
    if key not in _TRIU:
        t = torch.triu_indices(M, M, 1, device=device)
        _TRIU[key] = (t[0], t[1])
    return _TRIU[key]
