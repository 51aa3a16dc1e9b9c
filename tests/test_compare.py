"""`msae compare`: metrics with intervals, differences to a baseline, resolved or not, L0 matching,
one-line refusals, the markdown and CSV it writes."""

import json

import pandas as pd
import pytest

from fixtures_runs import make_run
from msae_core import cli
from msae_core.artifacts import RUN_EVAL, atomic_write_json
from msae_core.errors import MsaeError
from msae_core.inspect import compare as C
from msae_core.inspect.groups import label_groups


def _run(root, name, ev, absorption, ci, l0=8.0, seed=0, k=8, letters=None):
    """A topk run of `k` (the group) and `seed` with its eval; `letters`: per-letter absorption."""
    run = make_run(root, name, "no-store", arch="topk", ev=ev, absorption=absorption, l0=l0,
                   weights=False, traces=False, umap=False, seed=seed, k=k)
    data = json.loads((run / RUN_EVAL).read_text())
    data["absorption"]["eval_result_metrics"]["uncertainty"] = {
        "mean_absorption_fraction_score_ci_low": ci[0], "mean_absorption_fraction_score_ci_high": ci[1]}
    if letters is not None:
        data["absorption"]["eval_result_details"] = [{"first_letter": c, "mean_absorption_fraction": v}
                                                     for c, v in letters.items()]
    atomic_write_json(run / RUN_EVAL, data)
    return run


@pytest.fixture()
def runs(tmp_path):
    """Groups of three seeds: base; far (absorption clearly lower at every seed); near (the same
    give or take a seed's noise); sparser (another L0)."""
    out = []
    for s, (b, f, n) in enumerate([(0.30, 0.10, 0.31), (0.32, 0.11, 0.30), (0.28, 0.09, 0.29)]):
        out.append(_run(tmp_path, f"base-seed{s}", 0.80 + s / 100, b, (b - 0.03, b + 0.03), seed=s, k=8))
        out.append(_run(tmp_path, f"far-seed{s}", 0.78 + s / 100, f, (f - 0.02, f + 0.02), seed=s, k=16))
        out.append(_run(tmp_path, f"near-seed{s}", 0.81 - s / 100, n, (n - 0.03, n + 0.03), seed=s, k=24))
        out.append(_run(tmp_path, f"sparser-seed{s}", 0.75, 0.20 + s / 100, (0.18, 0.22), l0=4.0, seed=s, k=4))
    return out


def test_seeds_are_replicates_and_differences_are_paired_by_seed(runs):
    df = C.read_runs(runs)
    long = C.comparison(df, "base-seed0").set_index(["run", "metric"])
    assert long.loc[("base", "absorption"), "n_seeds"] == 3
    assert long.loc[("base", "absorption"), "value"] == pytest.approx(0.30)
    lo, hi = long.loc[("base", "absorption"), ["ci_low", "ci_high"]]
    assert lo < 0.28 and hi > 0.32  # t over the seeds, not a run's own bootstrap
    far = long.loc[("far", "absorption")]
    assert far["diff"] == pytest.approx(-0.2) and far["n_pairs"] == 3 and far["pairing"] == "3 same-seed pairs"
    assert far["verdict"] == "resolved" and far["resolved"] == True and far["better"] == True  # noqa: E712
    assert far["diff_ci_high"] < 0
    near = long.loc[("near", "absorption")]
    assert near["verdict"] == "within noise" and near["diff_ci_low"] < 0 < near["diff_ci_high"]
    assert long.loc[("sparser", "l0"), "l0_matched"] == False and long.loc[("near", "l0"), "l0_matched"] == True  # noqa: E712
    wide = C.wide_table(C.comparison(df, "near-seed1"), "near-seed1")
    assert wide["run"].tolist() == ["near (baseline)", "base", "far", "sparser"]
    assert wide["L0 matched"].tolist() == ["yes", "yes", "yes", "NO"]
    hint = C.l0_hint(C.comparison(df, "near-seed1"), label_groups(df))
    assert hint.startswith("L0 not matched: sparser") and "--target-l0" not in hint  # a topk: no threshold
    col = "mean absorption fraction (↓)"
    assert "n=3" in wide.loc[2, col] and wide.loc[2, col].endswith("resolved)")


