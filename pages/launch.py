"""Launch: settings -> a training process (then its eval), live progress, cancel, sweep grids."""

import time

import streamlit as st

import ui
from msae_core.artifacts import EVAL_NAMES
from msae_core.evals.cli import DEFAULT_EVALS
from msae_core.errors import MsaeError
from msae_core.runs.launch import config_problems, problem_widget
from msae_core.sae import SAEConfig, momentum_bases, registered_archs
from msae_core.runs.config import TrainConfig
from msae_core.paths import runs_root
from msae_core.inspect.runs_table import list_stores
from msae_core.runs.jobs import start_harvest
from msae_core.runs.jobs import cancel_run, launch_run
from msae_core.runs.memory import sweep_plan
from msae_core.paths import safe_run_name
from msae_core.runs.folder import list_runs

SAE_DEFAULTS, TRAIN_DEFAULTS = SAEConfig(), TrainConfig()  # every default from the configs, as msae train has them
LM_EVALS = DEFAULT_EVALS.split(",")  # what `msae eval` runs by default on a language model's run

st.title("Launch runs")
root = ui.root()
runs_dir = runs_root(root)
slots: dict[str, object] = {}


@st.cache_resource(max_entries=8, show_spinner=False)
def _open_store(path: str, stamp: float):
    from msae_core.data.store import ActivationStore

    return ActivationStore(path)


def _opened_store(path: str):
    """The store at `path`, opened once per version of its manifest (not on every rerun); None when
    it cannot be opened (the settings check then says why, beside the store picker)."""
    import os

    try:
        return _open_store(os.path.abspath(path), os.path.getmtime(os.path.join(path, "manifest.json")))
    except (OSError, MsaeError):
        return None

# ------------------------------------------------------------------ activations
st.subheader("Activations")
source = st.radio("Source", ["activation store", "stream from the model"], horizontal=True, key="source",
                  help="a store harvested once and read by every run, or the model run while training "
                       "(no disk: the research-scale setting)")
stores = [s for s in list_stores(root) if not s.get("problem")]
c1, c2 = st.columns([3, 2])
stream: dict = {}
with c1:
    if source == "activation store":
        options = [s["path"] for s in stores] + ["other folder..."]
        choice = st.selectbox("Activation store", options, key="store_choice",
                              format_func=lambda p: p if p == "other folder..." else
                              next(f"{s['name']}  (model {s['model']}, layer {s['layer']}, corpus {s['corpus']}, "
                                   f"{s['n_rows']} rows{'' if s['complete'] else ', harvest unfinished'})"
                                   for s in stores if s["path"] == p))
        acts = st.text_input("Store folder", key="store_path") if choice == "other folder..." else choice
    else:
        acts = ""
        stream = {"source": "stream",
                  "model": st.text_input("Model", "embedded", key="s_model",
                                         help="'embedded' (Gemma 3 270M), a Hugging Face name or a local folder"),
                  "layer": int(st.number_input("Layer", 0, 200, 6, key="s_layer")),
                  "corpus": st.text_input("Corpus", "embedded", key="s_corpus",
                                          help="'embedded' (Debian fortunes) or a Hugging Face dataset"),
                  "model_dtype": st.selectbox("Model dtype", ["auto", "float32", "bfloat16", "float16"],
                                              key="s_dtype", help="auto: bfloat16 on CUDA, float32 on the CPU"),
                  "cache": st.text_input("Cache folder (optional)", "", key="s_cache",
                                         help="also write what is streamed there as an activation store: later "
                                              "runs can train on it, and the feature pages show its token examples")}
        st.caption("The run reads the model's width from its config now and loads the model when it starts.")
    slots["acts"] = st.empty()
    chosen_store = next((s for s in stores if s["path"] == acts), None)
    if chosen_store is not None:
        st.caption(f"Row norms: {chosen_store['outliers']}")
    outliers = st.selectbox("Outlier rows (norm over 5x the median)", ["keep", "exclude", "clip"], key="outliers",
                            help="keep: train on every row, as SAEBench evaluates on all non-special tokens; "
                                 "exclude: drop them from each batch; clip: scale them down to 5x the median")
