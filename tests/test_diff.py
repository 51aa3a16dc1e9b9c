"""The diff of two SAEs: the matching finds the identity on a permuted copy, a constructed split
and merge are flagged, activations agree on matched pairs, and runs on different stores are refused."""

import numpy as np
import pandas as pd
import pytest
import torch

from fixtures_runs import make_run, make_store
from msae_core.errors import MsaeError
from msae_core.inspect import diff as Df
from msae_core.inspect.features import FeatureSample
from msae_core.sae_io import load_sae, save_sae


def _sample(cols: dict[int, np.ndarray], n_rows: int, d_sae: int) -> FeatureSample:
    """A FeatureSample whose feature f fires on rows cols[f] (value 1)."""
    ptr, rows = [0], []
    for f in range(d_sae):
        r = np.sort(np.asarray(cols.get(f, []), dtype=np.int64))
        rows.append(r)
        ptr.append(ptr[-1] + len(r))
    nz = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return FeatureSample(np.arange(n_rows), np.zeros(n_rows, np.int64), np.arange(n_rows), np.zeros(n_rows, np.int64),
                         np.asarray(ptr), nz, np.ones(len(nz), np.float32))


def test_matching_finds_the_identity_on_a_permuted_copy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 32)).astype(np.float32)
    perm = rng.permutation(300)
    b = a[perm] * rng.uniform(0.5, 2.0, size=(300, 1)).astype(np.float32)  # norms do not matter
    partner, cos = Df.match(a, b)
    assert np.array_equal(perm[partner], np.arange(300)) and np.allclose(cos, 1.0, atol=1e-5)
    # a smaller B: every B latent is used once, the A latents left over have no partner
    partner, cos = Df.match(a, b[:100])
    assert (partner >= 0).sum() == 100 and len(set(partner[partner >= 0])) == 100
    assert np.allclose(cos[partner >= 0], 1.0, atol=1e-5) and np.isnan(cos[partner < 0]).all()


def test_a_constructed_split_is_flagged():
    """(diff_runs's merges are the same test with A and B swapped: splits(B, A, sample of A).)"""
    rng = np.random.default_rng(1)
    a = rng.normal(size=(20, 64)).astype(np.float32)
    u = rng.normal(size=64).astype(np.float32)
    half = 0.5 * np.linalg.norm(a[3]) * u / np.linalg.norm(u)
    b = np.vstack([a, a[3:4] - half])  # B: A's latents, a3 turned by +half, and a 21st: a3 - half
    b[3] = a[3] + half
    fires = {f: np.arange(f * 10, f * 10 + 10) for f in range(20)}
    sb = _sample({**fires, 3: np.arange(30, 35), 20: np.arange(35, 40)}, 200, 21)  # the halves fire apart
    got = Df.splits(a, b, sb)
    assert got["a"].tolist() == [3] and sorted(got["b_latents"].iloc[0]) == [3, 20]
    assert got["max_jaccard"].iloc[0] == 0.0
    # halves firing together are not a split (one feature drawn twice)
    together = _sample({**fires, 3: np.arange(30, 40), 20: np.arange(30, 40)}, 200, 21)
    assert Df.splits(a, b, together).empty
    assert Df.splits(b, a, _sample(fires, 200, 20)).empty  # each of B's latents has one A latent near
    partner, cos = Df.match(a, b)
    assert partner[3] in (3, 20) and cos[3] < 0.95 and np.allclose(np.delete(cos, 3), 1.0, atol=1e-5)


def test_diff_runs_on_one_store_and_refused_on_two(tmp_path):
    store = make_store(tmp_path / "stores" / "s")
    run_a = make_run(tmp_path, "a", str(store), arch="topk", d_sae=64, ev=None, traces=False, umap=False, k=8)
    run_b = tmp_path / "runs" / "b"
    import shutil

    shutil.copytree(run_a, run_b)
    sae = load_sae(run_a)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # B: A with its latents permuted, the same SAE
        sae.W_enc.copy_(sae.W_enc[:, perm])
        sae.b_enc.copy_(sae.b_enc[perm])
        sae.W_dec.copy_(sae.W_dec[perm])
    save_sae(sae, run_b)
    d = Df.diff_runs(run_a, run_b, n_rows=256)
    assert (d.table["b"].to_numpy() == np.argsort(perm.numpy())).all()
    fired = d.table["pearson"].notna()
    assert fired.any() and np.allclose(d.table.loc[fired, "pearson"], 1.0, atol=1e-5)
    assert d.unmatched.empty and d.splits.empty and d.merges.empty
    cache = run_a / "workbench" / "diff-b.safetensors"
    assert cache.is_file()
    mtime = cache.stat().st_mtime_ns
    again = Df.diff_runs(run_a, run_b, n_rows=256)  # read back, not recomputed
    assert cache.stat().st_mtime_ns == mtime
    pd.testing.assert_frame_equal(again.table, d.table)
    save_sae(load_sae(run_a), run_b)  # B's weights change: computed again
    assert (Df.diff_runs(run_a, run_b, n_rows=256).table["b"] == np.arange(64)).all()
    other = make_store(tmp_path / "stores" / "t", seed=1)
    run_c = make_run(tmp_path, "c", str(other), arch="topk", d_sae=64, ev=None, traces=False, umap=False, k=8)
    with pytest.raises(MsaeError, match="different activation stores"):
        Df.diff_runs(run_a, run_c)


def test_a_store_recorded_relative_and_absolute_is_one_store(tmp_path, monkeypatch):
    """The demo records its store one way, the Launch page another: the diff reads both as one."""
    import json
    import shutil

    store = make_store(tmp_path / "stores" / "s")
    run_a = make_run(tmp_path, "a", str(store), arch="topk", d_sae=64, ev=None, traces=False, umap=False, k=8)
    run_b = tmp_path / "runs" / "b"
    shutil.copytree(run_a, run_b)
    cfg = json.loads((run_b / "config.json").read_text())
    cfg["data"]["acts"] = "stores/s"  # relative to the folder the workbench runs from
    (run_b / "config.json").write_text(json.dumps(cfg))
    monkeypatch.chdir(tmp_path)
    d = Df.diff_runs(run_a, run_b, n_rows=128)
    assert (d.table["b"] == np.arange(64)).all()
