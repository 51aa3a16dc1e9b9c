"""Harvest into an activation store with a tiny model: round trip, resume, refusals, disk full."""

from __future__ import annotations

import argparse
import errno
import itertools

import pytest
import torch
from safetensors.torch import load_file

from msae_core.data import harvest as harvest_mod
from msae_core.data import store as store_mod
from msae_core.errors import MsaeError
from msae_core.data.harvest import add_cli, harvest
from msae_core.data.lm import load_lm, save_tiny_model
from msae_core.data.store import ActivationStore, StoreSettings

WORDS = "the cat sat on a mat while dogs bark at night and fish swim in cold water".split()


def tiny_setup(root, n_docs=120):
    """A tiny random llama model and a text corpus of `n_docs` documents of random WORDS in `root`,
    with the model loaded: what the harvest and stream tests run on."""
    model = save_tiny_model(root / "model", "llama", seed=0)
    g = torch.Generator().manual_seed(0)
    docs = []
    for _ in range(n_docs):
        n = int(torch.randint(3, 30, (1,), generator=g))
        docs.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g)))
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(docs))
    return {"model": str(model), "corpus": str(corpus), "lm": load_lm(str(model), device="cpu")}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("harvest"))


def _settings(setup, **kw):
    base = dict(model=setup["model"], corpus=setup["corpus"], layer=2, target_tokens=300,
                context_size=16, dtype="float32")
    return StoreSettings(**{**base, **kw})


def _run(setup, out, **kw):
    settings_kw = {k: kw.pop(k) for k in list(kw) if k in StoreSettings.__dataclass_fields__}
    return harvest(_settings(setup, **settings_kw), out, batch_size=4, shard_tokens=64,
                   progress=False, **kw)


def _shards(path):
    store = ActivationStore(path)
    return store.manifest["shards"], [load_file(str(path / s["file"])) for s in store.manifest["shards"]]


def test_round_trip_rows_trace_back_to_their_window(setup, tmp_path):
    torch.manual_seed(0)
    store = _run(setup, tmp_path / "st")
    lm = setup["lm"]
    m = store.manifest
    assert store.n_rows == 300 and store.d_in == 64 and store.complete
    assert m["model"] == setup["model"] and m["layer"] == 2 and m["hook"] == "resid_post"
    assert m["corpus"]["name"] == setup["corpus"] and len(m["corpus"]["provenance"]["sha256"]) == 64
    assert len(m["shards"]) == 3 and sum(s["rows"] for s in m["shards"]) == 300
    info = store.row_info(torch.arange(store.n_rows))
    assert not torch.isin(info["token_ids"].long(), torch.tensor(sorted(lm.special_ids))).any()
    assert (info["positions"] > 0).all()  # BOS rows dropped
    # every 7th row: recompute its window and compare the activation at its position
    for r in range(0, 300, 7):
        w, p = int(info["window_ids"][r]), int(info["positions"][r])
        ids = store.window_tokens(w)
        assert len(ids) == 16 and ids[0] == lm.bos_token_id and ids[p] == int(info["token_ids"][r])
        ref = lm.resid_post(torch.tensor([ids]), 2)[0, p]
        torch.testing.assert_close(store.rows(torch.tensor([r]))[0], ref, rtol=1e-5, atol=1e-5)


def test_float16_store_is_close(setup, tmp_path):
    s16 = _run(setup, tmp_path / "a", dtype="float16", target_tokens=100)
    s32 = _run(setup, tmp_path / "b", dtype="float32", target_tokens=100)
    assert s16.dtype == "float16"
    x16, x32 = s16.rows(torch.arange(100)), s32.rows(torch.arange(100))
    torch.testing.assert_close(x16, x32, rtol=2e-3, atol=2e-3)


def test_killed_harvest_resumes_to_the_uninterrupted_store(setup, tmp_path, monkeypatch):
    _run(setup, tmp_path / "full")
    real = store_mod.atomic_write_json
    calls = {"n": 0}

    def killed_on_third_manifest(path, obj):  # 1: empty manifest, 2: lists shard 0, 3: shard 1
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # shard_00001 renamed into place, never listed
        real(path, obj)

    monkeypatch.setattr(store_mod, "atomic_write_json", killed_on_third_manifest)
    with pytest.raises(KeyboardInterrupt):
        _run(setup, tmp_path / "resumed")
    monkeypatch.setattr(store_mod, "atomic_write_json", real)
    partial = ActivationStore(tmp_path / "resumed")
    assert len(partial.manifest["shards"]) == 1 and not partial.complete
    assert (tmp_path / "resumed" / "shard_00001.safetensors").exists()  # unlisted: never read
    _run(setup, tmp_path / "resumed")
    meta_a, tensors_a = _shards(tmp_path / "full")
    meta_b, tensors_b = _shards(tmp_path / "resumed")
    assert meta_a == meta_b
    for a, b in zip(tensors_a, tensors_b):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_complete_store_is_returned_without_loading_the_model(setup, tmp_path, monkeypatch):
    _run(setup, tmp_path / "st", target_tokens=50)
    monkeypatch.setattr("msae_core.data.lm.load_lm", lambda *a, **k: pytest.fail("model loaded"))
    assert _run(setup, tmp_path / "st", target_tokens=50).n_rows == 50


