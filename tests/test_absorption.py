"""Feature absorption (SAEBench's first-letter eval): vocabulary filter, prompt packing against one-word
prompts, the per-word absorption arithmetic, feature splitting, the whole pipeline on planted LM
activations and a hand-built SAE, and run_evals end to end on a tiny random LM."""

from __future__ import annotations

import json
import statistics
import math
import random

import pytest
import torch

from msae_core.errors import MsaeError
from msae_core.evals import absorption as A

LETTER_S = A.LETTERS.index("s")
LETTER_B = A.LETTERS.index("b")


# ----------------------------------------------------------------------------------------------
# vocabulary and prompts


def test_alpha_word_filter():
    assert A.is_alpha_word("cat") and A.is_alpha_word(" Cat") and A.is_alpha_word("XYZ")
    for w in ["", " ", "  cat", "cat ", "ca t", "c4t", "café", "cat's", "-cat", "\ncat", "ß"]:
        assert not A.is_alpha_word(w), w
    assert not A.is_alpha_word(" cat", allow_leading_space=False)
    assert A.first_letter_class(" Zebra") == 25 and A.first_letter_class("apple") == 0
    assert A.answer_text(" cat") == " C"


class _SPTokenizer:
    """A SentencePiece-like vocabulary whose detokenizer drops a leading '▁' space (Mistral)."""

    all_special_tokens = ["<s>"]

    def get_vocab(self):
        return {"<s>": 0, "▁cat": 1, "dog": 2, "▁the": 3, "▁": 4, "12": 5, "▁a1": 6, "<0x61>": 7, "a": 8, "▁über": 9}

    def convert_tokens_to_string(self, tokens):
        t = tokens[0]
        return {"<0x61>": "a"}.get(t, t.replace("▁", " ").lstrip(" "))


def test_alpha_vocab_sentencepiece_space_and_duplicates():
    vocab = A.alpha_vocab(_SPTokenizer())
    # '▁' marks a leading space even where the detokenizer drops it; byte tokens that decode to
    # an existing word are kept once (lowest id)
    assert vocab == {" cat": 1, "dog": 2, " the": 3, "a": 7}


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from msae_core.data.lm import load_lm, save_tiny_model

    path = tmp_path_factory.mktemp("tiny-lm") / "model"
    save_tiny_model(path, family="llama", d_model=64, n_layers=2, seed=0)
    return load_lm(str(path), device="cpu")


def _tiny_pos(tok) -> int:
    vocab = A.alpha_vocab(tok)
    return A.word_token_pos(tok, A.Config.prompt_template, "a", vocab["a"])


def test_alpha_vocab_byte_level(tiny_lm):
    vocab = A.alpha_vocab(tiny_lm.tokenizer)
    assert " t" in vocab and "A" in vocab and "z" in vocab  # 'Ġt' reads as " t"
    assert all(A.is_alpha_word(w) for w in vocab)
    assert not any(w.strip() in ("<pad>", "<bos>") for w in vocab)
    assert tiny_lm.tokenizer.convert_ids_to_tokens(vocab[" t"]) == "Ġt"


def test_packed_prompts_read_the_same_activations_as_one_word_prompts(tiny_lm):
    """A word read from a packed prompt has exactly the activation of a SAEBench prompt holding
    the lines before it, and right-padding in a batch changes nothing."""
    tok = tiny_lm.tokenizer
    pos = _tiny_pos(tok)
    lines = A._Lines(tok, A.Config.prompt_template)
    vocab = A.alpha_vocab(tok)
    words = A.usable_words(vocab, lines, pos)
    assert len(words) > 40
    rng = random.Random(0)
    queries, others = words[:9], words[9:14]
    # examples come from a pool holding the queries too, but never a query of the same prompt:
    # with all 9 in one prompt, only the 5 others can be chosen
    (one,) = A.build_prompts(queries, queries + others, lines, bos=tiny_lm.bos_token_id, pos=pos,
                             max_icl_examples=5, queries_per_prompt=9, rng=rng)
    start = one.positions[0] - len(lines.line_ids(queries[0])) - pos   # the first query's line
    block = one.ids[1:start]
    assert len(block) == sum(len(lines.line_ids(w) + lines.answer_ids(w)) for w in others)
    for w in others:
        ex = lines.line_ids(w) + lines.answer_ids(w)
        assert any(block[i:i + len(ex)] == ex for i in range(len(block))), w
    packed = A.build_prompts(queries, words[9:], lines, bos=tiny_lm.bos_token_id, pos=pos,
                             max_icl_examples=5, queries_per_prompt=4, rng=rng)
    assert [len(p.words) for p in packed] == [4, 4, 1]
    for p in packed:
        for w, i in zip(p.words, p.positions):
            assert p.ids[i] == vocab[w]
    got = A.collect_acts(tiny_lm, 1, packed, batch_size=2, progress=False)
    # every query as its own prompt: the packed prompt cut after the query's line
    single = [A.Prompt(p.ids[:i - pos], [i], [w]) for p in packed for w, i in zip(p.words, p.positions)]
    assert single[1].ids[-1] == tok(":", add_special_tokens=False)["input_ids"][-1]
    want = torch.cat([A.collect_acts(tiny_lm, 1, [s], batch_size=1, progress=False) for s in single])
    assert got.shape == (9, 64)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # a word's activation depends on its context: queries are not read at a constant position
    assert not torch.allclose(got[0], got[1])


