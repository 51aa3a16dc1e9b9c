"""A diff of two SAEs trained on the same activations (TopK against momentum, two lambdas, two
seeds): which latents of A correspond to which of B, and which A splits or merges.

- Matching: one-to-one, maximising the summed decoder cosine (directions in input units), solved
  on each A latent's `candidates` nearest B latents (a sparse bipartite matching, scipy's
  min_weight_full_bipartite_matching), so 16k x 16k never builds the dense cosine matrix. A latent
  whose match has cosine below `good_cos` has no good partner.
- Activation agreement: the Pearson correlation of a matched pair's activations over the same
  sampled store rows (both SAEs encode the same rows).
- Splits: an A latent with two or more B latents at cosine >= `split_cos` that rarely fire
  together (Jaccard of their firing rows <= `disjoint`): B covers with several latents what A
  covers with one. Merges: the same with A and B swapped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from msae_core.errors import MsaeError

GOOD_COS = 0.7
SPLIT_COS = 0.5
DISJOINT = 0.1
CANDIDATES = 8


def unit_rows(w_FD: np.ndarray) -> np.ndarray:
    w = np.asarray(w_FD, dtype=np.float32)
    return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)


def top_candidates(a_FD: np.ndarray, b_GD: np.ndarray, k: int, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(indices (F, k), cosines (F, k)) of each A row's k most similar B rows, by chunks of A."""
    a, b = unit_rows(a_FD), unit_rows(b_GD)
    k = min(k, len(b))
    idx = np.empty((len(a), k), dtype=np.int64)
    val = np.empty((len(a), k), dtype=np.float32)
    for lo in range(0, len(a), chunk):
        c = a[lo:lo + chunk] @ b.T
        part = np.argpartition(-c, k - 1, axis=1)[:, :k]
        vals = np.take_along_axis(c, part, 1)
        order = np.argsort(-vals, axis=1, kind="stable")
        idx[lo:lo + chunk] = np.take_along_axis(part, order, 1)
        val[lo:lo + chunk] = np.take_along_axis(vals, order, 1)
    return idx, val


def match(a_FD: np.ndarray, b_GD: np.ndarray, candidates: int = CANDIDATES) -> tuple[np.ndarray, np.ndarray]:
    """(partner in B of each A latent or -1, its cosine or nan): the one-to-one matching with the
    largest summed cosine among each A latent's `candidates` nearest B latents (both directions:
    each B latent's nearest A latents are candidates too)."""
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    F, G = len(a_FD), len(b_GD)
    ia, va = top_candidates(a_FD, b_GD, candidates)
    ib, vb = top_candidates(b_GD, a_FD, candidates)
    rows = np.concatenate([np.repeat(np.arange(F), ia.shape[1]), ib.reshape(-1)])
    cols = np.concatenate([ia.reshape(-1), np.repeat(np.arange(G), ib.shape[1])])
    cos = np.concatenate([va.reshape(-1), vb.reshape(-1)]).astype(np.float64)
    key = rows * G + cols
    key, first = np.unique(key, return_index=True)
    rows, cols, cos = rows[first], cols[first], cos[first]
    partner = np.full(F, -1, dtype=np.int64)
    try:
        # weights must be positive: 2 - cos in [1, 3]; a full matching of the smaller side exists
        # only when the candidate graph allows it, else fall back to the dense problem
        graph = coo_matrix((2.0 - cos, (rows, cols)), shape=(F, G)).tocsr()
        if F <= G:
            r, c = min_weight_full_bipartite_matching(graph)
        else:
            c, r = min_weight_full_bipartite_matching(graph.T.tocsr())
    except ValueError:
        if F * G > 64_000_000:
            raise MsaeError(f"cannot match {F} x {G} latents on their {candidates} nearest candidates; "
                            "raise candidates") from None
        dense = unit_rows(a_FD) @ unit_rows(b_GD).T
        r, c = linear_sum_assignment(-dense)
    ok = (r >= 0) & (c >= 0)
    partner[r[ok]] = c[ok]
    cos_F = np.full(F, np.nan)
    have = partner >= 0
    cos_F[have] = np.einsum("fd,fd->f", unit_rows(a_FD)[have], unit_rows(b_GD)[partner[have]])
    return partner, cos_F


def _jaccard(rows_a: np.ndarray, rows_b: np.ndarray) -> float:
    from msae_core.inspect.features import jaccard

    return jaccard(len(np.intersect1d(rows_a, rows_b, assume_unique=True)), len(rows_a), len(rows_b))


def splits(a_FD: np.ndarray, b_GD: np.ndarray, sample_b: Any, split_cos: float = SPLIT_COS,
           disjoint: float = DISJOINT, candidates: int = CANDIDATES) -> pd.DataFrame:
    """A latents that B splits: rows (a, b_latents, cosines, max_jaccard) for each A latent with
    two or more B latents at cosine >= split_cos whose firing rows on `sample_b` (a FeatureSample
    of B) overlap at most `disjoint` (Jaccard, every pair of them). B latents that never fire on
    the sample are left out."""
    idx, val = top_candidates(a_FD, b_GD, candidates)
    out = []
    fired = np.diff(sample_b.feat_ptr) > 0
    for a in range(len(idx)):
        near = [(int(b), float(c)) for b, c in zip(idx[a], val[a]) if c >= split_cos and fired[b]]
        if len(near) < 2:
            continue
        rows = {b: sample_b.feature(b)[0] for b, _ in near}
        worst = max(_jaccard(rows[p], rows[q]) for n, (p, _) in enumerate(near) for q, _ in near[n + 1:])
        if worst <= disjoint:
            out.append({"a": a, "b_latents": [b for b, _ in near], "cosines": [round(c, 4) for _, c in near],
                        "max_jaccard": worst})
    return pd.DataFrame(out, columns=["a", "b_latents", "cosines", "max_jaccard"])


