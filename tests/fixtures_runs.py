"""Fixture run folders for the workbench tests and bench/pages.py, written file by file from the
run-folder contract (DEVELOPERS.md): config.json, status.json, metrics.jsonl, traces/, events.jsonl,
eval.json, sae.safetensors + sae_config.json; and a tiny activation store whose manifest names a
tiny tokenizer and model saved on disk (so token text and output tokens work offline)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from msae_core.artifacts import (RUN_CONFIG, RUN_EVAL, RUN_EVENTS, RUN_METRICS, RUN_STATUS,
                                 RUN_TRACE, RUN_TRACES_DIR, SAE_CONFIG, SAE_WEIGHTS,
                                 atomic_save_safetensors, atomic_write_json)
from msae_core.sae.base import MOMENTUM_FIELDS

D_IN = 64
TEXT = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. Ask not what your "
        "country can do for you. To be or not to be, that is the question. ") * 8
STATUS_VERSION = 1


def make_store(path: Path, n_windows: int = 96, context: int = 16, d: int = D_IN, seed: int = 0,
               model_dir: Path | None = None) -> Path:
    """A small store with planted structure (a few directions switched on by token id), its
    tokenizer/model a tiny one saved next to it (or `model_dir`)."""
    from msae_core.data.lm import save_tiny_model
    from msae_core.data.store import StoreSettings, StoreWriter

    path = Path(path)
    if model_dir is None:
        model_dir = path.parent / f"{path.name}-tiny-model"
        if not (model_dir / "config.json").exists():
            save_tiny_model(model_dir, family="llama", d_model=d, n_layers=2, seed=seed)
    from transformers import AutoTokenizer

    g = torch.Generator().manual_seed(seed)
    tok_ids = AutoTokenizer.from_pretrained(str(model_dir))(TEXT, add_special_tokens=False)["input_ids"]
    starts = torch.randint(0, len(tok_ids) - context, (n_windows,), generator=g)
    windows = torch.tensor([[2] + tok_ids[s:s + context - 1] for s in starts.tolist()], dtype=torch.int32)
    pos = torch.arange(1, context).repeat(n_windows)
    wid = torch.arange(n_windows).repeat_interleave(context - 1)
    tok = windows[:, 1:].reshape(-1)
    dirs = torch.randn(16, d, generator=g)
    acts = 0.3 * torch.randn(len(tok), d, generator=g) + dirs[tok.long() % 16] * 2.0
    settings = StoreSettings(model=str(model_dir), layer=0, target_tokens=len(tok), dtype="float32",
                             context_size=context)
    w = StoreWriter(path, settings, {"d_model": d, "tokenizer": str(model_dir), "bos_token_id": 2,
                                     "n_layers": 2, "corpus": {"name": "fixture"}})
    w.write_shard(acts, tok, wid, pos.to(torch.int32), windows, torch.arange(n_windows),
                  torch.arange(n_windows))
    w.finish()
    return path


def _config(arch: str, d_sae: int, store: str, steps: int, **sae_kw) -> dict:
    sae = {"arch": arch, "d_in": D_IN, "d_sae": d_sae, "k": 8, "l1_coeff": 0.04}
    if arch == "momentum":
        sae.update(base="topk", momentum={"beta": 0.95, "tau": 0.4, "lam": 0.1})
    for k, v in sae_kw.items():  # the momentum knobs go under sae.momentum, as msae writes them
        if k in MOMENTUM_FIELDS:
            sae.setdefault("momentum", {})[k] = v
        else:
            sae[k] = v
    return {"sae": sae, "train": {"steps": steps, "batch_size": 256, "lr": 3e-4, "warmup_steps": 10,
                                  "seed": 0, "device": "cpu", "log_every": 10, "checkpoint_every": 50,
                                  "snapshot_every": 10, "evals": []},
            "data": {"acts": store}}


def eval_json(ev: float, absorption: float, l0: float, kl: float = 0.9, ce: float = 0.85) -> dict:
    """An eval.json in SAEBench's per-eval layout."""
    base = {"eval_config": {}, "eval_id": "fixture", "datetime_epoch_millis": int(time.time() * 1000),
            "eval_result_details": [], "sae_bench_commit_hash": "fixture", "sae_lens_id": None}
    return {
        "core": {**base, "eval_type_id": "core", "eval_result_metrics": {
            "model_behavior_preservation": {"kl_div_score": kl, "kl_div_with_ablation": 5.0, "kl_div_with_sae": 0.5},
            "model_performance_preservation": {"ce_loss_score": ce, "ce_loss_with_ablation": 9.0,
                                               "ce_loss_with_sae": 3.5, "ce_loss_without_sae": 3.0},
            "reconstruction_quality": {"explained_variance": ev, "mse": 1 - ev, "cossim": 0.9},
            "sparsity": {"l0": l0, "l1": 10 * l0},
            "misc_metrics": {"freq_over_1_percent": 0.1, "frac_alive": 0.95, "frac_dead_features": 0.05,
                             "dead_window_tokens": 4096}}},
        "absorption": {**base, "eval_type_id": "absorption_first_letter", "eval_result_metrics": {
            "mean": {"mean_absorption_fraction_score": absorption, "mean_full_absorption_score": absorption / 2,
                     "mean_num_split_features": 1.2}}},
        "sparse_probing": {**base, "eval_type_id": "sparse_probing", "eval_result_metrics": {
            "llm": {"llm_test_accuracy": 0.95, "llm_top_1_test_accuracy": 0.7},
            "sae": {"sae_test_accuracy": 0.93, "sae_top_1_test_accuracy": 0.72}}},
    }