# ----------------------------------------------------------------------------------------------
# the per-word arithmetic


def _basis(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    return q.T  # rows orthonormal


def _planted_words(n: int, n_absorbed: int, *, absorber_aligned: bool, main_off: bool, seed: int = 0):
    """Words of one letter: x = 3 u + noise; on `n_absorbed` of them also 3 t. Latent 0 (main,
    decoder u), latent 1 (decoder (u+t)/sqrt2, or t alone when not aligned), latents 2.. noise
    latents orthogonal to u."""
    D, F = 32, 12
    E = _basis(D, seed)
    u, t = E[0], E[1]
    dec = torch.zeros(F, D)
    dec[0] = u
    dec[1] = (u + t) / math.sqrt(2) if absorber_aligned else t
    dec[2:] = E[2:F]
    g = torch.Generator().manual_seed(seed + 1)
    x = 3 * u + 0.05 * torch.randn(n, D, generator=g)
    f = torch.zeros(n, F)
    f[:, 0] = 3.0
    f[:, 2:] = torch.rand(n, F - 2, generator=g) * (torch.rand(n, F - 2, generator=g) < 0.3)
    x = x + f[:, 2:] @ dec[2:]
    ab = torch.arange(n) < n_absorbed
    x[ab] += 3 * t
    f[ab, 1] = 3 * math.sqrt(2) if absorber_aligned else 3.0
    if main_off:
        f[ab, 0] = 0.0
    return x, f, dec, u, ab


def test_word_absorption_planted_full_absorption():
    x, f, dec, u, ab = _planted_words(100, 30, absorber_aligned=True, main_off=True)
    r = A.word_absorption(x, f, dec, u * 2.5, [0])  # any probe scale
    assert r.absorption_fraction[ab].eq(1).all() and r.is_full_absorption[ab].all()
    assert r.absorption_fraction[~ab].eq(0).all() and not r.is_full_absorption[~ab].any()
    assert r.absorption_fraction.mean().item() == pytest.approx(0.30)
    assert (r.top_projection_feat[ab] == 1).all()


def test_word_absorption_partial():
    """The main latent carries a third of the probe projection, an aligned latent the rest: the
    absorption fraction is 2/3 and it is not full absorption (the main latent fires)."""
    x, f, dec, u, ab = _planted_words(10, 10, absorber_aligned=True, main_off=False)
    f[:, 0] = 1.0
    f[:, 1] = 2 * math.sqrt(2)
    r = A.word_absorption(x, f, dec, u, [0])
    torch.testing.assert_close(r.absorption_fraction, torch.full((10,), 2 / 3), atol=2e-2, rtol=0)
    assert not r.is_full_absorption.any()


def test_word_absorption_zero_without_an_aligned_absorber():
    # the main latent is off on 30 words, but the latent firing instead is orthogonal to the probe
    x, f, dec, u, ab = _planted_words(100, 30, absorber_aligned=False, main_off=True)
    r = A.word_absorption(x, f, dec, u, [0])
    assert r.absorption_fraction.eq(0).all() and not r.is_full_absorption.any()
    # and with the main latent firing everywhere there is nothing to absorb
    x, f, dec, u, ab = _planted_words(100, 0, absorber_aligned=True, main_off=True)
    r = A.word_absorption(x, f, dec, u, [0])
    assert r.absorption_fraction.eq(0).all() and not r.is_full_absorption.any()


def test_word_absorption_uses_contributions_in_input_units():
    """Moving a factor between activations and decoder norms (the same SAE) changes nothing; the
    cosine-only projection a_i cos_i (right only for unit-norm decoders) would see no absorption."""
    x, f, dec, u, ab = _planted_words(100, 30, absorber_aligned=True, main_off=True)
    base = A.word_absorption(x, f, dec, u, [0])
    r = A.word_absorption(x, f * 0.25, dec * 4.0, u, [0])
    torch.testing.assert_close(r.absorption_fraction, base.absorption_fraction)
    assert torch.equal(r.is_full_absorption, base.is_full_absorption)
    cos_only = (f * 0.25)[ab, 1] * torch.nn.functional.cosine_similarity(dec[1], u, dim=0)
    assert (cos_only / (x[ab] @ u) < A.ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD).all()


def test_decoder_directions_are_in_input_units():
    from msae_core.sae import SAEConfig, build_sae

    sae = build_sae(SAEConfig(arch="relu", d_in=16, d_sae=40, seed=3)).eval()
    with torch.no_grad():
        sae.input_scale.fill_(0.25)
        sae.b_dec.normal_()
    dec = A.decoder_directions(sae)
    torch.testing.assert_close(dec, sae.W_dec.detach() / 0.25)
    f = torch.rand(5, 40)
    torch.testing.assert_close(sae.decode(f).detach(), f @ dec + sae.decode(torch.zeros(1, 40)).detach())


# ----------------------------------------------------------------------------------------------
# feature splitting and the whole pipeline on planted activations


def test_split_features_walk():
    feats = [[7], [7, 3], [7, 3, 9], [7, 3, 9, 1]]
    assert A.split_features([0.50, 0.90, 0.92, 0.99], feats, 0.03) == [7, 3]      # +0.02 stops the walk
    assert A.split_features([0.50, 0.90, 0.95, 0.99], feats, 0.03) == [7, 3, 9, 1]
    assert A.split_features([0.90, 0.91, 0.99, 0.99], feats, 0.03) == [7]          # stops at the first miss
    assert A.split_features([0.0, 0.0], feats, 0.03) == [7]                          # k=1 always counts
    assert A.split_features([], [], 0.03) == []
    assert A.f1_score(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 1, 0])) == pytest.approx(0.5)
    assert A.f1_score(torch.tensor([0, 0]), torch.tensor([0, 0])) == 0.0