def test_one_seed_is_not_a_comparison_and_gets_the_paired_item_interval(tmp_path):
    letters_a = {c: 0.3 + 0.01 * i for i, c in enumerate("abcdefghij")}
    letters_b = {c: v - 0.05 for c, v in letters_a.items()}  # every letter lower by 0.05
    a = _run(tmp_path, "a", 0.8, 0.345, (0.30, 0.39), letters=letters_a)
    b = _run(tmp_path, "b", 0.8, 0.295, (0.25, 0.34), k=16, letters=letters_b)
    long = C.comparison(C.read_runs([a, b]), "a").set_index(["run", "metric"])
    r = long.loc[("b", "absorption")]
    assert r["verdict"] == "one seed: not a comparison" and r["resolved"] is None
    assert r["item_ci_low"] == pytest.approx(-0.05) and r["item_ci_high"] == pytest.approx(-0.05)
    text = C.cell({**r.to_dict(), "run": "b"}, "a")
    assert "one seed: not a comparison; items -0.05" in text


def test_cli_prints_and_writes_markdown_and_csv(runs, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert cli.main(["compare"] + [str(r) for r in runs[:12]] + ["--baseline", str(runs[2]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| near (baseline) |" in printed and "resolved" in printed and "n=3" in printed
    md = (out / "compare.md").read_text()
    assert md.startswith("L0 not matched: sparser") and "\n| run |" in md and "Differences are to near" in md
    csv = pd.read_csv(out / "compare.csv")
    assert set(csv["run"]) == {"near", "base", "far", "sparser"} and "diff_ci_low" in csv.columns


def test_refusals_are_one_line(runs, tmp_path, capsys):
    assert cli.main(["compare", str(tmp_path / "nope")]) == 2
    assert "no run folder" in capsys.readouterr().err
    pending = make_run(tmp_path, "pending", "no-store", arch="topk", ev=None, weights=False, traces=False, umap=False)
    assert cli.main(["compare", str(runs[0]), str(pending)]) == 2
    assert "has no eval results yet" in capsys.readouterr().err
    with pytest.raises(MsaeError, match="baseline 'x' is not among the runs"):
        C.comparison(C.read_runs(runs[:2]), "x")


def test_runs_on_different_data_are_warned_about_and_namesakes_kept_apart(runs, tmp_path, capsys):
    import shutil

    other = _run(tmp_path / "elsewhere", "base-seed0", 0.70, 0.20, (0.18, 0.22))  # another root, the same name
    cfg = json.loads((other / "config.json").read_text())
    cfg["data"]["acts"] = "another-store"
    (other / "config.json").write_text(json.dumps(cfg))
    assert cli.main(["compare", str(runs[0]), str(other), "--baseline", str(runs[0])]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("WARNING: these runs trained on different data")
    first = f"{runs[0].parent.parent.name}/runs/base"
    assert f"| {first} (baseline) |" in printed and "| elsewhere/runs/base |" in printed
    assert "nan" not in printed  # no interval is "-", not [nan, nan]
    assert cli.main(["compare", str(runs[0]), str(runs[1])]) == 0
    assert "WARNING" not in capsys.readouterr().out  # the same store: no warning
    assert cli.main(["compare", str(runs[0]), str(runs[0])]) == 2
    assert "given twice" in capsys.readouterr().err
    shutil.rmtree(other)


def test_a_long_table_read_back_prints_no_nan_interval(runs):
    one_seed = [r for r in runs if r.name.endswith("seed0")]
    long = C.comparison(C.read_runs(one_seed), "base-seed0")
    back = pd.read_csv(pd.io.common.StringIO(long.to_csv(index=False)))  # None -> NaN
    text = C.cell(back[back["metric"] == "explained_variance"].iloc[1].to_dict(), "base")
    assert "nan" not in text and "[" not in text.split("(")[0]


def test_the_same_config_and_seed_twice_are_not_replicates(tmp_path):
    """A config trained twice with one seed (or two imported SAEs of one shape) is not a group of
    replicates: each stays its own row (the second silently replaced the first's value)."""
    a = _run(tmp_path, "again-a", 0.80, 0.30, (0.27, 0.33), seed=0)
    b = _run(tmp_path, "again-b", 0.70, 0.20, (0.17, 0.23), seed=0)
    c = _run(tmp_path, "again-c", 0.75, 0.25, (0.22, 0.28), seed=1)
    long = C.comparison(C.read_runs([a, b, c]), "again-a")
    runs = list(dict.fromkeys(long["run"]))
    assert len(runs) == 3 and (long[long["metric"] == "absorption"]["n_seeds"] == 1).all()


def test_imported_saes_of_one_shape_are_not_replicates(tmp_path):
    from msae_core.inspect.groups import group_key

    cfg = {"sae": {"arch": "jumprelu", "d_sae": 16}, "train": {"steps": 1, "seed": 0}, "data": {}}
    assert group_key(cfg, "d", "gemma-scope / layer_3") != group_key(cfg, "d", "gemma-scope / layer_4")