def test_refuses_a_folder_holding_another_harvest(setup, tmp_path):
    _run(setup, tmp_path / "st", target_tokens=50)
    with pytest.raises(MsaeError, match="different harvest"):
        _run(setup, tmp_path / "st", target_tokens=50, layer=1)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(MsaeError, match="not empty"):
        _run(setup, tmp_path / "other", target_tokens=50)


def test_bad_inputs_fail_before_writing(setup, tmp_path, monkeypatch):
    with pytest.raises(MsaeError, match="tokens must be > 0"):
        _run(setup, tmp_path / "a", target_tokens=0)
    with pytest.raises(MsaeError, match="layer 9 is out of range"):
        _run(setup, tmp_path / "b", layer=9)
    with pytest.raises(MsaeError, match="layer must be >= 0"):
        _run(setup, tmp_path / "b", layer=-1)
    monkeypatch.setenv("MSAE_FORTUNES_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(MsaeError, match="apt-get install fortunes"):
        _run(setup, tmp_path / "c", corpus="embedded")
    assert not any((tmp_path / n).exists() for n in "abc")


def test_disk_full_keeps_completed_shards_and_resumes(setup, tmp_path, monkeypatch):
    _run(setup, tmp_path / "full")
    real = store_mod.atomic_save_safetensors
    calls = {"n": 0}

    def fills_up(path, tensors, metadata=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, tensors, metadata)

    monkeypatch.setattr(store_mod, "atomic_save_safetensors", fills_up)
    with pytest.raises(MsaeError, match="disk full.*2 complete shard"):
        _run(setup, tmp_path / "st")
    monkeypatch.setattr(store_mod, "atomic_save_safetensors", real)
    partial = ActivationStore(tmp_path / "st")
    full = ActivationStore(tmp_path / "full")
    n = partial.n_rows
    assert len(partial.manifest["shards"]) == 2 and 0 < n < 300
    assert torch.equal(partial.rows(torch.arange(n)), full.rows(torch.arange(n)))
    assert _run(setup, tmp_path / "st").n_rows == 300


def test_float16_overflow_is_an_error(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(harvest_mod, "FLOAT16_MAX", 1e-3)
    with pytest.raises(MsaeError, match="--dtype float32"):
        _run(setup, tmp_path / "st", dtype="float16", target_tokens=20)


def test_corpus_running_out_finishes_with_what_there_is(setup, tmp_path):
    store = _run(setup, tmp_path / "st", target_tokens=10**6)
    assert store.complete and store.manifest["corpus_exhausted"] and 500 < store.n_rows < 10**6


def test_cli(setup, tmp_path):
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["harvest", "--model", setup["model"], "--corpus", setup["corpus"],
                              "--layer", "1", "--tokens", "40", "--context-size", "16",
                              "--dtype", "float32", "--out", str(tmp_path / "st"), "--no-progress"])
    assert args.func(args) == 0
    store = ActivationStore(tmp_path / "st")
    assert store.n_rows == 40 and store.manifest["layer"] == 1 and store.manifest["context_size"] == 16
    assert store.manifest["harvest"]["model_dtype"] == "torch.float32"  # auto on the CPU
    # --model-dtype bfloat16: the model runs in bfloat16, the manifest says so, the rows stay close
    args = parser.parse_args(["harvest", "--model", setup["model"], "--corpus", setup["corpus"],
                              "--layer", "1", "--tokens", "40", "--context-size", "16", "--model-dtype",
                              "bfloat16", "--dtype", "float32", "--out", str(tmp_path / "bf"), "--no-progress"])
    assert args.func(args) == 0
    bf = ActivationStore(tmp_path / "bf")
    assert bf.manifest["harvest"]["model_dtype"] == "torch.bfloat16"
    x, y = store.rows(torch.arange(40)), bf.rows(torch.arange(40))
    assert not torch.equal(x, y) and ((x - y).norm(dim=1) / x.norm(dim=1)).max() < 0.05


_CHILD = """
import sys, time
from msae_core.data import store
from msae_core.data.harvest import harvest
from msae_core.data.store import StoreSettings
real = store.StoreWriter.write_shard
def slow(self, *a, **k):
    out = real(self, *a, **k)
    time.sleep(0.3)  # room for the parent to kill us between (or inside) shard writes
    return out
store.StoreWriter.write_shard = slow
s = StoreSettings(model=sys.argv[1], corpus=sys.argv[2], layer=2, target_tokens=300, context_size=16,
                  dtype="float32")
harvest(s, sys.argv[3], batch_size=4, shard_tokens=64, progress=False)
"""


def test_sigkilled_harvest_resumes_to_the_uninterrupted_store(setup, tmp_path):
    import json
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, setup["model"], setup["corpus"], str(out)])
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if len(json.loads((out / "manifest.json").read_text())["shards"]) >= 1:
                    break
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    partial = ActivationStore(out)
    assert not partial.complete and 1 <= len(partial.manifest["shards"]) < 3
    _run(setup, out)
    _run(setup, tmp_path / "full")
    meta_a, tensors_a = _shards(tmp_path / "full")
    meta_b, tensors_b = _shards(out)
    assert meta_a == meta_b
    for a, b in zip(tensors_a, tensors_b):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_activations_are_never_written(setup, tmp_path, monkeypatch):
    """A NaN from the model (float16 overflow aside, which has its own message) stops the harvest
    naming where it came from; the shards written before stay whole and NaN-free."""
    from msae_core.data.lm import LanguageModel

    real = LanguageModel.resid_post
    calls = {"n": 0}

    def resid_post(self, *a, **k):
        out = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3:  # the third batch, after a shard or two of 64 rows
            out[1, 5, 0] = float("nan")
        return out

    monkeypatch.setattr(LanguageModel, "resid_post", resid_post)
    with pytest.raises(MsaeError, match=r"non-finite activations \(NaN or inf\) at layer 2 in 1 row\(s\), "
                                        r"the first in window \d+ at position 5"):
        _run(setup, tmp_path / "nan")
    store = ActivationStore(tmp_path / "nan")
    assert store.n_rows > 0 and store.nonfinite_rows() == (0, [])


