"""Diff two SAEs trained on the same activations: which latents of A correspond to which of B
(one-to-one by decoder cosine, with their activation agreement), which A latents have no good
partner, which B splits or merges; any row opens both features side by side."""

import numpy as np
import streamlit as st

import ui
from msae_core.errors import MsaeError
from msae_core.inspect import features
from msae_core.inspect import figures as F
from msae_core.paths import run_path

st.title("Diff two SAEs")
df = ui.runs_table()
done = df[(df["state"] == "done") & (df["problem"].fillna("") == "")]["name"].tolist() if not df.empty else []
if len(done) < 2:
    st.info("Two finished runs on the same activation store are needed (e.g. TopK and momentum).")
    st.stop()
c1, c2 = st.columns(2)
a_name = c1.selectbox("SAE A", done, key="d_a")
b_name = c2.selectbox("SAE B", [n for n in done if n != a_name], key="d_b")
root = ui.root()
run_a, run_b = run_path(root, a_name), run_path(root, b_name)
try:
    with st.spinner("matching latents and encoding a sample of the store with both SAEs..."):
        d = ui.diff(run_a, run_b)
except MsaeError as exc:
    st.error(str(exc))
    st.stop()

t = d.table
good = int(t["good"].sum())
st.markdown(f"**{good}** of {len(t)} latents of A have a partner in B at decoder cosine >= {d.good_cos}; "
            f"median cosine {np.nanmedian(t['cosine']):.3f}, median activation correlation "
            f"{np.nanmedian(t['pearson']):.3f}. B splits **{len(d.splits)}** latents of A and merges "
            f"**{len(d.merges)}** groups of them.")
ui.show_figure(F.match_cosine_figure(t["cosine"].to_numpy(), a_name, b_name), "diff", stem=f"diff-{a_name}-vs-{b_name}", width="stretch")

tab_u, tab_s, tab_m, tab_all = st.tabs([f"No good partner ({len(d.unmatched)})", f"Split by B ({len(d.splits)})",
                                        f"Merged by B ({len(d.merges)})", "All matches"])
tab_u.dataframe(d.unmatched.sort_values("cosine"), hide_index=True, width="stretch", key="d_unmatched")
tab_s.caption("One latent of A, two or more of B close to it in direction that rarely fire together.")
tab_s.dataframe(d.splits, hide_index=True, width="stretch", key="d_splits")
tab_m.caption("One latent of B, two or more of A close to it that rarely fire together.")
tab_m.dataframe(d.merges, hide_index=True, width="stretch", key="d_merges")
tab_all.dataframe(t, hide_index=True, width="stretch", key="d_all")

st.subheader("Side by side")
a_feat = int(st.number_input("Latent of A", 0, len(t) - 1, int(d.splits["a"].iloc[0]) if len(d.splits) else 0,
                             key="d_feat"))
split_row = d.splits[d.splits["a"] == a_feat]
b_feats = list(split_row["b_latents"].iloc[0]) if len(split_row) else (
    [int(t.loc[a_feat, "b"])] if t.loc[a_feat, "b"] >= 0 else [])
st.caption(f"A {a_feat} against B {', '.join(map(str, b_feats)) or '(no partner)'}")
left, right = st.columns(2)
try:
    sa, sb = ui.sample(run_a, compute=True), ui.sample(run_b, compute=True)
    left.markdown(f"**{a_name} · latent {a_feat}**")
    for e in features.top_examples(sa, a_feat, n=4):
        left.html(F.example_html(e, [a_feat]))
    for b in b_feats:
        right.markdown(f"**{b_name} · latent {b}**")
        for e in features.top_examples(sb, b, n=4 if len(b_feats) == 1 else 2):
            right.html(F.example_html(e, [b], colour_offset=1))
except MsaeError as exc:
    st.info(f"examples unavailable: {exc}")