N_TOKEN_DIRS = 15


def _planted_letters(absorb: bool, seed: int = 0, n_per_letter: int = 40, n_s: int = 150, n_absorbed: int = 45,
                     latent_scale: float = 1.0):
    """LM activations of words with 26 letter directions; 's' words: `n_absorbed` of them carry one
    of 10 token directions; 'b' words carry one of two sub-directions. The SAE has one latent per
    letter (b: two split latents) and, with `absorb`, 15 token latents whose decoders lean on 's'
    and that switch the 's' latent off (encoder inhibition), as absorption does."""
    from msae_core.sae import SAEConfig, build_sae

    D = 64
    E = _basis(D, seed)
    U = E[:26]
    T = E[26:26 + N_TOKEN_DIRS]
    V = E[26 + N_TOKEN_DIRS:28 + N_TOKEN_DIRS]
    g = torch.Generator().manual_seed(seed + 7)
    labels, extra = [], []
    for c in range(26):
        n = n_s if c == LETTER_S else n_per_letter
        labels += [c] * n
        for i in range(n):
            if c == LETTER_S:
                extra.append(("t", i % N_TOKEN_DIRS) if i < n_absorbed else None)
            elif c == LETTER_B:
                extra.append(("v", i % 2))
            else:
                extra.append(None)
    y = torch.tensor(labels)
    x = 4 * U[y] + 0.15 * torch.randn(len(y), D, generator=g)
    for n, e in enumerate(extra):
        if e is not None:
            x[n] += 4 * (T if e[0] == "t" else V)[e[1]]
    absorbed = torch.tensor([e is not None and e[0] == "t" for e in extra])

    F = 26 + N_TOKEN_DIRS + 1   # letters (b's latent is its first split half), token latents, b's second half
    W_enc = torch.zeros(D, F)
    W_dec = torch.zeros(F, D)
    b_enc = torch.zeros(F)
    for c in range(26):
        W_enc[:, c], b_enc[c], W_dec[c] = U[c] * 1.125, -0.5, U[c]
    W_enc[:, LETTER_S] -= 2 * T.sum(0) if absorb else 0
    # b: two latents, each firing on one half (u_b + v_i)
    for j, col in enumerate((LETTER_B, F - 1)):
        W_enc[:, col] = U[LETTER_B] + V[j]
        b_enc[col] = -4.0
        W_dec[col] = (U[LETTER_B] + V[j]) / math.sqrt(2)
    for j in range(N_TOKEN_DIRS):
        col = 26 + j
        if absorb:  # fires ~4 sqrt2 on its words, decoder (u_s + t_j)/sqrt2: reconstructs them
            W_enc[:, col], b_enc[col], W_dec[col] = 2 * T[j], -8 + 4 * math.sqrt(2), (U[LETTER_S] + T[j]) / math.sqrt(2)
        else:      # a token latent orthogonal to 's'
            W_enc[:, col], b_enc[col], W_dec[col] = T[j], -2.0, T[j]
    sae = build_sae(SAEConfig(arch="relu", d_in=D, d_sae=F, seed=0)).eval()
    with torch.no_grad():  # latent_scale: the same SAE with activations scaled, decoder rows unscaled
        sae.W_enc.copy_(W_enc * latent_scale)
        sae.W_dec.copy_(W_dec / latent_scale)
        sae.b_enc.copy_(b_enc * latent_scale)
        sae.b_dec.zero_()
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm], absorbed[perm], sae