with c2:
    with st.expander("Harvest a new store (model, layer, corpus)"):
        h_model = st.text_input("Model", "embedded", key="h_model",
                                help="'embedded' (Gemma 3 270M), a Hugging Face name or a local folder")
        h_layer = st.number_input("Layer", 0, 200, 6, key="h_layer")
        h_corpus = st.text_input("Corpus", "embedded", key="h_corpus",
                                 help="'embedded' (Debian fortunes) or a Hugging Face dataset")
        h_tokens = st.number_input("Tokens", 1000, 100_000_000, 100_000, step=10_000, key="h_tokens")
        h_name = st.text_input("Store name", f"{h_model}-L{h_layer}-{h_tokens // 1000}k", key="h_name")
        if st.button("Start harvest", key="h_go"):
            try:
                out = start_harvest(root, h_name, h_model, int(h_layer), h_corpus, int(h_tokens))
                st.success(f"Harvest started into `{out}`; it appears in the list when its first shard is written.")
            except MsaeError as exc:
                st.error(str(exc))

# ------------------------------------------------------------------ SAE and training
st.subheader("SAE and training")
a1, a2, a3 = st.columns(3)
with a1:
    archs = ["momentum"] + [a for a in registered_archs() if a != "momentum"]  # ours first, then the registry's
    arch = st.radio("Architecture", archs, horizontal=True, key="arch")
    bases = momentum_bases()
    base = st.radio("Base architecture", bases, index=bases.index(SAE_DEFAULTS.base), horizontal=True,
                    key="base",
                    disabled=arch != "momentum", help="the SAE the momentum machinery wraps")
    sparsity = base if arch == "momentum" else arch
    l0c = 1.0
    if sparsity == "jumprelu":
        l0c = st.number_input("L0 coefficient", 0.0, 1000.0, SAE_DEFAULTS.l0_coeff, step=0.1, format="%.4f",
                              key="l0c")
        slots["l0_coeff"] = st.empty()
        k, l1 = SAE_DEFAULTS.k, SAE_DEFAULTS.l1_coeff
    elif sparsity != "relu":
        k = st.number_input("k (active features per token" + (", on average" if sparsity != "topk" else "") + ")",
                            1, 65536, SAE_DEFAULTS.k, key="k")
        slots["k"] = st.empty()
        l1 = SAE_DEFAULTS.l1_coeff
    else:
        l1 = st.number_input("L1 coefficient", 0.0, 100.0, SAE_DEFAULTS.l1_coeff, step=0.01, format="%.4f", key="l1")
        slots["l1_coeff"] = st.empty()
        k = SAE_DEFAULTS.k
    d_sae = st.number_input("d_sae (dictionary size)", 1, 1 << 20, SAE_DEFAULTS.d_sae, step=256, key="d_sae")
    slots["d_sae"] = st.empty()
with a2:
    on = arch == "momentum"
    beta = st.slider("beta (momentum rate)", 0.0, 0.999, SAE_DEFAULTS.momentum.beta, 0.001, format="%.3f", key="beta",
                     disabled=not on)
    slots["beta"] = st.empty()
    tau = st.slider("tau (competition threshold)", 0.0, 1.0, SAE_DEFAULTS.momentum.tau, 0.01, key="tau", disabled=not on)
    slots["tau"] = st.empty()
    lam = st.number_input("lambda (competition penalty)", 0.0, 100.0, SAE_DEFAULTS.momentum.lam, step=0.05, format="%.3f",
                          key="lam", disabled=not on)
    slots["lam"] = st.empty()
