"""The msae workbench: `streamlit run workbench/Home.py` (serves on 127.0.0.1, see .streamlit/config.toml).

This file only declares the pages (top-level pages/) with st.navigation; each page is thin: it reads
widgets, calls msae_core (inspect: data and figures for the pages; runs, jobs) and renders."""

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for p in (_HERE, _HERE.parent):  # workbench/ui.py and msae_core, even when msae is not installed
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import streamlit as st  # noqa: E402

st.set_page_config(page_title="msae workbench", layout="wide")

import ui  # noqa: E402

PAGES = _HERE.parent / "pages"
ui.PAGES = {
    "home": st.Page(PAGES / "home.py", title="Home", icon=":material/home:", default=True),
    "launch": st.Page(PAGES / "launch.py", title="Launch", icon=":material/rocket_launch:"),
    "tradeoff": st.Page(PAGES / "tradeoff.py", title="Trade-off", icon=":material/scatter_plot:"),
    "curves": st.Page(PAGES / "curves.py", title="Training curves", icon=":material/show_chart:"),
    "traces": st.Page(PAGES / "traces.py", title="Momentum traces", icon=":material/timeline:"),
    "pairs": st.Page(PAGES / "pairs.py", title="Competing pairs", icon=":material/compare_arrows:"),
    "explorer": st.Page(PAGES / "explorer.py", title="Feature explorer", icon=":material/explore:"),
    "diff": st.Page(PAGES / "diff.py", title="Diff two SAEs", icon=":material/difference:"),
    "export": st.Page(PAGES / "export.py", title="Export", icon=":material/download:"),
}
st.navigation(list(ui.PAGES.values())).run()
