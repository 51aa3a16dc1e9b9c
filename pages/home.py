"""Home: every run with its settings and scores, filters, the embedded default, a one-click demo.

While a demo or a run is in progress the table and the demo's phases refresh every few seconds
(a fragment), so runs appear with their live status and their scores as each eval lands."""

import pandas as pd
import streamlit as st

import ui
from msae_core import demo
from msae_core.artifacts import DEMO_LOG
from msae_core.inspect import runs_table as rt
from msae_core.inspect.groups import format_interval, groups_table
from msae_core.paths import runs_root

LIVE_STATES = ("queued", "running")

st.title("msae workbench")
root = ui.root()

with st.expander("What the embedded default is", expanded=ui.runs_table().empty):
    d = rt.EMBEDDED_DEFAULT
    st.markdown(
        f"- **Model**: {d['model']}\n- **Corpus**: {d['corpus']}\n- **Layer**: {d['layer']}, "
        f"hook {d['hook']}\n- **Demo**: `msae demo` harvests it, trains a TopK baseline and a momentum "
        "SAE (the research log's run 5: beta 0.95, tau 0.4, lambda 0.3) and evaluates both.\n"
        f"- **Results folder**: `{root}` (set `MSAE_RESULTS` to change it)")


def _demo_panel(progress: dict | None) -> None:
    """The demo's phases: a bar, the phase in hand and the time left; its error when it failed."""
    if progress is None:
        return
    phases = progress["phases"]
    done = sum(1 for p in phases if isinstance(p, dict) and p.get("state") in ("done", "failed"))
    state = progress.get("state")
    current = phases[progress["phase"]] if isinstance(progress.get("phase"), int) and \
        0 <= progress["phase"] < len(phases) and isinstance(phases[progress["phase"]], dict) else {}
    eta = progress.get("eta_s")
    if state == "running":
        left = f", about {int(eta) // 60} min {int(eta) % 60:02d} s left" if isinstance(eta, (int, float)) else ""
        st.progress(done / max(len(phases), 1),
                    text=f"Demo: phase {done + 1} of {len(phases)}, {current.get('label', '')}{left}")
    elif state == "done":
        st.success(f"Demo done: {len(phases)} phases.")
    else:
        st.error(f"Demo stopped: {progress.get('error') or state}")


def _live() -> bool:
    df = ui.runs_table()
    prog = demo.demo_progress(root)
    return (prog is not None and prog.get("state") == "running") or \
        (not df.empty and df["state"].isin(LIVE_STATES).any())


def _groups_section(view) -> None:
    """Runs that differ only in their training seed, as one row each: the mean over the seeds with
    the 95 % t interval over them (n said)."""
    groups = groups_table(rt.with_synthetic_scores(view[view["state"] == "done"]))
    groups = groups[groups["n_seeds"] > 1] if not groups.empty else groups
    if groups.empty:
        return
    st.markdown(f"**Training seeds as replicates**: {len(groups)} group(s) of runs that differ only in their "
                "seed, each score the mean over the seeds [95 % t interval over them].")
    shown = {"explained_variance": "expl. var", "absorption": "absorption", "synth_absorption": "synth absorption",
             "l0": "L0", "kl_div_score": "KL score"}
    table = {"group": groups["name"], "n": groups["n_seeds"], "seeds": groups["seeds"]}
    for key, label in shown.items():
        if groups[key].notna().any():
            table[label] = [format_interval(m, lo, hi) for m, lo, hi in
                            zip(groups[key], groups[f"{key}_ci_low"], groups[f"{key}_ci_high"])]
    st.dataframe(pd.DataFrame(table), hide_index=True, key="groups_table", width="stretch")