with a3:
    lr = st.number_input("Learning rate", 1e-7, 1.0, TRAIN_DEFAULTS.lr, step=1e-4, format="%.2e", key="lr")
    slots["lr"] = st.empty()
    steps = st.number_input("Steps", 1, 10_000_000, TRAIN_DEFAULTS.steps, step=100, key="steps")
    slots["steps"] = st.empty()
    batch = st.number_input("Batch size (tokens per step)", 1, 1 << 20, TRAIN_DEFAULTS.batch_size, step=256,
                            key="batch")
    slots["batch_size"] = st.empty()
    rows = (chosen_store or {}).get("n_rows")
    st.caption(f"= {int(steps) * int(batch):,} training tokens" + (
        f", {int(steps) * int(batch) / rows:,.1f} passes over the store's {rows:,} rows" if rows else ""))
    synthetic = bool(chosen_store and chosen_store.get("synthetic"))
    evals = st.multiselect("Evals when done", list(EVAL_NAMES), key="evals_synthetic" if synthetic else "evals",
                           default=["synthetic"] if synthetic else list(LM_EVALS),
                           help="synthetic scores a run on a store written by `msae synth` against its true "
                                "features; the others need a language model's activations. None: evaluate "
                                "later with `msae eval`")

sae = {"arch": arch, "d_in": 0, "d_sae": int(d_sae), "k": int(k), "l1_coeff": float(l1), "l0_coeff": float(l0c)}
if arch == "momentum":
    sae.update(base=base, momentum={"beta": float(beta), "tau": float(tau), "lam": float(lam)})
cfg_dict = {"sae": sae, "train": {"steps": int(steps), "batch_size": int(batch), "lr": float(lr)},  # the rest: defaults
            "data": {**(stream or {"acts": acts or ""}), "outliers": outliers}}
cfg, problems = config_problems(cfg_dict, source=_opened_store(acts) if acts else None)
general = []
for p in problems:
    widget = problem_widget(p)
    if widget in slots:
        slots[widget].error(p)
    else:
        general.append(p)

# ------------------------------------------------------------------ launch
st.subheader("Launch")
default_name = f"{arch}-F{int(d_sae)}" + (f"-b{beta:g}-t{tau:g}-l{lam:g}" if arch == "momentum" else
                                         f"-l0c{l0c:g}" if sparsity == "jumprelu" else
                                         f"-k{int(k)}" if sparsity != "relu" else f"-l1{l1:g}")
n1, n2 = st.columns([3, 1])
# the name follows the settings until the user edits it (then it is theirs)
if st.session_state.get("run_name") in (None, st.session_state.get("_run_name_default")):
    st.session_state["run_name"] = default_name
st.session_state["_run_name_default"] = default_name
raw_name = n1.text_input("Run name", key="run_name", help="follows the settings until you edit it")
parallel = n2.number_input("Runs at once", 1, 32, 2, key="parallel",
                           help="more launches wait queued until a slot is free")
try:
    name = safe_run_name(raw_name)
    if name != raw_name:
        n1.caption(f"will be saved as `{name}`")
except MsaeError as exc:
    name = None
    n1.error(str(exc))
for p in general:
    st.error(p)
if st.button("Launch run", type="primary", key="launch", disabled=bool(problems) or name is None):
    try:
        run_dir = launch_run(cfg, runs_dir, name, evals=evals, max_parallel=int(parallel))
        st.session_state.setdefault("launched", []).append(run_dir.name)
        st.success(f"Launched `{run_dir.name}` in its own process.")
    except MsaeError as exc:
        st.error(str(exc))

