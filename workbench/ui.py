"""Streamlit helpers shared by the pages: cached loaders keyed by file fingerprints, the run picker,
and the figure registry the Export page reads. Logic lives in msae_core; this only wires widgets."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from msae_core.errors import MsaeError
from msae_core import paths
from msae_core.inspect import features, projection, run_files, runs_table as rt


def root() -> Path:
    return paths.results_root()


@st.cache_data(show_spinner=False, max_entries=16)
def _runs_table(root_str: str, fingerprint: tuple) -> pd.DataFrame:
    return rt.runs_table(root_str)


def runs_table() -> pd.DataFrame:
    r = root()
    return _runs_table(str(r), rt.runs_fingerprint(r))


@st.cache_data(show_spinner=False, max_entries=16)
def _groups(root_str: str, fingerprint: tuple) -> pd.DataFrame:
    from msae_core.inspect.groups import groups_table

    return groups_table(_runs_table(root_str, fingerprint))


def groups() -> pd.DataFrame:
    """The runs table's groups of training seeds (inspect.groups.groups_table), computed once per
    version of the runs."""
    r = root()
    return _groups(str(r), rt.runs_fingerprint(r))


def _run_key(run_dir: Path) -> tuple:
    """Changes when a run's weights, traces, events or metrics change."""
    return (str(run_dir), *run_files.run_fingerprint(run_dir))


@st.cache_data(show_spinner=False, max_entries=8)
def _traces(key: tuple, feats: tuple | None) -> run_files.Traces:
    return run_files.load_traces(key[0], None if feats is None else list(feats))


def traces(run_dir: Path, feats: list[int] | None) -> run_files.Traces:
    return _traces(_run_key(run_dir), None if feats is None else tuple(feats))


@st.cache_data(show_spinner=False, max_entries=8)
def _pairs(key: tuple) -> tuple[pd.DataFrame, int | None]:
    return run_files.load_pairs(key[0])


def pairs(run_dir: Path) -> tuple[pd.DataFrame, int | None]:
    return _pairs(_run_key(run_dir))


@st.cache_data(show_spinner=False, max_entries=8)
def _events(key: tuple) -> pd.DataFrame:
    return run_files.load_events(key[0])


def events(run_dir: Path) -> pd.DataFrame:
    return _events(_run_key(run_dir))


@st.cache_data(show_spinner=False, max_entries=8)
def _top_pressure(key: tuple, n: int) -> list[int]:
    return run_files.top_pressure_features(key[0], n)


def top_pressure(run_dir: Path, n: int) -> list[int]:
    return _top_pressure(_run_key(run_dir), n)


@st.cache_resource(show_spinner=False, max_entries=4)
def _sample(key: tuple, compute: bool) -> features.FeatureSample | None:
    return features.feature_sample(key[0], compute=compute)


def _cached_or_computed(cached, run_dir: Path, compute: bool, extra: tuple = ()):
    """cached(key, False) (in-process, or from the run folder's cache); computed when missing and
    `compute`, clearing the in-process None first. `extra` joins the key (a cache file another
    thread writes)."""
    key = (*_run_key(run_dir), *extra)
    value = cached(key, False)
    if value is None and compute:
        cached.clear()
        value = cached(key, True)
    return value


def sample(run_dir: Path, compute: bool) -> features.FeatureSample | None:
    """The run's feature sample (cached in-process and in the run folder); None if not computed."""
    return _cached_or_computed(_sample, run_dir, compute)


@st.cache_resource(show_spinner=False, max_entries=4)
def _umap(key: tuple, compute: bool):
    return projection.umap_coords(key[0], compute=compute)


def umap(run_dir: Path, compute: bool):
    """The run's UMAP coordinates (cached in-process and in the run folder); None if not computed.
    Keyed by the folder's UMAP file too, so one written by the background job is read at once."""
    from msae_core.artifacts import RUN_INSPECT_CACHE_DIR, UMAP_COORDS

    return _cached_or_computed(_umap, run_dir, compute,
                               (run_files.file_fingerprint(run_dir / RUN_INSPECT_CACHE_DIR / UMAP_COORDS),))


@st.cache_resource(show_spinner=False)
def _umap_jobs() -> dict:
    """The UMAPs being computed in this server: run path -> (thread, [error or None])."""
    return {}


def start_umap(run_dir: Path) -> None:
    """Compute the run's UMAP into its folder in a thread of this server, so the page's widgets
    stay live meanwhile (`umap_job` polls it). Once per run at a time."""
    import threading

    jobs = _umap_jobs()
    key = str(run_dir)
    if key in jobs and jobs[key][0].is_alive():
        return
    said: list = [None]

    def work() -> None:
        try:
            projection.umap_coords(run_dir, compute=True)
        except Exception as exc:  # noqa: BLE001 - shown on the page, in one line
            said[0] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"

    thread = threading.Thread(target=work, name=f"umap-{run_dir.name}", daemon=True)
    jobs[key] = (thread, said)
    thread.start()


