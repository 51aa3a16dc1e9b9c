"""Outlier rows: the norms a store records, the manifest's summary, the training options that drop
or clip them, and the pair score without its top tokens."""

import json

import numpy as np
import pytest
import torch

from msae_core.artifacts import RUN_METRICS, STORE_MANIFEST
from msae_core.data.loader import limit_outliers
from msae_core.data.store import ActivationStore, StoreSettings, StoreWriter, norm_outliers, outlier_line
from msae_core.sae import SAEConfig
from msae_core.runs.config import DataConfig, RunConfig, TrainConfig
from msae_core.training.trainer import train

D = 16


def _store(path, n=4096, huge=(7, 100, 2000), token_of_huge=42, seed=0):
    """Rows of norm about 4 (sqrt(D)), the rows `huge` 50x longer, all of them token 42."""
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(n, D, generator=g)
    acts[list(huge)] *= 50
    tok = torch.randint(100, 200, (n,), generator=g, dtype=torch.int32)
    tok[list(huge)] = token_of_huge
    w = StoreWriter(path, StoreSettings(model="tiny", layer=0, target_tokens=n, dtype="float32", context_size=8),
                    {"d_model": D, "tokenizer": "tiny", "bos_token_id": 1})
    half = n // 2
    for lo in (0, half):  # two shards
        nw = half // 8
        w.write_shard(acts[lo:lo + half], tok[lo:lo + half], lo // 8 + torch.arange(nw).repeat_interleave(8),
                      torch.arange(8).repeat(nw), torch.zeros(nw, 8, dtype=torch.int32), lo // 8 + torch.arange(nw),
                      lo // 8 + torch.arange(nw))
    w.finish()
    return path, acts


def test_store_records_norms_and_the_manifest_names_the_outliers(tmp_path):
    path, acts = _store(tmp_path / "s")
    store = ActivationStore(path)
    norms = acts.norm(dim=1).numpy()
    np.testing.assert_allclose(store.row_norms(np.arange(store.n_rows)), norms, rtol=1e-6)
    o = json.loads((path / STORE_MANIFEST).read_text())["outliers"]
    assert o["n_rows"] == 3 and o["top_tokens"] == [[42, 3]]
    assert o["median_norm"] == pytest.approx(float(np.median(norms)), rel=1e-6)
    big = norms[[7, 100, 2000]]
    assert o["share_sq_norm"] == pytest.approx(float((big ** 2).sum() / (norms ** 2).sum()), rel=1e-6)
    assert o["max_norm"] == pytest.approx(float(big.max()), rel=1e-6)
    assert "3 rows (0.07%) above 5x the median norm" in outlier_line(o, lambda ids: ["'"] * len(ids))
    # a store written before norms were recorded: the same summary, computed from the rows
    for s in store._mapped.values():
        del s["norms"]
    assert norm_outliers(store)["n_rows"] == 3


def test_limit_outliers_drops_clips_or_keeps():
    x = torch.ones(6, 4)
    x[2] *= 100
    kept, n = limit_outliers(x, 10.0, "keep")
    assert kept is x and n == 0
    dropped, n = limit_outliers(x, 10.0, "exclude")
    assert dropped.shape == (5, 4) and n == 1 and torch.equal(dropped, torch.ones(5, 4))
    clipped, n = limit_outliers(x, 10.0, "clip")
    assert n == 1 and clipped[2].norm() == pytest.approx(10.0) and torch.equal(clipped[[0, 1, 3]], x[[0, 1, 3]])
    assert torch.allclose(clipped[2] / clipped[2].norm(), x[2] / x[2].norm())


@pytest.mark.parametrize("mode", ["exclude", "clip"])
def test_training_drops_or_clips_outlier_rows_and_keeps_the_threshold(tmp_path, mode):
    path, acts = _store(tmp_path / "s", huge=tuple(range(0, 4096, 64)))  # 1 row in 64
    cfg = RunConfig(sae=SAEConfig(arch="topk", d_in=D, d_sae=32, k=4),
                    train=TrainConfig(steps=20, batch_size=512, lr=1e-3, warmup_steps=2, seed=0, device="cpu",
                                      log_every=10, checkpoint_every=10),
                    data=DataConfig(acts=str(path), outliers=mode))
    train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / RUN_METRICS).read_text().splitlines()]
    assert all(4 <= r["outlier_rows"] <= 14 for r in rows)  # about 8 of 512 rows per step
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    median = float(acts[:4096].norm(dim=1).median())
    assert state["outlier_norm"] == pytest.approx(5 * median, rel=0.1)
    keep = RunConfig(sae=cfg.sae, train=cfg.train, data=DataConfig(acts=str(path)))
    train(keep, tmp_path / "keep", progress=False)
    assert "outlier_rows" not in json.loads((tmp_path / "keep" / RUN_METRICS).read_text().splitlines()[0])


def test_bad_outlier_settings_are_refused(tmp_path):
    from msae_core.errors import MsaeError

    path, _ = _store(tmp_path / "s")
    cfg = RunConfig(sae=SAEConfig(arch="topk", d_in=D, d_sae=32, k=4), train=TrainConfig(steps=2, batch_size=64),
                    data=DataConfig(acts=str(path), outliers="drop", outlier_factor=0.5))
    with pytest.raises(MsaeError, match="outliers must be one of keep, exclude, clip.*outlier_factor must be > 1"):
        train(cfg, tmp_path / "run", progress=False)
