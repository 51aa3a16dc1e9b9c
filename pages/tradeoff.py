"""Trade-off: reconstruction against absorption for every run, the Pareto frontier, reported points."""

import streamlit as st

import ui
from msae_core.evals.reference import reference_points
from msae_core.inspect import compare as C
from msae_core.inspect import figures as F
from msae_core.inspect import runs_table as rt

st.title("Reconstruction vs absorption")
df = ui.runs_table()
c0, c1, c2 = st.columns([3, 3, 2])  # the labels are long: checkboxes get their own row
c3, c4, c5 = st.columns([1, 1, 2])
x = c0.selectbox("Absorption", list(F.ABSORPTION_LABELS), key="t_x",
                 format_func=lambda k: F.ABSORPTION_LABELS.get(k, k),
                 help="SAEBench's first-letter scores on a language model, or the exact score against a "
                      "synthetic store's true features (msae synth, eval `synthetic`)")
y = c1.selectbox("Reconstruction", list(F.RECONSTRUCTION_LABELS), key="t_y",
                 format_func=lambda k: F.RECONSTRUCTION_LABELS.get(k, k))
colour_opts = ["arch", "beta", "tau", "lam", "k", "l1_coeff", "d_sae", "lr", "tokens", "l0", "state"]
colour = c2.selectbox("Colour by", colour_opts, key="t_colour")
frontier = c3.checkbox("Pareto frontier", True, key="t_front")
show_ref = c4.checkbox("Research log points", False, key="t_ref",
                       help="the points the research log reported (gemma-2-2b, layer 12, F=16384)")
each_seed = c5.checkbox("Each seed", False, key="t_seeds",
                        help="one point per run; unticked, runs that differ only in their training seed are "
                             "one point: their mean, with the 95 % t interval over the seeds as error bars")
runs_df = df
if not each_seed and not df.empty:
    df = ui.groups()
ref = reference_points() if show_ref else None
if ref is not None and any(c not in ref or ref[c].isna().all() for c in (x, y)):
    st.caption(f"The research log reported no {F.RECONSTRUCTION_LABELS.get(y, y)} against "
               f"{F.ABSORPTION_LABELS.get(x, x)}: its points are not drawn.")
fig = F.tradeoff_figure(df, y=y, x=x, color=colour, reference=ref, frontier=frontier,
                        hover=() if each_seed else ("n_seeds", "seeds"))
event = ui.show_figure(fig, "tradeoff", stem=f"tradeoff-{y}-vs-{x}", on_select="rerun", selection_mode=("points",), width="stretch")

have = df[df[x].notna() & df[y].notna()] if not df.empty else df
missing = df[~df.index.isin(have.index)] if not df.empty else df
if len(missing):
    synth = missing["synthetic"].fillna(False).astype(bool) if "synthetic" in missing else missing["name"].map(lambda n: False)
    parts = []
    if (~synth).any():
        parts.append(f"{int((~synth).sum())} not evaluated for it, or unfinished")
    if synth.any() and not x.startswith("synth"):
        parts.append(f"{int(synth.sum())} trained on a synthetic store ({', '.join(missing[synth]['name'][:3])}): "
                     "choose the synthetic absorption to see them")
    elif synth.any():
        parts.append(f"{int(synth.sum())} synthetic without a synthetic eval")
    st.caption(f"{len(missing)} run(s) have no {y} or {x}: " + "; ".join(parts) + ".")
flagged = have[have["flags"].fillna("") != ""] if not have.empty else have
if not flagged.empty:
    st.warning("Points to read with care:\n\n" + "\n".join(f"- **{r.name}**: {r.flags}"
                                                            for r in flagged.itertuples()))
together = rt.cross_run_notes(have)
if together:
    st.info("What these points show together:\n\n" + "\n".join(f"- {line}" for line in together))

picked = None
try:
    pts = event.selection.points if event else []
    if pts:
        cd = pts[0].get("customdata")
        picked = cd[0] if isinstance(cd, (list, tuple)) else cd
except AttributeError:
    picked = None