@st.fragment(run_every=3 if _live() else None)
def runs_section() -> None:
    progress = demo.demo_progress(root)
    _demo_panel(progress)
    df = ui.runs_table()
    if df.empty:
        st.info(f"No runs yet under `{runs_root(root)}`.")
        if progress is None or progress.get("state") != "running":
            if st.button("Run the demo (harvest, train, evaluate on the embedded default)", key="demo",
                         type="primary"):
                proc = demo.start_demo(root)
                st.success(f"Demo started in its own process (pid {proc.pid}); its log is "
                           f"`{root / DEMO_LOG}`. Runs appear here as they start.")
        return

    c1, c2, c3, c4 = st.columns([2, 2, 2, 1])
    states = c1.multiselect("State", sorted(df["state"].dropna().unique()), key="f_state")
    archs = c2.multiselect("Architecture", sorted(df["arch"].dropna().unique()), key="f_arch")
    text = c3.text_input("Name contains", key="f_text")
    only_eval = c4.checkbox("Evaluated only", key="f_eval")
    view = rt.filter_runs(df, states, archs, text, only_eval)

    view = rt.with_synthetic_scores(view)
    # the scores first (the table scrolls sideways), then the settings, then training's own numbers
    cols = ["name", "state", "eval_phase", "data", "arch", "explained_variance", "absorption", "synth_absorption",
            "synth_f1", "l0", "kl_div_score", "ce_loss_score", "dead_fraction", "base", "beta", "tau", "lam", "k",
            "l1_coeff", "d_sae", "tokens", "step", "total_steps", "train_explained_variance", "train_l0",
            "train_dead_fraction", "flags", "problem"]
    st.caption(f"{len(view)} of {len(df)} runs")
    st.dataframe(view[cols], hide_index=True, key="runs_table", width="stretch",
                 column_config={
                     "data": st.column_config.TextColumn("trained on", help="model, layer and activation "
                                                         "store (or streamed); synthetic: a msae synth store"),
                     "explained_variance": st.column_config.NumberColumn(
                         "expl. var", format="%.4f", help="the core eval's; a synthetic run's from its synthetic eval"),
                     "absorption": st.column_config.NumberColumn(
                         "absorption", format="%.4f", help="first-letter absorption (the absorption eval)"),
                     "synth_absorption": st.column_config.NumberColumn(
                         "synth absorption", format="%.4f", help="a synthetic run's exact absorption "
                         "against its store's known features"),
                     "synth_f1": st.column_config.NumberColumn("synth F1", format="%.3f"),
                     "kl_div_score": st.column_config.NumberColumn("KL score", format="%.4f"),
                     "ce_loss_score": st.column_config.NumberColumn("CE score", format="%.4f"),
                     "l0": st.column_config.NumberColumn("L0", format="%.1f", help="the core eval's; a "
                                                         "synthetic run's from its synthetic eval"),
                     "tokens": st.column_config.NumberColumn(format="compact"),
                     "train_explained_variance": st.column_config.NumberColumn("EV (train)", format="%.3f"),
                     "train_l0": st.column_config.NumberColumn("L0 (train)", format="%.1f"),
                     "dead_fraction": st.column_config.NumberColumn(
                         "dead", format="%.3f", help="fraction of latents that fire on none of the core eval's "
                         "held-out density window: the run's dead_tokens_threshold tokens (a twentieth of "
                         "its training tokens, 100,000 to 10M, unless set), as in training; "
                         "dead_window_tokens in eval.json; SAEBench's 1 - frac_alive"),
                     "train_dead_fraction": st.column_config.NumberColumn(
                         "dead (train)", format="%.3f", help="fraction of latents silent for the last "
                         "dead_tokens_threshold tokens of training (a twentieth of its tokens, 100,000 to 10M, "
                         "unless set): those AuxK trains"),
                     "eval_phase": st.column_config.TextColumn("eval", help="the evals after training: "
                                                               "which one runs now, done, or where it failed"),
                     "flags": st.column_config.TextColumn("suspicious", help="values a researcher should "
                                                          "check before trusting the run (msae_core.evals.flags)"),
                 })
    _groups_section(view)
    bad = df[df["problem"].fillna("") != ""]
    ui.problems_box([f"{r.name}: {r.problem}" for r in bad.itertuples()], "in run folders")
    flagged = view[view["flags"].fillna("") != ""]
    if not flagged.empty:
        st.warning("Suspicious results, check before trusting them:\n\n" + "\n".join(
            f"- **{r.name}**: {r.flags}" for r in flagged.itertuples()))
    together = rt.cross_run_notes(view)
    if together:
        st.info(f"What the {len(view)} runs shown tell together (changes with the runs shown):\n\n"
                + "\n".join(f"- {line}" for line in together))


runs_section()
