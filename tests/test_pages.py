"""Every workbench page under AppTest: with no runs, with fixture runs, with broken run folders.
No exception, and the page's key elements are there."""

from __future__ import annotations

import json
import re
import os
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from fixtures_runs import make_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "workbench" / "Home.py")
PAGES = ["home", "launch", "tradeoff", "curves", "traces", "pairs", "explorer", "diff", "export"]


@pytest.fixture(scope="module")
def full_root(tmp_path_factory):
    return make_results(tmp_path_factory.mktemp("wb") / "results", n_runs=4, broken=True)


@pytest.fixture(scope="module")
def broken_only_root(tmp_path_factory, full_root):
    """Only broken folders (and the store the good runs used)."""
    import shutil

    root = tmp_path_factory.mktemp("wb-broken") / "results"
    (root / "runs").mkdir(parents=True)
    for p in (full_root / "runs").iterdir():
        if p.name.startswith("broken"):
            shutil.copytree(p, root / "runs" / p.name)
    return root


def open_page(root: Path, page: str, monkeypatch, session: dict | None = None) -> AppTest:
    monkeypatch.setenv("MSAE_RESULTS", str(root))
    at = AppTest.from_file(APP, default_timeout=120)
    for k, v in (session or {}).items():
        at.session_state[k] = v
    at.run()
    if page != "home":
        at.switch_page(f"../pages/{page}.py")
        at.run()
    return at


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def texts(at: AppTest) -> str:
    parts = []
    for kind in ("title", "subheader", "markdown", "caption", "info", "warning", "error", "success"):
        parts += [str(getattr(e, "value", "")) for e in getattr(at, kind)]
    return "\n".join(parts)


def charts(at: AppTest) -> list[dict]:
    out = []
    for el in at.get("plotly_chart"):
        spec = el.proto.spec if hasattr(el, "proto") else el.spec
        out.append(json.loads(spec))
    return out


def arr(v) -> list:
    """A plotly json array, plain or binary-encoded ({dtype, bdata})."""
    if isinstance(v, dict) and "bdata" in v:
        import base64

        import numpy as np

        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"]).tolist()
    return list(v)


@pytest.mark.parametrize("page", PAGES)
def test_every_page_with_no_runs(page, tmp_path, monkeypatch):
    at = open_page(tmp_path / "empty-results", page, monkeypatch)
    assert_clean(at)
    if page == "home":
        assert "No runs yet" in texts(at)
        assert any("demo" in b.label.lower() for b in at.button)
    if page == "launch":
        assert at.button(key="launch").disabled  # no store chosen: launch is refused up front
        assert any("acts" in e.value or "store" in e.value for e in at.error)


@pytest.mark.parametrize("page", PAGES)
def test_every_page_with_broken_runs_only(page, broken_only_root, monkeypatch):
    at = open_page(broken_only_root, page, monkeypatch)
    assert_clean(at)
    if page == "home":
        df = at.dataframe[0].value
        assert set(df["name"]) >= {"broken-empty", "broken-status-not-json", "broken-corrupt-files",
                                   "broken-binary-metrics", "broken-list-fields"}
        probs = dict(zip(df["name"], df["problem"]))
        assert "empty" in probs["broken-empty"]
        assert "version" in probs["broken-old-version"]
        assert "eval.json" in probs["broken-corrupt-files"]