with st.expander("Sweep grid (same settings, one run per point)"):
    grid_text = st.text_area("One line per setting: name=v1,v2 (e.g. beta=0.9,0.95 or train.lr=1e-4,3e-4); "
                             "seeds=0,1,2 trains each point with those training seeds, as replicates",
                             "beta=0.9,0.95\nlam=0.1,0.3\nseeds=0,1,2", key="grid",
                             help="runs that differ only in their seed are one group on Home and the "
                                  "Trade-off page: their mean with an interval over the seeds")
    sweep_name = st.text_input("Sweep name", "sweep", key="sweep_name")
    points = []
    try:
        from msae_core.runs.sweep import expand_grid, parse_grid

        if cfg is None:
            raise MsaeError("fix the settings above first")
        grid = parse_grid([ln for ln in grid_text.splitlines() if ln.strip()])
        points = expand_grid(cfg, grid, safe_run_name(sweep_name))
        st.caption(f"{len(points)} runs: " + ", ".join(p.name for p in points[:12]) + (" ..." if len(points) > 12 else ""))
        st.caption(sweep_plan([p.config for p in points], [p.name for p in points],
                              _opened_store(acts) if acts else None), help=(
            "The runs that share the activation store, batch size, data seed and device train in one "
            "process, each batch read once for all of them; each is still its own run. Memory: every "
            "run's weights and Adam state, the largest run's step, the data (msae_core.runs.memory)."))
    except MsaeError as exc:
        st.error(str(exc))
    if st.button(f"Launch sweep ({len(points)} runs)", key="sweep_go", disabled=not points or bool(problems)):
        from msae_core.runs.sweep import launch_sweep

        try:  # the same path as `msae sweep`: a sweep record, every point through the run queue
            record = launch_sweep(cfg, grid, runs_dir, safe_run_name(sweep_name), int(parallel), evals)
        except MsaeError as exc:
            st.error(str(exc))
        else:
            started = [p["name"] for p in record["points"]]
            st.session_state.setdefault("launched", []).extend(started)
            st.success(f"Launched sweep `{record['name']}`: {len(started)} runs ({int(parallel)} at a time).")


# ------------------------------------------------------------------ live progress
def _evaluating(info) -> bool:
    """A run done training whose evals are still running (its status.json `eval`)."""
    phase = (info.status or {}).get("eval") if isinstance(info.status, dict) else None
    return isinstance(phase, str) and (phase.startswith("running") or phase == "starting")


@st.fragment(run_every=2.0)
def progress() -> None:
    launched = set(st.session_state.get("launched", []))
    infos = [i for i in list_runs(runs_dir, metrics_tail=1)
             if i.state in ("queued", "running") or i.name in launched or _evaluating(i)]
    st.subheader(f"Progress ({sum(i.state in ('queued', 'running') for i in infos)} active)")
    if not infos:
        st.caption("No queued or running runs.")
        return
    for info in infos:
        s, m = info.status, (info.metrics[-1] if info.metrics else {})
        step, total = int(s.get("step") or 0), int(s.get("total_steps") or 0)
        c1, c2, c3 = st.columns([3, 5, 1])
        phase = f" · eval {s['eval']}" if isinstance(s.get("eval"), str) and s.get("eval") != "done" else ""
        c1.markdown(f"**{info.name}** · `{info.state}`{phase}" + (f"  \n:red[{info.problem}]" if info.problem else ""))
        c1.progress(min(1.0, step / total) if total else 0.0, text=f"step {step}/{total}")
        eta = s.get("eta_s")
        fmt = lambda k, f: f"{m[k]:{f}}" if isinstance(m.get(k), (int, float)) else "-"  # noqa: E731
        c2.markdown(f"loss {fmt('loss', '.4g')} · EV {fmt('explained_variance', '.3f')} · L0 {fmt('l0', '.1f')}"
                    f" · competing pairs {fmt('competing_pairs', '.0f')} · time left "
                    f"{time.strftime('%H:%M:%S', time.gmtime(eta)) if isinstance(eta, (int, float)) else '-'}"
                    + (f"  \n{s.get('error')}" if s.get("error") else ""))
        if info.state in ("queued", "running") and c3.button("Cancel", key=f"cancel_{info.name}"):
            cancel_run(info.path)
            st.toast(f"cancelling {info.name}")


progress()
