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


def _run(root, name, ev, absorption, ci, l0=8.0):
    run = make_run(root, name, "no-store", arch="topk", ev=ev, absorption=absorption, l0=l0,
                   weights=False, traces=False, umap=False)
    data = json.loads((run / RUN_EVAL).read_text())
    data["absorption"]["eval_result_metrics"]["uncertainty"] = {
        "mean_absorption_fraction_score_ci_low": ci[0], "mean_absorption_fraction_score_ci_high": ci[1]}
    atomic_write_json(run / RUN_EVAL, data)
    return run


@pytest.fixture()
def runs(tmp_path):
    return [_run(tmp_path, "base", 0.80, 0.30, (0.27, 0.33)),
            _run(tmp_path, "far", 0.78, 0.10, (0.08, 0.12)),          # absorption clearly lower
            _run(tmp_path, "near", 0.81, 0.29, (0.26, 0.32)),         # within the noise
            _run(tmp_path, "sparser", 0.75, 0.20, (0.18, 0.22), l0=4.0)]


def test_differences_resolved_only_when_intervals_are_disjoint(runs):
    df = C.read_runs(runs)
    long = C.comparison(df, "base").set_index(["run", "metric"])
    assert long.loc[("far", "absorption"), "resolved"] == True  # noqa: E712 (numpy bool)
    assert long.loc[("far", "absorption"), "diff"] == pytest.approx(-0.2)
    assert long.loc[("far", "absorption"), "better"] == True  # noqa: E712 - lower absorption is better
    assert long.loc[("near", "absorption"), "resolved"] == False  # noqa: E712
    assert pd.isna(long.loc[("far", "explained_variance"), "resolved"])  # no interval: no verdict
    assert long.loc[("far", "explained_variance"), "better"] == False  # noqa: E712
    assert pd.isna(long.loc[("base", "absorption"), "diff"])
    assert long.loc[("sparser", "l0"), "l0_matched"] == False and long.loc[("near", "l0"), "l0_matched"] == True  # noqa: E712
    wide = C.wide_table(C.comparison(df, "near"), "near")
    assert wide["run"].tolist() == ["near (baseline)", "base", "far", "sparser"]
    col = "mean absorption fraction (↓)"
    assert wide.loc[2, col] == "0.1000 [0.0800, 0.1200] (-0.1900, resolved)"
    assert wide.loc[1, col].endswith("within noise)")
    assert wide.loc[1, "explained variance (↑)"].endswith("no interval)")
    assert wide["L0 matched"].tolist() == ["yes", "yes", "yes", "NO"]


def test_cli_prints_and_writes_markdown_and_csv(runs, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert cli.main(["compare", str(runs[0]), str(runs[1]), "--baseline", str(runs[2]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| near (baseline) |" in printed and "resolved" in printed
    md = (out / "compare.md").read_text()
    assert md.startswith("| run |") and "Differences are to near" in md
    csv = pd.read_csv(out / "compare.csv")
    assert set(csv["run"]) == {"near", "base", "far"} and "ci_low" in csv.columns


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

    other = _run(tmp_path / "elsewhere", "base", 0.70, 0.20, (0.18, 0.22))  # another root, the same name
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
    long = C.comparison(C.read_runs(runs), "base")
    back = pd.read_csv(pd.io.common.StringIO(long.to_csv(index=False)))  # None -> NaN
    back = back.astype(object).where(back.notna(), None).assign(ci_low=back["ci_low"], ci_high=back["ci_high"])
    text = C.cell(back[back["metric"] == "explained_variance"].iloc[1].to_dict(), "base")
    assert "nan" not in text and "[" not in text