def _evaluate(absorb: bool, latent_scale: float = 1.0, **cfg_kw):
    x, y, absorbed, sae = _planted_letters(absorb, latent_scale=latent_scale)
    n_train = int(0.8 * len(y))
    cfg = A.Config(max_k_value=4, k_sparse_probe_batch_size=128, k_sparse_probe_num_epochs=30, **cfg_kw)

    def encode(a):
        with torch.no_grad():
            return sae.encode(a)

    metrics, details, extra = A.evaluate(x[:n_train], y[:n_train], x[n_train:], y[n_train:], encode,
                                         A.decoder_directions(sae), cfg, progress=False)
    test_absorbed = absorbed[n_train:]
    return metrics, {d["first_letter"]: d for d in details}, extra, y[n_train:], test_absorbed


def test_evaluate_finds_planted_absorption_and_split():
    torch.manual_seed(0)
    metrics, details, extra, y_test, absorbed = _evaluate(absorb=True)
    assert len(details) == 26 and extra["letters_evaluated"] == list(A.LETTERS)
    s = details["s"]
    planted = absorbed[y_test == LETTER_S].float().mean().item()    # probe gets every 's' word
    assert s["num_probe_true_positives"] == int((y_test == LETTER_S).sum())
    assert 0.15 < planted < 0.5
    assert s["mean_absorption_fraction"] == pytest.approx(planted, abs=0.03)
    assert s["full_absorption_rate"] == pytest.approx(planted, abs=0.03)
    assert s["num_full_absorption"] == pytest.approx(planted * s["num_probe_true_positives"], abs=1)
    # each token latent covers too few 's' words to count as a split feature: 's' keeps one main latent
    assert s["num_split_features"] == 1 and extra["main_latents"]["s"] == [LETTER_S]
    assert details["b"]["num_split_features"] == 2
    assert sorted(extra["main_latents"]["b"]) == sorted([LETTER_B, 26 + N_TOKEN_DIRS])
    for letter, d in details.items():
        if letter not in "sb":
            assert d["num_split_features"] == 1 and d["mean_absorption_fraction"] == 0.0, letter
    m = metrics["mean"]
    assert m["mean_absorption_fraction_score"] == pytest.approx(s["mean_absorption_fraction"] / 26)
    assert m["mean_num_split_features"] == pytest.approx(27 / 26)
    assert m["std_dev_num_split_features"] > 0


