"""The served workbench in a real browser: `streamlit run workbench/Home.py` as a subprocess, driven
by Debian's headless Chromium through Playwright. On the Launch page a tiny momentum run is set up
with the widgets and launched (its own training process); the page's live progress is polled until
the run is done; then every page is opened on that run, screenshotted under
test-artifacts/browser/, and checked for rendered plotly figures and for no exception box.

The results folder is a tmp folder holding a tiny activation store (StoreWriter, a tiny random
model saved next to it, as tests/fixtures_runs.make_store) and two evaluated fixture runs, so the
trade-off page has points to draw."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts" / "browser"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
RUN_NAME = "browser-momentum"

pytestmark = [pytest.mark.browser, pytest.mark.slow]

if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"{CHROMIUM} is missing (Debian's chromium package drives the browser test)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytest.importorskip("streamlit")

from fixtures_runs import make_results  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"streamlit exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"streamlit did not answer on {url} in {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    return make_results(tmp_path_factory.mktemp("browser") / "results", n_runs=2)


@pytest.fixture(scope="module")
def server(results, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("browser-log") / "streamlit.log"
    env = dict(os.environ, MSAE_RESULTS=str(results), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cmd = [sys.executable, "-m", "streamlit", "run", "workbench/Home.py", "--server.headless", "true",
           "--server.port", str(port), "--browser.gatherUsageStats", "false"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"  # .streamlit/config.toml binds 127.0.0.1; nothing here widens it
    try:
        _wait_http(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        _stop_run(results / "runs" / RUN_NAME)


def _stop_run(run_dir: Path) -> None:
    """Cancel the launched training process if the test stopped before it finished."""
    from msae_core.runs.jobs import cancel_run
    from msae_core.runs.folder import read_run

    if run_dir.is_dir() and read_run(run_dir).state in ("queued", "running"):
        cancel_run(run_dir)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def wait_idle(page, timeout: float = 60) -> None:
    """Wait until the page has rendered its title and no script run is in progress (the app's
    data-test-script-state stays notRunning for a second)."""
    page.wait_for_selector('[data-testid="stMain"] h1', timeout=timeout * 1000)
    end = time.monotonic() + timeout
    quiet = 0
    while time.monotonic() < end:
        state = page.get_attribute('[data-testid="stApp"]', "data-test-script-state")
        quiet = quiet + 1 if state == "notRunning" else 0
        if quiet >= 4:
            return
        page.wait_for_timeout(250)
    raise AssertionError(f"the app kept running a script for {timeout:.0f} s")


def assert_no_exception(page, where: str) -> None:
    boxes = page.locator('[data-testid="stException"]')
    assert boxes.count() == 0, f"{where}: exception box: {boxes.first.inner_text()[:2000]}"
    body = page.locator('[data-testid="stMain"]').inner_text()
    assert "Traceback" not in body, f"{where}: {body[:2000]}"


def set_number(page, label: str, value) -> None:
    box = page.get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Enter")
    wait_idle(page)


def plotly_charts(page, n_min: int, where: str, timeout: float = 30) -> int:
    """Wait for at least n_min plotly charts that drew data: scatter points or lines, heatmap
    images, bars, or a WebGL canvas (scattergl). A figure with only a "no data" note does not count."""
    end = time.monotonic() + timeout
    drawn = 0
    while time.monotonic() < end:
        drawn = page.evaluate("""() => [...document.querySelectorAll('.stPlotlyChart .js-plotly-plot')]
            .filter(p => p.querySelector('svg.main-svg') && p.querySelector(
                '.scatterlayer path.point, .scatterlayer path.js-line, .heatmaplayer image, .barlayer path, canvas'))
            .length""")
        if drawn >= n_min:
            return drawn
        page.wait_for_timeout(300)
    raise AssertionError(f"{where}: {drawn} plotly chart(s) drew data, wanted >= {n_min}")


def shot(page, name: str) -> None:
    """A screenshot of the whole page: the viewport is stretched to the main area's height (the
    app scrolls inside it, so a full-page screenshot alone would stop at the viewport)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    size = page.viewport_size
    height = page.evaluate("() => document.querySelector('[data-testid=stMain]').scrollHeight")
    page.set_viewport_size({"width": size["width"], "height": max(size["height"], min(int(height), 12000))})
    page.wait_for_timeout(800)  # plotly relayouts on resize
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    page.set_viewport_size(size)


