"""Feature explorer: a UMAP of decoder directions, and one feature's dashboard (activation
histogram, top, quantile and random contexts with token shading, nearest and correlated features,
promoted and suppressed output tokens with their logit histogram), downloadable as one HTML file."""

import streamlit as st

import ui
from msae_core.errors import MsaeError
from msae_core.inspect import dashboard, features
from msae_core.inspect import figures as F
from msae_core.inspect.run_files import has_weights

AUTO_MAX_F = 4096  # compute UMAP / the sample without asking up to this d_sae

st.title("Feature explorer")
df = ui.runs_table()
ready = df[df["problem"].fillna("").eq("") & df["state"].eq("done")] if not df.empty else df
ready = ready[[has_weights(p) for p in ready["path"]]] if not ready.empty else ready
if ready.empty:
    st.info("No finished run with readable weights yet.")
    st.stop()
run = ui.pick_run(ready, key="explorer")
if run is None:
    st.stop()
d_sae = int(ready[ready["name"] == run.name]["d_sae"].fillna(0).iloc[0])
auto = 0 < d_sae <= AUTO_MAX_F

@st.fragment(run_every=2)
def _umap_progress(run) -> None:
    """While this server computes the run's UMAP: a line; once it is cached, the page again."""
    running, error = ui.umap_job(run)
    if running:
        st.caption("UMAP of the decoder directions is computing in the background (the other widgets "
                   "work meanwhile); the map switches to it when it is done.")
    elif error:
        st.error(f"UMAP failed: {error}")
    elif ui.umap(run, compute=False) is not None:
        st.rerun()


coords, layout = None, "UMAP"
try:
    coords = ui.umap(run, compute=False)
    if coords is None:
        running, _ = ui.umap_job(run)
        st.info(f"The UMAP of {d_sae} decoder directions is not cached yet: a PCA projection is shown "
                "until it is (UMAP compiles for ~40 s the first time in a server, then ~1 min per 16k).")
        coords, layout = ui.pca(run), "PCA"
        if not running and st.button("Compute UMAP", key="e_umap"):
            ui.start_umap(run)
        _umap_progress(run)
except MsaeError as exc:
    st.error(str(exc))
except ImportError as exc:
    st.error(f"umap-learn is not installed: {exc}")
try:
    broken = ui.empty_rows(run)
except MsaeError:
    broken = 0
if broken:
    st.warning(f"{broken} of {d_sae} decoder rows have no direction (NaN, infinite or zero: a diverged or "
               "damaged SAE): they sit at the map's centre and their dashboards mean nothing.")

sample = None
try:
    sample = ui.sample_or_button(run, auto, "Compute activation sample (needed for density and dashboards)",
                                 "e_sample")
except MsaeError as exc:
    st.warning(f"no activation sample: {exc}")

c1, c2 = st.columns([1, 1])
colour_by = c1.radio("Colour by", ["density", "pressure"], horizontal=True, key="e_colour")
feature = int(c2.number_input("Feature", 0, max(d_sae - 1, 0), 0, key="e_feature"))
if coords is not None:
    vals = features.feature_colour_values(run, colour_by, len(coords), sample)
    name = "log10 firing fraction" if colour_by == "density" else "pressure"
    ev = ui.show_figure(F.umap_figure(coords, vals, name if vals is not None else "", feature,
                                      title=f"{run.name}: decoder directions ({layout}, {len(coords)} features)", layout=layout),
                        "umap", stem=f"{run.name}-umap-{colour_by}", on_select="rerun", selection_mode=("points",), width="stretch")
    try:
        pts = ev.selection.points if ev else []
        if pts and pts[0].get("customdata") is not None:
            cd = pts[0]["customdata"]
            feature = int(cd[0] if isinstance(cd, (list, tuple)) else cd)
            st.caption(f"selected feature {feature} on the map")
    except (AttributeError, TypeError, ValueError):
        pass
    if vals is None:
        st.caption(f"no {colour_by} values for this run (density needs the activation sample, "
                   "pressure needs momentum traces)")

st.subheader(f"Feature {feature}")
if sample is not None:
    counts, edges, frac = features.activation_histogram(sample, feature)
    st.markdown(f"Activation density: fires on **{frac:.3%}** of {sample.n_rows:,} sampled tokens.")
    ui.show_figure(F.histogram_figure(counts, edges, feature, frac), "histogram",
                   stem=f"{run.name}-feature{feature}-histogram", width="stretch")
    st.markdown("**Top activating contexts**")
    try:
        for e in features.top_examples(sample, feature, n=st.slider("Contexts", 1, 20, 6, key="e_n")):
            st.html(F.example_html(e, [feature]))
    except MsaeError as exc:
        st.error(str(exc))
    with st.expander("Examples across its range (quantile bins of its nonzero activations)"):
        try:
            for lo, hi, exs in features.quantile_examples(sample, feature, n_bins=5, per_bin=2):
                st.caption(f"activation {lo:.3g} to {hi:.3g}")
                for e in exs:
                    st.html(F.example_html(e, [feature]))
        except MsaeError as exc:
            st.error(str(exc))
    with st.expander("Random positive examples (what a typical firing looks like)"):
        try:
            for e in features.random_examples(sample, feature, n=4):
                st.html(F.example_html(e, [feature]))
        except MsaeError as exc:
            st.error(str(exc))
