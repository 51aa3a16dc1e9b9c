"""Feature competition as pure functions: a batch's co-firing, the pair statistic, the candidate
table's ranking, decoder neighbours and the competition penalty. No state here: the tracker
(tracker.py) holds the momentum buffers and the table and calls these once per step.

Shapes: B batch, F d_sae, K entries per token (TopK), A active entries of a batch, M cofire_top, S = M (M - 1) / 2
slot pairs per token, P = B S occurrences of a batch (every slot pair of every token; those whose
two latents do not both fire are inactive and weigh 0), N unordered pairs (the table's, or the
candidates of one update), U new pairs of a batch, E = 2 N table entries (each pair in both of its
rows), C slots per row. A pair (i, j) is keyed once as key = min(i, j) F + max(i, j) (`pair_key`).

Host syncs: an output of data-dependent size (a boolean mask's selection, `unique`) makes the host
wait for the work queued before it on a GPU. Every occurrence keeps its place (inactive ones weigh
0) and the penalty has no early exit, so only the table's content has a data-dependent size: one
sync in `table_of`, three in `batch_scores`, none elsewhere here.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch

from msae_core.sae.base import ActiveLatents

_EPS = 1e-6  # the penalty's eps in w_ij f_bi f_bj / (mag_i mag_j + eps)
# Knuth's multiplicative hash (2^32 / golden ratio) and the largest prime below 2^32: the screen's
# buckets of pair keys
_HASH_MULT = 2654435761
_HASH_PRIME = 4294967291
_BUCKETS_PER_OCCURRENCE = 8


class CoFiring(NamedTuple):
    """A batch's co-firing occurrences: per token, the slot pairs of its M strongest latents (the
    pair co-fires where both fire: `active_P`)."""

    id_BM: torch.Tensor  # (B, M) long, ids of each token's M strongest latents (unsorted)
    val_BM: torch.Tensor  # (B, M) their activations (with grad when the input had it)
    slot_a_S: torch.Tensor  # (S,) first slot of each slot pair
    slot_b_S: torch.Tensor  # (S,) second slot (slot_a < slot_b)
    active_P: torch.Tensor  # (P,) bool, both latents of the slot pair fire; P = B S, token-major
    key_P: torch.Tensor  # (P,) key of each occurrence's pair


class Table(NamedTuple):
    """The candidate table's unordered pairs, each once, in ascending key order."""

    key: torch.Tensor  # (N,) long, min(i, j) F + max(i, j)
    kappa: torch.Tensor  # (N,) pair score
    first: torch.Tensor  # (N,) int32, first step competing, -1 = never
    last: torch.Tensor  # (N,) int32, last step competing, -1 = never


class Slots(NamedTuple):
    """The table as stored: row i's slots hold its partners, each pair in both of its rows."""

    partner_FC: torch.Tensor  # (F, C) int32, -1 = empty
    kappa_FC: torch.Tensor  # (F, C)
    first_FC: torch.Tensor  # (F, C) int32
    last_FC: torch.Tensor  # (F, C) int32


class CompetitionEvent(NamedTuple):
    """A pair crossing tau: "up" when kappa_ij reached tau at `step` (0-based), "down" when it fell below."""

    step: int
    i: int
    j: int
    kappa: float
    direction: str


class Observables(NamedTuple):
    """What a trace snapshot holds: per-feature traces (F,) and the pair table (N,)."""

    rate: torch.Tensor
    mag: torch.Tensor
    pressure: torch.Tensor
    pair_i: torch.Tensor
    pair_j: torch.Tensor
    pair_kappa: torch.Tensor
    pair_dec_cos: torch.Tensor
    pair_first: torch.Tensor
    pair_last: torch.Tensor
    pair_competing: torch.Tensor


# -------------------------------------------------------------------------------- keys and weights
def pair_key(i: torch.Tensor, j: torch.Tensor, F: int) -> torch.Tensor:
    """key = min(i, j) F + max(i, j): one key per unordered pair."""
    return torch.minimum(i, j) * F + torch.maximum(i, j)


def competition_weight(kappa: torch.Tensor, tau: float) -> torch.Tensor:
    """w_ij = (kappa_ij - tau) / (1 - tau) where kappa_ij >= tau, else 0 (for tau = 1: 1 at 1)."""
    if tau >= 1.0:
        return (kappa >= 1.0).to(kappa.dtype)
    return ((kappa - tau) / (1.0 - tau)).clamp_min(0.0) * (kappa >= tau)


