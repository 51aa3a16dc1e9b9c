"""Sparse probing (SAEBench's definitions): task drawing, top-k selection, pooling over non-special
tokens, the offline labelled datasets, SAEBench's datasets on a fake stream, and the eval end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from msae_core.errors import MsaeError
from msae_core.evals import probe_data
from msae_core.evals import sparse_probing as sp

FORTUNES = Path("/usr/share/games/fortunes")
HAVE_FORTUNES = all((FORTUNES / p).exists() for p in ("computers", "politics", "de", "es", "it"))
needs_fortunes = pytest.mark.skipif(
    not HAVE_FORTUNES, reason="Debian fortunes not installed "
    "(sudo apt-get install fortunes fortunes-min fortunes-de fortunes-es fortunes-it)")


# ----------------------------------------------------------------------------------------------
# probe machinery on synthetic activations


def _planted(n_per_class: int, classes: list[str], F: int, planted: dict[str, int], seed: int):
    """Sparse non-negative latents; class c switches latent planted[c] on. Latent F-1 is loud
    (large variance) but the same in every class, so a selection by variance would pick it."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for c in classes:
        x = torch.rand(n_per_class, F, generator=g) * (torch.rand(n_per_class, F, generator=g) < 0.2)
        x[:, planted[c]] += 3.0 + 0.3 * torch.rand(n_per_class, generator=g)
        x[:, F - 1] = 20.0 * torch.rand(n_per_class, generator=g)
        out[c] = x
    return out


def test_top1_finds_the_planted_latent_and_shuffled_labels_are_chance():
    classes, F = ["a", "b", "c"], 64
    planted = {"a": 5, "b": 17, "c": 40}
    train = _planted(200, classes, F, planted, seed=0)
    test = _planted(200, classes, F, planted, seed=1)
    res, top = sp.probe_suite(train, test, [1, 2], "sae", seed=0, full_probe="sklearn")
    for c in classes:
        assert top[c][0] == planted[c]
        assert res["sae_top_1_test_accuracy"][c] >= 0.97
        assert res["sae_test_accuracy"][c] >= 0.97

    # the same rows with labels shuffled across classes: nothing to find, top-1 is at chance
    def shuffled(acts, seed):
        g = torch.Generator().manual_seed(seed)
        rows = torch.cat([acts[c] for c in classes])
        rows = rows[torch.randperm(len(rows), generator=g)]
        return {c: rows[i * 200:(i + 1) * 200] for i, c in enumerate(classes)}

    res_s, _ = sp.probe_suite(shuffled(train, 2), shuffled(test, 3), [1], "sae", seed=0, full_probe=None)
    chance = sum(res_s["sae_top_1_test_accuracy"].values()) / len(classes)
    assert 0.38 <= chance <= 0.62, chance
    assert "sae_test_accuracy" not in res_s


def test_saebench_full_probe_learns_a_linear_rule():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(1200, 16, generator=g)
    y = (X[:, 3] - X[:, 7] > 0).long()
    acc = sp.saebench_probe_correct(X[:1000], y[:1000], X[1000:], y[1000:], torch.Generator().manual_seed(0)).mean()
    assert acc >= 0.9
    y_rand = torch.randint(0, 2, (1200,), generator=g)
    acc_rand = sp.saebench_probe_correct(X[:1000], y_rand[:1000], X[1000:], y_rand[1000:],
                                         torch.Generator().manual_seed(0)).mean()
    assert acc_rand < 0.75  # best-of-epochs on test lifts chance a little, never to a rule


def test_top_k_mean_diff_ranks_by_absolute_difference():
    X = torch.tensor([[0.1, -2.0, 0.5, 0.0],
                      [0.1, -2.0, 0.5, 0.0],
                      [0.0, 0.0, 0.0, 0.0],
                      [0.0, 0.0, 0.0, 0.0]])
    y = torch.tensor([1, 1, 0, 0])
    assert sp.top_k_mean_diff(X, y, 3).tolist() == [1, 2, 0]
    assert sp.top_k_mean_diff(-X, y, 1).tolist() == [1]


