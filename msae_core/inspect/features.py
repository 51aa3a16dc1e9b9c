"""What the SAE's features do on real text: a cached sample of the SAE's activations over whole
context windows of the run's activation store (`FeatureSample`), and the queries the pages make on
it (activation histogram, top contexts, pair examples, co-firing), the tokens a feature's decoder
direction promotes through the unembedding, and per-feature values to colour the feature map.

The sample is cached in `<run>/workbench/feature_sample.safetensors` (msae_core.artifacts names):
stored sparse and sorted by feature (CSC: feat_ptr, nz_row, nz_val) with the sample's rows, windows,
positions and token ids, written atomically and keyed by the weights' fingerprint, the sample size
and seed and the store, so a retrained run recomputes it.

About 580 lines in one module: the sample's cache is a format (one owner), and every query here
reads that sample's sparse layout, so they change with it."""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from msae_core.artifacts import (FEATURE_SAMPLE, RUN_INSPECT_CACHE_DIR, atomic_save_safetensors)
from msae_core.errors import MsaeError
from msae_core.inspect import projection
from msae_core.inspect.projection import decoder_units, numpy_decoder_rows
from msae_core.data.store import read_manifest
from msae_core.inspect.run_files import (latest_snapshots, load_run_sae, run_config, run_store_path,
                                         weights_key)

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------- feature sample
@dataclass
class FeatureSample:
    """The SAE's activations over sampled whole windows of the store, sparse by feature."""

    rows: np.ndarray          # (R,) global store row of each sample row
    window_ids: np.ndarray    # (R,)
    positions: np.ndarray     # (R,)
    token_ids: np.ndarray     # (R,)
    feat_ptr: np.ndarray      # (F+1,) nz entries of feature f are [feat_ptr[f], feat_ptr[f+1])
    nz_row: np.ndarray        # (nnz,) sample-row index
    nz_val: np.ndarray        # (nnz,) activation
    store_path: str = ""

    @property
    def n_rows(self) -> int:
        return len(self.rows)

    @property
    def d_sae(self) -> int:
        return len(self.feat_ptr) - 1

    def feature(self, f: int) -> tuple[np.ndarray, np.ndarray]:
        """(sample rows, activations) where feature f fires."""
        if not 0 <= f < self.d_sae:
            raise MsaeError(f"feature {f} is out of range [0, {self.d_sae})")
        a, b = int(self.feat_ptr[f]), int(self.feat_ptr[f + 1])
        return self.nz_row[a:b], self.nz_val[a:b].astype(np.float32)

    def column(self, f: int) -> np.ndarray:
        """Dense activations (R,) of feature f over the sample."""
        out = np.zeros(self.n_rows, dtype=np.float32)
        r, v = self.feature(f)
        out[r] = v
        return out

    def density(self) -> np.ndarray:
        """Fraction of sample rows on which each feature fires, (F,)."""
        return np.diff(self.feat_ptr).astype(np.float32) / max(self.n_rows, 1)

    def window_rows(self, window_id: int) -> np.ndarray:
        """Sample-row indices of one window, by position."""
        idx = np.nonzero(self.window_ids == window_id)[0]
        return idx[np.argsort(self.positions[idx], kind="stable")]