names = have["name"].tolist() if not have.empty else []
members = dict(zip(have["name"], have["member"])) if "member" in have else {n: n for n in names}
if names:
    run_names = runs_df[runs_df["name"].isin(
        [m for r in (have["runs"] if "runs" in have else have["name"]) for m in str(r).split(",")])]["name"].tolist()
    picked = members.get(picked, picked)  # a group's point opens its first seed
    names = run_names or names
    if picked in names and picked != st.session_state.get("_t_picked"):
        st.session_state["t_open"] = picked  # a clicked point selects its run (once per click)
    elif st.session_state.get("t_open") not in names:
        st.session_state["t_open"] = names[0]
    st.session_state["_t_picked"] = picked
    name = st.selectbox("Open run", names, key="t_open")
    row = runs_df[runs_df["name"] == name].iloc[0]
    st.session_state["selected_run"] = name
    st.dataframe(row.dropna().astype(str).rename("value").to_frame(), width="stretch")
    ui.page_links(["traces", "pairs", "explorer"])
def _match_l0_button(long, runs) -> None:
    """Evaluate the thresholded runs whose L0 is off at the baseline's L0 (each its own process)."""
    from msae_core.evals.calibrate import THRESHOLDED
    from msae_core.runs.jobs import start_eval

    l0 = long[long["metric"].isin(["l0", "synth_l0"])]
    off = set(l0[l0["l0_matched"] == False]["run"])  # noqa: E712
    sparsity = runs["base"].where(runs["base"].notna(), runs["arch"])
    todo = runs[runs["group_label"].isin(off) & sparsity.isin(THRESHOLDED)]
    if todo.empty:
        return
    target = float(l0["value"].iloc[0])
    if st.button(f"Evaluate {len(todo)} thresholded run(s) at L0 {target:.2f}", key="t_match_l0"):
        for r in todo.itertuples():
            evals = ["synthetic"] if str(r.data).startswith("synthetic") else ["core", "absorption"]
            start_eval(r.path, evals, target)
        st.success(f"Started: {', '.join(todo['name'])}; their evals land in the table as each finishes.")


labels = list(dict.fromkeys(runs_df[runs_df["name"].isin(names)]["group_label"])) if names else []
if len(labels) > 1:
    st.subheader("Compare runs")
    st.caption("Runs that differ only in their training seed are one row: the mean over the seeds with its "
               "95 % t interval (n seeds). The difference to the baseline is paired by seed: resolved when "
               "the interval of the same-seed differences excludes zero; with one seed, not a comparison. "
               "Compare runs at matched L0. The Export page's bundle includes this comparison.")
    chosen = st.multiselect("Runs (groups of seeds)", labels, default=labels[:4], key="t_cmp_runs")
    if len(chosen) > 1:
        arch_of = dict(zip(runs_df["group_label"], runs_df["arch"]))
        first_base = next((i for i, g in enumerate(chosen) if arch_of.get(g) != "momentum"), 0)
        baseline = st.selectbox("Baseline", chosen, index=first_base, key="t_cmp_base",
                                help="the first chosen group that is not a momentum SAE, unless you choose")
        picked_runs = runs_df[runs_df["group_label"].isin(chosen)]
        st.session_state["comparison"] = (picked_runs["name"].tolist(), baseline)  # the Export page's bundle
        long = C.comparison(picked_runs, baseline)
        hint = C.l0_hint(long, picked_runs)
        if hint:
            st.warning(hint)
            _match_l0_button(long, picked_runs)
        wide = C.wide_table(long, baseline)
        st.dataframe(wide, hide_index=True, width="stretch")
        d1, d2 = st.columns(2)
        d1.download_button("Markdown", C.to_markdown(wide, baseline), file_name=f"compare-{baseline}.md",
                           key="t_cmp_md")
        d2.download_button("CSV", long.to_csv(index=False), file_name=f"compare-{baseline}.csv", key="t_cmp_csv")
if show_ref and ref is not None:
    with st.expander("Reported points (research log)"):
        st.dataframe(ref, hide_index=True)
        st.caption("Read them with care: the baseline's L0 of 8896 is not a sparse code, negative explained "
                   "variance is worse than predicting the mean, and runs 3 and 4 report the same KL score.")