def test_launch_a_run_and_open_every_page(server, results, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    page.set_default_timeout(30_000)

    # ----------------------------------------------------------------- launch through the widgets
    page.goto(server + "/launch")
    wait_idle(page)
    assert_no_exception(page, "launch")
    main = page.locator('[data-testid="stMain"]')
    set_number(page, "d_sae (dictionary size)", 64)
    set_number(page, "k (active features per token)", 4)
    set_number(page, "Steps", 2000)
    set_number(page, "Batch size (tokens per step)", 64)
    name_box = page.get_by_label("Run name", exact=True)
    name_box.fill(RUN_NAME)
    name_box.press("Enter")
    wait_idle(page)
    launch = page.get_by_role("button", name="Launch run")
    assert launch.is_enabled(), main.inner_text()[:2000]
    launch.click()
    page.get_by_text(f"Launched `{RUN_NAME}`".replace("`", ""), exact=False).wait_for(timeout=30_000)

    # ------------------------------------------------------- the progress fragment polls until done
    seen, progress = set(), ""
    end = time.monotonic() + 150
    while time.monotonic() < end:
        text = main.inner_text()
        progress = text[text.rfind("Progress ("):]
        m = re.search(rf"{RUN_NAME} · (\w+)", progress)
        if m:
            seen.add(m.group(1))
            if m.group(1) == "running" and re.search(r"loss \d", progress):
                seen.add("running with metrics")
            if m.group(1) in ("done", "failed", "diverged", "cancelled"):
                break
        page.wait_for_timeout(500)
    train_log = (results / "runs" / RUN_NAME / "train.log").read_text()[-3000:]
    assert "done" in seen, (seen, progress, train_log)
    assert "running with metrics" in seen, (seen, progress)  # live step/loss/EV while it trained
    assert re.search(r"step 2000/2000", progress) and re.search(r"EV \d\.\d+ · L0 \d", progress), progress
    shot(page, "launch")
    run_dir = results / "runs" / RUN_NAME
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["sae"]["d_sae"] == 64 and cfg["train"]["steps"] == 2000 and cfg["sae"]["k"] == 4
    assert Path(cfg["data"]["acts"]) == results / "stores" / "fixture-store"  # the tmp store was chosen
    assert (run_dir / "sae.safetensors").is_file() and any((run_dir / "traces").iterdir())

    # ----------------------------------------------- every page, on the run, in one browser session
    # the first page is opened by address with ?run=; the others through the sidebar, so the
    # session (chosen run, figures shown so far) carries over to the Export page
    page.goto(f"{server}/traces?run={RUN_NAME}")
    tour = {"traces": ("Momentum traces", 4), "pairs": ("Competing pairs", 0),
            "explorer": ("Feature explorer", 3), "home": ("Home", 0), "tradeoff": ("Trade-off", 1),
            "export": ("Export", 0)}
    for name, (link, n_figs) in tour.items():
        if name != "traces":
            page.locator('[data-testid="stSidebarNav"]').get_by_text(link, exact=True).click()
            page.wait_for_url(re.compile(rf"/{'' if name == 'home' else name}(\?.*)?$"))
        wait_idle(page, timeout=90)
        if n_figs:
            plotly_charts(page, n_figs, name)
        assert_no_exception(page, name)
        for width in (1280, 1920):  # the widths researchers' screens have: nothing runs off the side
            page.set_viewport_size({"width": width, "height": 1800})
            page.wait_for_timeout(400)
            wide = page.evaluate("""() => { const m = document.querySelector('[data-testid=stMain]');
                return [m.scrollWidth, m.clientWidth]; }""")
            assert wide[0] <= wide[1] + 1, (name, width, wide)
        page.set_viewport_size({"width": 1400, "height": 1800})
        text = main.inner_text()
        if name in ("traces", "pairs", "explorer"):
            assert page.get_by_role("combobox", name="Run").input_value().startswith(RUN_NAME)
        if name == "home":
            assert "3 of 3 runs" in text  # the launched run and the two fixture runs (the grid is a canvas)
            assert page.locator('[data-testid="stDataFrame"]').count() == 1
        if name == "pairs":
            assert page.locator('[data-testid="stDataFrame"]').count() >= 1 and "both fire" in text
            assert page.locator('[data-testid="stMain"] span[style*="background:rgba"]').count() > 0
            # long token-shaded contexts wrap inside their column instead of running over the other
            spill = page.evaluate("""() => [...document.querySelectorAll(
                '[data-testid=stMain] div[style*="font-family:monospace"]')]
                .filter(d => d.scrollWidth > d.clientWidth + 1).length""")
            assert spill == 0, f"{spill} token contexts overflow their column"
        if name == "tradeoff":  # clicking a point opens its run below the chart
            before = page.get_by_role("combobox", name="Open run").input_value()
            points = page.locator(".stPlotlyChart .scatterlayer path.point")
            clicked = ""
            for n in range(points.count()):  # a point of another run than the one open now
                box = points.nth(n).bounding_box()
                x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2  # the drag layer is on
                hover = page.locator(".hoverlayer .hovertext")                  # top: point as a user does
                page.mouse.move(5, 5)  # off the chart first: the last point's label must go, or it would
                hover.first.wait_for(state="detached", timeout=10_000)  # be read again for this point
                page.mouse.move(x, y)
                hover.first.wait_for(timeout=10_000)
                clicked = hover.first.text_content() or ""  # "<name>absorption=...": the name comes first
                if not clicked.startswith(before):
                    break
            assert clicked and not clicked.startswith(before), (before, clicked)
            page.mouse.click(x, y)
            page.wait_for_timeout(500)
            wait_idle(page)
            opened = page.get_by_role("combobox", name="Open run").input_value()
            assert opened != before and clicked.startswith(opened), (before, clicked, opened)
        if name == "explorer":
            assert "Top activating contexts" in text
            own_text(page, results / "runs" / RUN_NAME)
        if name == "export":
            export_figure_and_bundle(page, results)
        shot(page, name)
    page.close()


def own_text(page, run: Path) -> None:
    """The explorer's "Try your own text": type a sentence, run the model on the server, read the
    feature's activation back from the page and compare it with the SAE on the model's own
    activations of that text (computed here)."""
    from msae_core.inspect import features

    sentence = "The quick brown fox jumps over the lazy dog. To be or not to be."
    toks, lat = features.text_activations(run, sentence)
    strongest = int(lat.max(axis=0).argmax())  # a feature that fires on this text
    assert lat[:, strongest].max() > 0
    feature_box = page.get_by_label("Feature", exact=True)
    for _ in range(3):  # the number input keeps what was typed once the rerun it causes has run
        set_number(page, "Feature", strongest)
        if feature_box.input_value() == str(strongest):
            break
    assert feature_box.input_value() == str(strongest)
    page.get_by_text("Try your own text", exact=True).click()
    box = page.get_by_label("Text", exact=True)
    box.fill(sentence)
    box.press("Control+Enter")  # commit the text (a rerun) before the button reads it
    wait_idle(page)
    page.get_by_role("button", name="Run the model on it").click()
    caption = page.get_by_text(re.compile(r"^feature \d+: max \S+ over \d+ tokens$"))
    caption.wait_for(timeout=120_000)
    wait_idle(page)
    got = re.match(r"feature (\d+): max (\S+) over (\d+) tokens", caption.inner_text())
    feature, peak, n_tokens = int(got[1]), float(got[2]), int(got[3])
    assert feature == strongest and n_tokens == len(toks) > 5, (caption.inner_text(), strongest, len(toks))
    assert peak == pytest.approx(float(lat[:, feature].max()), rel=1e-2, abs=1e-3)
    # the text is shown token by token, the peak token shaded with its activation on hover
    assert page.locator(f'span[title="{float(lat[:, feature].max()):.3g}"][style*="background:rgba"]').count() > 0
    assert_no_exception(page, "explorer, own text")


def export_figure_and_bundle(page, results: Path) -> None:
    """The figures shown on the other pages are offered; one renders to a PNG download (kaleido +
    chromium inside the server), and the write-up bundle lands under results/exports/."""
    figure = page.get_by_role("combobox", name="Figure", exact=True)
    figure.click()
    options = page.get_by_role("option").all_inner_texts()
    for shown in ("traces", "heatmap", "events", "umap", "histogram", "tradeoff"):
        assert shown in options, options
    page.get_by_role("option", name="umap", exact=True).click()
    wait_idle(page)
    page.get_by_role("button", name="Render").click()
    # named after the run and the setting shown, not a bare "umap.png"
    download = page.get_by_role("button", name=f"Download {RUN_NAME}-umap-density.png")
    download.wait_for(timeout=90_000)
    with page.expect_download() as dl:
        download.click()
    assert dl.value.suggested_filename == f"{RUN_NAME}-umap-density.png"
    assert Path(dl.value.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    wait_idle(page)
    page.get_by_role("button", name="Write bundle").click()
    page.get_by_text("Wrote").wait_for(timeout=120_000)
    bundles = list((results / "exports").iterdir())
    assert len(bundles) == 1, bundles
    readme = (bundles[0] / "README.md").read_text()
    assert "| name |" in readme and RUN_NAME in readme
    figs = {p.name for p in (bundles[0] / "figures").iterdir()}
    assert {f"{RUN_NAME}-umap-density.png", f"{RUN_NAME}-umap-density.svg",
            "tradeoff-explained-variance.png"} <= figs, figs
    assert_no_exception(page, "export")