def write_weights(run: Path, cfg: dict, seed: int = 0) -> bool:
    """sae.safetensors + sae_config.json through msae_core.sae_io (False when it is not there yet)."""
    try:
        from msae_core.sae import SAEConfig, build_sae
        from msae_core.sae_io import save_sae
    except ImportError:
        return False
    from msae_core.configutil import from_dict
    from msae_core.sae.base import nest_momentum

    fields = {**nest_momentum(cfg["sae"]), "seed": seed}
    torch.manual_seed(seed)
    sae = build_sae(from_dict(SAEConfig, fields))
    save_sae(sae, run)
    return True


def write_traces(run: Path, d_sae: int, steps: list[int], n_pairs: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    pi = torch.randint(0, d_sae, (n_pairs,), generator=g)
    pj = (pi + 1 + torch.randint(0, d_sae - 1, (n_pairs,), generator=g)) % d_sae
    for n, s in enumerate(steps):
        frac = (n + 1) / len(steps)
        atomic_save_safetensors(run / RUN_TRACES_DIR / RUN_TRACE.format(step=s), {
            "rate": torch.rand(d_sae, generator=g) * 0.1,
            "mag": torch.rand(d_sae, generator=g),
            # as in a real run, only features in competing pairs are under pressure
            "pressure": torch.rand(d_sae, generator=g) ** 4 * frac * (torch.rand(d_sae, generator=g) < 0.5),
            "pair_i": pi.to(torch.int64), "pair_j": pj.to(torch.int64),
            "pair_kappa": torch.rand(n_pairs, generator=g) * 0.5 + 0.4,
            "pair_dec_cos": torch.rand(n_pairs, generator=g) * 0.6,
            # every eighth pair has never crossed tau: the tracker writes -1 for its steps
            "pair_first": torch.randint(0, max(s, 1), (n_pairs,), generator=g).to(torch.int64).index_fill(
                0, torch.arange(0, n_pairs, 8), -1),
            "pair_last": torch.full((n_pairs,), s, dtype=torch.int64).index_fill(0, torch.arange(0, n_pairs, 8), -1),
        }, metadata={"step": str(s)})


def write_umap_cache(run: Path, d_sae: int, seed: int = 0) -> None:
    """Random UMAP coordinates in the workbench's cache format (the real computation is tested once:
    numba compiles UMAP for ~40 s per process)."""
    from msae_core.artifacts import RUN_INSPECT_CACHE_DIR, UMAP_COORDS
    from msae_core.inspect.run_files import weights_key

    if not (run / SAE_WEIGHTS).exists():
        return
    g = torch.Generator().manual_seed(seed)
    key = {"weights": weights_key(run), "n_neighbors": "15", "min_dist": "0.1", "seed": "0"}
    atomic_save_safetensors(run / RUN_INSPECT_CACHE_DIR / UMAP_COORDS, {"coords": torch.randn(d_sae, 2, generator=g)},
                            metadata=key)


def make_run(root: Path, name: str, store: str, arch: str = "momentum", d_sae: int = 256,
             state: str = "done", steps: int = 100, ev: float | None = 0.8, absorption: float | None = 0.05,
             l0: float = 8.0, weights: bool = True, traces: bool = True, seed: int = 0,
             n_pairs: int = 64, n_snapshots: int = 10, umap: bool = True, **sae_kw) -> Path:
    """A complete (or, by arguments, partial) run folder under root/runs/<name>."""
    run = Path(root) / "runs" / name
    run.mkdir(parents=True, exist_ok=True)
    cfg = _config(arch, d_sae, store, steps, **sae_kw)
    cfg["train"]["seed"] = seed  # runs of one config with different seeds are replicates
    atomic_write_json(run / RUN_CONFIG, cfg)
    now = time.time()
    step = steps if state == "done" else steps // 2
    atomic_write_json(run / RUN_STATUS, {"state": state, "step": step, "total_steps": steps, "started": now - 60,
                                         "updated": now, "eta_s": 0 if state == "done" else 30.0,
                                         "error": None, "pid": None, "version": STATUS_VERSION})
    rng = np.random.default_rng(seed)
    with open(run / RUN_METRICS, "w") as fh:
        for s in range(10, step + 1, 10):
            fh.write(json.dumps({"step": s, "loss": float(1 / s + rng.random() * 0.01),
                                 "explained_variance": float(1 - 1 / s), "l0": float(8 + rng.random()),
                                 "competing_pairs": float(rng.integers(0, 50)), "lr": 3e-4,
                                 "dead_features": float(s // 10),
                                 "time": now}) + "\n")
    if arch == "momentum" and traces:
        snap = [int(s) for s in np.linspace(10, step, n_snapshots).round()]
        write_traces(run, d_sae, sorted(set(snap)), n_pairs, seed)
        with open(run / RUN_EVENTS, "w") as fh:
            for _ in range(30):
                fh.write(json.dumps({"step": int(rng.integers(0, step)), "i": int(rng.integers(0, d_sae)),
                                     "j": int(rng.integers(0, d_sae)), "kappa": 0.4,
                                     "direction": str(rng.choice(["up", "down"]))}) + "\n")
    if state == "done" and weights:
        write_weights(run, cfg, seed)
    if state == "done" and weights and umap:
        write_umap_cache(run, d_sae, seed)
    if state == "done" and ev is not None and absorption is not None:
        atomic_write_json(run / RUN_EVAL, eval_json(ev, absorption, l0))
    return run


def make_broken_runs(root: Path, store: str) -> list[Path]:
    """Run folders a page must survive: every kind of half-written, old or corrupt one."""
    runs = Path(root) / "runs"
    out = []

    def folder(name: str) -> Path:
        p = runs / name
        p.mkdir(parents=True, exist_ok=True)
        out.append(p)
        return p

    folder("broken-empty")
    p = folder("broken-status-not-json")
    (p / RUN_STATUS).write_text('{"state": "runn')
    (p / RUN_CONFIG).write_text(json.dumps(_config("topk", 256, store, 10)))
    p = folder("broken-old-version")
    (p / RUN_STATUS).write_text(json.dumps({"state": "finished", "step": 3, "version": 0}))
    (p / RUN_CONFIG).write_text(json.dumps({"sae": "not a dict", "train": [1, 2]}))
    p = folder("broken-done-no-weights")
    make_run(root, p.name, store, weights=False, ev=None)
    p = folder("broken-corrupt-files")
    make_run(root, p.name, store, weights=False, ev=None)
    (p / SAE_WEIGHTS).write_bytes(b"\x80\x04\x95 this is a pickle, never load it")
    (p / SAE_CONFIG).write_text(json.dumps({"arch": "momentum", "d_in": D_IN, "d_sae": 256}))
    (p / RUN_EVAL).write_text("{not json")
    (p / RUN_METRICS).open("a").write('{"step": 999, "loss": 0.1')  # torn last line
    traces = sorted((p / RUN_TRACES_DIR).glob("*.safetensors"))
    traces[-1].write_bytes(b"garbage")  # half-written snapshot
    (p / RUN_EVENTS).open("a").write("not json\n")
    p = folder("broken-binary-metrics")
    make_run(root, p.name, store, weights=False, ev=None)
    (p / RUN_METRICS).write_bytes(bytes(range(256)) * 40 + b"\n\xff\xfe{\"step\": \x00}\n")
    p = folder("broken-list-fields")
    make_run(root, p.name, store, weights=False, ev=None)
    cfg = json.loads((p / RUN_CONFIG).read_text())
    cfg["sae"].update(arch=["momentum"], d_sae=[256, 512], beta=[0.9], lam={"a": 1}, k=None)  # flat, as before
    cfg["sae"].pop("momentum", None)                                                          # sae.momentum
    cfg["train"].update(steps=["10"], lr=[3e-4])
    (p / RUN_CONFIG).write_text(json.dumps(cfg))
    st = json.loads((p / RUN_STATUS).read_text())
    st.update(state=["done"], step=[5], total_steps={"n": 10}, error=["x"], eta_s=[1.0])
    (p / RUN_STATUS).write_text(json.dumps(st))
    p = folder("broken-running-dead-pid")
    make_run(root, p.name, store, state="running", weights=False)
    st = json.loads((p / RUN_STATUS).read_text())
    st["pid"] = 2 ** 22 + 12345
    (p / RUN_STATUS).write_text(json.dumps(st))
    return out


def make_results(root: Path, n_runs: int = 6, broken: bool = False, big_run: int = 0,
                 store: Path | None = None) -> Path:
    """A results folder: a store, `n_runs` done runs with evals (mixed architectures and knobs),
    optionally the broken folders and one momentum run of `big_run` features."""
    root = Path(root)
    store = store or make_store(root / "stores" / "fixture-store")
    archs = ["momentum", "topk", "relu"]
    for n in range(n_runs):
        arch = archs[n % 3]
        kw = {}
        if arch == "momentum":
            kw = {"beta": [0.8, 0.9, 0.95, 0.99][n % 4], "tau": [0.3, 0.4, 0.5, 0.7][(n // 2) % 4],
                  "lam": [0.0, 0.1, 0.3, 0.5][(n // 3) % 4]}
        make_run(root, f"run-{n:03d}-{arch}", str(store), arch=arch, seed=n,
                 ev=0.5 + 0.45 * np.sin(n + 1) ** 2, absorption=0.002 + 0.1 * np.cos(n) ** 2,
                 l0=8 + n % 5, **kw)
    if broken:
        make_broken_runs(root, str(store))
    if big_run:
        make_run(root, f"big-{big_run}", str(store), arch="momentum", d_sae=big_run, seed=99,
                 n_pairs=big_run * 4, n_snapshots=20)
    return root
