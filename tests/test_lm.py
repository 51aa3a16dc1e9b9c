"""Language-model loading and residual-stream hooks, on tiny random models of each family."""

from __future__ import annotations

import pytest
import torch

from msae_core.data import lm as lm_mod
from msae_core.errors import MsaeError
from msae_core.data.lm import TINY_FAMILIES, find_blocks, load_lm, save_tiny_model


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    out = {}
    for fam in TINY_FAMILIES:
        out[fam] = load_lm(str(save_tiny_model(tmp_path_factory.mktemp(fam), fam, seed=0)), device="cpu")
    return out


def _ids(lm, seed=0, B=2, T=24):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, len(lm.tokenizer), (B, T), generator=g)
    ids[:, 0] = lm.bos_token_id
    return ids


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_resid_post_equals_hidden_states(tiny_models, family):
    lm = tiny_models[family]
    assert lm.d_model == 64 and lm.n_layers == 4
    ids = _ids(lm)
    with torch.no_grad():
        hs = lm.model(ids, output_hidden_states=True).hidden_states
    assert len(hs) == lm.n_layers + 1
    for layer in range(lm.n_layers - 1):
        for stop in (True, False):
            r = lm.resid_post(ids, layer, stop_early=stop)
            assert r.shape == (2, 24, 64)
            torch.testing.assert_close(r, hs[layer + 1], rtol=0, atol=0)


def test_last_layer_is_block_output_before_final_norm(tiny_models):
    lm = tiny_models["llama"]
    ids = _ids(lm)
    with torch.no_grad():
        hs = lm.model(ids, output_hidden_states=True).hidden_states
        last = lm.resid_post(ids, lm.n_layers - 1)
        torch.testing.assert_close(lm.model.model.norm(last), hs[-1])
    assert not torch.allclose(last, hs[-1])


@pytest.mark.parametrize("family", ["gpt2", "gemma3"])
def test_early_stop_runs_no_later_block(tiny_models, family):
    lm = tiny_models[family]
    before = [len(b._forward_hooks) for b in lm.blocks]
    ran = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(lm.blocks)]
    try:
        lm.resid_post(_ids(lm), 1, stop_early=True)
        assert ran == [0, 1]
        ran.clear()
        lm.resid_post(_ids(lm), 1, stop_early=False)
        assert ran == [0, 1, 2, 3]
    finally:
        for h in handles:
            h.remove()
    # the capture hook is gone: a later forward is unaffected
    assert [len(b._forward_hooks) for b in lm.blocks] == before


def test_logits_with_hook_identity_and_replacement(tiny_models):
    lm = tiny_models["gemma2"]
    ids = _ids(lm)
    with torch.no_grad():
        plain = lm.model(ids).logits
    torch.testing.assert_close(lm.logits_with_hook(ids, 2, None), plain)
    torch.testing.assert_close(lm.logits_with_hook(ids, 2, lambda h: h.clone()), plain)
    zeroed = lm.logits_with_hook(ids, 2, lambda h: torch.zeros_like(h))
    assert zeroed.shape == plain.shape and not torch.allclose(zeroed, plain)
    # replacing the output of block L changes resid of L+1 but not of L
    seen = {}
    h = lm.blocks[3].register_forward_hook(lambda m, a, o: seen.setdefault("x", o))
    try:
        lm.logits_with_hook(ids, 2, lambda h: h * 2.0)
    finally:
        h.remove()
    ref = lm.resid_post(ids, 3)
    assert not torch.allclose(seen["x"] if torch.is_tensor(seen["x"]) else seen["x"][0], ref)


def test_unembed_and_special_ids(tiny_models):
    lm = tiny_models["gpt_neox"]
    W_U = lm.unembed_matrix()
    assert W_U.shape == (len(lm.tokenizer), lm.d_model)
    assert lm.bos_token_id == 2 and {0, 1, 2} <= lm.special_ids
    ids = lm.to_tokens("to be or not")
    assert ids[0, 0] == 2 and ids.shape[0] == 1


def test_layer_out_of_range(tiny_models):
    lm = tiny_models["llama"]
    for bad in (-1, 4, 99):
        with pytest.raises(MsaeError, match="out of range"):
            lm.resid_post(_ids(lm), bad)
    with pytest.raises(MsaeError, match="out of range"):
        lm.logits_with_hook(_ids(lm), 4, None)