def test_home_lists_runs_with_scores_and_filters(full_root, monkeypatch):
    at = open_page(full_root, "home", monkeypatch)
    assert_clean(at)
    df = at.dataframe[0].value
    good = df[df["name"].str.startswith("run-")]
    assert len(good) == 4
    for col in ("state", "arch", "beta", "tau", "lam", "k", "l1_coeff", "d_sae", "tokens",
                "explained_variance", "absorption", "l0", "kl_div_score"):
        assert col in df.columns
    assert good["explained_variance"].notna().all() and good["absorption"].notna().all()
    mom = good[good["arch"] == "momentum"]
    assert mom["beta"].notna().all() and good[good["arch"] == "relu"]["l1_coeff"].notna().all()
    # the fixture gives every run the same KL score: said once above the table, not as each run's flag
    assert not good["flags"].fillna("").str.contains("kl_div_score 0.9 equals").any()
    together = [i.value for i in at.info if "tell together" in i.value]
    assert together and "run-000-momentum: kl_div_score 0.9 equals" in together[0]
    assert "data" in df.columns and good["data"].str.endswith("· fixture-store").all()
    at.multiselect(key="f_arch").set_value(["relu"]).run()
    assert_clean(at)
    assert set(at.dataframe[0].value["arch"]) == {"relu"}


def test_launch_explains_invalid_settings_beside_widgets(full_root, monkeypatch):
    at = open_page(full_root, "launch", monkeypatch)
    assert_clean(at)
    # the defaults are the configs' (batch 4096): more than the fixture store's rows, said beside it
    assert any("exceeds the store's" in e.value for e in at.error) and at.button(key="launch").disabled
    at.number_input(key="batch").set_value(256).run()
    assert not at.button(key="launch").disabled, [e.value for e in at.error]
    assert any(c.value.startswith("Row norms: ") for c in at.caption)  # the chosen store's outliers
    assert any("passes over the store's" in c.value for c in at.caption)
    at.number_input(key="k").set_value(8192).run()  # k > d_sae (4096)
    assert_clean(at)
    assert any("k must" in e.value or "k " in e.value for e in at.error), [e.value for e in at.error]
    assert at.button(key="launch").disabled
    at.number_input(key="k").set_value(8).run()
    at.text_input(key="run_name").set_value("../../etc/evil").run()
    assert_clean(at)
    assert any("etc-evil" in c.value for c in at.caption)  # sanitised name shown before launch
    assert "sweep" in texts(at).lower() or at.text_area(key="grid")


def test_launch_run_name_follows_the_settings_until_edited(full_root, monkeypatch):
    """The suggested name tracks architecture and d_sae (a TopK run is never named momentum-...);
    once the user types a name, setting changes leave it alone."""
    at = open_page(full_root, "launch", monkeypatch)
    from msae_core.sae import SAEConfig

    d = SAEConfig()  # the page's defaults are the config's
    assert at.text_input(key="run_name").value == f"momentum-F{d.d_sae}-b{d.momentum.beta:g}-t{d.momentum.tau:g}-l{d.momentum.lam:g}"
    at.radio(key="arch").set_value("topk").run()
    at.number_input(key="d_sae").set_value(4096).run()
    assert_clean(at)
    assert at.text_input(key="run_name").value == "topk-F4096-k32"
    at.text_input(key="run_name").set_value("my-run").run()
    at.number_input(key="d_sae").set_value(1024).run()
    at.radio(key="arch").set_value("batchtopk").run()
    assert_clean(at)
    assert at.text_input(key="run_name").value == "my-run"


def test_launch_streams_from_a_model(full_root, monkeypatch, tmp_path):
    """Source "stream from the model": model, layer and corpus instead of a store, checked against
    the model's config (no weights loaded in the page), launched as a `--source stream` run."""
    from msae_core.data.lm import save_tiny_model
    from msae_core.runs import jobs

    model = save_tiny_model(tmp_path / "tiny", "llama", n_layers=2, seed=0)
    launched = {}
    monkeypatch.setattr(jobs, "launch_run", lambda cfg, root, name, **kw: launched.update(cfg=cfg, **kw) or
                        (Path(root) / name))
    at = open_page(full_root, "launch", monkeypatch)
    at.radio(key="source").set_value("stream from the model").run()
    at.text_input(key="s_model").set_value(str(model)).run()
    at.number_input(key="s_layer").set_value(5).run()
    assert_clean(at)
    assert any("layer 5 is past the last block" in e.value for e in at.error), [e.value for e in at.error]
    assert at.button(key="launch").disabled
    at.number_input(key="s_layer").set_value(1).run()
    at.text_input(key="s_cache").set_value(str(tmp_path / "cache")).run()
    at.selectbox(key="outliers").set_value("clip").run()
    assert_clean(at)
    assert not at.button(key="launch").disabled, [e.value for e in at.error]
    at.button(key="launch").click().run()
    assert_clean(at)
    cfg = launched["cfg"]
    assert cfg.data.source == "stream" and cfg.data.model == str(model) and cfg.data.layer == 1
    assert cfg.sae.d_in == 64 and not cfg.data.acts and cfg.data.cache == str(tmp_path / "cache")
    assert cfg.data.outliers == "clip"
    assert launched["evals"] == ["core", "absorption", "sparse_probing"]  # a launch is followed by its evals