# ---------------------------------------------------------------------------------- a batch's view
def firing_sums(f_BF: torch.Tensor, active: ActiveLatents | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per latent over the batch: n_i = sum_b 1[f_bi > 0], m_i = sum_b f_bi, q_i = sum_b f_bi^2
    (float32, (F,) each). From the batch's active entries when the base gives them (A entries
    instead of B F)."""
    F = f_BF.shape[1]
    if active is None:
        f = f_BF.detach().float()
        # every architecture's latents are >= 0, so sign(f) is 1[f > 0]; summed as floats it is one
        # pass where a boolean column sum took 9x as long on a CPU
        return f.sign().sum(0), f.sum(0), (f * f).sum(0)
    v = active.val_N.detach().float()
    sums = [torch.zeros(F, device=v.device).index_add_(0, active.lat_N, t) for t in ((v > 0).float(), v, v * v)]
    return sums[0], sums[1], sums[2]


def cofiring(f_BF: torch.Tensor, active: ActiveLatents | None, M: int) -> CoFiring:
    """Per token, the pairs of its M strongest latents, and which of them both fire. From the active
    entries when the base gives them: every non-zero latent of a token is among its entries."""
    B, F = f_BF.shape
    if active is None:
        M = min(M, F)
        _, id_BM = f_BF.detach().topk(M, dim=1, sorted=False)
        val_BM = f_BF.gather(1, id_BM)
    elif active.per_token:
        val_BK, idx_BK = active.val_N.view(B, -1), active.lat_N.view(B, -1)
        M = min(M, idx_BK.shape[1])
        _, slot_BM = val_BK.detach().topk(M, dim=1, sorted=False)
        id_BM, val_BM = idx_BK.gather(1, slot_BM), val_BK.gather(1, slot_BM)
    else:
        M = min(M, F)
        id_BM, val_BM = _strongest_per_token(active, B, M)
    slot_a_S, slot_b_S = _slot_pairs(M, f_BF.device)
    v = val_BM.detach()
    active_BS = (v[:, slot_a_S] > 0) & (v[:, slot_b_S] > 0)
    key_BS = pair_key(id_BM[:, slot_a_S], id_BM[:, slot_b_S], F)
    return CoFiring(id_BM, val_BM, slot_a_S, slot_b_S, active_BS.reshape(-1), key_BS.reshape(-1))


def _strongest_per_token(active: ActiveLatents, B: int, M: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(id_BM, val_BM) of each token's M strongest entries (a varying number per token): one stable
    sort of the entries on (token, value descending) as one int64, a value >= 0 being a float32
    whose bits order like integers; a token with fewer than M gets latent 0 at value 0 (inactive)."""
    v = active.val_N.detach().float() + 0.0  # + 0.0: no negative zero
    desc = (0x7FFFFFFF - v.view(torch.int32).long()).clamp_min(0)
    order = torch.sort((active.tok_N << 31) | desc, stable=True).indices
    tok = active.tok_N[order]
    rank = _rank_in_row(tok, B)
    flat = torch.where(rank < M, tok * M + rank, B * M)  # the rest to a spare slot, cut off below
    id_BM = torch.zeros(B * M + 1, dtype=torch.long, device=v.device).index_put((flat,), active.lat_N[order])
    val_BM = active.val_N.new_zeros(B * M + 1).index_put((flat,), active.val_N[order])
    return id_BM[:B * M].view(B, M), val_BM[:B * M].view(B, M)


def occurrence_products(cof: CoFiring) -> torch.Tensor:
    """f_bi f_bj of each occurrence, 0 where inactive (and no gradient there). (P,)"""
    v = cof.val_BM
    return (v[:, cof.slot_a_S] * v[:, cof.slot_b_S]).reshape(-1) * cof.active_P