def umap_job(run_dir: Path) -> tuple[bool, str | None]:
    """(running, error) of this server's UMAP job for the run ((False, None) when there is none)."""
    job = _umap_jobs().get(str(run_dir))
    if job is None:
        return False, None
    return job[0].is_alive(), job[1][0]


@st.cache_data(show_spinner=False, max_entries=4)
def _diff(key_a: tuple, key_b: tuple):
    from msae_core.inspect.diff import diff_runs

    return diff_runs(key_a[0], key_b[0])


def diff(run_a: Path, run_b: Path):
    """inspect.diff.diff_runs, cached until either run's files change."""
    return _diff(_run_key(run_a), _run_key(run_b))


# ---------------------------------------------------------------------------------- run picker
def pick_run(df: pd.DataFrame, label: str = "Run", key: str = "run", help: str | None = None) -> Path | None:
    """A selectbox over df's runs; remembers the choice across pages (session 'run' and ?run=)."""
    sound = df["problem"].fillna("").eq("") if "problem" in df else pd.Series(True, index=df.index)
    names = df[sound]["name"].tolist() + df[~sound]["name"].tolist()  # sound runs first
    if not names:
        return None
    wanted = st.session_state.get("selected_run") or st.query_params.get("run")
    index = names.index(wanted) if wanted in names else 0
    name = st.selectbox(label, names, index=index, key=f"pick_{key}", help=help,
                        format_func=lambda n: _run_label(df, n))
    st.session_state["selected_run"] = name
    try:
        return paths.run_path(root(), name)
    except MsaeError as exc:
        st.error(str(exc))
        return None


def pick_momentum_run(key: str) -> tuple[Path, pd.DataFrame]:
    """The momentum run chosen on this page and the momentum rows of the runs table; stops the
    page with a hint when there is none."""
    df = runs_table()
    mom = df[df["arch"] == "momentum"] if not df.empty else df
    if mom.empty:
        st.info("No momentum runs yet: launch one (architecture 'momentum') on the Launch page.")
        st.stop()
    run = pick_run(mom, key=key)
    if run is None:
        st.stop()
    return run, mom


def sample_or_button(run_dir: Path, auto: bool, label: str, key: str) -> features.FeatureSample | None:
    """The run's activation sample: computed without asking when `auto`, else behind a button
    (remembered for the session). Raises MsaeError as `sample` does."""
    flag = f"sample_{run_dir.name}"
    s = sample(run_dir, compute=auto or st.session_state.get(flag, False))
    if s is None and st.button(label, key=key):
        st.session_state[flag] = True
        s = sample(run_dir, compute=True)
    return s


def _run_label(df: pd.DataFrame, name: str) -> str:
    r = df[df["name"] == name]
    if r.empty:
        return name
    r = r.iloc[0]
    bits = [str(r.get("state"))]
    if isinstance(r.get("arch"), str):
        bits.append(r["arch"])
    if pd.notna(r.get("d_sae")):
        bits.append(f"F={int(r['d_sae'])}")
    return f"{name}  ({', '.join(bits)})"


# ----------------------------------------------------------------------------- figure registry
def show_figure(fig, name: str, stem: str = "", **kw):
    """st.plotly_chart + remember the figure for the Export page (by name, latest wins). Drawn with
    the figure's own template and colour scales (theme None), not Streamlit's theme, so that the
    screen and the exported PNG look the same (Streamlit's theme recoloured the pressure heatmap).
    `stem` names its exported file after the run and the setting shown (default: `name`)."""
    st.session_state.setdefault("figures", {})[name] = fig
    st.session_state.setdefault("figure_files", {})[name] = stem or name
    return st.plotly_chart(fig, key=f"fig_{name}", theme=None, **kw)


def problems_box(problems: list[str], what: str = "") -> None:
    if problems:
        with st.expander(f"{len(problems)} problem(s) {what}".strip(), expanded=False):
            for p in problems:
                st.warning(p)


PAGES: dict = {}  # name -> st.Page, set by workbench/Home.py


def page_links(names: list[str]) -> None:
    """Links to other pages (they keep the selected run through session state)."""
    cols = st.columns(len(names))
    for c, n in zip(cols, names):
        if n in PAGES:
            c.page_link(PAGES[n], label=f"Open in {PAGES[n].title}")


@st.cache_resource(show_spinner=False, max_entries=4)
def _pca(key: tuple):
    return projection.pca_coords(key[0])


def pca(run_dir: Path):
    return _pca(_run_key(run_dir))


def empty_rows(run_dir: Path) -> int:
    """How many of the run's decoder rows have no direction (NaN, inf or zeros)."""
    return projection.empty_rows(run_dir)