def test_launch_offers_the_evals_that_fit_the_store(tmp_path, monkeypatch):
    """Evals when done starts with the language-model evals on a harvest and with synthetic on a
    `msae synth` store (it started empty: runs launched from the page were never evaluated)."""
    from msae_core.data import synth as S

    root = tmp_path / "results"
    S.synth(S.SynthConfig(n_features=64, d_model=16, n_trees=2, depth=1, branching=2, n_correlated=4,
                          group_size=2, rows=2000), root / "stores" / "syn", progress=False)
    at = open_page(root, "launch", monkeypatch)
    assert_clean(at)
    assert at.multiselect(key="evals_synthetic").value == ["synthetic"]


def test_tradeoff_frontier_reference_and_open_run(full_root, monkeypatch):
    at = open_page(full_root, "tradeoff", monkeypatch)
    assert_clean(at)
    spec = charts(at)[0]
    names = [t.get("name") for t in spec["data"]]
    assert "Pareto frontier" in names
    run_traces = [t for t in spec["data"] if t.get("legendgroup") == "runs"]
    assert sum(len(arr(t["x"])) for t in run_traces) == 4
    assert {t["name"] for t in run_traces} == {"arch: momentum", "arch: topk", "arch: relu"}  # coloured by arch
    at.checkbox(key="t_ref").check().run()
    assert_clean(at)
    ref = next(t for t in charts(at)[0]["data"] if t.get("name") == "research log (reported)")
    assert len(arr(ref["x"])) == 6 and min(arr(ref["y"])) < 0  # negative EV shown, not hidden
    at.selectbox(key="t_y").set_value("ce_loss_score").run()
    assert_clean(at)
    spec = charts(at)[0]
    assert "CE-loss" in spec["layout"]["title"]["text"]
    assert "reported no" in texts(at)  # the log has no CE-loss scores: said, not faked
    assert at.selectbox(key="t_open").value.startswith("run-")
    at.multiselect(key="t_cmp_runs").set_value(at.multiselect(key="t_cmp_runs").value[:3]).run()
    assert_clean(at)
    base = at.selectbox(key="t_cmp_base").value
    (table,) = [d.value for d in at.dataframe if "L0 matched" in d.value.columns]
    assert table["run"].tolist()[0] == f"{base} (baseline)" and len(table) == 3
    assert table.iloc[1]["mean absorption fraction (↓)"].endswith("one seed: not a comparison)")  # one seed each
    at.selectbox(key="t_x").set_value("synth_absorption").run()  # no run trained on a synthetic store
    assert_clean(at)
    assert "exact" in charts(at)[0]["layout"]["title"]["text"]
    assert re.search(r"\d+ run\(s\) have no ce_loss_score or synth_absorption: \d+ not evaluated for it", texts(at)), texts(at)