n1, n2 = st.columns(2)
try:
    near = features.nearest_by_decoder(run, feature, k=10)
    n1.markdown("**Nearest features by decoder cosine**")
    n1.dataframe(near, hide_index=True, width="stretch", key="e_near",
                 column_config={"decoder_cos": st.column_config.NumberColumn("decoder cos", format="%.3f")})
except MsaeError as exc:
    n1.info(f"nearest features unavailable: {exc}")
if sample is not None:
    n2.markdown("**Most correlated by activation** (Pearson over the sample)")
    n2.dataframe(features.most_correlated(sample, feature, k=10), hide_index=True, width="stretch",
                 key="e_corr", column_config={"pearson": st.column_config.NumberColumn(format="%.3f")})
pairs_, _ = ui.pairs(run)  # a momentum run's competing partners of this feature, at the last snapshot
if not pairs_.empty:
    mine = pairs_[(pairs_["i"] == feature) | (pairs_["j"] == feature)].copy()
    mine["partner"] = mine["j"].where(mine["i"] == feature, mine["i"])
    st.markdown(f"**Competing partners** ({len(mine)} in the pair table; the Competing pairs page shows "
                "their examples)")
    st.dataframe(mine[["partner", "kappa", "dec_cos"]].head(20), hide_index=True, width="stretch", key="e_partners",
                 column_config={"kappa": st.column_config.NumberColumn(format="%.3f"),
                                "dec_cos": st.column_config.NumberColumn("decoder cos", format="%.3f")})
n3, _ = st.columns([1, 2])
go_to = n3.number_input("Open feature", 0, max(d_sae - 1, 0), feature, key="e_goto",
                        help="a feature from the tables above")
n3.button("Open", key="e_open", disabled=go_to == feature, on_click=st.session_state.update,
          kwargs={"e_feature": int(go_to)})  # a callback: it runs before the Feature widget is drawn
with st.expander("Try your own text"):
    text = st.text_area("Text", key="e_text", height=90,
                        placeholder="Paste text: each token is shaded by this feature's activation")
    if st.button("Run the model on it", key="e_text_go") and text.strip():
        try:
            with st.spinner("loading the model (the first time) and running it up to the SAE's layer..."):
                toks, lat = features.text_activations(run, text)
            st.session_state["e_text_out"] = (run.name, text, toks, lat)
        except MsaeError as exc:
            st.error(str(exc))
    got = st.session_state.get("e_text_out")
    if got and got[0] == run.name and got[1] == text:
        _, _, toks, lat = got
        st.html(F.tokens_html(toks, lat[:, feature].tolist()))
        peak = float(lat[:, feature].max()) if len(lat) else 0.0
        st.caption(f"feature {feature}: max {peak:.3g} over {len(toks)} tokens")
        tops = features.top_features_per_token(lat, k=3)
        st.dataframe({"token": toks, "top features": [", ".join(f"{f} ({a:.2g})" for f, a in t) for t in tops]},
                     hide_index=True, width="stretch", key="e_text_table")
try:
    out = features.output_tokens(run, feature, k=12)
    ui.show_figure(F.logits_figure(out["promoted"], out["suppressed"], feature), "logits",
                   stem=f"{run.name}-feature{feature}-logits", width="stretch")
    ui.show_figure(F.logit_histogram_figure(*out["histogram"], feature, out["promoted"], out["suppressed"]),
                   "logit_hist", stem=f"{run.name}-feature{feature}-logit-histogram", width="stretch")
except MsaeError as exc:
    st.info(f"output tokens unavailable: {exc}")
if st.button("Prepare this dashboard as one HTML file", key="e_dash",
             help="for the write-up; `msae dashboard RUN --features ...` writes many at once"):
    try:
        with st.spinner("gathering the dashboard..."):
            page = dashboard.dashboard_html(dashboard.feature_dashboard(run, feature, sample=sample))
        st.session_state["e_dash_out"] = (run.name, feature, page)
    except MsaeError as exc:
        st.error(str(exc))
got = st.session_state.get("e_dash_out")
if got and got[:2] == (run.name, feature):
    st.download_button("Download the dashboard (HTML)", got[2], file_name=f"{dashboard.dashboard_file_stem(run.name, feature)}.html",
                       mime="text/html", key="e_dash_dl")