def test_evaluate_reads_latents_in_saebench_units():
    """An SAE whose activations are 1000x smaller and decoder rows 1000x longer (as ours are, in input
    units, when their input scale is small) is the same SAE: same probes, same absorption."""
    torch.manual_seed(0)
    m1, d1, e1, _, _ = _evaluate(absorb=True)
    torch.manual_seed(0)
    m2, d2, e2, _, _ = _evaluate(absorb=True, latent_scale=0.001)
    assert e2["main_latents"] == e1["main_latents"]
    for letter in d1:
        for key, v in d1[letter].items():
            assert d2[letter][key] == pytest.approx(v, abs=1e-6), (letter, key)


def test_evaluate_reports_zero_without_absorption():
    torch.manual_seed(0)
    metrics, details, extra, _, _ = _evaluate(absorb=False)
    assert metrics["mean"]["mean_absorption_fraction_score"] == 0.0
    assert metrics["mean"]["mean_full_absorption_score"] == 0.0
    assert details["s"]["num_split_features"] == 1


def test_evaluate_refuses_with_too_few_good_letters():
    with pytest.raises(MsaeError, match="only 26 letters"):
        _evaluate(absorb=False, min_feats_for_eval=27)


# ----------------------------------------------------------------------------------------------
# end to end


@pytest.fixture()
def tiny_run(tmp_path):
    from fixtures_runs import make_run, make_store
    from msae_core.data.lm import save_tiny_model

    model = save_tiny_model(tmp_path / "model", family="llama", d_model=64, n_layers=2, seed=0)
    store = make_store(tmp_path / "store", model_dir=model)
    run = make_run(tmp_path, "topk-run", str(store), arch="topk", d_sae=128, ev=None, umap=False)
    return run, model


def _tiny_settings(model) -> dict:
    from transformers import AutoTokenizer

    return {"prompt_token_pos": _tiny_pos(AutoTokenizer.from_pretrained(str(model))), "max_words": 0,
            "queries_per_prompt": 4, "max_k_value": 3, "k_sparse_probe_num_epochs": 5,
            "min_GT_probe_f1": 0.0, "min_feats_for_eval": 1}


def test_run_evals_end_to_end(tiny_run):
    from msae_core.evals import run_evals
    from msae_core.evals.schema import check_result
    from msae_core.evals.summary import summarize

    run, model = tiny_run
    out = run_evals(run, ["absorption"], progress=False, device="cpu", overrides={"absorption": _tiny_settings(model)})
    on_disk = json.loads((run / "eval.json").read_text())
    res = on_disk["absorption"]
    assert out["absorption"]["eval_id"] == res["eval_id"]
    assert check_result(res) == []
    assert res["eval_type_id"] == "absorption_first_letter" == A.EVAL_TYPE_ID
    assert res["eval_config"]["model_name"] == str(model) and res["eval_config"]["max_k_value"] == 3
    s = summarize(on_disk)
    assert {"absorption", "absorption_full", "n_split_features"} <= set(s)
    assert 0 <= s["absorption"] <= 1 and 0 <= s["absorption_full"] <= 1 and 1 <= s["n_split_features"] <= 3
    details = res["eval_result_details"]
    assert details and all(set(d) == {"first_letter", "mean_absorption_fraction", "full_absorption_rate",
                                      "num_full_absorption", "num_probe_true_positives", "num_split_features"}
                           for d in details)
    assert all(d["num_probe_true_positives"] >= 1 and d["num_full_absorption"] <= d["num_probe_true_positives"]
               for d in details)
    (u,) = res["eval_result_unstructured"]["seeds"]
    assert u["n_train_words"] + u["n_test_words"] + u["n_words_dropped_tokenization"] == u["n_alpha_vocab"]
    assert res["eval_result_unstructured"]["saebench_definitions"] == "sae-bench 0.6.0"
    unc = res["eval_result_metrics"]["uncertainty"]
    assert unc["n_seeds"] == 1 and unc["mean_absorption_fraction_score_seed_sd"] is None
    assert unc["mean_absorption_fraction_score_ci_low"] <= s["absorption"] <= unc["mean_absorption_fraction_score_ci_high"]
    per_word = u["per_word"]
    assert sum(len(p["word"]) for p in per_word.values()) == sum(d["num_probe_true_positives"] for d in details)
    assert all(w.strip()[0].lower() == letter for letter, p in per_word.items() for w in p["word"])