def test_tradeoff_draws_a_group_of_seeds_as_its_mean_with_seed_error_bars(tmp_path, monkeypatch):
    """Three seeds of one config are one point (their mean, the t interval over the seeds as error
    bars, n in the hover); "Each seed" draws them one by one; the comparison pairs them by seed."""
    from fixtures_runs import make_run, make_store

    root = tmp_path / "results"
    store = make_store(root / "stores" / "s")
    for s_, (ev, ab) in enumerate([(0.80, 0.30), (0.82, 0.32), (0.78, 0.28)]):
        make_run(root, f"topk-seed{s_}", str(store), arch="topk", ev=ev, absorption=ab, seed=s_, umap=False)
        make_run(root, f"wide-seed{s_}", str(store), arch="topk", ev=ev + 0.05, absorption=ab - 0.1, seed=s_,
                 d_sae=512, umap=False)
    at = open_page(root, "tradeoff", monkeypatch)
    assert_clean(at)
    pts = [t for t in charts(at)[0]["data"] if t.get("legendgroup") == "runs"]
    assert sum(len(arr(t["x"])) for t in pts) == 2
    xs = sorted(x for t in pts for x in arr(t["x"]))
    assert xs == pytest.approx([0.20, 0.30])  # the means over the seeds
    bars = [t["error_x"] for t in pts if t.get("error_x")]
    assert bars and all(min(arr(b["array"])) > 0.02 for b in bars)  # the t interval of 3 seeds, +-0.05
    at.checkbox(key="t_seeds").check().run()
    assert_clean(at)
    pts = [t for t in charts(at)[0]["data"] if t.get("legendgroup") == "runs"]
    assert sum(len(arr(t["x"])) for t in pts) == 6
    assert set(at.multiselect(key="t_cmp_runs").options) == {"topk", "wide"}
    (table,) = [d.value for d in at.dataframe if "L0 matched" in d.value.columns]
    assert "n=3" in table.iloc[0]["mean absorption fraction (↓)"]
    assert table.iloc[1]["mean absorption fraction (↓)"].endswith("resolved)")  # -0.1 at each seed
    for s_ in range(2):  # a BatchTopK pair at another L0: the page offers its eval at the baseline's
        make_run(root, f"btk-seed{s_}", str(store), arch="batchtopk", ev=0.8, absorption=0.2, l0=6.0, seed=s_,
                 umap=False)
    from msae_core.runs import jobs

    started = []
    monkeypatch.setattr(jobs, "start_eval", lambda run, evals, target: started.append((Path(run).name, target)))
    at = open_page(root, "tradeoff", monkeypatch)
    at.multiselect(key="t_cmp_runs").set_value(["topk", "btk"]).run()
    at.selectbox(key="t_cmp_base").set_value("topk").run()
    assert any("L0 not matched: btk" in w.value and "--target-l0 8.00" in w.value for w in at.warning)
    at.button(key="t_match_l0").click().run()
    assert_clean(at)
    assert sorted(started) == [("btk-seed0", 8.0), ("btk-seed1", 8.0)]
    home = open_page(root, "home", monkeypatch)
    assert_clean(home)
    groups = next(d.value for d in home.dataframe if "seeds" in d.value.columns)
    assert sorted(groups["group"]) == ["btk", "topk", "wide"] and groups["n"].tolist().count(3) == 2
    assert groups.set_index("group").loc["topk", "absorption"].startswith("0.3000 [")


def test_traces_page_shows_traces_heatmap_and_events(full_root, monkeypatch):
    at = open_page(full_root, "traces", monkeypatch)
    assert_clean(at)
    # drawn with the figure's own colours (no Streamlit theme): the screen matches the exported PNG
    assert all(el.proto.theme == "" for el in at.get("plotly_chart"))
    specs = charts(at)
    assert len(specs) >= 3
    assert any(t["type"] == "heatmap" for s in specs for t in s["data"])
    at.radio(key="tr_mode").set_value("by id").run()
    at.text_input(key="tr_ids").set_value("3, 7, 999999").run()
    assert_clean(at)
    assert any("ignored" in w.value for w in at.warning)


