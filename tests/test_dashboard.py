"""Feature dashboards as files (`msae dashboard`): what they gather, the HTML pages and their
links, the PNG, and what bad input gets."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from fixtures_runs import make_results
from msae_core.artifacts import DASHBOARD_PLOTLY_JS
from msae_core.cli import main
from msae_core.errors import MsaeError
from msae_core.inspect import dashboard as D
from msae_core.inspect import features

HAVE_CHROMIUM = os.access("/usr/bin/chromium", os.X_OK)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = make_results(tmp_path_factory.mktemp("dash") / "results", n_runs=2, broken=False)
    return root / "runs" / "run-000-momentum"


def test_dashboard_gathers_what_the_explorer_shows(run):
    d = D.feature_dashboard(run, 5)
    s = features.feature_sample(run)
    assert d.problems == {} and d.n_rows == s.n_rows
    assert d.fraction == pytest.approx(len(s.feature(5)[0]) / s.n_rows)
    assert d.nearest["feature"].tolist() == features.nearest_by_decoder(run, 5)["feature"].tolist()
    assert d.correlated.equals(features.most_correlated(s, 5, k=10))
    assert [e.acts[5][e.center] for e in d.top] == sorted((e.acts[5][e.center] for e in d.top), reverse=True)
    assert d.output["promoted"][0][1] >= d.output["promoted"][-1][1]
    with pytest.raises(MsaeError, match="out of range"):
        D.feature_dashboard(run, 10 ** 6)


def test_dashboard_without_a_store_keeps_its_other_sections(run, tmp_path):
    import shutil

    copy = tmp_path / "runs" / "nostore"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("workbench"))  # no cached sample either
    cfg = (copy / "config.json").read_text()
    (copy / "config.json").write_text(re.sub(r'"acts": "[^"]*"', '"acts": "/nonexistent/store"', cfg))
    d = D.feature_dashboard(copy, 2, logits=False)
    assert "examples" in d.problems and d.top == [] and len(d.nearest) == 10
    assert "examples unavailable" in D.dashboard_html(d, plotly_js="plotly.min.js")


def test_html_pages_link_their_neighbours_and_share_one_plotly(run, tmp_path):
    files = D.write_dashboards(run, [3, 7], tmp_path, ("html",))
    assert [p.name for p in files] == ["run-000-momentum-feature3.html", "run-000-momentum-feature7.html"]
    assert (tmp_path / DASHBOARD_PLOTLY_JS).stat().st_size > 1_000_000
    page = files[0].read_text()
    assert f'<script src="{DASHBOARD_PLOTLY_JS}">' in page and page.count("<script src=") == 1
    near = D.feature_dashboard(run, 3, logits=False).nearest["feature"].tolist()
    links = [int(x) for x in re.findall(r'href="run-000-momentum-feature(\d+)\.html"', page)]
    assert set(links) <= {3, 7}  # only pages that exist are linked; the other neighbours are named
    assert all(f"feature {f}" in page for f in near)
    again = D.write_dashboards(run, near[:2], tmp_path, ("html",))  # their pages now exist: linked
    page = D.write_dashboards(run, [3], tmp_path, ("html",))[0].read_text()
    links = [int(x) for x in re.findall(r'href="run-000-momentum-feature(\d+)\.html"', page)]
    assert set(near[:2]) <= set(links) and all((tmp_path / f"run-000-momentum-feature{f}.html").is_file() for f in links)
    assert len(again) == 2
    for heading in ("Top activating contexts", "Random positive examples", "quantile bin", "Most correlated"):
        assert heading in page
    assert "background:rgba" in page and page.count("plotly-graph-div") == 3  # histogram, logits, logit histogram


def test_parse_features_and_bad_input(run, tmp_path, capsys):
    assert D.parse_features("3, 17,40-42,3") == [3, 17, 40, 41, 42]
    for bad, why in (("x", "not a feature number"), ("5-2", "not a feature number"), ("", "names no feature"),
                     ("300", "out of range")):
        with pytest.raises(MsaeError, match=why):
            D.parse_features(bad, 256)
    assert main(["dashboard", str(run), "--features", "999", "--out", str(tmp_path)]) == 2
    assert "out of range [0, 256)" in capsys.readouterr().err
    import tracemalloc

    tracemalloc.start()  # a huge range is refused before it is expanded
    with pytest.raises(MsaeError, match="0-1000000000 is out of range"):
        D.parse_features("0-1000000000", 256)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20
    assert main(["dashboard", str(run), "--features", "1", "--format", "gif", "--out", str(tmp_path)]) == 2
    assert "unknown dashboard format gif" in capsys.readouterr().err
    assert main(["dashboard", str(tmp_path / "nope"), "--features", "1"]) == 2


@pytest.mark.skipif(not HAVE_CHROMIUM, reason="PNG export needs Debian's chromium")
def test_cli_writes_a_png(run, tmp_path, capsys, caplog):
    import logging

    caplog.set_level(logging.INFO)
    assert main(["dashboard", str(run), "--features", "4", "--format", "png", "--out", str(tmp_path)]) == 0
    png = tmp_path / "run-000-momentum-feature4.png"
    assert str(png) in capsys.readouterr().out
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = np.frombuffer(head[16:24], dtype=">u4")
    assert width == 1650 and height > 1.2 * width  # histogram, output tokens, logit histogram, contexts
    chatter = [r for r in caplog.records if r.name.split(".")[0] in ("kaleido", "choreographer", "logistro")
               and r.levelno < logging.WARNING]
    assert not chatter, chatter[:3]  # the exporter's INFO lines stay out of the command's output
