"""Training curves: chosen runs' loss, explained variance, L0, dead latents and competing pairs over
steps, overlaid (or against L0, the trade-off as SAEBench plots it)."""

import streamlit as st

import ui
from msae_core.inspect import figures as F
from msae_core.inspect.run_files import load_metrics

st.title("Training curves")
df = ui.runs_table()
names = df[df["train_loss"].notna()]["name"].tolist() if not df.empty else []  # runs that logged metrics
if not names:
    st.info("No run has logged training metrics yet.")
    st.stop()
chosen = st.multiselect("Runs", names, default=names[:4], key="c_runs")
c1, c2 = st.columns(2)
x = c2.radio("Against", ["step", "l0"], horizontal=True, key="c_x",
             format_func=lambda k: {"step": "training step", "l0": "L0 (the trade-off)"}[k])
metrics = [k for k in F.CURVE_LABELS if k != x]  # L0 against L0 says nothing
if st.session_state.get("c_y") not in metrics:
    st.session_state.pop("c_y", None)
y = c1.selectbox("Metric", metrics, key="c_y", format_func=lambda k: F.CURVE_LABELS.get(k, k))
paths = dict(zip(df["name"], df["path"]))
curves = {name: load_metrics(paths[name]) for name in chosen}
ui.show_figure(F.curves_figure(curves, y, x), "curves", stem=f"curves-{y}-by-{x}", width="stretch")
missing = [n for n, m in curves.items() if m.empty or y not in m]
if missing:
    st.caption(f"Not drawn (no {y} logged): {', '.join(missing)}")