def test_pairs_page_shows_table_and_token_examples(full_root, monkeypatch):
    at = open_page(full_root, "pairs", monkeypatch)
    assert_clean(at)
    table = at.dataframe[0].value
    assert {"i", "j", "kappa", "dec_cos", "first", "last", "cofiring"} <= set(table.columns)
    assert table["kappa"].is_monotonic_decreasing
    md = texts(at)
    assert "both fire" in md and "fires" in md
    htmls = [h.proto.body for h in at.get("html")]
    assert htmls and any("background:rgba" in h for h in htmls)


def test_explorer_page_map_and_dashboard(full_root, monkeypatch):
    at = open_page(full_root, "explorer", monkeypatch)
    assert_clean(at)
    specs = charts(at)
    assert specs[0]["data"][0]["type"] == "scattergl"
    titles = " ".join(str(s["layout"].get("title", {}).get("text", "")) for s in specs)
    assert "activations where it fires" in titles and "output tokens" in titles and "logits over the vocabulary" in titles
    at.number_input(key="e_feature").set_value(5).run()
    assert_clean(at)
    near = next(d.value for d in at.dataframe if "decoder_cos" in d.value.columns)
    assert len(near) == 10 and 5 not in near["feature"].tolist() and near["decoder_cos"].is_monotonic_decreasing
    assert "Activation density: fires on" in texts(at)
    partners = [d.value for d in at.dataframe if "partner" in d.value.columns]  # a momentum run's pairs
    assert partners and (partners[0]["partner"] != 5).all()
    other = int(near["feature"].iloc[0])
    at.number_input(key="e_goto").set_value(other).run()
    at.button(key="e_open").click().run()
    assert_clean(at)
    assert at.number_input(key="e_feature").value == other  # the table's link opens that feature
    at.text_area(key="e_text").set_value("The quick brown fox jumps over the lazy dog.").run()
    at.button(key="e_text_go").click().run()
    assert_clean(at)
    assert f"feature {other}: max" in texts(at)
    rows = next(d.value for d in at.dataframe if "top features" in d.value.columns)
    assert "".join(rows["token"]).startswith("The") and "quick" in "".join(rows["token"])  # a row a token, no BOS
    at.button(key="e_dash").click().run()
    assert_clean(at)
    dl = [b for b in at.get("download_button") if "dashboard" in b.proto.label]
    page = at.session_state["e_dash_out"][2]  # the chosen feature's page, plotly.js inside: opens offline
    assert dl and f"<h1>run-000-momentum: feature {other}</h1>" in page and len(page) > 1_000_000


def test_export_page_lists_figures_and_tables(full_root, monkeypatch):
    at = open_page(full_root, "export", monkeypatch)
    assert_clean(at)
    assert "tradeoff-explained-variance" in at.selectbox(key="x_fig").options
    assert any(b.label.startswith("Runs table") for b in at.get("download_button"))
    at.selectbox(key="x_sae_run").set_value("run-001-topk").run()
    at.button(key="x_sae_go").click().run()
    assert_clean(at)
    out = full_root / "exports" / "run-001-topk-saelens"
    assert any(str(out) in s.value for s in at.success), [e.value for e in at.error]
    assert json.loads((out / "cfg.json").read_text())["architecture"] == "topk"