def activation_agreement(sample_a: Any, sample_b: Any, partner: np.ndarray) -> np.ndarray:
    """Per A latent, the Pearson correlation of its activations and its partner's over the same
    sample rows (nan without a partner, or when either never fires there)."""
    from msae_core.inspect.features import pearson_centered

    if not np.array_equal(sample_a.rows, sample_b.rows):
        raise MsaeError("the two activation samples are of different store rows: diff runs on one store")
    out = np.full(len(partner), np.nan)
    for a, b in enumerate(partner.tolist()):
        if b < 0:
            continue
        x = sample_a.column(a).astype(np.float64)
        r = pearson_centered(x - x.mean(), sample_b.column(b))
        if r is not None:
            out[a] = r
    return out


@dataclass
class SAEDiff:
    table: pd.DataFrame       # per A latent: a, b (partner or -1), cosine, pearson, good
    splits: pd.DataFrame      # A latents B splits
    merges: pd.DataFrame      # B latents A splits (B's latents that merge several of A's)
    good_cos: float

    @property
    def unmatched(self) -> pd.DataFrame:
        return self.table[~self.table["good"]]


def _cache_path(run_a: str | os.PathLike, run_b: str | os.PathLike):
    from pathlib import Path

    from msae_core.artifacts import DIFF_CACHE, RUN_INSPECT_CACHE_DIR

    return Path(run_a) / RUN_INSPECT_CACHE_DIR / DIFF_CACHE.format(other=Path(run_b).name)


def diff_runs(run_a: str | os.PathLike, run_b: str | os.PathLike, n_rows: int = 8192,
              good_cos: float = GOOD_COS) -> SAEDiff:
    """The diff of two runs' SAEs (decoders in input units; activation samples of the same rows
    of run A's store), cached in run A's folder (workbench/diff-<B>.safetensors) until either
    run's weights change. MsaeError when they read activations of different widths or stores."""
    import json

    from msae_core.artifacts import atomic_save_safetensors
    from msae_core.inspect.run_files import weights_key

    key = json.dumps({"a": weights_key(run_a), "b": weights_key(run_b), "n_rows": n_rows, "good_cos": good_cos})
    cache = _cache_path(run_a, run_b)
    got = _read_cache(cache, key)
    if got is not None:
        return got
    d = _compute_diff(run_a, run_b, n_rows, good_cos)
    try:
        import torch

        t = d.table
        atomic_save_safetensors(cache, {k: torch.tensor(t[k].to_numpy(dt)) for k, dt in
                                        (("b", np.int64), ("cosine", np.float64), ("pearson", np.float64))},
                                metadata={"key": key, "splits": d.splits.to_json(orient="records"),
                                          "merges": d.merges.to_json(orient="records")})
    except OSError:  # a read-only run folder: computed each time
        pass
    return d


def _read_cache(path, key: str) -> SAEDiff | None:
    import json

    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as fh:
            meta = fh.metadata() or {}
            if meta.get("key") != key:
                return None
            arrays = {k: fh.get_tensor(k) for k in ("b", "cosine", "pearson")}
        good_cos = json.loads(key)["good_cos"]
        table = pd.DataFrame({"a": np.arange(len(arrays["b"])), **arrays})
        table["good"] = table["cosine"] >= good_cos
        splits_ = pd.DataFrame(json.loads(meta["splits"]), columns=["a", "b_latents", "cosines", "max_jaccard"])
        merges = pd.DataFrame(json.loads(meta["merges"]), columns=["b", "a_latents", "cosines", "max_jaccard"])
        return SAEDiff(table, splits_, merges, good_cos)
    except Exception:  # noqa: BLE001 - no cache, a torn one or another version: computed again
        return None


def _compute_diff(run_a: str | os.PathLike, run_b: str | os.PathLike, n_rows: int, good_cos: float) -> SAEDiff:
    from msae_core.inspect.features import feature_sample
    from msae_core.inspect.projection import numpy_decoder_rows
    from msae_core.inspect.run_files import load_run_sae, run_store_path

    if run_store_path(run_a) != run_store_path(run_b):
        raise MsaeError(f"{os.path.basename(run_a)} and {os.path.basename(run_b)} trained on different "
                        "activation stores: a diff needs the same activations")
    wa, wb = numpy_decoder_rows(load_run_sae(run_a)), numpy_decoder_rows(load_run_sae(run_b))
    if wa.shape[1] != wb.shape[1]:
        raise MsaeError(f"the two SAEs read activations of different widths ({wa.shape[1]} and {wb.shape[1]})")
    sa, sb = feature_sample(run_a, n_rows=n_rows), feature_sample(run_b, n_rows=n_rows)
    partner, cos = match(wa, wb)
    pearson = activation_agreement(sa, sb, partner)
    table = pd.DataFrame({"a": np.arange(len(wa)), "b": partner, "cosine": cos, "pearson": pearson})
    table["good"] = table["cosine"] >= good_cos
    merged = splits(wb, wa, sa).rename(columns={"a": "b", "b_latents": "a_latents"})
    return SAEDiff(table, splits(wa, wb, sb), merged, good_cos)
