"""Export: every figure as PNG, SVG or PDF, tables as CSV, and a write-up bundle under results/exports/."""

import streamlit as st

import ui
from msae_core.artifacts import EXPORT_FIGURES_DIR
from msae_core.errors import MsaeError
from msae_core.evals.reference import reference_points
from msae_core.inspect import export as X
from msae_core.paths import exports_root
from msae_core.runs.saelens import export_run

st.title("Export")
root = ui.root()
df = ui.runs_table()

st.subheader("Figures")
figs = dict(st.session_state.get("figures", {}))
files = dict(st.session_state.get("figure_files", {}))
if not figs:
    st.caption("Figures you open on the other pages are listed here; the standard write-up figures are "
               "always available.")
include_std = st.checkbox("Include the standard write-up figures (trade-off, pressure heatmaps, events)",
                          True, key="x_std")
if include_std:
    for k, v in X.standard_figures(root, df).items():
        figs.setdefault(k, v)
if figs:
    c1, c2, c3 = st.columns([3, 1, 2])
    which = c1.selectbox("Figure", sorted(figs), key="x_fig")
    fmt = c2.selectbox("Format", list(X.FORMATS), key="x_fmt")
    if c3.button("Render", key="x_render"):
        try:
            with st.spinner(f"rendering {which}.{fmt} with headless Chromium..."):
                st.session_state["x_bytes"] = (which, fmt, X.figure_bytes(figs[which], fmt))
        except MsaeError as exc:
            st.error(str(exc))
    got = st.session_state.get("x_bytes")
    if got and got[0] == which and got[1] == fmt:
        stem = X.safe_file_stem(files.get(which, which))  # named after the run and the setting shown
        c3.download_button(f"Download {stem}.{fmt}", got[2], file_name=f"{stem}.{fmt}",
                           mime=X.MIME[fmt], key="x_dl")

st.subheader("Tables")
t1, t2 = st.columns(2)
t1.download_button("Runs table (CSV)", X.table_csv(df), file_name="runs.csv", mime="text/csv", key="x_runs_csv")
for name, table in st.session_state.get("tables", {}).items():
    t2.download_button(f"{name} (CSV)", X.table_csv(table), file_name=f"{name}.csv", mime="text/csv",
                       key=f"x_csv_{name}")
ref = reference_points()
t1.download_button("Research log points (CSV)", X.table_csv(ref), file_name="research_log_points.csv",
                   mime="text/csv", key="x_ref_csv")
with st.expander("Runs table as markdown"):
    st.code(X.runs_markdown(df), language="markdown")

st.subheader("SAE weights for SAELens")
done = df[df["state"].eq("done") & df["problem"].fillna("").eq("")]["name"].tolist() if not df.empty else []
if done:
    s1, s2 = st.columns([3, 2])
    run_name = s1.selectbox("Run", done, key="x_sae_run")
    target = exports_root(root) / f"{run_name}-saelens"
    s1.caption(f"Into `{target}`: cfg.json and sae_weights.safetensors, as SAELens saves a SAE "
               f"(`msae export RUN --format saelens --out DIR` does the same; `msae import` reads it back).")
    if s2.button("Export SAE", key="x_sae_go"):
        try:
            out = export_run(dict(zip(df["name"], df["path"]))[run_name], target)
            st.success(f"Wrote `{out}`")
        except MsaeError as exc:
            st.error(str(exc))
else:
    st.caption("No finished run to export yet.")

st.subheader("Write-up bundle")
formats = st.multiselect("Figure formats", list(X.FORMATS), ["png", "svg"], key="x_formats")
if st.button("Write bundle", type="primary", key="x_bundle", disabled=not formats):
    try:
        with st.spinner("writing figures and tables..."):
            cmp = st.session_state.get("comparison")  # set by the Trade-off page's comparison
            shown = {files.get(k, k): f for k, f in st.session_state.get("figures", {}).items()}
            out = X.write_bundle(root, figures=shown, formats=tuple(formats),
                                 runs=df, include_standard=include_std, compare=cmp)
        st.success(f"Wrote `{out}` ({sum(1 for _ in (out / EXPORT_FIGURES_DIR).iterdir())} figure files, runs.md, "
                   "runs.csv, README.md" + (f", compare.md and compare.csv against {cmp[1]}" if cmp else "") + ")")
    except MsaeError as exc:
        st.error(str(exc))