def test_seeds_repeat_exactly_differ_from_each_other_and_the_interval_covers_them(tiny_run):
    from msae_core.evals import run_evals

    run, model = tiny_run
    settings = {**_tiny_settings(model), "seeds": 3, "random_seed": 5}
    res = run_evals(run, ["absorption"], progress=False, device="cpu", overrides={"absorption": settings})["absorption"]
    seeds = res["eval_result_unstructured"]["seeds"]
    assert [s["seed"] for s in seeds] == [5, 6, 7]
    words = [sorted(w for p in s["per_word"].values() for w in p["word"]) for s in seeds]
    assert words[0] != words[1] and words[1] != words[2]  # each seed its own split of the words
    scores = [s["mean_absorption_fraction_score"] for s in seeds]
    m, unc = res["eval_result_metrics"]["mean"], res["eval_result_metrics"]["uncertainty"]
    assert m["mean_absorption_fraction_score"] == pytest.approx(sum(scores) / 3)
    lo, hi = unc["mean_absorption_fraction_score_ci_low"], unc["mean_absorption_fraction_score_ci_high"]
    assert lo <= min(scores) and max(scores) <= hi and lo < hi
    assert unc["mean_absorption_fraction_score_seed_sd"] == pytest.approx(statistics.stdev(scores))
    assert {d["seed"] for d in res["eval_result_details"]} == {5, 6, 7}
    # seed 6 alone gives seed 6's numbers again, bit for bit
    again = run_evals(run, ["absorption"], progress=False, device="cpu",
                      overrides={"absorption": {**settings, "seeds": 1, "random_seed": 6}})["absorption"]
    assert again["eval_result_metrics"]["mean"]["mean_absorption_fraction_score"] == scores[1]
    assert again["eval_result_unstructured"]["seeds"][0]["per_word"] == seeds[1]["per_word"]


def test_run_refuses_a_wrong_word_position(tiny_run):
    from msae_core.evals import run_evals

    run, model = tiny_run
    settings = _tiny_settings(model)
    right = settings.pop("prompt_token_pos")
    with pytest.raises(MsaeError, match=f"prompt_token_pos={right}"):
        run_evals(run, ["absorption"], progress=False, device="cpu",
                  overrides={"absorption": {**settings, "prompt_token_pos": -6}})
    assert not (run / "eval.json").exists()


@pytest.mark.embedded
def test_embedded_model_tiny_settings(tmp_path):
    """Gemma 3 270M: its vocabulary, the template's word position (-6) and a run with few words."""
    from msae_core.artifacts import RUN_CONFIG, RUN_STATUS, STORE_MANIFEST, atomic_write_json
    from msae_core.data.store import STORE_FORMAT
    from msae_core.evals import run_evals
    from msae_core.evals.schema import check_result
    from msae_core.sae import SAEConfig, build_sae
    from msae_core.sae_io import save_sae

    store = tmp_path / "store"
    store.mkdir()
    atomic_write_json(store / STORE_MANIFEST, {  # a valid store manifest with no rows: model and layer
        "format": STORE_FORMAT, "model": "embedded", "layer": 3, "context_size": 128,
        "corpus": {"name": "embedded"}, "d_model": 640, "dtype": "float16", "n_rows": 0,
        "n_windows": 0, "settings_hash": "-", "shards": []})
    run = tmp_path / "run"
    run.mkdir()
    sae_cfg = {"arch": "topk", "d_in": 640, "d_sae": 256, "k": 16}
    atomic_write_json(run / RUN_CONFIG, {"sae": sae_cfg, "train": {"steps": 1}, "data": {"acts": str(store)}})
    atomic_write_json(run / RUN_STATUS, {"state": "done", "step": 1, "total_steps": 1, "version": 1})
    save_sae(build_sae(SAEConfig(**sae_cfg)), run)
    out = run_evals(run, ["absorption"], progress=False, device="cpu", overrides={"absorption": {
        "max_words": 160, "queries_per_prompt": 16, "max_k_value": 2, "k_sparse_probe_num_epochs": 5,
        "min_GT_probe_f1": 0.0, "min_feats_for_eval": 1}})
    res = out["absorption"]
    assert check_result(res) == []
    (u,) = res["eval_result_unstructured"]["seeds"]
    assert u["n_alpha_vocab"] > 100_000
    assert u["n_words_dropped_tokenization"] <= 8    # -6 is the word's position for nearly every word
    assert u["n_train_words"] + u["n_test_words"] >= 150
