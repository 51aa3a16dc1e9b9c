"""Home: every run with its settings and scores, filters, the embedded default, a one-click demo."""

import streamlit as st

import ui
from msae_core.inspect.paths import runs_root
from msae_core.inspect.runs_table import EMBEDDED_DEFAULT, filter_runs

st.title("msae workbench")
root = ui.root()
df = ui.runs_table()

with st.expander("What the embedded default is", expanded=df.empty):
    d = EMBEDDED_DEFAULT
    st.markdown(
        f"- **Model**: {d['model']}\n- **Corpus**: {d['corpus']}\n- **Layer**: {d['layer']}, "
        f"hook {d['hook']}\n- **Demo**: `msae demo` harvests it, trains a TopK baseline and a momentum "
        "SAE (the research log's run 5: beta 0.95, tau 0.4, lambda 0.3) and evaluates both.\n"
        f"- **Results folder**: `{root}` (set `MSAE_RESULTS` to change it)")

if df.empty:
    st.info(f"No runs yet under `{runs_root(root)}`.")
    try:
        from msae_core import demo
    except ImportError:
        demo = None
    if demo is None:
        st.caption("The demo command is not available in this installation.")
    else:
        states = demo.demo_state(root)
        if any(s != "absent" for s in states.values()):
            st.write("Demo runs:", states)
        if st.button("Run the demo (harvest, train, evaluate on the embedded default)", key="demo",
                     type="primary"):
            proc = demo.start_demo(root)
            st.success(f"Demo started in its own process (pid {proc.pid}); its log is `{root / 'demo.log'}`. "
                       "Runs appear here as they start.")
    st.stop()

c1, c2, c3, c4 = st.columns([2, 2, 2, 1])
states = c1.multiselect("State", sorted(df["state"].dropna().unique()), key="f_state")
archs = c2.multiselect("Architecture", sorted(df["arch"].dropna().unique()), key="f_arch")
text = c3.text_input("Name contains", key="f_text")
only_eval = c4.checkbox("Evaluated only", key="f_eval")
view = filter_runs(df, states, archs, text, only_eval)

cols = ["name", "state", "arch", "base", "beta", "tau", "lam", "k", "l1_coeff", "d_sae", "tokens",
        "explained_variance", "absorption", "l0", "kl_div_score", "ce_loss_score", "step", "total_steps",
        "train_explained_variance", "train_l0", "problem"]
st.caption(f"{len(view)} of {len(df)} runs")
st.dataframe(view[cols], hide_index=True, key="runs_table", width="stretch",
             column_config={
                 "explained_variance": st.column_config.NumberColumn("expl. var", format="%.4f"),
                 "absorption": st.column_config.NumberColumn(format="%.4f"),
                 "kl_div_score": st.column_config.NumberColumn("KL score", format="%.4f"),
                 "ce_loss_score": st.column_config.NumberColumn("CE score", format="%.4f"),
                 "l0": st.column_config.NumberColumn("L0", format="%.1f"),
                 "tokens": st.column_config.NumberColumn(format="compact"),
                 "train_explained_variance": st.column_config.NumberColumn("EV (train)", format="%.3f"),
                 "train_l0": st.column_config.NumberColumn("L0 (train)", format="%.1f"),
             })
bad = df[df["problem"].fillna("") != ""]
ui.problems_box([f"{r.name}: {r.problem}" for r in bad.itertuples()], "in run folders")
