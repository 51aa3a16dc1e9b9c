"""Activation store: round trip, memory-mapped reads, deterministic shuffles, resume, refusals."""

import json

import pytest
import torch

from msae_core.errors import MsaeError
from msae_core.data.store import ActivationStore, StoreSettings, StoreWriter

D, T = 16, 8


def _write(path, n_shards=3, windows_per_shard=4, settings=None, dtype="float32", seed=0):
    settings = settings or StoreSettings(model="tiny", layer=1, target_tokens=1000, dtype=dtype, context_size=T)
    w = StoreWriter(path, settings, {"d_model": D, "tokenizer": "tiny", "bos_token_id": 1})
    g = torch.Generator().manual_seed(seed)
    all_acts = []
    for s in range(w.n_windows_done // windows_per_shard, n_shards):
        first = s * windows_per_shard
        windows = torch.randint(2, 50, (windows_per_shard, T), generator=g)
        rows = windows_per_shard * (T - 1)  # BOS rows dropped
        acts = torch.randn(rows, D, generator=g)
        win_ids = torch.arange(first, first + windows_per_shard).repeat_interleave(T - 1)
        pos = torch.arange(1, T).repeat(windows_per_shard)
        tok = windows[:, 1:].reshape(-1)
        w.write_shard(acts, tok, win_ids, pos, windows, torch.arange(first, first + windows_per_shard),
                      torch.arange(first, first + windows_per_shard) // 2)
        all_acts.append(acts)
    w.finish()
    return w, torch.cat(all_acts) if all_acts else None


def test_round_trip_rows_and_contexts(tmp_path):
    _, acts = _write(tmp_path / "s")
    store = ActivationStore(tmp_path / "s")
    assert store.n_rows == acts.shape[0] and store.d_in == D and store.complete
    idx = torch.tensor([0, 5, acts.shape[0] - 1, 30, 29])
    assert torch.equal(store.rows(idx), acts[idx])
    info = store.row_info(idx)
    # every row traces back to its window and position, and the window holds its token
    for r, w, p, t in zip(idx.tolist(), info["window_ids"].tolist(), info["positions"].tolist(),
                          info["token_ids"].tolist()):
        assert store.window_tokens(w)[p] == t
    with pytest.raises(IndexError):
        store.rows(torch.tensor([acts.shape[0]]))


def test_float16_storage(tmp_path):
    _, acts = _write(tmp_path / "s", dtype="float16")
    store = ActivationStore(tmp_path / "s")
    out = store.rows(torch.arange(store.n_rows))
    assert out.dtype == torch.float32
    assert torch.allclose(out, acts, atol=1e-2, rtol=1e-3)


def test_batches_are_deterministic_shuffles_covering_every_row(tmp_path):
    _write(tmp_path / "s")
    store = ActivationStore(tmp_path / "s")
    n = store.n_rows
    b = 10
    idx = torch.cat([store.batch_indices(s, b, seed=3) for s in range(n // b)])
    assert len(set(idx.tolist())) == len(idx)  # no repeats within an epoch
    assert not torch.equal(idx, torch.arange(len(idx)))  # shuffled
    again = ActivationStore(tmp_path / "s")
    assert torch.equal(again.batch(4, b, seed=3), store.batch(4, b, seed=3))
    assert not torch.equal(store.batch(4, b, seed=4), store.batch(4, b, seed=3))
    # a batch that crosses an epoch boundary still has the requested size
    assert store.batch(n // b, b + 7, seed=3).shape == (b + 7, D)


def test_resume_after_partial_shard_equals_uninterrupted(tmp_path):
    _, full = _write(tmp_path / "full")
    settings = StoreSettings(model="tiny", layer=1, target_tokens=1000, dtype="float32", context_size=T)
    w = StoreWriter(tmp_path / "cut", settings, {"d_model": D, "tokenizer": "tiny", "bos_token_id": 1})
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(2, 50, (4, T), generator=g)
    acts = torch.randn(4 * (T - 1), D, generator=g)
    w.write_shard(acts, windows[:, 1:].reshape(-1), torch.arange(4).repeat_interleave(T - 1),
                  torch.arange(1, T).repeat(4), windows, torch.arange(4), torch.arange(4) // 2)
    # a killed writer leaves a shard file that was never listed, and a temp file
    (tmp_path / "cut" / "shard_00001.safetensors").write_bytes(b"partial")
    (tmp_path / "cut" / ".shard_00002.safetensors.abc.tmp").write_bytes(b"partial")
    assert ActivationStore(tmp_path / "cut").n_rows == 4 * (T - 1)  # the partial shard is never read
    w2, _ = _write(tmp_path / "cut")  # resumes at window 4 with the same RNG stream replayed
    assert w2.n_windows_done == 12
    a, b = ActivationStore(tmp_path / "full"), ActivationStore(tmp_path / "cut")
    assert a.n_rows == b.n_rows
    # the generator differs after the cut, so compare the first shard and the layout
    assert torch.equal(a.rows(torch.arange(4 * (T - 1))), b.rows(torch.arange(4 * (T - 1))))
    assert [s["rows"] for s in a.manifest["shards"]] == [s["rows"] for s in b.manifest["shards"]]


def test_refuses_a_folder_with_another_harvest(tmp_path):
    _write(tmp_path / "s")
    other = StoreSettings(model="tiny", layer=2, target_tokens=1000, dtype="float32", context_size=T)
    with pytest.raises(MsaeError, match="different harvest"):
        StoreWriter(tmp_path / "s", other, {"d_model": D})
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(MsaeError, match="not empty"):
        StoreWriter(tmp_path / "junk", other, {"d_model": D})


def test_clear_errors_for_missing_or_broken_stores(tmp_path):
    with pytest.raises(MsaeError, match="no activation store"):
        ActivationStore(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MsaeError, match="not an activation store"):
        ActivationStore(tmp_path / "empty")
    _write(tmp_path / "s")
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    (tmp_path / "s" / m["shards"][1]["file"]).unlink()
    with pytest.raises(MsaeError, match="missing"):
        ActivationStore(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").write_text("{not json")
    with pytest.raises(MsaeError, match="unreadable"):
        ActivationStore(tmp_path / "s")


def test_settings_validation_lists_problems():
    s = StoreSettings(target_tokens=0, layer=-1, dtype="int8")
    probs = s.problems()
    assert len(probs) == 3 and any("tokens" in p for p in probs)
    assert StoreSettings().settings_hash() == StoreSettings().settings_hash()
    assert StoreSettings(layer=3).settings_hash() != StoreSettings().settings_hash()


def _break_manifest(path, edit):
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("edit,field", [
    (lambda m: m.pop("shards"), "shards is missing"),
    (lambda m: m.pop("d_model"), "d_model is missing"),
    (lambda m: m.update(d_model="16"), "d_model must be int"),
    (lambda m: m.update(d_model=16.5), "d_model must be int"),
    (lambda m: m.update(shards={"file": "x"}), "shards must be list"),
    (lambda m: m.update(shards=["shard_00000.safetensors"]), "shards[0] must be an object"),
    (lambda m: m["shards"][0].pop("rows"), "shards[0].rows is missing"),
    (lambda m: m["shards"][1].update(first_window="4"), "shards[1].first_window must be int"),
    (lambda m: m.update(n_rows=None), "n_rows must be int"),
    (lambda m: m.update(dtype="int8"), "dtype must be float16 or float32"),
    (lambda m: m.update(d_model=True), "d_model must be int"),
])
def test_a_bad_manifest_is_named_not_a_traceback(tmp_path, edit, field):
    _write(tmp_path / "s")
    _break_manifest(tmp_path / "s", edit)
    with pytest.raises(MsaeError) as err:
        ActivationStore(tmp_path / "s")
    assert str(err.value).startswith("not a valid activation store:")
    assert field in str(err.value)
    # the writer (a resumed harvest) and the trainer's config check say the same
    with pytest.raises(MsaeError, match="not a valid activation store"):
        StoreWriter(tmp_path / "s", StoreSettings(model="tiny", layer=1, target_tokens=1000,
                                                  dtype="float32", context_size=T), {"d_model": D})
    from msae_core.runs.config import DataConfig, RunConfig
    from msae_core.sae import SAEConfig

    from msae_core.configutil import InvalidSettings

    with pytest.raises(InvalidSettings) as exc:
        RunConfig(sae=SAEConfig(d_in=D, d_sae=32), data=DataConfig(acts=str(tmp_path / "s"))).check()
    assert any("not a valid activation store" in p and field in p and p.field == "data.acts"
               for p in exc.value.problems)


@pytest.mark.parametrize("text", ["[1, 2]", "{not json", "\x00\x01binary"])
def test_a_manifest_that_is_not_an_object(tmp_path, text):
    _write(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").write_text(text)
    with pytest.raises(MsaeError, match="not a valid activation store"):
        ActivationStore(tmp_path / "s")


def _many_shards(path, n_shards, rows_per_shard=4, d=D, dtype=torch.float16):
    """A store of `n_shards` tiny shards written directly (StoreWriter rewrites the manifest at
    every shard, which is quadratic at thousands of shards)."""
    from safetensors.torch import save_file

    path.mkdir()
    g = torch.Generator().manual_seed(0)
    shards, acts_all = [], []
    for i in range(n_shards):
        acts = torch.randn(rows_per_shard, d, generator=g).to(dtype)
        name = f"shard_{i:05d}.safetensors"
        save_file({"acts": acts, "token_ids": torch.full((rows_per_shard,), 5, dtype=torch.int32),
                   "window_ids": torch.full((rows_per_shard,), i, dtype=torch.int64),
                   "positions": torch.arange(1, rows_per_shard + 1, dtype=torch.int32),
                   "windows": torch.full((1, rows_per_shard + 1), 5, dtype=torch.int32),
                   "window_index": torch.tensor([i]), "doc_ids": torch.tensor([i])}, str(path / name))
        shards.append({"file": name, "rows": rows_per_shard, "windows": 1, "first_window": i})
        acts_all.append(acts)
    settings = StoreSettings(model="tiny", layer=1, target_tokens=n_shards * rows_per_shard, context_size=rows_per_shard + 1)
    import dataclasses
    manifest = {"format": "msae-activation-store/1", "msae_version": "test", **dataclasses.asdict(settings),
                "d_model": d, "tokenizer": "tiny", "bos_token_id": 1, "settings_hash": settings.settings_hash(),
                "n_rows": n_shards * rows_per_shard, "n_windows": n_shards, "complete": True, "shards": shards}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return torch.cat(acts_all)


def test_open_files_stay_bounded_with_thousands_of_shards(tmp_path):
    """3,000 shards (21,000 tensors) are read, and an SAE trained on them, under a soft limit of 256
    open files: shards are mapped when read, one file and one mapping each, and unmapped past
    MAX_MAPPED_SHARDS."""
    import subprocess
    import sys

    acts = _many_shards(tmp_path / "s", 3000)
    script = f"""
import resource, torch
resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from msae_core.data.store import ActivationStore, MAX_MAPPED_SHARDS
st = ActivationStore({str(tmp_path / "s")!r})
for step in range(8):
    x = st.batch(step, 2048, seed=1)                  # every batch touches most shards
    assert x.shape == (2048, {D}) and torch.isfinite(x).all()
assert len(st._mapped) <= MAX_MAPPED_SHARDS
idx = st.batch_indices(3, 2048, seed=1)
torch.save((idx, st.batch(3, 2048, seed=1)), {str(tmp_path / "b.pt")!r})
from msae_core.sae import SAEConfig
from msae_core.runs.config import DataConfig, RunConfig, TrainConfig
from msae_core.training.trainer import train
cfg = RunConfig(sae=SAEConfig(arch="topk", d_sae=32, k=4),
                train=TrainConfig(steps=12, batch_size=1024, device="cpu", log_every=4, checkpoint_every=6),
                data=DataConfig(acts={str(tmp_path / "s")!r}))
assert train(cfg, {str(tmp_path / "run")!r}, progress=False).state == "done"
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    idx, x = torch.load(tmp_path / "b.pt")
    assert torch.equal(x, acts[idx].float())


def test_large_stores_shuffle_in_blocks(tmp_path, monkeypatch):
    """Above FULL_SHUFFLE_ROWS an epoch is a block shuffle: every row once per epoch, deterministic
    in (seed, epoch), different across epochs and seeds, and no O(rows) permutation is built.
    Below it the order is still the one seeded permutation (runs started before keep the rows of
    each batch; a batch's rows come ascending)."""
    from msae_core.data import store as S

    _many_shards(tmp_path / "s", 70, rows_per_shard=4)   # 280 rows
    st = ActivationStore(tmp_path / "s")
    perm = torch.randperm(280, generator=torch.Generator().manual_seed(2 * 1_000_003))
    assert torch.equal(st.batch_indices(1, 40, seed=2), torch.sort(perm[40:80]).values)
    monkeypatch.setattr(S, "FULL_SHUFFLE_ROWS", 100)
    monkeypatch.setattr(S, "SHUFFLE_BLOCK_ROWS", 16)
    monkeypatch.setattr(S, "SHUFFLE_GROUP_BLOCKS", 4)
    st = ActivationStore(tmp_path / "s")
    epoch0 = torch.cat([st.batch_indices(s, 40, seed=2) for s in range(7)])
    epoch1 = torch.cat([st.batch_indices(s, 40, seed=2) for s in range(7, 14)])
    for ep in (epoch0, epoch1):
        assert sorted(ep.tolist()) == list(range(280))
    assert not torch.equal(epoch0, epoch1)
    assert torch.equal(epoch0, torch.cat([ActivationStore(tmp_path / "s").batch_indices(s, 40, seed=2)
                                          for s in range(7)]))
    assert not torch.equal(epoch0, torch.cat([st.batch_indices(s, 40, seed=3) for s in range(7)]))
    assert isinstance(st._order, S._BlockOrder)
    # a batch straddling two epochs, and a batch size that does not divide the rows
    b = st.batch_indices(5, 50, seed=2)  # rows 250..299 of the endless order
    want = torch.cat([st._epoch_rows(2, 0, 250, 30), st._epoch_rows(2, 1, 0, 20)])
    assert torch.equal(b, torch.sort(want).values)
    assert set(want[:30].tolist()) <= set(epoch0[-40:].tolist())  # the last batch of epoch 0's rows
    # rows are shuffled within a group, blocks across groups: the first 64 positions are 4 whole
    # blocks of 16 consecutive rows, and a batch of 16 of them draws from more than one block
    first = torch.cat([st.batch_indices(s, 16, seed=2) for s in range(4)])
    blocks = sorted({int(r) // 16 for r in first})
    assert len(blocks) == 4 and sorted(first.tolist()) == [b * 16 + i for b in blocks for i in range(16)]
    assert len({int(r) // 16 for r in first[:16]}) > 1


def test_prefetching_loader_yields_the_synchronous_batches(tmp_path):
    """data.loader.BatchLoader: the batches store.batch gives, in order, across an epoch boundary,
    from any start step; steps out of order and errors in its thread are raised to the caller."""
    from msae_core.data.loader import BatchLoader

    _many_shards(tmp_path / "s", 20)   # 80 rows, float16
    st = ActivationStore(tmp_path / "s")
    with BatchLoader(st, 24, seed=4, start_step=2, depth=2) as loader:
        for s in range(2, 12):
            x = loader.next(s)
            assert x.dtype == torch.float32 and torch.equal(x, st.batch(s, 24, seed=4))
        with pytest.raises(ValueError, match="in order"):
            loader.next(20)
    with BatchLoader(st, 24, seed=4, start_step=3, resident=True) as loader:  # the rows held in one tensor
        assert loader._thread is None
        for s in range(3, 9):
            assert torch.equal(loader.next(s), st.batch(s, 24, seed=4))

    class Broken:  # an ActivationSource (data.source) whose second batch fails
        d_in, torch_dtype, streamed = 2, torch.float16, False

        def batch_raw(self, step, batch_size, seed, out=None, part=(0, 1)):
            if step == 1:
                raise MsaeError("shard 3 is unreadable")
            return torch.zeros(batch_size, 2, dtype=torch.float16)

    # a batch stays valid through the next call; buffers are reused, not reallocated
    with BatchLoader(st, 24, seed=4) as loader:
        a = loader.next(0)
        a_copy = a.clone()
        loader.next(1)
        assert torch.equal(a, a_copy)
        seen = {loader.next(s).data_ptr() for s in range(2, 12)}
        assert len(seen) <= 5

    with BatchLoader(Broken(), 4, seed=0) as loader:
        assert loader.next(0).shape == (4, 2)
        with pytest.raises(MsaeError, match="shard 3"):
            loader.next(1)


def test_rank_slices_make_up_the_batch(tmp_path):
    """Data-parallel: rank r of n reads the r-th slice of each batch; the slices in rank order are
    the whole batch, through the loader as through the store."""
    from msae_core.data.loader import BatchLoader

    _many_shards(tmp_path / "s", 20)
    st = ActivationStore(tmp_path / "s")
    for step in (0, 3, 7):
        whole = st.batch_raw(step, 24, seed=1)
        parts = [st.batch_raw(step, 24, seed=1, part=(r, 3)) for r in range(3)]
        assert all(len(p) == 8 for p in parts) and torch.equal(torch.cat(parts), whole)
    loaders = [BatchLoader(st, 24, seed=1, part=(r, 2)) for r in range(2)]
    try:
        for step in range(4):
            assert torch.equal(torch.cat([ld.next(step) for ld in loaders]), st.batch(step, 24, seed=1))
    finally:
        for ld in loaders:
            ld.close()
