"""Momentum traces: per-feature rate, mag and pressure over steps, a features x steps heatmap,
and the timeline of competition events."""

import re

import numpy as np
import streamlit as st

import ui
from msae_core.inspect import figures as F
from msae_core.inspect.run_files import events_by_pair, load_metrics, trace_files

st.title("Momentum traces")
run, _ = ui.pick_momentum_run("traces")
files = trace_files(run)
if not files:
    st.info(f"Run {run.name} has no trace snapshots yet (train.snapshot_every steps).")
    st.stop()

c1, c2 = st.columns([1, 2])
mode = c1.radio("Features", ["top by pressure", "by id"], horizontal=True, key="tr_mode")
if mode == "top by pressure":
    n = c2.slider("How many", 1, 50, 8, key="tr_n")
    feats = ui.top_pressure(run, n)
    if len(feats) < n:
        st.caption(f"Only {len(feats)} feature(s) are under competition pressure at the last snapshot: "
                   "features under none are not listed (choose them by id).")
    if not feats:
        st.stop()
else:
    text = c2.text_input("Feature ids (comma or space separated)", "0, 1, 2", key="tr_ids")
    feats = [int(t) for t in re.findall(r"\d+", text)][:50]
tr = ui.traces(run, feats)
ui.problems_box(tr.problems, "in trace snapshots")
if tr.d_sae and len(tr.features) < len(feats):
    st.warning(f"ids outside [0, {tr.d_sae}) are ignored")
ui.show_figure(F.traces_figure(tr.steps, tr.features.tolist(), tr.rate, tr.mag, tr.pressure,
                               title=f"{run.name}: momentum traces"), "traces", stem=f"{run.name}-traces",
               width="stretch")

st.subheader("Features x steps")
h1, h2 = st.columns([1, 2])
what = h1.selectbox("Quantity", ["pressure", "rate", "mag"], key="tr_heat_q")
n_heat = h2.slider("Top features by pressure", 5, 200, 40, key="tr_heat_n")
heat_feats = ui.top_pressure(run, n_heat)
if heat_feats:
    th = ui.traces(run, heat_feats)
    ui.show_figure(F.heatmap_figure(th.steps, th.features.tolist(), getattr(th, what),
                                    title=f"{run.name}: {what}, features x steps", quantity=what), "heatmap",
                   stem=f"{run.name}-{what}-heatmap-top{len(heat_feats)}", width="stretch")
    if len(heat_feats) < n_heat:
        st.caption(f"{len(heat_feats)} of the {n_heat} rows asked for: only these features are under pressure.")
else:
    st.caption("No feature is under competition pressure at the last snapshot.")

st.subheader("Competition events")
ev = ui.events(run)
by_pair = events_by_pair(ev)
ui.show_figure(F.pair_events_figure(by_pair, title=f"{run.name}: competition by pair ({len(ev)} events)"),
               "events", stem=f"{run.name}-events-by-pair", width="stretch")
with st.expander(f"Every event ({len(ev)}), at its step"):
    ui.show_figure(F.events_figure(ev, title=f"{run.name}: competition events ({len(ev)})"), "events-all",
                   stem=f"{run.name}-events", width="stretch")
m = load_metrics(run)
ui.show_figure(F.metrics_figure(m, ("loss", "explained_variance", "l0", "competing_pairs"),
                                title=f"{run.name}: training metrics"), "metrics", stem=f"{run.name}-metrics",
               width="stretch")
if not ev.empty:
    with st.expander("Events by pair (table)"):
        st.dataframe(by_pair, hide_index=True, width="stretch")
_ = np  # numpy is used by the figures through the arrays