def occurrence_scores(cof: CoFiring, q_F: torch.Tensor, F: int) -> torch.Tensor:
    """c = f_bi f_bj / sqrt(q_i q_j) of each occurrence (0 where inactive), q_i = sum_b f_bi^2;
    summed over a pair's occurrences it is the pair's batch statistic s_ij (the cosine of the two
    activation columns, counted over the tokens where both are among the M strongest). (P,)"""
    with torch.no_grad():
        c_P = occurrence_products(cof).float()
    return c_P / (q_F[cof.key_P // F] * q_F[cof.key_P % F]).sqrt().clamp_min(1e-12)


def batch_scores(key_P: torch.Tensor, c_P: torch.Tensor, active_P: torch.Tensor, table_key_N: torch.Tensor,
                 admit: float, F: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch statistic s = clamp(sum of c over the pair's active occurrences, 0, 1) of every
    table pair (0 where it did not co-fire), and the new pairs (not in the table) that co-fired
    with s >= admit (every one that co-fired when admit <= 0): (s_N, new_key_U ascending, new_s_U).

    `table_key_N` must be ascending (`Table.key`); c_P is 0 where inactive. Table pairs are found by
    binary search; new pairs are screened by a hashed sum of c, an upper bound of s (colliding
    pairs only add, c >= 0), and only the few that pass are grouped exactly (a sort of every
    occurrence cost more than the SAE step). Host syncs: the screen's selection, `unique`, and the
    selection of the grouped pairs that reach admit."""
    dev = key_P.device
    s_N = torch.zeros(len(table_key_N), device=dev)
    new_P = active_P
    if len(table_key_N):
        pos_P = torch.searchsorted(table_key_N, key_P).clamp_max(len(table_key_N) - 1)
        in_table_P = table_key_N[pos_P] == key_P
        s_N.index_add_(0, pos_P, c_P * in_table_P)
        new_P = active_P & ~in_table_P
    if admit > 0:
        # about 8 buckets per occurrence (at most one per possible key): few collisions, and a
        # bucket array that costs no more to clear than the occurrences
        n_buckets = 1 << max(1, min(max(_BUCKETS_PER_OCCURRENCE * len(key_P), 1), F * F - 1).bit_length())
        bucket = key_P if F * F <= n_buckets else (key_P * _HASH_MULT) % _HASH_PRIME % n_buckets
        bound = torch.zeros(n_buckets, device=dev).index_add_(0, bucket, c_P * new_P)[bucket]
        new_P = new_P & (bound >= admit)
    idx = new_P.nonzero().squeeze(1)
    new_key, new_c = key_P[idx], c_P[idx]
    key_U, inv = torch.unique(new_key, return_inverse=True)
    s_U = torch.zeros(len(key_U), device=dev).index_add_(0, inv, new_c)
    keep_U = s_U >= admit
    return s_N.clamp(0.0, 1.0), key_U[keep_U], s_U[keep_U].clamp(0.0, 1.0)


# -------------------------------------------------------------------------------------- the penalty
def competition_loss(cof: CoFiring, table: Table, mag_F: torch.Tensor, tau: float, B: int) -> torch.Tensor:
    """L_comp = (1 / B) sum_b sum_{(i, j) competing} w_ij f_bi f_bj / (mag_i mag_j + eps),
    w_ij = (kappa_ij - tau) / (1 - tau), over the pairs of each token's M strongest latents (the
    co-firing the statistic counts), differentiable through `cof.val_BM`.

    It is the co-firing lift E[f_i f_j] / (E f_i E f_j) of competing pairs: about 1 for independent
    features, about 1 / rate for duplicates, whatever the activation scale. No host
    sync: every occurrence is weighed (w = 0 off the competing pairs), none is selected."""
    F = mag_F.shape[0]
    if len(table.key) == 0 or cof.key_P.numel() == 0:
        return cof.val_BM.new_zeros(())
    pos_P = torch.searchsorted(table.key, cof.key_P).clamp_max(len(table.key) - 1)
    w_P = competition_weight(table.kappa, tau)[pos_P] * (table.key[pos_P] == cof.key_P)
    mag_P = mag_F[cof.key_P // F] * mag_F[cof.key_P % F]
    return (w_P * occurrence_products(cof) / (mag_P + _EPS)).sum() / B


# ---------------------------------------------------------------------------------------- the table
def table_of(slots: Slots) -> Table:
    """The stored slots as pairs, each once (from the row of its smaller id), in key order."""
    F, C = slots.partner_FC.shape
    partner = slots.partner_FC.reshape(-1).long()
    row = torch.arange(F * C, device=partner.device) // C
    idx = ((partner >= 0) & (row < partner)).nonzero().squeeze(1)  # the one host sync
    key, order = (row[idx] * F + partner[idx]).sort()  # ascending by row already, not within it
    idx = idx[order]
    return Table(key, slots.kappa_FC.reshape(-1)[idx], slots.first_FC.reshape(-1)[idx],
                 slots.last_FC.reshape(-1)[idx])


def crossings(kappa_N: torch.Tensor, last_N: torch.Tensor, prev_step: torch.Tensor,
              tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(up_N, down_N): pairs competing now (kappa >= tau) that were not at the previous update, and
    the reverse. `prev_step` is a 0-d tensor (-1 before the first update), compared on the device."""
    was_N = (last_N == prev_step.to(last_N.dtype)) & (prev_step >= 0)
    now_N = kappa_N >= tau
    return now_N & ~was_N, was_N & ~now_N


def rank_into_slots(key_N: torch.Tensor, kappa_N: torch.Tensor, first_N: torch.Tensor, last_N: torch.Tensor,
                    F: int, C: int) -> Slots:
    """Every row keeps its C strongest candidates, and a pair stays only where both of its rows keep
    it; the kept pairs are packed from slot 0, strongest first.

    Order within a row: kappa descending; on equal kappa, the earlier candidate (the caller lists
    the table's pairs, then the batch's, then decoder neighbours, each in key order). One stable
    sort of the E = 2 N entries on (row, kappa descending) as one int64: kappa >= 0 is a float32
    whose bits order like integers."""
    dev = key_N.device
    lo_N, hi_N = key_N // F, key_N % F
    row_E = torch.stack([lo_N, hi_N], 1).reshape(-1)  # entries 2n and 2n + 1 are pair n
    col_E = torch.stack([hi_N, lo_N], 1).reshape(-1)
    bits_N = (kappa_N.float() + 0.0).view(torch.int32).long()  # + 0.0: no negative zero
    desc_E = (0x7FFFFFFF - bits_N).clamp_min(0).repeat_interleave(2)
    order = torch.sort((row_E << 31) | desc_E, stable=True).indices
    row_sorted = row_E[order]
    kept_sorted = _rank_in_row(row_sorted, F) < C
    kept_E = torch.empty_like(kept_sorted)
    kept_E[order] = kept_sorted
    both_N = kept_E.view(-1, 2).all(1)
    pair_sorted = order // 2
    keep_sorted = both_N[pair_sorted]
    # slot of each kept entry: its rank among its row's kept entries; the others go to a spare slot
    # F C that is cut off below (no selection: no host sync)
    flat = torch.where(keep_sorted, row_sorted * C + _rank_in_row(row_sorted, F, keep_sorted), F * C)
    partner = torch.full((F * C + 1,), -1, dtype=torch.int32, device=dev)
    kappa = torch.zeros(F * C + 1, dtype=kappa_N.dtype, device=dev)
    first = torch.full((F * C + 1,), -1, dtype=torch.int32, device=dev)
    last = first.clone()
    partner[flat] = col_E[order].to(torch.int32)
    kappa[flat] = kappa_N[pair_sorted]
    first[flat] = first_N[pair_sorted]
    last[flat] = last_N[pair_sorted]
    return Slots(*(t[:F * C].view(F, C) for t in (partner, kappa, first, last)))


def _rank_in_row(row_sorted: torch.Tensor, F: int, counted: torch.Tensor | None = None) -> torch.Tensor:
    """Position of each entry within its row's run (rows in ascending order), counting only the
    `counted` entries when given (the others' positions mean nothing)."""
    if counted is None:
        counts_F = torch.bincount(row_sorted, minlength=F)
        start_F = counts_F.cumsum(0) - counts_F
        return torch.arange(len(row_sorted), device=row_sorted.device) - start_F[row_sorted]
    n = counted.long()
    before = n.cumsum(0) - n  # counted entries before this one, all rows
    counts_F = torch.zeros(F, dtype=torch.long, device=row_sorted.device).index_add_(0, row_sorted, n)
    start_F = counts_F.cumsum(0) - counts_F  # counted entries in the rows before
    return before - start_F[row_sorted]


def decoder_neighbour_keys(W_dec_FD: torch.Tensor, n: int, chunk: int = 4096) -> torch.Tensor:
    """Keys of each feature's n nearest decoder directions with cosine > 0 (self excluded), in
    chunks of rows; a pair may appear twice (once from each row)."""
    W_FD = unit_rows(W_dec_FD.detach())
    F = W_FD.shape[0]
    n = min(n, F - 1)
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
        out.append(pair_key(i[m], j[m], F))
    return torch.cat(out)


def unit_rows(W: torch.Tensor) -> torch.Tensor:
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-8)


@lru_cache(maxsize=None)
def _slot_pairs(M: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The S = M (M - 1) / 2 slot pairs (a, b), a < b, of M slots (cached: built once per M)."""
    ab = torch.triu_indices(M, M, 1, device=device)
    return ab[0], ab[1]