def test_unknown_model_offline_says_use_embedded(monkeypatch):
    monkeypatch.setattr(lm_mod, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-msae-test")
    with pytest.raises(MsaeError, match="no network.*--model embedded"):
        load_lm("nobody-xyz/no-such-model-123")


def test_bad_local_folder(tmp_path):
    (tmp_path / "junk.txt").write_text("not a model")
    with pytest.raises(MsaeError, match="cannot load model"):
        load_lm(str(tmp_path))


def test_find_blocks_generic_fallback():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])
            self.other = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    assert len(find_blocks(Odd())) == 3


def test_embedded_cache_is_atomic(tmp_path, monkeypatch):
    """A build killed half-way leaves only a temporary folder, which the next build removes."""
    monkeypatch.setenv("MSAE_CACHE", str(tmp_path))

    def dies(part, tmp):
        (tmp / "out").mkdir()
        (tmp / "out" / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(lm_mod, "_build_embedded_part", dies)
    with pytest.raises(KeyboardInterrupt):
        lm_mod.ensure_embedded("model")
    root = lm_mod.embedded_dir()
    assert not (root / "model").exists()
    assert list(root.iterdir()) == []  # the temporary folder was cleaned up too

    def builds(part, tmp):
        (tmp / "out").mkdir()
        (tmp / "out" / lm_mod._CACHE_MARKER).write_text("{}")

    monkeypatch.setattr(lm_mod, "_build_embedded_part", builds)
    stale = root / ".model.tmp-999999999-abc"
    stale.mkdir()
    assert lm_mod.ensure_embedded("model") == root / "model"
    assert not stale.exists()
    assert lm_mod.ensure_embedded("model") == root / "model"  # second call: cached


@pytest.mark.embedded
@pytest.mark.slow
def test_embedded_model_early_stop_matches_full_forward():
    lm = load_lm("embedded", device="cpu")
    assert lm.d_model == 640 and lm.n_layers == 18
    assert lm.bos_token_id == 2 and lm.dtype == torch.float32
    ids = lm.to_tokens("The quick brown fox jumps over the lazy dog because it was late.")
    with torch.no_grad():
        out = lm.model(ids, output_hidden_states=True)
    early = lm.resid_post(ids, 6, stop_early=True)
    torch.testing.assert_close(early, out.hidden_states[7], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lm.logits_with_hook(ids, 6, lambda h: h), out.logits, rtol=1e-5, atol=1e-4)
    # a real model: the next token after a common phrase is predicted well above chance
    logp = out.logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    assert logp.mean().item() > -6.0  # chance would be -log(262144) = -12.5


def test_gguf_conversion_names_a_missing_requirement(tmp_path, monkeypatch):
    """Without accelerate, the first load says so in one line instead of transformers' traceback."""
    monkeypatch.setenv("MSAE_CACHE", str(tmp_path))
    real = lm_mod._installed
    monkeypatch.setattr(lm_mod, "_installed", lambda name: name != "accelerate" and real(name))
    with pytest.raises(MsaeError, match="needs accelerate.*pip install accelerate"):
        lm_mod.ensure_embedded("model")
    assert not (lm_mod.embedded_dir() / "model").exists()


@pytest.mark.embedded
@pytest.mark.slow
def test_embedded_model_converts_into_an_empty_cache(tmp_path, monkeypatch):
    """The cold path a new user takes: GGUF -> float32 safetensors + tokenizer in an empty cache."""
    monkeypatch.setenv("MSAE_CACHE", str(tmp_path))
    assert list(tmp_path.iterdir()) == []
    lm_mod.load_tokenizer.cache_clear()  # an earlier test may hold the tokenizer of another cache
    lm = load_lm("embedded", device="cpu")
    root = lm_mod.embedded_dir()
    assert root.parent == tmp_path
    for part in ("model", "tokenizer"):
        assert (root / part / lm_mod._CACHE_MARKER).is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary folder left
    assert lm.d_model == 640 and lm.n_layers == 18
    ids = lm.to_tokens("The capital of France is")
    with torch.no_grad():
        logits = lm.model(ids).logits
    assert torch.isfinite(logits).all()