def _sample_windows(store: Any, n_rows: int, seed: int, scan_rows: int = 2_000_000) -> np.ndarray:
    """Global store rows of randomly chosen whole windows, about n_rows of them, sorted."""
    import torch

    n = min(store.n_rows, scan_rows)
    wids = store.row_info(torch.arange(n))["window_ids"].numpy()
    uniq = np.unique(wids)
    rng = np.random.default_rng(seed)
    rng.shuffle(uniq)
    rows_per_window = max(1, n // max(len(uniq), 1))
    chosen = np.sort(uniq[: max(1, math.ceil(n_rows / rows_per_window))])
    return np.nonzero(np.isin(wids, chosen))[0]


def compute_feature_sample(sae: Any, store: Any, n_rows: int = 8192, seed: int = 0,
                           chunk: int = 1024, max_nnz: int = 4_000_000) -> FeatureSample:
    """Encode whole windows of `store` (about `n_rows` rows) with `sae`, keep the nonzeros."""
    import torch

    rows = _sample_windows(store, n_rows, seed)
    info = store.row_info(torch.from_numpy(rows))
    r_list, f_list, v_list, nnz = [], [], [], 0
    kept = 0
    with torch.no_grad():
        for a in range(0, len(rows), chunk):
            x = store.rows(torch.from_numpy(rows[a:a + chunk]))
            f_BF = sae.encode(x).float()
            b_idx, f_idx = torch.nonzero(f_BF > 0, as_tuple=True)
            if nnz + len(b_idx) > max_nnz and kept:
                break  # keep the sample to whole chunks under the size cap
            r_list.append((b_idx + a).numpy().astype(np.int32))
            f_list.append(f_idx.numpy().astype(np.int32))
            v_list.append(f_BF[b_idx, f_idx].numpy().astype(np.float32))
            nnz += len(b_idx)
            kept = min(a + chunk, len(rows))
            d_sae = f_BF.shape[1]
    if not kept:
        raise MsaeError("the activation store has no rows to sample")
    nz_r = np.concatenate(r_list)
    nz_f = np.concatenate(f_list)
    nz_v = np.concatenate(v_list)
    order = np.lexsort((nz_r, nz_f))
    nz_r, nz_f, nz_v = nz_r[order], nz_f[order], nz_v[order]
    ptr = np.zeros(d_sae + 1, dtype=np.int64)
    np.cumsum(np.bincount(nz_f, minlength=d_sae), out=ptr[1:])
    return FeatureSample(rows[:kept], info["window_ids"].numpy()[:kept].astype(np.int64),
                         info["positions"].numpy()[:kept].astype(np.int64),
                         info["token_ids"].numpy()[:kept].astype(np.int64), ptr, nz_r, nz_v,
                         str(getattr(store, "path", "")))


_SAMPLE_KEYS = ("rows", "window_ids", "positions", "token_ids", "feat_ptr", "nz_row", "nz_val")


def feature_sample(run_dir: str | os.PathLike, n_rows: int = 8192, seed: int = 0,
                   compute: bool = True) -> FeatureSample | None:
    """The run's cached feature sample, computed (and cached in the run folder) when missing or
    stale. None when not cached and compute is False. MsaeError when the weights or store fail."""
    import torch

    run_dir = Path(run_dir)
    cache = run_dir / RUN_INSPECT_CACHE_DIR / FEATURE_SAMPLE
    store_path = run_store_path(run_dir) or ""
    key = {"weights": weights_key(run_dir), "n_rows": str(n_rows), "seed": str(seed), "store": store_path}
    if cache.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(cache), framework="np") as fh:
                meta = fh.metadata() or {}
                if all(meta.get(k) == v for k, v in key.items()):
                    t = {k: fh.get_tensor(k) for k in _SAMPLE_KEYS}
                    return FeatureSample(**t, store_path=store_path)
        except Exception as exc:  # noqa: BLE001 - a corrupt cache is recomputed
            log.warning("feature sample cache %s unreadable (%s): recomputing", cache, exc)
    if not compute:
        return None
    if not store_path:
        data = run_config(run_dir).get("data")
        if isinstance(data, dict) and data.get("source") == "stream":
            raise MsaeError(f"run {run_dir.name} was streamed without --cache, so no rows of it were "
                            "stored: train with --cache DIR to see its token examples")
        raise MsaeError(f"run {run_dir.name} names no activation store")
    from msae_core.data.store import ActivationStore

    sae = load_run_sae(run_dir)
    store = ActivationStore(store_path)
    s = compute_feature_sample(sae, store, n_rows=n_rows, seed=seed)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(getattr(s, k))) for k in _SAMPLE_KEYS}
    try:
        atomic_save_safetensors(cache, tensors, metadata=key)
    except OSError as exc:
        log.warning("cannot cache the feature sample in %s: %s", cache, exc)
    return s


