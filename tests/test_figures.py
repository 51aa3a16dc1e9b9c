"""Figure builders, workbench data loading (traces, pairs, the feature sample, token examples,
output tokens, UMAP cache) and figure export, against fixture run folders."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from fixtures_runs import make_results
from msae_core.artifacts import FEATURE_SAMPLE, RUN_INSPECT_CACHE_DIR
from msae_core.inspect import export as X
from msae_core import paths
from msae_core.inspect import features, projection, run_files
from msae_core.inspect import figures as F
from msae_core.inspect.runs_table import runs_table
from msae_core.errors import MsaeError

HAVE_CHROMIUM = os.access("/usr/bin/chromium", os.X_OK)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_results(tmp_path_factory.mktemp("figs") / "results", n_runs=3, broken=True)


@pytest.fixture()
def run(root):
    return root / "runs" / "run-000-momentum"


def test_pareto_front_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = rng.random(30), rng.random(30)
        x[3], y[5] = np.nan, np.nan
        got = set(F.pareto_front(x, y).tolist())
        want = {i for i in range(30) if np.isfinite(x[i]) and np.isfinite(y[i]) and not any(
            (x[j] <= x[i] and y[j] >= y[i] and (x[j] < x[i] or y[j] > y[i]))
            for j in range(30) if np.isfinite(x[j]) and np.isfinite(y[j]))}
        assert got == want


def test_tradeoff_figure_frontier_customdata_and_empty():
    df = pd.DataFrame({"name": ["a", "b", "c", "d"], "absorption": [0.1, 0.05, 0.2, np.nan],
                       "explained_variance": [0.9, 0.8, 0.85, 0.99], "arch": ["topk", "momentum", "relu", "topk"],
                       "beta": [np.nan, 0.9, np.nan, np.nan]})
    fig = F.tradeoff_figure(df, color="beta")
    runs = [t for t in fig.data if t.legendgroup == "runs"]
    assert sorted(c[0] for t in runs for c in t.customdata) == ["a", "b", "c"]  # NaN absorption left out
    scaled = next(t for t in runs if t.marker.colorscale)
    assert [c[0] for c in scaled.customdata] == ["b"] and list(scaled.marker.color) == [0.9]
    assert next(t for t in runs if t.name == "beta: n/a").marker.color == "#bbbbbb"  # no beta: grey, not hidden
    by_arch = [t for t in F.tradeoff_figure(df, color="arch").data if t.legendgroup == "runs"]
    assert {t.name: [c[0] for c in t.customdata] for t in by_arch} == {
        "arch: momentum": ["b"], "arch: relu": ["c"], "arch: topk": ["a"]}  # one legend entry per value
    assert len({t.marker.color for t in by_arch}) == 3
    front = next(t for t in fig.data if t.name == "Pareto frontier")
    assert list(front.x) == [0.05, 0.1]  # c is beaten by a on both axes
    # runs of another size are not on the same frontier: one frontier per (d_sae, steps)
    sized = df.assign(d_sae=[4096, 4096, 16384, 16384], steps=2000)
    sized.loc[3, "absorption"] = 0.3
    fronts = {t.name: list(t.x) for t in F.tradeoff_figure(sized).data if t.name.startswith("Pareto")}
    assert fronts == {"Pareto frontier (d_sae 4096, steps 2000)": [0.05, 0.1],
                      "Pareto frontier (d_sae 16384, steps 2000)": [0.2, 0.3]}
    empty = F.tradeoff_figure(df.iloc[0:0])
    assert "no run" in empty.layout.annotations[0].text
    # an absorption interval: error bars on the runs that have one
    df["absorption_ci_low"], df["absorption_ci_high"] = [0.08, np.nan, 0.15, np.nan], [0.13, np.nan, 0.3, np.nan]
    bars = F.tradeoff_figure(df)
    (t,) = [t for t in bars.data if t.legendgroup == "runs"]
    by_name = {c[0]: i for i, c in enumerate(t.customdata)}
    assert t.error_x.array[by_name["a"]] == pytest.approx(0.03) and t.error_x.arrayminus[by_name["a"]] == pytest.approx(0.02)
    assert t.error_x.array[by_name["b"]] == 0 and t.error_y.array is None  # no interval: no bar
    # the synthetic axes: exact absorption against F1, only the runs scored on a synthetic store
    df["synth_absorption"], df["synth_f1"] = [np.nan, 0.3, 0.1, 0.2], [np.nan, 0.5, 0.6, 0.7]
    synth = F.tradeoff_figure(df, x="synth_absorption", y="synth_f1")
    assert sorted(c[0] for t in synth.data if t.legendgroup == "runs" for c in t.customdata) == ["b", "c", "d"]
    assert "exact" in synth.layout.xaxis.title.text and "lower is better" in synth.layout.xaxis.title.text
    assert "F1" in synth.layout.yaxis.title.text


def test_tokens_html_escapes_and_shades():
    h = F.tokens_html(["<script>", "ok"], [2.0, 0.0])
    assert "<script>" not in h and "&lt;script&gt;" in h
    assert "rgba(31,119,180,1.00)" in h and "rgba(31,119,180,0.00)" in h


def test_traces_skip_a_corrupt_snapshot_and_subset_features(root):
    bad = root / "runs" / "broken-corrupt-files"
    tr = run_files.load_traces(bad, [0, 5, 10_000])
    assert tr.problems and "unreadable" in tr.problems[0]
    assert tr.features.tolist() == [0, 5] and tr.rate.shape == (2, len(tr.steps))
    full = run_files.load_traces(root / "runs" / "run-000-momentum")
    assert full.rate.shape == (256, 10) and not full.problems
    sub = run_files.load_traces(root / "runs" / "run-000-momentum", [7])
    np.testing.assert_array_equal(sub.pressure[0], full.pressure[7])
    top = run_files.top_pressure_features(root / "runs" / "run-000-momentum", 5)
    assert full.pressure[top[0], -1] == full.pressure[:, -1].max()
    every = run_files.top_pressure_features(root / "runs" / "run-000-momentum", 256)  # no zero padding
    assert len(every) == int((full.pressure[:, -1] > 0).sum()) < 256 and (full.pressure[every, -1] > 0).all()
    fig = F.heatmap_figure(full.steps, top, full.pressure[top])
    assert fig.data[0].z.shape == (5, 10)


def test_pairs_sorted_and_events(run):
    pairs, step = run_files.load_pairs(run)
    assert step == 100 and len(pairs) == 64 and pairs["kappa"].is_monotonic_decreasing
    raw = run_files.latest_snapshots(run, run_files.PAIR_KEYS, None)
    first_raw = next(iter(raw))[1]["pair_first"]
    never = int((first_raw < 0).sum())  # the tracker's -1: never crossed tau
    assert never > 0 and int(pairs["first"].isna().sum()) == never and (pairs["first"].dropna() >= 0).all()
    ev = run_files.load_events(root_bad := run.parent / "broken-corrupt-files")
    assert len(ev) == 30  # the torn line is skipped
    assert len(F.events_figure(ev).data) >= 2
    assert root_bad.exists()


def test_feature_sample_equals_dense_encoding_and_is_cached(run):
    from msae_core.data.store import ActivationStore

    cache = run / RUN_INSPECT_CACHE_DIR / FEATURE_SAMPLE
    cache.unlink(missing_ok=True)
    s = features.feature_sample(run, n_rows=512)
    assert cache.is_file()
    sae = run_files.load_run_sae(run)
    store = ActivationStore(run_files.run_store_path(run))
    with torch.no_grad():
        dense = sae.encode(store.rows(torch.from_numpy(s.rows))).float().numpy()
    for f in (0, 17, 255):
        np.testing.assert_allclose(s.column(f), dense[:, f], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.density(), (dense > 0).mean(0), atol=1e-6)
    # whole windows: every row of a sampled window is in the sample
    w = int(s.window_ids[0])
    assert len(s.window_rows(w)) == len(store.window_tokens(w)) - 1  # all but the BOS
    mtime = cache.stat().st_mtime_ns
    again = features.feature_sample(run, n_rows=512)
    assert cache.stat().st_mtime_ns == mtime and np.array_equal(again.nz_val, s.nz_val)


def test_pair_examples_split_by_who_fires(run):
    s = features.feature_sample(run, n_rows=512)
    counts = np.diff(s.feat_ptr)
    i, j = (int(t) for t in np.argsort(-counts)[:2])
    co = features.pair_cofiring(s, i, j)
    assert co["both"] + co["only_i"] == counts[i]
    groups = features.pair_examples(s, i, j, n=3)
    for title, exs in groups.items():
        for e in exs:
            ai, aj = e.acts[i][e.center], e.acts[j][e.center]
            if title == "both fire":
                assert ai > 0 and aj > 0
            elif title.startswith(f"only {i}"):
                assert ai > 0 and aj == 0
            else:
                assert aj > 0 and ai == 0
            assert len(e.tokens) == len(e.acts[i]) and "<" not in "".join(e.tokens)[:0]
    assert sum(len(v) for v in groups.values()) > 0
    html = F.example_html(groups["both fire"][0] if groups["both fire"] else next(
        v[0] for v in groups.values() if v), [i, j])
    assert "background:rgba" in html


def test_output_tokens_are_the_unembedding_of_the_decoder_row(run):
    from msae_core.data.lm import load_lm

    out = features.output_tokens(run, 3, k=5)
    sae = run_files.load_run_sae(run)
    lm = load_lm(features.store_manifest(run_files.run_store_path(run))["model"], device="cpu")
    logits = lm.unembed_matrix().float() @ sae.W_dec[3].detach().float()
    assert [round(v, 4) for _, v, _ in out["promoted"]] == [round(float(v), 4) for v in logits.topk(5).values]
    assert [i for _, _, i in out["promoted"]] == logits.topk(5).indices.tolist()
    assert out["suppressed"][0][1] == pytest.approx(float(logits.min()), abs=1e-5)
    counts, edges = out["histogram"]  # the whole vocabulary, from its lowest logit to its highest
    assert counts.sum() == len(logits) and edges[0] == pytest.approx(float(logits.min()), abs=1e-5)
    assert edges[-1] == pytest.approx(float(logits.max()), abs=1e-5)
    hist = F.logit_histogram_figure(counts, edges, 3, out["promoted"], out["suppressed"])
    colours = list(hist.data[0].marker.color)
    assert colours[-1] == "#2ca02c" and colours[0] == "#d62728" and "#999999" in colours  # tails coloured
    # tokens that decode to the same text stay separate bars
    fig = F.logits_figure([("\ufffd", 2.0, 7), ("\ufffd", 1.0, 9), ("a", 0.5, 3)], [("b", -1.0, 4)], 3)
    assert len(set(fig.data[0].y)) == 3 and list(fig.data[0].x) == [0.5, 1.0, 2.0]
    with pytest.raises(MsaeError):
        features.output_tokens(run, 10_000)


def test_runs_table_survives_broken_folders_and_run_path_refuses_traversal(root):
    df = runs_table(root)
    assert len(df) == 3 + 8  # the good runs and every broken folder of fixtures_runs
    assert df.set_index("name").loc["run-001-topk", "k"] == 8
    last = run_files.load_metrics(root / "runs" / "run-001-topk").iloc[-1]
    row = df.set_index("name").loc["run-001-topk"]  # dead latents, each with the window it was counted on
    assert row["train_dead_fraction"] == pytest.approx(last["dead_features"] / row["d_sae"]) and row["train_dead_fraction"] > 0
    assert (row["train_dead_window"], row["dead_fraction"], row["dead_window_tokens"]) == (100_000, 0.05, 4096)
    assert (df[df["name"].str.startswith("broken")]["problem"] != "").all()
    for bad in ("../x", "a/b", "..", ".hidden", ""):
        with pytest.raises(MsaeError):
            paths.run_path(root, bad)


def test_umap_cache_is_keyed_by_the_weights(tmp_path, run):
    copy = tmp_path / "runs" / "copy"
    shutil.copytree(run, copy)
    assert projection.umap_coords(copy, compute=False) is not None  # the fixture's cache
    (copy / "sae.safetensors").touch()
    os.utime(copy / "sae.safetensors", ns=(1, 1))
    assert projection.umap_coords(copy, compute=False) is None  # stale after the weights changed
    pca = projection.pca_coords(copy)
    assert pca.shape == (256, 2) and np.isfinite(pca).all()


def test_pca_preview_equals_the_exact_top_two_components():
    rng = np.random.default_rng(3)
    scales = np.array([9.0, 4.0] + [1.0] * 62)  # two clear principal axes, then noise
    w = (rng.standard_normal((2000, 64)) * scales) @ np.linalg.qr(rng.standard_normal((64, 64)))[0]
    got = projection.top2_pca(w)
    u = w / np.linalg.norm(w, axis=1, keepdims=True)
    u -= u.mean(0)
    _, _, vt = np.linalg.svd(u, full_matrices=False)
    exact = u @ vt[:2].T
    for a in range(2):  # the same axes, up to sign
        assert abs(np.corrcoef(got[:, a], exact[:, a])[0, 1]) > 0.9999
        assert np.abs(got[:, a]).max() == pytest.approx(np.abs(exact[:, a]).max(), rel=1e-3)
        assert got[np.abs(got[:, a]).argmax(), a] > 0
    assert projection.top2_pca(w[:, :1]).shape == (2000, 2)  # fewer than two dimensions: zeros pad


@pytest.mark.slow
def test_umap_computes_and_caches(tmp_path, run):
    copy = tmp_path / "runs" / "copy"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / RUN_INSPECT_CACHE_DIR)
    c = projection.umap_coords(copy)
    assert c.shape == (256, 2) and np.isfinite(c).all()
    np.testing.assert_array_equal(projection.umap_coords(copy, compute=False), c)


def test_runs_markdown_and_csv(root):
    df = runs_table(root)
    md = X.runs_markdown(df)
    assert md.splitlines()[0].startswith("| name | state |") and "run-000-momentum" in md
    assert b"run-002-relu" in X.table_csv(df)
    with pytest.raises(MsaeError):
        X.figure_bytes(F.tradeoff_figure(df), "gif")


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_CHROMIUM, reason="/usr/bin/chromium is not installed (kaleido needs a Chromium)")
def test_figure_export_and_writeup_bundle(root):
    fig = F.tradeoff_figure(runs_table(root))
    assert X.figure_bytes(fig, "png").startswith(b"\x89PNG")
    assert b"<svg" in X.figure_bytes(fig, "svg")[:500]
    assert X.figure_bytes(fig, "pdf").startswith(b"%PDF")
    df = runs_table(root)
    pair = df[df["absorption"].notna()]["name"].tolist()[:2]
    out = X.write_bundle(root, formats=("png",), name="t", compare=(pair, pair[1]))
    assert out.parent == root / "exports"
    md = (out / "compare.md").read_text()
    assert "\n| run |" in md and (out / "compare.csv").is_file()
    assert md.startswith("L0 not matched: ")  # the fixtures' L0 differ: said above the table, as msae compare says it
    figs = sorted(p.name for p in (out / "figures").iterdir())
    assert "tradeoff-explained-variance.png" in figs and any("pressure-heatmap" in f for f in figs)
    readme = (out / "README.md").read_text()
    assert "| name |" in readme and "figures/tradeoff-explained-variance.png" in readme
    assert f"## Comparison with {pair[1]}" in readme and f"| {pair[1]} (baseline) |" in readme
    assert (out / "runs.csv").is_file()
    runs_md = (out / "runs.md").read_text().splitlines()[0]
    assert all(f" {c} |" in runs_md for c in ("data", "explained_variance", "absorption", "l0", "dead_fraction"))
    # a placeholder ("no chosen run has logged ...") is left out and named
    empty = F.curves_figure({}, "loss")
    assert F.is_empty(empty) and not F.is_empty(fig)
    out2 = X.write_bundle(root, figures={"curves-nothing": empty}, formats=("svg",), name="t2",
                          include_standard=False)
    assert not any((out2 / "figures").iterdir())
    assert "Left out, nothing to draw yet: curves-nothing" in (out2 / "README.md").read_text()


def test_pair_score_against_a_direct_computation_and_without_its_top_tokens(run):
    s = features.feature_sample(run, n_rows=512)
    counts = np.diff(s.feat_ptr)
    i, j = (int(t) for t in np.argsort(-counts)[:2])
    ci, cj = s.column(i).astype(np.float64), s.column(j).astype(np.float64)
    ps = features.pair_score(s, i, j, drop_top=5)
    assert ps["score"] == pytest.approx(ci @ cj / np.sqrt((ci @ ci) * (cj @ cj)), rel=1e-6)
    top = np.argsort(-(ci * cj), kind="stable")[:5]
    assert sorted(ps["top_rows"].tolist()) == sorted(top.tolist())
    keep = np.setdiff1d(np.arange(len(ci)), top)
    a, b = ci[keep], cj[keep]
    assert ps["score_without_top"] == pytest.approx(a @ b / np.sqrt((a @ a) * (b @ b)), rel=1e-6)
    assert ps["top_share"] == pytest.approx((ci * cj)[top].sum() / (ci * cj).sum(), rel=1e-6)
    toks = features.rows_tokens_and_norms(s, ps["top_rows"])
    assert len(toks) == 5 and all(isinstance(t, str) and n > 0 for t, n in toks)
    # one huge shared token carries a pair: remove it and the score collapses
    s.nz_val = s.nz_val.copy()
    ri, _ = s.feature(i)
    rj, _ = s.feature(j)
    shared = np.intersect1d(ri, rj)
    assert len(shared)  # the two commonest features share tokens
    for f, r in ((i, ri), (j, rj)):
        a0 = int(s.feat_ptr[f])
        s.nz_val[a0:a0 + len(r)] *= 0.01
        s.nz_val[a0 + int(np.searchsorted(r, shared[0]))] = 1e4
    big = features.pair_score(s, i, j, drop_top=1)
    assert big["score"] > 0.99 and big["top_share"] > 0.99 and big["score_without_top"] < big["score"]


def test_events_by_pair_counts_the_flapping():
    ev = pd.DataFrame({"step": [10, 12, 14, 16, 18, 50, 70], "i": [1, 1, 1, 1, 1, 2, 3], "j": [5, 5, 5, 5, 5, 6, 7],
                       "kappa": 0.4, "direction": ["up", "down", "up", "down", "up", "up", "down"]})
    by = run_files.events_by_pair(ev.sample(frac=1, random_state=0))  # any order in, step order used
    assert by[["i", "j", "first", "last", "crossings", "ups", "downs"]].values.tolist() == [
        [1, 5, 10, 18, 5, 3, 2], [2, 6, 50, 50, 1, 1, 0], [3, 7, 70, 70, 1, 0, 1]]
    assert by["ends_competing"].tolist() == [True, True, False]
    fig = F.pair_events_figure(by)
    assert "1 crossing tau more than twice" in fig.layout.title.text
    assert list(fig.data[1].y) == ["3 & 7", "2 & 6", "1 & 5"] and list(fig.data[1].marker.color) == [1, 1, 5]
    assert run_files.events_by_pair(ev.iloc[0:0]).empty and "no competition" in F.pair_events_figure(
        run_files.events_by_pair(ev.iloc[0:0])).layout.annotations[0].text


def test_dashboard_quantiles_neighbours_and_correlations_against_direct_computations(run):
    s = features.feature_sample(run, n_rows=512)
    f = int(np.argmax(np.diff(s.feat_ptr)))
    r, v = s.feature(f)
    bins = features.quantile_examples(s, f, n_bins=4, per_bin=2)
    edges = np.quantile(v, np.linspace(0, 1, 5))
    assert [x for lo, hi, _ in bins for x in (lo, hi)] == pytest.approx(
        [x for b in range(4) for x in (edges[b], edges[b + 1])])
    for lo, hi, exs in bins:
        assert 1 <= len(exs) <= 2
        for e in exs:  # each example's centre activation lies in its bin
            assert lo - 1e-6 <= e.acts[f][e.center] <= hi + 1e-6
    rand = features.random_examples(s, f, n=3, seed=1)
    assert len(rand) == 3 and all(e.acts[f][e.center] > 0 for e in rand)  # drawn where it fires
    assert [e.label for e in rand] == [e.label for e in features.random_examples(s, f, n=3, seed=1)]
    assert [e.label for e in features.random_examples(s, f, n=len(v), seed=0)] == [f"{x:.3g}" for x in v]
    dense = np.stack([s.column(g) for g in range(s.d_sae)], 1).astype(np.float64)
    corr = features.most_correlated(s, f, k=5)
    with np.errstate(invalid="ignore", divide="ignore"):
        want = np.array([np.corrcoef(dense[:, f], dense[:, g])[0, 1] for g in range(s.d_sae)])
    want[f] = -np.inf
    want = np.nan_to_num(want, nan=-np.inf)
    assert corr["feature"].tolist() == np.argsort(-want, kind="stable")[:5].tolist()
    assert corr["pearson"].to_numpy() == pytest.approx(np.sort(want)[::-1][:5])
    near = features.nearest_by_decoder(run, f, k=3)
    from msae_core.inspect.projection import numpy_decoder_rows
    from msae_core.inspect.run_files import load_run_sae

    w = numpy_decoder_rows(load_run_sae(run)).astype(np.float64)
    cos = (w / np.linalg.norm(w, axis=1, keepdims=True)) @ (w[f] / np.linalg.norm(w[f]))
    cos[f] = -np.inf
    assert near["feature"].tolist() == np.argsort(-cos)[:3].tolist()
    with pytest.raises(MsaeError):
        features.nearest_by_decoder(run, 10 ** 6)


def test_text_activations_equal_the_sae_on_the_models_own_activations(run):
    from msae_core.data.lm import load_lm
    from msae_core.inspect.run_files import load_run_sae, run_store_path

    text = "A stitch in time saves nine."
    toks, lat = features.text_activations(run, text)
    manifest = features.store_manifest(run_store_path(run))
    lm = load_lm(manifest["model"], device="cpu")
    ids = lm.to_tokens(text)
    assert len(toks) == ids.shape[1] - 1 and lat.shape == (len(toks), 256)
    assert "".join(toks) == text and not any(m in t for t in toks for m in ("▁", "Ġ"))  # text, not pieces
    with torch.inference_mode():
        want = load_run_sae(run).encode(lm.resid_post(ids, int(manifest["layer"]))[0].float()).numpy()[1:]
    np.testing.assert_allclose(lat, want, rtol=1e-5, atol=1e-5)
    tops = features.top_features_per_token(lat, k=2)
    assert all(len(t) <= 2 and all(a > 0 for _, a in t) for t in tops)
    assert tops[0] and tops[0][0][0] == int(np.argmax(lat[0]))
    with pytest.raises(MsaeError, match="type some text"):
        features.text_activations(run, "   ")


def test_figures_carry_paper_ready_axes():
    """What an exported figure needs to stand alone in a write-up: named axes and colour bars,
    scales that start where the quantity does, fixed bins where two figures get compared."""
    heat = F.heatmap_figure(np.arange(3), [4, 9], np.array([[0.2, 0.5, 0.9], [0.1, 0.3, 0.4]]), quantity="rate")
    assert heat.data[0].zmin == 0 and heat.data[0].zmax == pytest.approx(0.9)
    assert heat.data[0].colorbar.title.text == "rate"
    m = pd.DataFrame({"step": [10, 20], "loss": [1.0, 0.5], "l0": [30.0, 32.0]})
    mf = F.metrics_figure(m, ("loss", "l0"))
    assert [a.text for a in mf.layout.annotations] == ["training loss", "L0 (batch)"]
    assert mf.layout.yaxis.title.text is None  # the panel title names it; no y title over the next panel
    assert mf.layout.yaxis2.rangemode == "tozero" and mf.layout.yaxis.rangemode is None
    by = pd.DataFrame({"i": [1, 2], "j": [3, 4], "first": [5, 6], "last": [7, 8], "crossings": [1, 7],
                       "ups": [1, 4], "downs": [0, 3], "ends_competing": [True, True]})
    pe = F.pair_events_figure(by)
    assert pe.layout.yaxis.dtick == 1 and pe.data[1].marker.cmin == 1 and pe.data[1].marker.cmax == 7
    ev = pd.DataFrame({"step": [1, 1, 2], "i": [0, 1, 2], "j": [3, 4, 5], "kappa": 0.5, "direction": "up"})
    ef = F.events_figure(ev)
    assert ef.layout.yaxis.rangemode == "tozero" and ef.layout.yaxis2.dtick == 1
    mc = F.match_cosine_figure(np.array([0.3, 0.9, np.nan]), "a", "b")
    assert mc.data[0].xbins.size == 0.025 and list(mc.layout.xaxis.range) == [0.0, 1.0]
    assert list(F.match_cosine_figure(np.array([-0.2, 0.9]), "a", "b").layout.xaxis.range) == [-1.0, 1.0]
    um = F.umap_figure(np.zeros((3, 2)), layout="PCA")
    assert (um.layout.xaxis.title.text, um.layout.yaxis.title.text) == ("PCA 1", "PCA 2")
    lh = F.logit_histogram_figure(np.array([3, 40, 2]), np.array([-1.0, 0.0, 1.0, 2.0]), 0)
    assert lh.layout.yaxis.type == "log" and lh.layout.yaxis.dtick == 1  # a tick a decade, no 2..9 clutter


def test_own_text_and_output_tokens_share_one_loaded_model(run, monkeypatch):
    """The explorer's output tokens read the unembedding of the model "your own text" keeps: one
    load when the text comes first, and no second copy of W_U when it comes after."""
    import msae_core.data.lm as lm_module

    loads = []
    real = lm_module.load_lm
    monkeypatch.setattr(lm_module, "load_lm", lambda *a, **k: loads.append(a) or real(*a, **k))
    features.clear_caches()
    try:
        features.text_activations(run, "a stitch in time")
        out = features.output_tokens(run, 3, k=5)
        assert len(loads) == 1
        model = features.store_manifest(run_files.run_store_path(run))["model"]
        held = features._TEXT_LMS[model].unembed_matrix()
        assert features._unembed(model).data_ptr() == held.data_ptr()  # the same storage, not a copy
        features.clear_caches()
        loads.clear()
        again = features.output_tokens(run, 3, k=5)  # output tokens first: a copy, the model dropped
        features.text_activations(run, "a stitch in time")
        assert len(loads) == 2 and features._unembed(model).data_ptr() == \
            features._TEXT_LMS[model].unembed_matrix().data_ptr()
        assert [t[2] for t in again["promoted"]] == [t[2] for t in out["promoted"]]
    finally:
        features.clear_caches()
