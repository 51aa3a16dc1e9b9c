"""How long each workbench page takes to render, with many runs and one 16k-feature run.

The results folder holds `--runs` fixture runs (tests/fixtures_runs.py: mixed architectures,
eval.json, traces, pair tables, weights, a cached map) and one momentum run of `--big` features
with d_in `--big-d-in` (640 = the embedded Gemma 3 270M's width): `--snapshots` trace snapshots,
a pair table of 4 x d_sae pairs, competition events, and a store of `--big-windows` windows.

Each page is rendered by Streamlit's AppTest, which runs the real entry (workbench/Home.py) and the
page script in this process: data loading, caches, figure building and serialising the page's
elements. The browser's drawing is not included (see --browser). Three columns:

  first     a fresh server: Streamlit's caches and the in-process loaders emptied
            (on-disk caches in <run>/workbench/ kept when present)
  rerun     the same session run again (what every widget change costs)
  payload   bytes of the page's plotly figure specs sent to the browser

The 16k run's feature map has extra rows: the explorer before its UMAP exists (PCA shown), the
"Compute UMAP" click (UMAP computed once and written to <run>/workbench/umap.safetensors), and
the explorer in a fresh server once it is on disk; the same for the activation sample behind the
pair examples and feature dashboards (computed on request above 4096 features). The Diff page on
the 16k run against a permuted copy of itself (the matching, both activation samples, the diff
cached in the run folder), then in a fresh server; the explorer's "try your own text" with the
fixture runs' model, first click (model cold) and second (warm).

With --real-run RUN (a finished run of a real model, e.g. a TopK SAE trained on the embedded
Gemma 3 270M's activations), that run is copied into the results folder and its feature dashboard
(the explorer page: map, activation sample, output tokens through the model's unembedding,
nearest and correlated features) is timed once computed and again from disk in a fresh server,
then "try your own text" through the run's own model: first click (the model loaded), second
(warm).

With --browser, the app is also served and each page timed in headless Chromium (Debian's
/usr/bin/chromium through Playwright): from navigation to every plotly chart drawn.

    python bench/pages.py [--root DIR] [--runs 100] [--big 16384] [--big-d-in 640] [--real-run RUN] [--browser]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_name  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
APP = str(REPO / "workbench" / "Home.py")
GOAL_S = 2.0
VERBOSE = False


# ---------------------------------------------------------------------------------- the results
def build(root: Path, n_runs: int, big: int, big_d_in: int, snapshots: int, big_windows: int) -> str:
    from fixtures_runs import make_results, make_run, make_store

    t0 = time.perf_counter()
    make_results(root, n_runs=n_runs, broken=True)
    big_name = f"big-{big}"
    if big:
        store = make_store(root / "stores" / f"wide-store-d{big_d_in}", n_windows=big_windows, context=16,
                           d=big_d_in, seed=1)
        make_run(root, big_name, str(store), arch="momentum", d_sae=big, seed=99, n_pairs=4 * big,
                 n_snapshots=snapshots, umap=False, d_in=big_d_in, k=32)
    (root / "BENCH_READY").write_text(json.dumps({"runs": n_runs, "big": big, "d_in": big_d_in}))
    print(f"built {root} in {time.perf_counter() - t0:.0f} s")
    return big_name


# -------------------------------------------------------------------------------------- timing
def clear_caches() -> None:
    """What a fresh server process starts without."""
    import streamlit as st

    from msae_core.inspect import features

    st.cache_data.clear()
    st.cache_resource.clear()
    features.clear_caches()


def payload(at) -> int:
    return sum(len(el.proto.spec) for el in at.get("plotly_chart"))


def render(root: Path, page: str, session: dict | None = None, reruns: int = 1) -> dict:
    """Time one page: first render after emptying the caches, then `reruns` reruns (median)."""
    from streamlit.testing.v1 import AppTest

    os.environ["MSAE_RESULTS"] = str(root)
    at = AppTest.from_file(APP, default_timeout=1800)
    for k, v in (session or {}).items():
        at.session_state[k] = v
    at.run()  # the entry and Home (not timed for other pages)
    clear_caches()
    if page != "home":
        at.switch_page(f"../pages/{page}.py")
    t0 = time.perf_counter()
    at.run()
    first = time.perf_counter() - t0
    if at.exception:
        raise RuntimeError(f"{page}: {at.exception[0].value}")
    again = []
    for _ in range(reruns):
        t0 = time.perf_counter()
        at.run()
        again.append(time.perf_counter() - t0)
    again.sort()
    notes = [f"{kind}: {e.value}" for kind in ("info", "warning", "error") for e in getattr(at, kind)]
    return {"first": first, "rerun": again[len(again) // 2], "payload": payload(at), "notes": notes}


def render_text(root: Path, run: str, text: str) -> dict:
    """The explorer's "try your own text": the first click (model loaded cold) and a second one
    (model warm), each the whole rerun the click causes."""
    from streamlit.testing.v1 import AppTest

    os.environ["MSAE_RESULTS"] = str(root)
    at = AppTest.from_file(APP, default_timeout=1800)
    at.session_state["selected_run"] = run
    at.run()
    clear_caches()
    at.switch_page("../pages/explorer.py")
    at.run()
    at.text_area(key="e_text").set_value(text)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        at.button(key="e_text_go").click().run()
        times.append(time.perf_counter() - t0)
        if at.exception:
            raise RuntimeError(f"custom text: {at.exception[0].value}")
    return {"first": times[0], "rerun": times[1], "payload": payload(at), "notes": []}


def permuted_copy(src: Path, dst: Path, seed: int = 0) -> None:
    """Run folder `dst`: `src` with its SAE's latents permuted (the same SAE, for a full-size diff)."""
    import torch

    from msae_core.sae_io import load_sae, save_sae

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("workbench", "traces", "checkpoint"))
    sae = load_sae(src)
    perm = torch.randperm(sae.cfg.d_sae, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.W_enc.copy_(sae.W_enc[:, perm])
        sae.b_enc.copy_(sae.b_enc[perm])
        sae.W_dec.copy_(sae.W_dec[perm])
    save_sae(sae, dst)


def real_run(root: Path, src: Path, reruns: int) -> None:
    """The rows of --real-run: a real model's run, its dashboard and your own text (module docstring)."""
    from msae_core.artifacts import RUN_INSPECT_CACHE_DIR
    from msae_core.inspect.run_files import run_config

    name = f"real-{src.name}"
    dst = root / "runs" / name
    if not dst.is_dir():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoint", RUN_INSPECT_CACHE_DIR))
    cfg = run_config(dst)
    sae, data = cfg.get("sae", {}), cfg.get("data", {})
    label = f"{name} ({data.get('model')} L{data.get('layer')}, {sae.get('arch')} {sae.get('d_sae')})"
    print(label)
    full = {"selected_run": name, f"umap_{name}": True, f"sample_{name}": True}
    row("  explorer: map and sample computed (one time)", render(root, "explorer", full, reruns))
    row("  explorer: map and sample on disk, fresh server", render(root, "explorer", full, reruns))
    # the first click loads the model from its cache into this process (the page has loaded it
    # once already, for the unembedding, and dropped it), the second finds it loaded
    row("  your own text, 32 sentences (first click: model load; then warm)",
        render_text(root, name, "A stitch in time saves nine. " * 32))


def row(label: str, r: dict | None, first: float | None = None) -> None:
    f = r["first"] if r else first
    rr = r["rerun"] if r else None
    ok = lambda v: "" if v is None else ("ok" if v < GOAL_S else "SLOW")  # noqa: E731
    size = f"{r['payload'] / 1e6:7.2f}" if r else " " * 7
    print(f"{label:58s} {f:8.2f} {ok(f):4s} {'' if rr is None else f'{rr:8.2f}':>8s} {ok(rr):4s} {size}")
    if VERBOSE and r:
        for n in r["notes"]:
            print(f"    {n[:150]}")


# ------------------------------------------------------------------------------------- browser
def browser_times(root: Path, pages: list[tuple[str, str, int]]) -> list[tuple[str, float, int]]:
    """Serve the app and time each page in headless Chromium: from navigation until the script has
    finished and every plotly chart is drawn, at least `want` of them (pages: label, path, want)."""
    import socket
    import subprocess
    import urllib.request

    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MSAE_RESULTS=str(root), PYTHONPATH=str(REPO))
    log = open(root / "bench-streamlit.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "workbench/Home.py", "--server.headless",
                             "true", "--server.port", str(port)], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    out = []
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(url + "/_stcore/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as pw:
            b = pw.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-quic"])
            page = b.new_page(viewport={"width": 1400, "height": 1200})
            for label, path, want in pages:
                for attempt in ("first", "again"):
                    t0 = time.perf_counter()
                    page.goto(url + path)
                    page.wait_for_selector('[data-testid="stMain"] h1', timeout=600_000)
                    n = 0
                    while time.perf_counter() - t0 < 600:
                        state = page.get_attribute('[data-testid="stApp"]', "data-test-script-state")
                        n, drawn = page.evaluate("""() => {
                            const c = [...document.querySelectorAll('.stPlotlyChart .js-plotly-plot')];
                            return [c.length, c.filter(p => p.querySelector('svg.main-svg') && p.querySelector(
                              '.scatterlayer path.point, .scatterlayer path.js-line, .heatmaplayer image, .barlayer path, canvas, .annotation')).length]}""")
                        if state == "notRunning" and drawn == n >= want:
                            break
                        page.wait_for_timeout(50)
                    out.append((f"{label} ({attempt})", time.perf_counter() - t0, n))
            b.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return out


# ----------------------------------------------------------------------------------------- main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", help="results folder to build (or reuse when built before); default: a tmp folder")
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--big", type=int, default=16384, help="features of the big momentum run (0 = none)")
    p.add_argument("--big-d-in", type=int, default=640)
    p.add_argument("--snapshots", type=int, default=40, help="trace snapshots of the big run")
    p.add_argument("--big-windows", type=int, default=512, help="16-token windows in the big run's store")
    p.add_argument("--reruns", type=int, default=3)
    p.add_argument("--real-run", help="a finished run of a real model: time its dashboard and your own text")
    p.add_argument("--browser", action="store_true", help="also time the pages in headless Chromium")
    p.add_argument("--keep", action="store_true", help="keep the tmp results folder")
    p.add_argument("--verbose", action="store_true", help="print each page's info, warning and error boxes")
    args = p.parse_args()
    global VERBOSE
    VERBOSE = args.verbose

    import logging
    import warnings

    import streamlit.logger

    warnings.filterwarnings("ignore", message="n_jobs value")

    logging.basicConfig(level=logging.ERROR)
    streamlit.logger.set_log_level("error")
    # AppTest sets session state and clears caches from outside a script run: expected here
    for name in ("streamlit.runtime.scriptrunner_utils.script_run_context", "streamlit.runtime.caching.cache_data_api"):
        logging.getLogger(name).disabled = True
    os.environ.setdefault("TQDM_DISABLE", "1")
    tmp = None
    if args.root:
        root = Path(args.root)
    else:
        tmp = tempfile.mkdtemp(prefix="msae-bench-pages-")
        root = Path(tmp) / "results"
    big = f"big-{args.big}"
    if not (root / "BENCH_READY").is_file():
        big = build(root, args.runs, args.big, args.big_d_in, args.snapshots, args.big_windows)
    mom = "run-000-momentum"
    big_dir = root / "runs" / big
    try:
        import torch

        print(f"machine: {cpu_name()}, {os.cpu_count()} cores (shared with other work while measured), "
              f"torch threads {torch.get_num_threads()}")
        from msae_core.artifacts import RUN_INSPECT_CACHE_DIR, UMAP_COORDS
        from msae_core.inspect.run_files import load_events, load_pairs, trace_files
        from msae_core.inspect.runs_table import runs_table

        df = runs_table(root)
        print(f"results: {len(df)} run folders ({int(df['problem'].fillna('').ne('').sum())} broken)"
              + (f", big run {big}: d_sae {args.big}, d_in {args.big_d_in}, "
                 f"{len(trace_files(big_dir))} snapshots, {len(load_pairs(big_dir)[0])} pairs, "
                 f"{len(load_events(big_dir))} events" if args.big else ""))
        print(f"goal: under {GOAL_S:.0f} s per page render\n")
        print(f"{'page (AppTest: entry + page script, no browser drawing)':58s} {'first s':>8s} {'':4s} "
              f"{'rerun s':>8s} {'':4s} {'fig MB':>7s}")
        n = args.reruns
        for page in ("home", "launch", "tradeoff", "export"):
            row(f"{page} ({len(df)} runs)", render(root, page, reruns=n))
        for page in ("traces", "pairs", "explorer"):
            row(f"{page}, {mom} (256 features)", render(root, page, {"selected_run": mom}, n))
        if args.big:
            shutil.rmtree(big_dir / RUN_INSPECT_CACHE_DIR, ignore_errors=True)
            sel = {"selected_run": big}
            row(f"traces, {big}", render(root, "traces", sel, n))
            row(f"pairs, {big} (no activation sample yet)", render(root, "pairs", sel, n))
            row(f"explorer, {big} (no UMAP yet: PCA shown)", render(root, "explorer", sel, n))
            r = render(root, "explorer", {**sel, f"umap_{big}": True}, n)
            row(f"explorer, {big}: Compute UMAP (one time)", r)
            assert (big_dir / RUN_INSPECT_CACHE_DIR / UMAP_COORDS).is_file()
            row(f"explorer, {big}: UMAP on disk, fresh server", render(root, "explorer", {**sel, f"umap_{big}": True}, n))
            r = render(root, "explorer", {**sel, f"umap_{big}": True, f"sample_{big}": True}, n)
            row(f"explorer, {big}: Compute sample (one time)", r)
            full = {**sel, f"umap_{big}": True, f"sample_{big}": True}
            row(f"explorer, {big}: UMAP + sample on disk, fresh server", render(root, "explorer", full, n))
            row(f"pairs, {big}: sample on disk, fresh server", render(root, "pairs", full, n))
            row(f"export, {big} selected", render(root, "export", full, n))
            other = f"{big}-permuted"
            if not (root / "runs" / other).is_dir():
                permuted_copy(big_dir, root / "runs" / other)
            pair = {"d_a": big, "d_b": other}
            row(f"diff {big} vs {other} (one time: match, samples, cache)", render(root, "diff", pair, n))
            row(f"diff {big} vs {other}: on disk, fresh server", render(root, "diff", pair, n))
        row(f"explorer, {mom}: your own text (first click, then warm)",
            render_text(root, mom, "A stitch in time saves nine. " * 8))
        if args.real_run:
            real_run(root, Path(args.real_run), n)
        if args.browser:
            print(f"\n{'page in headless Chromium (served app)':58s} {'seconds':>8s} charts")
            pages = [("home", "/", 0), ("tradeoff", "/tradeoff", 1), ("traces, big", f"/traces?run={big}", 4),
                     ("pairs, big", f"/pairs?run={big}", 0), ("explorer, big", f"/explorer?run={big}", 3),
                     ("explorer, 256", f"/explorer?run={mom}", 3)]
            for label, s, k in browser_times(root, pages):
                print(f"{label:58s} {s:8.2f} {k}")
    finally:
        if tmp and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