def jaccard(both: int, n_a: int, n_b: int) -> float:
    """The Jaccard index of two sets of `n_a` and `n_b` elements sharing `both` (0 for two empty)."""
    either = n_a + n_b - both
    return both / either if either else 0.0


def pearson_centered(xc: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson correlation of x (given centred, float64) and y over the same rows; None when either
    is constant."""
    yc = y.astype(np.float64) - y.mean()
    den = np.sqrt((xc @ xc) * (yc @ yc))
    return float(xc @ yc / den) if den > 0 else None


def pair_cofiring(sample: FeatureSample, i: int, j: int) -> dict:
    """How often features i and j fire together on the sample: counts and the Jaccard index."""
    ri, _ = sample.feature(i)
    rj, _ = sample.feature(j)
    both = len(np.intersect1d(ri, rj, assume_unique=True))
    return {"both": both, "only_i": len(ri) - both, "only_j": len(rj) - both,
            "cofiring": jaccard(both, len(ri), len(rj))}


TOP_TOKENS_DROPPED = 10  # the pair score is also shown without the pair's this many top tokens


def pair_score(sample: FeatureSample, i: int, j: int, drop_top: int = TOP_TOKENS_DROPPED) -> dict:
    """The pair's batch statistic of the design note on the whole sample, s = sum f_i f_j /
    sqrt(sum f_i^2 sum f_j^2), and the same without the `drop_top` sample rows where f_i f_j is
    largest: a score that falls once a handful of tokens are gone is carried by those tokens
    (e.g. the huge-norm apostrophes of Gemma). Also the top rows (sample indices, most first) and
    their share of sum f_i f_j."""
    ri, vi = sample.feature(i)
    rj, vj = sample.feature(j)
    both, ii, jj = np.intersect1d(ri, rj, assume_unique=True, return_indices=True)
    prod = vi[ii].astype(np.float64) * vj[jj]
    order = np.argsort(-prod, kind="stable")[:drop_top]
    top_rows = both[order]
    sii, sjj = float((vi.astype(np.float64) ** 2).sum()), float((vj.astype(np.float64) ** 2).sum())
    score = float(prod.sum()) / np.sqrt(sii * sjj) if sii > 0 and sjj > 0 else 0.0
    rest_ij = float(prod.sum() - prod[order].sum())
    rest_ii = sii - float((vi[ii[order]].astype(np.float64) ** 2).sum())
    rest_jj = sjj - float((vj[jj[order]].astype(np.float64) ** 2).sum())
    without = rest_ij / np.sqrt(rest_ii * rest_jj) if rest_ii > 1e-12 and rest_jj > 1e-12 else 0.0
    return {"score": score, "score_without_top": float(max(without, 0.0)), "top_rows": top_rows,
            "top_share": float(prod[order].sum() / prod.sum()) if prod.sum() > 0 else 0.0}


def rows_tokens_and_norms(sample: FeatureSample, rows: np.ndarray) -> list[tuple[str, float]]:
    """(token text, row norm in medians of the store's row norm) of sample `rows`: whether a pair's
    top tokens are the store's outliers."""
    store = _open_store(sample)
    median = (store.manifest.get("outliers") or {}).get("median_norm")
    if not median:  # a store from before norms were recorded: the sample's median
        median = float(np.median(store.row_norms(sample.rows))) or 1.0
    norms = store.row_norms(sample.rows[rows]) / median
    texts = token_strings(sample.store_path, [int(t) for t in sample.token_ids[rows]])
    return list(zip(texts, [float(n) for n in norms]))


def add_cofiring(pairs: pd.DataFrame, sample: FeatureSample | None) -> pd.DataFrame:
    """pairs + `cofiring` (Jaccard of the two features' firing rows on the sample), `sample_score`
    and `without_top` (pair_score on the sample, whole and without the pair's top tokens)."""
    out = pairs.copy()
    cols = ("cofiring", "sample_score", "without_top")
    if sample is None or out.empty:
        for c in cols:
            out[c] = np.nan
        return out
    vals = []
    for i, j in zip(out["i"].to_numpy(), out["j"].to_numpy()):
        try:
            ps = pair_score(sample, int(i), int(j))
            vals.append((pair_cofiring(sample, int(i), int(j))["cofiring"], ps["score"], ps["score_without_top"]))
        except MsaeError:
            vals.append((np.nan,) * 3)
    for c, v in zip(cols, zip(*vals)):
        out[c] = v
    return out



# --------------------------------------------------------------------------- token-level examples
@functools.lru_cache(maxsize=4)
def _tokenizer(name: str):
    from msae_core.data.lm import load_tokenizer

    return load_tokenizer(name)


def store_manifest(store_path: str) -> dict:
    """The activation store's manifest; {} when it cannot be read."""
    try:
        return read_manifest(store_path) or {}
    except MsaeError:
        return {}


def token_strings(store_path: str, ids: list[int]) -> list[str]:
    """Text of each token id (the store's tokenizer); `<id>` when the tokenizer is unavailable."""
    name = store_manifest(store_path).get("tokenizer")
    tok = None
    if name:
        try:
            tok = _tokenizer(str(name))
        except Exception as exc:  # noqa: BLE001 - a missing tokenizer must not break a page
            log.info("tokenizer %s unavailable: %s", name, exc)
    if tok is None:
        return [f"<{i}>" for i in ids]
    return [tok.decode([int(i)]) for i in ids]


@dataclass
class Example:
    """One context: its tokens, and the activation of each shown feature on each token."""

    window_id: int
    center: int                # position of the row the example was chosen for
    tokens: list[str]
    acts: dict[int, list[float]]  # feature -> activation per token
    label: str = ""


def _window_example(sample: FeatureSample, store: Any, window_id: int, center: int,
                    features: list[int], span: int, label: str = "") -> Example:
    ids = store.window_tokens(int(window_id))
    lo, hi = max(0, center - span), min(len(ids), center + span // 2 + 1)
    rows = sample.window_rows(window_id)
    pos = sample.positions[rows]
    acts = {}
    for f in features:
        col = np.zeros(len(ids), dtype=np.float32)
        r, v = sample.feature(f)
        m = np.isin(r, rows)
        lookup = dict(zip(r[m].tolist(), v[m].tolist()))
        for row, p in zip(rows.tolist(), pos.tolist()):
            if 0 <= p < len(ids):
                col[p] = lookup.get(row, 0.0)
        acts[f] = col[lo:hi].tolist()
    return Example(int(window_id), int(center - lo), token_strings(sample.store_path, ids[lo:hi]), acts, label)


def _open_store(sample: FeatureSample):
    from msae_core.data.store import ActivationStore

    if not sample.store_path:
        raise MsaeError("the run names no activation store")
    return ActivationStore(sample.store_path)


def top_examples(sample: FeatureSample, feature: int, n: int = 8, span: int = 16,
                 extra_features: tuple[int, ...] = (), rows: np.ndarray | None = None,
                 label: str = "") -> list[Example]:
    """Contexts of the `n` strongest activations of `feature` (one per window), restricted to
    sample `rows` when given."""
    r, v = sample.feature(feature)
    if rows is not None:
        keep = np.isin(r, rows)
        r, v = r[keep], v[keep]
    order = np.argsort(-v, kind="stable")
    store = _open_store(sample)
    out, seen = [], set()
    for k in order:
        w = int(sample.window_ids[r[k]])
        if w in seen:
            continue
        seen.add(w)
        out.append(_window_example(sample, store, w, int(sample.positions[r[k]]),
                                   [feature, *extra_features], span, label))
        if len(out) >= n:
            break
    return out


def pair_examples(sample: FeatureSample, i: int, j: int, n: int = 4, span: int = 16) -> dict[str, list[Example]]:
    """Contexts for a pair: where both fire, where only i fires, where only j fires."""
    ri, _ = sample.feature(i)
    rj, _ = sample.feature(j)
    both = np.intersect1d(ri, rj)
    only_i = np.setdiff1d(ri, rj)
    only_j = np.setdiff1d(rj, ri)
    return {
        "both fire": top_examples(sample, i, n, span, (j,), both, "both"),
        f"only {i} fires": top_examples(sample, i, n, span, (j,), only_i, f"only {i}"),
        f"only {j} fires": [_swap(e, i, j) for e in top_examples(sample, j, n, span, (i,), only_j, f"only {j}")],
    }


def _swap(e: Example, i: int, j: int) -> Example:
    """Order an example's features as (i, j)."""
    return Example(e.window_id, e.center, e.tokens, {i: e.acts[i], j: e.acts[j]}, e.label)


def quantile_examples(sample: FeatureSample, feature: int, n_bins: int = 5, per_bin: int = 2,
                      span: int = 16, seed: int = 0) -> list[tuple[float, float, list[Example]]]:
    """Examples across the feature's range, as Neuronpedia shows them: its nonzero activations cut
    into `n_bins` equal-count quantile bins, `per_bin` random examples from each (seeded), lowest
    bin first: [(low, high, examples)], an example's centre activation within [low, high]."""
    r, v = sample.feature(feature)
    if not len(v):
        return []
    edges = np.quantile(v, np.linspace(0, 1, n_bins + 1))
    rng = np.random.default_rng(seed)
    store = _open_store(sample)
    out = []
    for b in range(n_bins):
        lo, hi = float(edges[b]), float(edges[b + 1])
        inside = np.nonzero((v >= lo) & ((v <= hi) if b == n_bins - 1 else (v < hi)))[0]
        pick = rng.choice(inside, size=min(per_bin, len(inside)), replace=False) if len(inside) else []
        exs = [_window_example(sample, store, int(sample.window_ids[r[k]]), int(sample.positions[r[k]]),
                               [feature], span, f"{lo:.3g}-{hi:.3g}") for k in pick]
        out.append((lo, hi, exs))
    return out


def random_examples(sample: FeatureSample, feature: int, n: int = 4, span: int = 16,
                    seed: int = 0) -> list[Example]:
    """`n` contexts drawn uniformly (seeded) from the sample rows where `feature` fires, as
    Neuronpedia's "random positive" examples: what a typical firing looks like, not its peak."""
    r, v = sample.feature(feature)
    if not len(r):
        return []
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(r), size=min(n, len(r)), replace=False))
    store = _open_store(sample)
    return [_window_example(sample, store, int(sample.window_ids[r[k]]), int(sample.positions[r[k]]),
                            [feature], span, f"{v[k]:.3g}") for k in pick]


def nearest_by_decoder(run_dir: str | os.PathLike, feature: int, k: int = 10) -> pd.DataFrame:
    """The `k` features whose decoder directions (input units) are closest in cosine to `feature`'s."""
    unit = decoder_units(run_dir)
    if not 0 <= feature < len(unit):
        raise MsaeError(f"feature {feature} is out of range [0, {len(unit)})")
    cos = (unit @ unit[feature]).astype(np.float64)
    cos[feature] = -np.inf
    top = np.argsort(-cos, kind="stable")[:k]
    return pd.DataFrame({"feature": top.astype(int), "decoder_cos": cos[top]})


def most_correlated(sample: FeatureSample, feature: int, k: int = 10) -> pd.DataFrame:
    """The `k` features whose activations over the sample correlate most with `feature`'s
    (Pearson over all sample rows). Only features firing on a row where it fires are scored: with
    activations >= 0, two features that never fire together correlate negatively."""
    x = sample.column(feature).astype(np.float64)
    if not x.any():
        return pd.DataFrame(columns=["feature", "pearson"])
    feat_of_nz = np.repeat(np.arange(sample.d_sae), np.diff(sample.feat_ptr))
    cand = np.unique(feat_of_nz[np.isin(sample.nz_row, np.nonzero(x)[0])])
    cand = cand[cand != feature]
    xc = x - x.mean()
    out = [(f, r) for f in cand.tolist() if (r := pearson_centered(xc, sample.column(f))) is not None]
    out.sort(key=lambda t: (-t[1], t[0]))
    return pd.DataFrame(out[:k], columns=["feature", "pearson"])


def activation_histogram(sample: FeatureSample, feature: int, bins: int = 40) -> tuple[np.ndarray, np.ndarray, float]:
    """(counts, edges, firing fraction) of a feature's nonzero activations over the sample."""
    _, v = sample.feature(feature)
    if len(v) == 0:
        return np.zeros(0), np.zeros(0), 0.0
    counts, edges = np.histogram(v, bins=bins)
    return counts, edges, len(v) / max(sample.n_rows, 1)


# ------------------------------------------------------------------------------- output tokens
_TEXT_LMS: dict[str, Any] = {}  # at most one language model, kept for "your own text" (_text_lm)


@functools.lru_cache(maxsize=2)
def _unembed(model: str):
    """W_U (V, D) float32 of a model, once per process: the loaded model's own when "your own text"
    holds it (no second copy), else a copy from a load whose model is then dropped."""
    from msae_core.data.lm import load_lm

    held = _TEXT_LMS.get(model)
    if held is not None:
        return held.unembed_matrix().float()
    lm = load_lm(model, device="cpu")
    w = lm.unembed_matrix().float().clone()
    del lm
    return w


def _load_one_line(load: Any, model: str, what: str = "") -> Any:
    """load(model), any failure of the model's loading (a missing file, a hub error) as one line."""
    try:
        return load(model)
    except MsaeError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise MsaeError(f"cannot load model {model!r}{what}: {exc}".splitlines()[0]) from exc


def output_tokens(run_dir: str | os.PathLike, feature: int, k: int = 10, sae: Any = None,
                  bins: int = 60) -> dict:
    """The tokens a feature's decoder direction promotes and suppresses through the unembedding:
    logits W_U @ d of its unit-norm decoder direction d in input units (no final norm: the direct
    path). {"promoted": [(token, logit, token id)], "suppressed": [...], "histogram": (counts,
    edges) of the logits over the whole vocabulary}; MsaeError when the model or weights are
    unavailable."""
    import torch

    run_dir = Path(run_dir)
    store_path = run_store_path(run_dir)
    manifest = store_manifest(store_path) if store_path else {}
    model = manifest.get("model")
    if not model:
        raise MsaeError("the run's activation store does not name its model")
    w_dec = numpy_decoder_rows(sae) if sae is not None else decoder_units(run_dir)
    if not 0 <= feature < w_dec.shape[0]:
        raise MsaeError(f"feature {feature} is out of range [0, {w_dec.shape[0]})")
    w_u = _load_one_line(_unembed, str(model), " for its unembedding")
    if w_u.shape[1] != w_dec.shape[1]:
        raise MsaeError(f"model {model} has width {w_u.shape[1]}, the SAE {w_dec.shape[1]}")
    d = torch.from_numpy(np.ascontiguousarray(w_dec[feature]))
    logits = (w_u @ (d / d.norm().clamp_min(1e-12))).numpy()
    k = min(k, len(logits))
    top = np.argsort(-logits, kind="stable")[:k]
    bot = np.argsort(logits, kind="stable")[:k]
    toks = token_strings(store_path, [int(t) for t in np.concatenate([top, bot])])
    counts, edges = np.histogram(logits, bins=bins)
    return {"promoted": list(zip(toks[:k], logits[top].tolist(), top.tolist())),
            "suppressed": list(zip(toks[k:], logits[bot].tolist(), bot.tolist())),
            "histogram": (counts, edges)}


# ------------------------------------------------------------------------------- your own text
def _text_lm(model: str):
    """The run's language model, loaded once per process for custom text (CPU, float32). Loading it
    drops the unembedding copies made before, so output tokens read this model's own W_U."""
    from msae_core.data.lm import load_lm

    if model not in _TEXT_LMS:
        _TEXT_LMS.clear()
        _TEXT_LMS[model] = load_lm(model, device="cpu")
        _unembed.cache_clear()
    return _TEXT_LMS[model]


MAX_TEXT_TOKENS = 512


def text_activations(run_dir: str | os.PathLike, text: str, sae: Any = None) -> tuple[list[str], np.ndarray]:
    """(tokens, latents (T, F) float32) of the run's SAE on `text`: the model runs up to the run's
    layer only (early stop), BOS first as in the harvest; the BOS row is left out. At most
    MAX_TEXT_TOKENS tokens. MsaeError when the model or the weights are unavailable."""
    import torch

    run_dir = Path(run_dir)
    if not text.strip():
        raise MsaeError("type some text first")
    data = run_config(run_dir).get("data") or {}
    store_path = run_store_path(run_dir)
    manifest = store_manifest(store_path) if store_path else {}
    model = manifest.get("model") or (data.get("model") if data.get("source") == "stream" else None)
    layer = manifest.get("layer", data.get("layer"))
    if not model or layer is None or manifest.get("synthetic"):
        raise MsaeError("the run names no language model and layer (a synthetic store has none)")
    sae = sae if sae is not None else load_run_sae(run_dir)
    lm = _load_one_line(_text_lm, str(model))
    ids = lm.to_tokens(text)[:, :MAX_TEXT_TOKENS]
    with torch.inference_mode():
        acts = lm.resid_post(ids, int(layer), stop_early=True)[0].float()
        f = sae.encode(acts).float().numpy()
    skip = 1 if lm.bos_token_id is not None else 0
    # each token as text (" quick"), as the contexts show them; convert_ids_to_tokens gave the
    # tokenizer's pieces with their "▁" space markers
    toks = [lm.tokenizer.decode([int(i)]) for i in ids[0].tolist()[skip:]]
    return toks, f[skip:]


def top_features_per_token(latents_TF: np.ndarray, k: int = 3) -> list[list[tuple[int, float]]]:
    """Per token, its `k` strongest latents [(feature, activation)], zeros left out."""
    out = []
    for row in latents_TF:
        top = np.argsort(-row, kind="stable")[:k]
        out.append([(int(f), float(row[f])) for f in top if row[f] > 0])
    return out


def clear_caches() -> None:
    """Forget the tokenizers, unembeddings and decoder directions loaded in this process (what a
    fresh one starts without)."""
    _tokenizer.cache_clear()
    _TEXT_LMS.clear()
    _unembed.cache_clear()
    projection.clear_caches()


# ---------------------------------------------------------------------------------- map colours
def feature_colour_values(run_dir: str | os.PathLike, by: str, d_sae: int,
                          sample: FeatureSample | None = None) -> np.ndarray | None:
    """Per-feature values to colour the UMAP: "density" (log10 firing fraction on the sample, or
    the momentum rate of the last snapshot) or "pressure" (last snapshot). None when unknown."""
    if by == "density" and sample is not None and sample.d_sae == d_sae:
        return np.log10(sample.density() + 1e-6)
    key = "rate" if by == "density" else "pressure"
    for _, t in latest_snapshots(run_dir, (key,)):
        v = t[key].astype(np.float32)
        if len(v) != d_sae:
            return None
        return np.log10(v + 1e-6) if key == "rate" else v
    return None