def test_binary_task_is_balanced_one_vs_rest_and_seeded():
    acts = {c: torch.arange(n, dtype=torch.float32)[:, None] + 100 * i
            for i, (c, n) in enumerate([("a", 10), ("b", 7), ("c", 5)])}
    X, y = sp.binary_task(acts, "a", torch.Generator().manual_seed(0))
    assert len(X) == 20 and int(y.sum()) == 10
    pos, neg = X[y == 1, 0], X[y == 0, 0]
    assert sorted(pos.tolist()) == list(range(10))                  # every "a" row, once
    assert all(v >= 100 for v in neg.tolist())                      # negatives from b and c only
    assert len(set(neg.tolist())) == 10                             # no row drawn twice
    assert (neg < 200).sum() == 5 and (neg >= 200).sum() == 5       # ceil(10 / 2) from each
    X2, y2 = sp.binary_task(acts, "a", torch.Generator().manual_seed(0))
    assert torch.equal(X, X2) and torch.equal(y, y2)
    with pytest.raises(MsaeError, match="only 5 texts"):
        sp.binary_task({"a": torch.zeros(10, 1), "b": torch.zeros(5, 1)}, "a", torch.Generator())


# ----------------------------------------------------------------------------------------------
# pooling over non-special tokens


def test_mean_pool_skips_masked_positions():
    acts = torch.tensor([[[1000.0, 0.0], [1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]])  # (1, 4, 2)
    ids = torch.tensor([[2, 10, 11, 0]])  # BOS, two tokens, padding
    keep = sp.keep_mask(ids, torch.tensor([3]), special_ids={0, 1, 2})
    assert keep.tolist() == [[False, True, True, False]]
    assert sp.mean_pool(acts, keep).tolist() == [[2.0, 3.0]]
    assert sp.mean_pool(acts, torch.ones_like(keep)).tolist() != [[2.0, 3.0]]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from msae_core.data.lm import load_lm, save_tiny_model

    d = tmp_path_factory.mktemp("tiny_lm")
    save_tiny_model(d, family="llama", d_model=64, n_layers=2, seed=0)
    return load_lm(str(d), device="cpu")


def test_pooled_activations_exclude_special_tokens_and_padding(tiny_lm):
    lm = tiny_lm
    texts = ["The quick brown fox", "To be or not to be<eos> that is the question", "A stitch"]
    F = 32
    W = torch.randn(lm.d_model, F, generator=torch.Generator().manual_seed(0))

    def encode(x):
        return torch.relu(x @ W)

    llm, sae = sp.pooled_activations(lm, 1, texts, context_length=64, llm_batch_size=3,
                                     sae_encode=encode, progress=False)
    for i, t in enumerate(texts):
        ids = lm.to_tokens(t)
        assert ids[0, 0].item() == lm.bos_token_id
        resid = lm.resid_post(ids, 1)[0].float()  # (T, D), alone: no padding
        keep = torch.tensor([tok not in lm.special_ids for tok in ids[0].tolist()])
        if i == 1:
            assert (~keep).sum() == 2  # BOS and the EOS inside the text
        assert torch.allclose(llm[i], resid[keep].mean(0), atol=1e-5)
        assert not torch.allclose(llm[i], resid.mean(0), atol=1e-3)   # with specials: different
        assert torch.allclose(sae[i], encode(resid[keep]).mean(0), atol=1e-4)
    # batching (and so padding) does not change a text's pooled activations
    alone, _ = sp.pooled_activations(lm, 1, texts[2:], 64, llm_batch_size=1, progress=False)
    assert torch.allclose(alone[0], llm[2], atol=1e-5)
    # truncation to context_length keeps the beginning
    short, _ = sp.pooled_activations(lm, 1, [texts[1]], context_length=4, llm_batch_size=1, progress=False)
    ids = lm.to_tokens(texts[1])[:, :4]
    assert torch.allclose(short[0], lm.resid_post(ids, 1)[0, 1:].float().mean(0), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# offline datasets


@needs_fortunes
@pytest.mark.parametrize("name,classes", [
    ("fortunes-topics", ("computers", "men-women", "politics", "science", "work")),
    ("fortunes-languages", ("en", "de", "es", "it")),
    ("code-vs-prose", ("code", "prose")),
])
def test_offline_dataset_balanced_disjoint_deterministic(name, classes):
    ds = probe_data.load_probe_dataset(name, 40, 20, seed=3)
    assert ds.classes == classes and ds.name == name
    assert {c: len(v) for c, v in ds.by_class("train").items()} == {c: 20 for c in classes}
    assert {c: len(v) for c, v in ds.by_class("test").items()} == {c: 10 for c in classes}
    norm = probe_data._normalise
    train_texts = {norm(t) for t, _ in ds.train}
    assert len(train_texts) == len(ds.train)                       # no duplicates
    assert not train_texts & {norm(t) for t, _ in ds.test}          # train and test disjoint
    assert all(len(norm(t)) >= probe_data.MIN_CHARS for t, _ in ds.train + ds.test)
    again = probe_data.load_probe_dataset(name, 40, 20, seed=3)
    assert again.train == ds.train and again.test == ds.test
    other = probe_data.load_probe_dataset(name, 40, 20, seed=4)
    assert other.train != ds.train
    assert json.dumps(ds.provenance)  # provenance is plain json


@needs_fortunes
def test_language_and_topic_labels_come_from_their_files():
    from msae_core.data.text import load_fortunes

    ds = probe_data.load_probe_dataset("fortunes-languages", 60, 20, seed=0)
    texts = {lang: {d.text for d in load_fortunes(lang).documents()} for lang in probe_data.LANGUAGES}
    for text, label in ds.train + ds.test:
        assert text in texts[label]
        assert all(text not in texts[o] for o in texts if o != label)
    german = [t for t, lab in ds.train if lab == "de"]
    assert any(w in " ".join(german).split() for w in ("der", "die", "und", "nicht"))

    ds = probe_data.load_probe_dataset("fortunes-topics", 40, 20, seed=0)
    for topic in ds.classes:
        docs = {d.text for d in load_fortunes("en", labels=[topic]).documents()}
        assert all(t in docs for t, lab in ds.train + ds.test if lab == topic)


@needs_fortunes
def test_code_snippets_are_stdlib_source_from_disjoint_files():
    ds = probe_data.load_probe_dataset("code-vs-prose", 40, 20, seed=1)
    code = ds.provenance["code"]
    root = Path(code["root"])
    assert not set(code["train_files"]) & set(code["test_files"])
    for split, files in (("train", code["train_files"]), ("test", code["test_files"])):
        snippets = ds.by_class(split)["code"]
        assert len(snippets) == len(set(files)) == (20 if split == "train" else 10)
        assert all(f.endswith(".py") and "site-packages" not in f for f in files)
        sources = [(root / f).read_text(encoding="utf-8") for f in files]
        assert all(any(s in src for src in sources) for s in snippets)
    from msae_core.data.text import load_fortunes

    allowed = {d.text for d in load_fortunes("en").documents() if d.label not in probe_data.PROSE_EXCLUDED}
    assert all(t in allowed for t, lab in ds.train + ds.test if lab == "prose")


@needs_fortunes
def test_dataset_errors_are_one_line():
    with pytest.raises(MsaeError, match="unknown probing dataset 'nope'.*fortunes-topics.*code-vs-prose"):
        probe_data.load_probe_dataset("nope", 10, 10, 0)
    with pytest.raises(MsaeError, match="class 'men-women' has only .* lower them"):
        probe_data.load_probe_dataset("fortunes-topics", 1000, 400, 0)
    with pytest.raises(MsaeError, match="at least 2"):
        probe_data.load_probe_dataset("fortunes-topics", 1, 10, 0)


def test_list_datasets_and_saebench_names_offline(monkeypatch):
    import msae_core.data.lm as lm_mod

    monkeypatch.setattr(lm_mod, "hub_reachable", lambda timeout=3.0: False)
    assert probe_data.list_datasets(True) == ["fortunes-topics", "fortunes-languages", "code-vs-prose"]
    assert "fancyzhx/ag_news" in probe_data.list_datasets(False)
    assert "LabHC/bias_in_bios_class_set1" in probe_data.list_datasets(False)
    assert probe_data.list_datasets() == probe_data.list_datasets(True)
    with pytest.raises(MsaeError, match="unreachable.*offline datasets: fortunes-topics"):
        probe_data.load_probe_dataset("fancyzhx/ag_news", 10, 10, 0)


def _fake_hub(monkeypatch, rows_by_split: dict[str, list[dict]]):
    import datasets

    import msae_core.data.lm as lm_mod

    monkeypatch.setattr(lm_mod, "hub_reachable", lambda timeout=3.0: True)
    calls = []

    def load_dataset(name, *args, split, streaming, **kw):
        assert streaming
        calls.append((name, split))
        rows = rows_by_split[split]
        return datasets.IterableDataset.from_generator(lambda: iter(rows))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_saebench_ag_news_from_a_stream(monkeypatch):
    rows = {s: [{"text": f"{s} news item number {i} about topic {i % 5}", "label": i % 5}
                for i in range(300)] for s in ("train", "test")}
    calls = _fake_hub(monkeypatch, rows)
    ds = probe_data.load_probe_dataset("fancyzhx/ag_news", 20, 10, seed=0)
    assert ds.classes == ("0", "1", "2", "3")  # SAEBench's chosen classes; label 4 is not one
    assert {c: len(v) for c, v in ds.by_class("train").items()} == {c: 10 for c in ds.classes}
    assert {c: len(v) for c, v in ds.by_class("test").items()} == {c: 5 for c in ds.classes}
    for split, pairs in (("train", ds.train), ("test", ds.test)):
        assert all(t.startswith(split) and t.endswith(f"topic {lab}") for t, lab in pairs)
    assert ("fancyzhx/ag_news", "train") in calls and ("fancyzhx/ag_news", "test") in calls


def test_saebench_bias_in_bios_balances_gender_per_profession(monkeypatch):
    rows = {s: [{"hard_text": f"bio {i} gender {i % 2} profession {i // 2 % 30}", "profession": i // 2 % 30,
                 "gender": i % 2} for i in range(2000)] for s in ("train", "test")}
    _fake_hub(monkeypatch, rows)
    ds = probe_data.load_probe_dataset("LabHC/bias_in_bios_class_set2", 16, 8, seed=0)
    assert ds.classes == ("11", "13", "14", "18", "19")
    for split, per_class in (("train", 8), ("test", 4)):
        for cls, texts in ds.by_class(split).items():
            assert len(texts) == per_class
            assert all(t.endswith(f"profession {cls}") for t in texts)
            assert sum("gender 1" in t for t in texts) == per_class // 2  # SAEBench's quadrants


# ----------------------------------------------------------------------------------------------
# the eval, end to end


def _tiny_run(tmp_path: Path) -> Path:
    from tests.fixtures_runs import make_run, make_store

    store = make_store(tmp_path / "store")
    return make_run(tmp_path, "tiny", str(store), arch="topk", d_sae=256, steps=20, ev=None,
                    traces=False, umap=False)


TINY = {"probe_train_set_size": 16, "probe_test_set_size": 8, "k_values": [1, 2, 5],
        "context_length": 24, "llm_batch_size": 8, "sae_batch_size": 8}


@needs_fortunes
def test_run_evals_writes_saebench_sparse_probing(tmp_path):
    from msae_core.evals import open_run, run_evals
    from msae_core.evals.schema import check_result, read_eval_json
    from msae_core.evals.summary import summarize

    run = _tiny_run(tmp_path)
    out = run_evals(run, ["sparse_probing"], progress=False, device="cpu",
                    overrides={"sparse_probing": TINY})
    res = read_eval_json(run)["sparse_probing"]
    assert res == out["sparse_probing"]
    assert check_result(res) == []
    assert res["eval_type_id"] == "sparse_probing"
    names = ["test_accuracy", "top_1_test_accuracy", "top_2_test_accuracy", "top_5_test_accuracy"]
    m = res["eval_result_metrics"]
    assert list(m["llm"]) == [f"llm_{n}" for n in names]
    assert list(m["sae"]) == [f"sae_{n}" for n in names]
    details = res["eval_result_details"]
    assert [d["dataset_name"] for d in details] == [f"{n}_results" for n in probe_data.OFFLINE]
    for group in ("llm", "sae"):
        for key, v in m[group].items():
            assert 0.0 <= v <= 1.0
            assert math.isclose(v, sum(d[key] for d in details) / len(details), rel_tol=1e-9)
    # per-class accuracies, SAEBench's unstructured layout, average to the dataset's numbers
    per_class = res["eval_result_unstructured"]["fortunes-languages_results"]
    assert set(per_class["sae_top_1_test_accuracy"]) == {"en", "de", "es", "it"}
    lang = next(d for d in details if d["dataset_name"] == "fortunes-languages_results")
    assert math.isclose(lang["sae_top_1_test_accuracy"],
                        sum(per_class["sae_top_1_test_accuracy"].values()) / 4, rel_tol=1e-9)
    top = res["eval_result_unstructured"]["msae_sae_top_latents"]["code-vs-prose"]["code"]
    assert len(top) == 5 and all(0 <= i < 256 for i in top)
    cfg = res["eval_config"]
    assert cfg["probe_train_set_size"] == 16 and cfg["model_name"] == str(tmp_path / "store-tiny-model")
    assert cfg["llm_dtype"] == "float32"
    s = summarize(read_eval_json(run))
    assert {"llm_probe_acc", "sae_probe_acc", "sae_top1_acc"} <= set(s)
    for key in ("sae_probe_acc", "sae_top1_acc", "llm_probe_acc"):  # each interval holds its accuracy
        assert s[f"{key}_ci_low"] <= s[key] <= s[f"{key}_ci_high"] and s[f"{key}_ci_low"] < s[f"{key}_ci_high"]

    # lower_vram_usage: no probe on all SAE latents (null), the top-k ones still run
    ctx = open_run(run, device="cpu", progress=False)
    low = sp.run(ctx, sp.Config(**{**TINY, "dataset_names": ["code-vs-prose"], "lower_vram_usage": True,
                                   "full_probe": "sklearn"}))
    assert low["eval_result_metrics"]["sae"]["sae_test_accuracy"] is None
    assert low["eval_result_metrics"]["sae"]["sae_top_1_test_accuracy"] is not None
    assert low["eval_result_metrics"]["llm"]["llm_test_accuracy"] is not None
    assert low["eval_result_metrics"]["uncertainty"]["sae_test_accuracy_ci_low"] is None


def test_accuracy_intervals_follow_the_per_text_results():
    """Datasets kept, classes and texts resampled: all right gives [1, 1]; more texts, narrower."""
    import numpy as np

    cfg = sp.Config(n_bootstrap=500)
    perfect = {"a": {"sae_test_accuracy": {"x": np.ones(20, bool), "y": np.ones(20, bool)}}}
    u = sp.accuracy_intervals(perfect, ("sae_test_accuracy",), cfg)
    assert (u["sae_test_accuracy_ci_low"], u["sae_test_accuracy_ci_high"]) == (1.0, 1.0)
    rng = np.random.default_rng(0)

    def width(n):
        c = {d: {"m": {cls: rng.random(n) < 0.8 for cls in "xyz"}} for d in ("a", "b")}
        u = sp.accuracy_intervals(c, ("m",), cfg)
        return u["m_ci_high"] - u["m_ci_low"]

    assert width(400) < width(20) / 2


def test_bad_settings_are_refused(tmp_path):
    from msae_core.evals import run_evals

    run = _tiny_run(tmp_path)
    with pytest.raises(MsaeError, match="unknown probing dataset"):
        run_evals(run, ["sparse_probing"], progress=False, device="cpu",
                  overrides={"sparse_probing": {**TINY, "dataset_names": ["nope"]}})
    with pytest.raises(MsaeError, match="full_probe"):
        run_evals(run, ["sparse_probing"], progress=False, device="cpu",
                  overrides={"sparse_probing": {**TINY, "full_probe": "svm"}})


@pytest.mark.embedded
@needs_fortunes
def test_embedded_model_separates_languages(tmp_path):
    """The real model at layer 6 tells fortunes' languages apart from pooled activations."""
    from msae_core.evals.context import EvalContext
    from msae_core.data.lm import load_lm
    from msae_core.sae import SAEConfig, build_sae

    lm = load_lm("embedded", device="cpu")
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(arch="topk", d_in=lm.d_model, d_sae=512, k=16)).eval()
    ctx = EvalContext(run_dir=tmp_path, sae=sae, config=None, manifest={"model": "embedded", "layer": 6},
                      device=torch.device("cpu"), progress=False)
    ctx.lm = lm
    cfg = sp.Config(dataset_names=["fortunes-languages"], probe_train_set_size=40, probe_test_set_size=40,
                    k_values=[1, 5], context_length=48, llm_batch_size=16)
    res = sp.run(ctx, cfg)
    llm = res["eval_result_metrics"]["llm"]
    assert llm["llm_test_accuracy"] >= 0.85
    assert llm["llm_top_5_test_accuracy"] > 0.6
    assert 0.0 <= res["eval_result_metrics"]["sae"]["sae_top_1_test_accuracy"] <= 1.0