def test_documents_are_joined_by_bos_and_a_store_from_before_the_setting_stays_eos(setup, tmp_path):
    """New harvests join documents with BOS (SAELens's default) and say so in the manifest; a store
    harvested before the setting (no separator in its manifest, documents joined by EOS) keeps its
    settings hash, so it is resumed or extended as an EOS harvest and refused as a BOS one."""
    import json

    from msae_core.data.harvest import check_store_folder

    store = _run(setup, tmp_path / "new")
    assert store.manifest["separator"] == "bos"
    old = _run(setup, tmp_path / "old", separator="eos")
    manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
    del manifest["separator"]  # as a harvest before the setting wrote it
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(manifest))
    # the hash an EOS harvest gets is the one harvests got before the setting existed
    import dataclasses
    import hashlib

    later = ("separator", "corpus_config", "corpus_split", "text_column")  # settings added since, at their old values
    before = {k: v for k, v in dataclasses.asdict(_settings(setup, separator="eos")).items() if k not in later}
    assert old.manifest["settings_hash"] == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    assert check_store_folder(tmp_path / "old", _settings(setup, separator="eos")) is not None
    with pytest.raises(MsaeError, match="different harvest"):
        check_store_folder(tmp_path / "old", _settings(setup))
    # the two packings differ from the first document boundary on
    n = min(store.n_rows, old.n_rows)
    assert not torch.equal(store.rows(torch.arange(n)), old.rows(torch.arange(n)))
    assert store.manifest["settings_hash"] != old.manifest["settings_hash"]


def test_a_datasets_corpus_with_its_own_text_column_is_harvested_and_read_back(setup, tmp_path):
    """--text-column (and --split, --dataset-config) reach the dataset, the manifest records them,
    and the evals read the run's corpus back the same way; a missing column is one line."""
    import json

    from msae_core.data.text import corpus_of

    words = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) for i in range(60)]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"id": i, "body": w}) + "\n" for i, w in enumerate(words)))
    store = _run({**setup, "corpus": str(data)}, tmp_path / "st", text_column="body")
    assert store.manifest["text_column"] == "body" and store.manifest["corpus_split"] == "train"
    assert [d.text for d in itertools.islice(corpus_of(store.manifest).documents(), 3)] == words[:3]
    with pytest.raises(MsaeError, match="no text column 'text'"):
        _run({**setup, "corpus": str(data)}, tmp_path / "st2")