def test_server_binds_localhost_by_default():
    """`streamlit run workbench/Home.py` from the repository serves on this machine only."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    cfg = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert cfg["server"]["address"] == "127.0.0.1"
    assert cfg["browser"]["gatherUsageStats"] is False


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on `port`, read from /proc/net/tcp and tcp6."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:  # 0A = LISTEN
                out.add(addr)
    return out


@pytest.mark.slow
def test_server_binds_localhost_from_another_folder(tmp_path):
    """Started from a folder without .streamlit/ (so the project's config is not the one in the
    working folder), the workbench still listens on 127.0.0.1 only."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "streamlit.log"
    env = dict(os.environ, MSAE_RESULTS=str(tmp_path / "results"))
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(REPO / "workbench" / "Home.py"),
                                 "--server.port", str(port), "--server.headless", "true"],
                                cwd=tmp_path, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        end = time.monotonic() + 90
        while time.monotonic() < end:
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        addrs = _listening_addresses(port)
        assert addrs == {"0100007F"}, addrs  # 127.0.0.1 in /proc's byte order, nothing wider
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_home_shows_a_demo_in_progress_and_its_failure(tmp_path, monkeypatch):
    import json

    from msae_core.artifacts import DEMO_STATUS

    root = tmp_path / "results"
    root.mkdir()
    phases = [{"label": "harvest activations", "state": "done"},
              {"label": "train demo-topk", "state": "running"}, {"label": "core eval of demo-topk",
                                                                 "state": "pending"}]
    (root / DEMO_STATUS).write_text(json.dumps({"state": "running", "pid": os.getpid(), "phase": 1,
                                                "eta_s": 125, "phases": phases}))
    at = open_page(root, "home", monkeypatch)
    assert_clean(at)
    bars = [e.proto.text for e in at.get("progress")]
    assert bars == ["Demo: phase 2 of 3, train demo-topk, about 2 min 05 s left"]
    assert not at.button  # no second demo offered while one runs
    (root / DEMO_STATUS).write_text(json.dumps({"state": "failed", "error": "disk full", "phases": phases}))
    at = open_page(root, "home", monkeypatch)
    assert_clean(at)
    assert any("Demo stopped: disk full" in e.value for e in at.error)
    assert at.button(key="demo")  # offered again


@pytest.mark.slow
def test_sweep_from_the_launch_page_leaves_the_cli_sweep_record(tmp_path, monkeypatch):
    """The page starts sweeps through the same path as `msae sweep`: a record in _sweeps/NAME and
    every point queued through the run queue."""
    import json

    from msae_core.runs.jobs import cancel_run

    from msae_core.runs.folder import read_status
    from msae_core.runs.sweep import sweep_dir

    root = make_results(tmp_path / "results", n_runs=1)
    at = open_page(root, "launch", monkeypatch)
    at.number_input(key="steps").set_value(3).run()
    at.number_input(key="batch").set_value(64).run()
    at.text_area(key="grid").set_value("lam=0,0.1").run()
    at.text_input(key="sweep_name").set_value("uisw").run()
    plan = [c.value for c in at.caption if "process" in c.value]
    assert plan and plan[0].startswith("1 process (2 runs, each process one pass over its data); the largest needs about ")
    at.button(key="sweep_go").click().run()
    assert_clean(at)
    rec_path = sweep_dir(root / "runs", "uisw") / "sweep.json"
    try:
        record = json.loads(rec_path.read_text())
        assert [p["name"] for p in record["points"]] == ["uisw-lam0", "uisw-lam0.1"]
        assert [p["values"] for p in record["points"]] == [{"sae.momentum.lam": 0.0}, {"sae.momentum.lam": 0.1}]
        for p in record["points"]:
            assert read_status(p["run"])["state"] in ("queued", "running", "done")
    finally:
        for name in ("uisw-lam0", "uisw-lam0.1"):
            cancel_run(root / "runs" / name)


def test_a_run_being_evaluated_shows_its_eval_on_home_and_launch(tmp_path, monkeypatch):
    """Done training, evals running: not a silent `done` with blank scores."""
    from msae_core.runs.folder import write_status

    root = make_results(tmp_path / "results", n_runs=2)
    run = sorted((root / "runs").iterdir())[0]
    write_status(run, eval="running absorption (2 of 3)")
    at = open_page(root, "home", monkeypatch)
    assert_clean(at)
    table = next(d.value for d in at.dataframe if "eval_phase" in d.value.columns)
    assert table.set_index("name").loc[run.name, "eval_phase"] == "running absorption (2 of 3)"
    at = open_page(root, "launch", monkeypatch)
    assert_clean(at)
    assert f"**{run.name}** · `done` · eval running absorption (2 of 3)" in texts(at)


