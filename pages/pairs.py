"""Competing pairs: the pair table, and token-level examples of a chosen pair side by side."""

import streamlit as st

import ui
from msae_core.data.store import OUTLIER_FACTOR
from msae_core.errors import MsaeError
from msae_core.inspect import figures as F
from msae_core.inspect.features import (TOP_TOKENS_DROPPED, add_cofiring, pair_cofiring, pair_examples,
                                        pair_score, rows_tokens_and_norms)
from msae_core.inspect.run_files import has_weights

AUTO_SAMPLE_MAX_F = 4096  # compute the activation sample without asking up to this d_sae

st.title("Competing pairs")
run, mom = ui.pick_momentum_run("pairs")
pairs, step = ui.pairs(run)
if pairs.empty:
    st.info(f"Run {run.name} has no readable pair table yet (it comes with the trace snapshots).")
    st.stop()

sample, sample_error = None, None
if has_weights(run):
    d_sae = mom[mom["name"] == run.name]["d_sae"].iloc[0]
    auto = d_sae == d_sae and d_sae <= AUTO_SAMPLE_MAX_F
    try:
        sample = ui.sample_or_button(run, auto, "Compute activation examples (encodes a sample of the store)",
                                     "p_sample")
    except MsaeError as exc:
        sample_error = str(exc)
else:
    sample_error = f"run {run.name} has no final weights yet: examples need them"

table = add_cofiring(pairs.head(2000), sample)
st.caption(f"{len(pairs)} candidate pairs at step {step}; kappa is the competition score, cofiring the "
           "Jaccard index of the two features' firing tokens on the sample, sample score the pair's "
           f"statistic on the sample and without top the same without its {TOP_TOKENS_DROPPED} top tokens "
           "(a score that falls there is carried by a handful of tokens).")
st.dataframe(table, hide_index=True, width="stretch", key="pair_table",
             column_config={"kappa": st.column_config.NumberColumn(format="%.3f"),
                            "dec_cos": st.column_config.NumberColumn("decoder cos", format="%.3f"),
                            "cofiring": st.column_config.NumberColumn(format="%.3f"),
                            "sample_score": st.column_config.NumberColumn("sample score", format="%.3f"),
                            "without_top": st.column_config.NumberColumn(
                                f"without top {TOP_TOKENS_DROPPED}", format="%.3f"),
                            "first": st.column_config.NumberColumn(
                                "first crossing", help="the first step kappa crossed tau (empty: it never did)"),
                            "last": st.column_config.NumberColumn(
                                "last crossing", help="the last step kappa crossed tau (empty: it never did)")})
st.session_state.setdefault("tables", {})["pairs"] = table

top = table.head(300)
labels = [f"{int(r.i)} & {int(r.j)}  (kappa {r.kappa:.3f})" for r in top.itertuples()]
pick = st.selectbox("Pair", range(len(labels)), format_func=lambda n: labels[n], key="p_pair")
i, j = int(top.iloc[pick]["i"]), int(top.iloc[pick]["j"])
if sample_error:
    st.info(sample_error)
    st.stop()
if sample is None:
    st.stop()
co = pair_cofiring(sample, i, j)
st.markdown(f"On {sample.n_rows} sampled tokens: both fire on **{co['both']}**, only {i} on **{co['only_i']}**, "
            f"only {j} on **{co['only_j']}** (Jaccard {co['cofiring']:.3f}).")
ps = pair_score(sample, i, j)
try:
    tops = rows_tokens_and_norms(sample, ps["top_rows"])
except MsaeError:
    tops = []
st.markdown(f"Pair score on the sample **{ps['score']:.3f}**; without its {len(ps['top_rows'])} top tokens "
            f"**{ps['score_without_top']:.3f}** (they carry {ps['top_share']:.0%} of it). Top tokens, with their "
            "row norm in medians of the store's: " + ", ".join(f"`{t!r}` ({n:.1f}x)" for t, n in tops))
if any(n > OUTLIER_FACTOR for _, n in tops):
    st.warning(f"Some of this pair's top tokens are outlier rows (over {OUTLIER_FACTOR:g}x the median norm): its score may be "
               "driven by them. Training with outliers excluded or clipped (Launch page) tests that.")
n_ex = st.slider("Contexts per group", 1, 10, 3, key="p_n")
try:
    groups = pair_examples(sample, i, j, n=n_ex)
except MsaeError as exc:
    st.error(str(exc))
    st.stop()
GROUP_CAPTIONS = {"both fire": "Tokens where both features fire: the inputs they share.",
                  f"only {i} fires": f"Tokens where {i} fires and {j} is silent: what {i} covers alone.",
                  f"only {j} fires": f"Tokens where {j} fires and {i} is silent: what {j} covers alone."}
for title, exs in groups.items():
    st.markdown(f"**{title}**")
    st.caption(GROUP_CAPTIONS.get(title, ""))
    if not exs:
        st.caption("none in the sample")
        continue
    left, right = st.columns(2)
    left.caption(f"shaded by feature {i}")
    right.caption(f"shaded by feature {j}")
    for e in exs:
        left.html(F.example_html(e, [i]))
        right.html(F.example_html(e, [j], colour_offset=1))
