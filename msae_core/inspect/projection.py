"""2-D maps of a run's decoder directions for the feature explorer: UMAP (cosine, cached in the run
folder, keyed by the weights' fingerprint) and an instant PCA shown until the UMAP is cached."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from msae_core.artifacts import RUN_INSPECT_CACHE_DIR, UMAP_COORDS, atomic_save_safetensors
from msae_core.inspect.run_files import load_run_sae, weights_key

log = logging.getLogger(__name__)


def numpy_decoder_rows(sae: Any) -> np.ndarray:
    """Decoder rows in input units, (F, D) float32 numpy (msae_core.sae_io.folded_weights); the
    numpy counterpart of msae_core.evals.absorption.decoder_directions, for plotting. A row
    holding NaN or inf (a diverged or damaged SAE) comes back as zeros: it sits at the map's
    centre instead of breaking the projection (`non_finite_rows` counts them)."""
    from msae_core.sae_io import folded_weights

    w = np.ascontiguousarray(folded_weights(sae)["W_dec"].cpu().numpy())
    bad = ~np.isfinite(w).all(axis=1)
    if bad.any():
        w[bad] = 0.0
    return w


def empty_rows(run_dir: str | os.PathLike) -> int:
    """How many of the run's decoder rows have no direction: NaN, inf (read as zeros by
    numpy_decoder_rows) or all zeros; from the cached unit rows, no second read of the weights."""
    return int((~decoder_units(run_dir).any(axis=1)).sum())


@functools.lru_cache(maxsize=2)
def _decoder_units(run_dir: str, key: str) -> np.ndarray:
    """Unit-norm decoder rows (input units) of the weights `key` names, float32 (F, D)."""
    w = numpy_decoder_rows(load_run_sae(run_dir))
    return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)


def decoder_units(run_dir: str | os.PathLike) -> np.ndarray:
    """The run's unit-norm decoder directions (F, D) float32, read and normalised once per version
    of its weights in this process: every feature the explorer opens reuses them (at F 16384 and
    D 2304, reading the weights and normalising took most of a second a rerun), and the PCA
    preview reads the same copy."""
    return _decoder_units(str(Path(run_dir).resolve()), weights_key(run_dir))


def clear_caches() -> None:
    """Forget the decoder directions read in this process (what a fresh one starts without)."""
    _decoder_units.cache_clear()


def compute_umap(w_FD: np.ndarray, n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0) -> np.ndarray:
    """UMAP of rows of w_FD (cosine), float32 (F, 2). A zero row (no direction: a damaged row
    read as zeros) is left out of the fit and placed at the centre of the others."""
    import umap

    n = w_FD.shape[0]
    ok = np.abs(w_FD).sum(axis=1) > 0
    out = np.zeros((n, 2), dtype=np.float32)
    if ok.sum() < 4:
        return out
    reducer = umap.UMAP(n_neighbors=min(n_neighbors, int(ok.sum()) - 1), min_dist=min_dist, metric="cosine",
                        random_state=seed, n_components=2, low_memory=True)
    out[ok] = reducer.fit_transform(w_FD if ok.all() else w_FD[ok]).astype(np.float32)
    out[~ok] = out[ok].mean(axis=0)
    return out


def umap_coords(run_dir: str | os.PathLike, compute: bool = True, n_neighbors: int = 15,
                min_dist: float = 0.1, seed: int = 0) -> np.ndarray | None:
    """2-D UMAP (cosine metric) of the decoder directions, (F, 2), cached in the run folder.
    None when not cached and compute is False."""
    import torch

    run_dir = Path(run_dir)
    cache = run_dir / RUN_INSPECT_CACHE_DIR / UMAP_COORDS
    key = {"weights": weights_key(run_dir), "n_neighbors": str(n_neighbors),
           "min_dist": str(min_dist), "seed": str(seed)}
    if cache.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(cache), framework="np") as fh:
                if all((fh.metadata() or {}).get(k) == v for k, v in key.items()):
                    return fh.get_tensor("coords")
        except Exception as exc:  # noqa: BLE001
            log.warning("UMAP cache %s unreadable (%s): recomputing", cache, exc)
    if not compute:
        return None
    w = numpy_decoder_rows(load_run_sae(run_dir))
    coords = compute_umap(w, n_neighbors=n_neighbors, min_dist=min_dist, seed=seed)
    try:
        atomic_save_safetensors(cache, {"coords": torch.from_numpy(coords)}, metadata=key)
    except OSError as exc:
        log.warning("cannot cache UMAP coordinates in %s: %s", cache, exc)
    return coords


def pca_coords(run_dir: str | os.PathLike) -> np.ndarray:
    """2-D PCA of the (unit-normalised) decoder directions, (F, 2): quick, shown until UMAP is cached."""
    return top2_pca(decoder_units(run_dir))


def top2_pca(w_FD: np.ndarray, rounds: int = 8, width: int = 8, seed: int = 0) -> np.ndarray:
    """Coordinates (F, 2) float32 of the unit-normalised, centred rows of w_FD on their top two
    principal axes, by subspace iteration (`width` seeded directions, `rounds` rounds, then
    Rayleigh-Ritz): O(F D width) a round where w.T @ w costs O(F D^2) (at F 16384, D 2304 that
    product took about 3 s of a 4 s first visit on 2 cores). Each axis's sign puts its largest
    |coordinate| positive."""
    w = w_FD.astype(np.float32, copy=True)
    w[~np.isfinite(w).all(axis=1)] = 0.0  # a damaged row sits at the centre
    w /= np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    w -= w.mean(0, keepdims=True)
    F_, D = w.shape
    m = max(1, min(width, D, F_))
    q = np.random.default_rng(seed).standard_normal((D, m)).astype(np.float32)
    for _ in range(rounds):
        q, _ = np.linalg.qr(w.T @ (w @ q))
    b = w @ q
    _, vecs = np.linalg.eigh((b.T @ b).astype(np.float64))  # ascending
    axes = (q @ vecs[:, ::-1][:, :2].astype(np.float32))
    out = w @ axes
    if out.shape[1] < 2:
        out = np.concatenate([out, np.zeros((F_, 2 - out.shape[1]), dtype=np.float32)], axis=1)
    peak = out[np.abs(out).argmax(axis=0), np.arange(2)]
    return (out * np.where(peak < 0, -1.0, 1.0).astype(np.float32)).astype(np.float32)