def test_curves_page_overlays_chosen_runs_by_step_or_l0(full_root, monkeypatch):
    at = open_page(full_root, "curves", monkeypatch)
    assert_clean(at)
    chosen = at.multiselect(key="c_runs").value
    spec = charts(at)[0]
    assert [t["name"] for t in spec["data"]] == chosen and len(chosen) >= 2
    at.selectbox(key="c_y").set_value("explained_variance").run()
    at.radio(key="c_x").set_value("l0").run()
    assert_clean(at)
    spec = charts(at)[0]
    assert spec["layout"]["xaxis"]["title"]["text"] == "L0 (batch)" and len(spec["data"]) == len(chosen)
    assert all(min(arr(t["x"])) >= 8 for t in spec["data"])  # the fixtures log L0 between 8 and 9
    at.radio(key="c_x").set_value("step").run()
    at.selectbox(key="c_y").set_value("l0").run()
    at.radio(key="c_x").set_value("l0").run()  # L0 (batch) against L0: a traceback once
    assert_clean(at)
    assert "L0 (batch)" not in at.selectbox(key="c_y").options and at.selectbox(key="c_y").value != "l0"


def test_diff_page_matches_two_runs_and_shows_both_side_by_side(full_root, monkeypatch):
    at = open_page(full_root, "diff", monkeypatch)
    assert_clean(at)
    assert "latents of A have a partner in B" in texts(at)
    everything = next(d.value for d in at.dataframe if {"a", "b", "cosine", "pearson"} <= set(d.value.columns))
    assert len(everything) == everything["a"].nunique() and everything["cosine"].max() <= 1 + 1e-6
    at.number_input(key="d_feat").set_value(3).run()
    assert_clean(at)
    htmls = [h.proto.body for h in at.get("html")]
    assert any("#3 " in h for h in htmls)  # A's latent 3, shaded, beside its partner


def test_explorer_with_nan_weights_and_a_umap_computed_in_the_background(tmp_path, monkeypatch):
    """A run whose decoder holds NaN rows opens (they sit at the map's centre, said in a warning;
    the PCA preview raised "Eigenvalues did not converge"); "Compute UMAP" returns at once and the
    map switches to the UMAP when the server's thread has cached it."""
    import time

    import numpy as np

    from fixtures_runs import make_run, make_store
    from msae_core.inspect import projection
    from msae_core.sae_io import load_sae, save_sae

    root = tmp_path / "results"
    store = make_store(root / "stores" / "s")
    run = make_run(root, "nan-run", str(store), arch="topk", d_sae=64, k=8, traces=False, umap=False)
    sae = load_sae(run)
    with __import__("torch").no_grad():
        sae.W_dec[:3] = float("nan")
    save_sae(sae, run)
    monkeypatch.setattr(projection, "compute_umap", lambda w, **kw: projection.top2_pca(w)[:, ::-1].copy())
    at = open_page(root, "explorer", monkeypatch)
    assert_clean(at)
    assert any("3 of 64 decoder rows have no direction" in w.value for w in at.warning)
    assert "PCA" in str(charts(at)[0]["layout"]["title"]["text"])
    at.button(key="e_umap").click().run()
    assert_clean(at)
    for _ in range(100):  # the thread writes the cache; the page reads it on its next run
        if (run / "workbench" / "umap.safetensors").is_file():
            break
        time.sleep(0.1)
    at.run()
    assert_clean(at)
    spec = charts(at)[0]
    assert "UMAP" in str(spec["layout"]["title"]["text"])
    xs = np.array(arr(spec["data"][0]["x"]), dtype=float)
    assert np.isfinite(xs).all() and len(xs) == 64
