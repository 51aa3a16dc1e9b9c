"""SAEBench's sparse-probing eval: how well do k SAE latents linearly decode labelled concepts?

Follows sae_bench/evals/sparse_probing (main.py, eval_config.py, eval_output.py, probe_training.py)
with sae_bench_utils/dataset_utils.py and activation_collection.py (sae-bench 0.6.0):

1. Per dataset, every class gets `probe_train_set_size // 2` train and `probe_test_set_size // 2`
   test texts (msae_core.evals.probe_data). Each text is truncated to `context_length` tokens.
2. The LM runs to the SAE's hook (resid_post of its layer); the activations of each text are
   mean-pooled over its tokens that are not BOS/EOS/PAD (or any other special token). The SAE
   encodes each such token and its latents are mean-pooled the same way. Latents are read in
   SAEBench's units, each scaled by its decoder norm in input units (SAEBench folds decoder norms
   into the SAEs it loads; the top-k choice and the L2-regularised probes depend on the units, and
   our SAEs scale their inputs internally).
3. Per class, a binary one-vs-rest task: the class's texts (label 1) against as many texts drawn
   evenly from the other classes (label 0), shuffled (SAEBench's prepare_probe_data).
4. Probes: on all LM channels (`llm_test_accuracy`), on all SAE latents (`sae_test_accuracy`), and
   on the top k channels / latents for each k in `k_values` (`llm_top_{k}_test_accuracy`,
   `sae_top_{k}_test_accuracy`). The top k are those with the largest absolute difference between
   the class means on the training task (get_top_k_mean_diff_mask); top-k probes are scikit-learn's
   L2 logistic regression (C=1, max_iter=1000), as SAEBench. Full-width probes, as SAEBench, are a
   linear layer trained with AdamW (lr 1e-2, batch 250, up to 100 epochs, patience 10) whose best
   test accuracy over epochs is reported; `full_probe="sklearn"` uses the logistic regression there
   too, which does not pick its epoch on the test set.
5. Accuracies are averaged over a dataset's classes, then over datasets. eval_result_metrics holds
   the averages (and, ours, an `uncertainty` group: confidence intervals of the LLM, SAE and SAE
   top-1 accuracies, a bootstrap over classes and test texts within each dataset), eval_result_details one entry per dataset (`dataset_name` is SAEBench's
   "<name>_results"), eval_result_unstructured the per-class accuracies keyed like SAEBench's.

Where we differ, and why:
- Datasets: offline by default (Debian fortunes topics and languages, Python standard library code
  against prose; see probe_data), since these machines reach no network. SAEBench's Hugging Face
  datasets work by name when the Hub is reachable (streamed through a seeded shuffle buffer).
- Model: our LanguageModel (Hugging Face) instead of TransformerLens; resid_post of block L is the
  same tensor as TransformerLens' blocks.L.hook_resid_post. Texts get a BOS prepended whatever the
  tokenizer's default (like the harvest, so the SAE sees its training distribution); the BOS is
  masked out of the mean as in SAEBench. Batches are padded to their longest text, not to
  `context_length`: right padding never changes a causal LM's earlier positions, and pads are masked.
- One binary task per class is drawn (seeded) and shared by every probe of that class, so LLM and SAE
  probes see the same texts; SAEBench draws the negatives afresh for each probe.
- Probes train in float32 (SAEBench uses the LLM's dtype, e.g. bfloat16 for Gemma 2).
- `lower_vram_usage` skips the full-width SAE probe as SAEBench does, but reports
  `sae_test_accuracy` as null instead of SAEBench's placeholder -1.
- Pooled activations live in memory; nothing is cached on disk between SAEs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from msae_core.errors import MsaeError
from msae_core.evals import probe_data
from msae_core.evals.schema import make_result

log = logging.getLogger(__name__)

EVAL_TYPE_ID = "sparse_probing"
POSITIVE, NEGATIVE = 1, 0  # SAEBench's dataset_info.POSITIVE_CLASS_LABEL / NEGATIVE_CLASS_LABEL
FULL_PROBES = ("saebench", "sklearn")


@dataclass
class Config:
    """SAEBench's SparseProbingEvalConfig fields, with defaults sized for 2 CPU cores."""

    random_seed: int = field(default=42, metadata={"help": "random seed (datasets, tasks, probes)"})
    dataset_names: list[str] = field(
        default_factory=lambda: list(probe_data.OFFLINE),
        metadata={"help": "probing datasets: the offline suite (fortunes-topics, fortunes-languages, "
                          "code-vs-prose) or SAEBench's Hugging Face names (need the Hub)"})
    probe_train_set_size: int = field(default=300, metadata={
        "help": "texts in one binary probing task's train set (each class gets half); SAEBench: 4000"})
    probe_test_set_size: int = field(default=150, metadata={
        "help": "texts in one binary probing task's test set (each class gets half); SAEBench: 1000"})
    context_length: int = field(default=128, metadata={
        "help": "tokens per text, BOS included; longer texts are truncated, keeping the beginning"})
    sae_batch_size: int = field(default=125, metadata={"help": "texts per SAE encode call"})
    llm_batch_size: int = field(default=32, metadata={"help": "texts per language-model forward"})
    llm_dtype: str = field(default="", metadata={
        "help": "recorded from the run's language model (as SAEBench records it); leave empty"})
    model_name: str = field(default="", metadata={
        "help": "recorded from the run (the model its activations came from); leave empty"})
    k_values: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20, 50], metadata={
        "help": "numbers of SAE latents / LM channels the sparse probes use; SAEBench default [1, 2, 5]"})
    lower_vram_usage: bool = field(default=False, metadata={
        "help": "skip the probe on all SAE latents (as SAEBench); sae_test_accuracy is then null"})
    full_probe: str = field(default="saebench", metadata={
        "help": "probe on all channels/latents: 'saebench' (AdamW, best test accuracy over epochs, "
                "as SAEBench) or 'sklearn' (L2 logistic regression, no selection on the test set)"})
    # ours
    n_bootstrap: int = field(default=2000, metadata={"help": "bootstrap replicates of the confidence intervals"})
    confidence: float = field(default=0.95, metadata={"help": "level of the confidence intervals"})

    def __post_init__(self) -> None:
        # `msae eval --set sparse_probing.k_values=1,5` arrives as text: accept comma lists
        if isinstance(self.dataset_names, str):
            self.dataset_names = [s.strip() for s in self.dataset_names.split(",") if s.strip()]
        if isinstance(self.k_values, (str, int)):
            parts = [s.strip() for s in str(self.k_values).split(",") if s.strip()]
            self.k_values = [int(s) if s.lstrip("-").isdigit() else s for s in parts]

    def problems(self) -> list[str]:
        out = []
        try:
            ks = [int(k) for k in self.k_values]
        except (TypeError, ValueError):
            ks = []
        if not self.dataset_names:
            out.append("dataset_names: choose at least one dataset")
        if self.probe_train_set_size < 2 or self.probe_test_set_size < 2:
            out.append("probe_train_set_size and probe_test_set_size must be >= 2")
        if self.context_length < 2:
            out.append("context_length must be >= 2 (BOS and one token)")
        if self.sae_batch_size < 1 or self.llm_batch_size < 1:
            out.append("sae_batch_size and llm_batch_size must be >= 1")
        if not ks or len(ks) != len(self.k_values) or any(k < 1 for k in ks):
            out.append(f"k_values must be positive integers (got {self.k_values})")
        if self.n_bootstrap < 1 or not 0 < self.confidence < 1:
            out.append("n_bootstrap must be >= 1 and confidence in (0, 1)")
        if self.full_probe not in FULL_PROBES:
            out.append(f"full_probe must be one of {', '.join(FULL_PROBES)} (got {self.full_probe!r})")
        return out


# ----------------------------------------------------------------------------------------------
# activations: mean over the non-special tokens of each text


def mean_pool(acts_BTD: torch.Tensor, keep_BT: torch.Tensor) -> torch.Tensor:
    """Mean over the kept positions of each row -> (B, D). A row keeping nothing gives zeros."""
    keep = keep_BT.to(acts_BTD.dtype)
    total_BD = (acts_BTD * keep[:, :, None]).sum(dim=1)
    return total_BD / keep.sum(dim=1).clamp(min=1.0)[:, None]


def keep_mask(ids_BT: torch.Tensor, lengths_B: torch.Tensor, special_ids) -> torch.Tensor:
    """True at real (non-padding) positions holding a non-special token."""
    T = ids_BT.shape[1]
    real_BT = torch.arange(T, device=ids_BT.device)[None, :] < lengths_B.to(ids_BT.device)[:, None]
    special = torch.tensor(sorted(int(i) for i in special_ids), dtype=ids_BT.dtype, device=ids_BT.device)
    return real_BT & ~torch.isin(ids_BT, special)


def tokenize_texts(lm, texts: list[str], context_length: int) -> list[list[int]]:
    """Token ids of each text: BOS (when the model has one) + the text, cut to context_length."""
    enc = lm.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    bos = [lm.bos_token_id] if lm.bos_token_id is not None else []
    return [(bos + list(ids))[:context_length] for ids in enc]


def pooled_activations(lm, layer: int, texts: list[str], context_length: int, llm_batch_size: int,
                       sae_encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       sae_batch_size: int = 125, progress: bool = True,
                       desc: str = "activations") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean-pooled LM activations (N, D) and SAE latents (N, F) of `texts` at block `layer`'s output,
    over each text's non-special tokens. Texts are batched by length (padding on the right)."""
    ids = tokenize_texts(lm, texts, context_length)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    pad = lm.tokenizer.pad_token_id
    pad = 0 if pad is None else int(pad)
    llm_out: list[torch.Tensor | None] = [None] * len(ids)
    sae_out: list[torch.Tensor | None] = [None] * len(ids)
    empty = 0
    bar = tqdm(total=len(ids), desc=desc, unit="text", disable=None if progress else True)
    for start in range(0, len(order), llm_batch_size):
        rows = order[start:start + llm_batch_size]
        lengths_B = torch.tensor([len(ids[i]) for i in rows])
        T = int(lengths_B.max())
        ids_BT = torch.full((len(rows), T), pad, dtype=torch.long)
        for b, i in enumerate(rows):
            ids_BT[b, :len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
        attn_BT = (torch.arange(T)[None, :] < lengths_B[:, None]).long()
        resid_BTD = lm.resid_post(ids_BT, layer, stop_early=True, attention_mask=attn_BT).float()
        keep_BT = keep_mask(ids_BT, lengths_B, lm.special_ids).to(resid_BTD.device)
        empty += int((keep_BT.sum(dim=1) == 0).sum())
        llm_BD = mean_pool(resid_BTD, keep_BT).cpu()
        sae_BF = None
        if sae_encode is not None:
            sae_BF = _sae_pooled(resid_BTD, keep_BT, sae_encode, sae_batch_size * T)
        for b, i in enumerate(rows):
            llm_out[i] = llm_BD[b]
            if sae_BF is not None:
                sae_out[i] = sae_BF[b]
        bar.update(len(rows))
    bar.close()
    if empty:
        log.warning("%d of %d texts have no non-special token; their pooled activations are zero",
                    empty, len(ids))
    llm_ND = torch.stack(llm_out) if ids else torch.zeros(0, lm.d_model)
    sae_NF = torch.stack(sae_out) if sae_encode is not None and ids else None
    return llm_ND, sae_NF


def _sae_pooled(resid_BTD: torch.Tensor, keep_BT: torch.Tensor,
                sae_encode: Callable[[torch.Tensor], torch.Tensor], chunk_rows: int) -> torch.Tensor:
    """Mean over kept tokens of SAE latents: only kept tokens are encoded, chunk_rows at a time."""
    B = resid_BTD.shape[0]
    row_N = torch.arange(B, device=keep_BT.device)[:, None].expand_as(keep_BT)[keep_BT]  # (N,)
    x_ND = resid_BTD[keep_BT]                                                          # (N, D)
    total_BF = None
    for s in range(0, x_ND.shape[0], max(chunk_rows, 1)):
        f_NF = sae_encode(x_ND[s:s + chunk_rows]).float()
        if total_BF is None:
            total_BF = torch.zeros(B, f_NF.shape[1], dtype=torch.float32, device=f_NF.device)
        total_BF.index_add_(0, row_N[s:s + chunk_rows].to(f_NF.device), f_NF)
    if total_BF is None:  # no kept token in the whole batch
        f0 = sae_encode(resid_BTD[:, 0])
        return torch.zeros(B, f0.shape[1])
    counts_B = keep_BT.sum(dim=1).clamp(min=1).to(total_BF)
    return (total_BF / counts_B[:, None]).cpu()


# ----------------------------------------------------------------------------------------------
# probes


def draw_task(sizes: dict[str, int], cls: str,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAEBench's one-vs-rest task (prepare_probe_data) as row picks: all n rows of `cls` (label 1)
    and n rows drawn evenly from the other classes (label 0), shuffled. `sizes` is {class: rows}.
    Returns (class index (2n,), row index (2n,), label (2n,)), class index into list(sizes)."""
    names = list(sizes)
    n = sizes[cls]
    others = [c for c in names if c != cls]
    if not others:
        raise MsaeError(f"class {cls!r} has no other class to probe against")
    per_class = math.ceil(n / len(others))
    neg_c, neg_r = [], []
    for c in others:
        rows = torch.randperm(sizes[c], generator=gen)[:per_class]
        neg_c.append(torch.full_like(rows, names.index(c)))
        neg_r.append(rows)
    pick = torch.randperm(sum(len(r) for r in neg_r), generator=gen)[:n]
    if len(pick) != n:
        raise MsaeError(f"class {cls!r}: only {len(pick)} texts in the other classes to pair with its {n}")
    cls_N = torch.cat([torch.full((n,), names.index(cls)), torch.cat(neg_c)[pick]])
    row_N = torch.cat([torch.arange(n), torch.cat(neg_r)[pick]])
    y_N = torch.cat([torch.full((n,), POSITIVE), torch.full((n,), NEGATIVE)]).long()
    perm = torch.randperm(2 * n, generator=gen)
    return cls_N[perm], row_N[perm], y_N[perm]


def gather_task(acts_by_class: dict[str, torch.Tensor], cls_N: torch.Tensor,
                row_N: torch.Tensor) -> torch.Tensor:
    """The activation rows a task picked -> (2n, D)."""
    names = list(acts_by_class)
    return torch.stack([acts_by_class[names[c]][r] for c, r in zip(cls_N.tolist(), row_N.tolist())])


def binary_task(acts_by_class: dict[str, torch.Tensor], cls: str,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One-vs-rest task on activations: (X (2n, D), y (2n,) int64), see draw_task."""
    cls_N, row_N, y_N = draw_task({c: len(v) for c, v in acts_by_class.items()}, cls, gen)
    return gather_task(acts_by_class, cls_N, row_N), y_N


def top_k_mean_diff(X_ND: torch.Tensor, y_N: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k columns with the largest |mean(positive) - mean(negative)|, largest first."""
    diff_D = (X_ND[y_N == POSITIVE].mean(dim=0) - X_ND[y_N == NEGATIVE].mean(dim=0)).abs()
    return torch.argsort(diff_D, descending=True, stable=True)[:k]


def sklearn_probe_correct(X_train: torch.Tensor, y_train: torch.Tensor, X_test: torch.Tensor,
                          y_test: torch.Tensor) -> np.ndarray:
    """Per test example, whether scikit-learn's L2 logistic regression (C=1, max_iter=1000, as
    SAEBench) classifies it right (bool array; its mean is the test accuracy)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    probe = LogisticRegression(C=1.0, max_iter=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(X_train.float().numpy(), y_train.numpy())
    return probe.predict(X_test.float().numpy()) == y_test.numpy()


def saebench_probe_correct(X_train: torch.Tensor, y_train: torch.Tensor, X_test: torch.Tensor,
                           y_test: torch.Tensor, gen: torch.Generator, epochs: int = 100,
                           lr: float = 1e-2, batch_size: int = 250, patience: int = 10) -> np.ndarray:
    """SAEBench's full-width probe (train_probe_gpu): a linear layer with BCE, AdamW, early stopping
    on test accuracy. Per test example, whether the probe at its best epoch (by test accuracy, as
    SAEBench picks it) classifies it right (bool array; its mean is the best test accuracy)."""
    X_train, X_test = X_train.float(), X_test.float()
    D = X_train.shape[1]
    bound = 1.0 / math.sqrt(D)  # nn.Linear's default initialisation, from our generator
    w = ((torch.rand(D, generator=gen) * 2 - 1) * bound).requires_grad_()
    b = ((torch.rand(1, generator=gen) * 2 - 1) * bound).requires_grad_()
    opt = torch.optim.AdamW([w, b], lr=lr)
    yf = y_train.float()
    best, waited = 0.0, 0
    best_correct = np.zeros(len(X_test), dtype=bool)
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(len(X_train), generator=gen)
            for s in range(0, len(perm), batch_size):
                idx = perm[s:s + batch_size]
                loss = torch.nn.functional.binary_cross_entropy_with_logits(X_train[idx] @ w + b, yf[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                correct = (((X_test @ w + b) > 0).long() == y_test).numpy()
            acc = float(correct.mean())
            if acc > best:
                best, waited, best_correct = acc, 0, correct
            else:
                waited += 1
                if waited >= patience:
                    break
    return best_correct


def probe_suite(train_by_class: dict[str, torch.Tensor], test_by_class: dict[str, torch.Tensor],
                k_values: list[int], prefix: str, seed: int, full_probe: str | None = "saebench",
                tasks: dict | None = None, progress: bool = False, correct: dict | None = None,
                ) -> tuple[dict[str, dict[str, float]], dict[str, list[int]]]:
    """Per-class accuracies {metric: {class: acc}} of the full probe and the top-k probes, and the
    chosen columns of the largest k per class. `tasks` maps a class to the (train, test) index
    draws to share between calls (filled on first use). full_probe None skips the full probe.
    `correct`, when given, is filled with {metric: {class: per-test-example bool array}}."""
    out: dict[str, dict[str, float]] = {}
    top: dict[str, list[int]] = {}
    kmax = max(k_values)
    for ci, cls in enumerate(tqdm(list(train_by_class), desc=f"{prefix} probes", unit="class",
                                  disable=None if progress else True)):
        Xtr, ytr, Xte, yte = _task(train_by_class, test_by_class, cls, seed, ci, tasks)
        hits = {}
        if full_probe is not None:
            if full_probe == "sklearn":
                hits[f"{prefix}_test_accuracy"] = sklearn_probe_correct(Xtr, ytr, Xte, yte)
            else:
                hits[f"{prefix}_test_accuracy"] = saebench_probe_correct(
                    Xtr, ytr, Xte, yte, torch.Generator().manual_seed(seed + ci))
        order = top_k_mean_diff(Xtr, ytr, kmax)
        top[cls] = order.tolist()
        for k in k_values:
            cols = order[:k]
            hits[f"{prefix}_top_{k}_test_accuracy"] = sklearn_probe_correct(Xtr[:, cols], ytr, Xte[:, cols], yte)
        for metric, h in hits.items():
            out.setdefault(metric, {})[cls] = float(h.mean())
            if correct is not None:
                correct.setdefault(metric, {})[cls] = h
    return out, top


def _task(train_by_class, test_by_class, cls, seed, ci, tasks):
    """The class's binary train and test tasks, drawn once per class and kept in `tasks`, so that
    LM and SAE activations of the same texts form the same tasks."""
    if tasks is not None and cls in tasks:
        tr, te = tasks[cls]
    else:
        gen = torch.Generator().manual_seed(seed * 1000 + ci)
        tr = draw_task({c: len(v) for c, v in train_by_class.items()}, cls, gen)
        te = draw_task({c: len(v) for c, v in test_by_class.items()}, cls, gen)
        if tasks is not None:
            tasks[cls] = (tr, te)
    return (gather_task(train_by_class, tr[0], tr[1]), tr[2],
            gather_task(test_by_class, te[0], te[1]), te[2])


def _mean(d: dict[str, float]) -> float:
    return sum(d.values()) / len(d)


# ----------------------------------------------------------------------------------------------
# the eval


def _split_by_class(acts_ND: torch.Tensor, labels: list[str], classes) -> dict[str, torch.Tensor]:
    return {c: acts_ND[[i for i, lab in enumerate(labels) if lab == c]] for c in classes}


def evaluate_dataset(ctx: Any, cfg: Config, name: str, correct: dict | None = None
                     ) -> tuple[dict[str, float], dict, dict, dict]:
    """One dataset: (averages, per-class accuracies, SAE top latents per class, provenance);
    `correct` is filled as probe_suite fills it."""
    ds = probe_data.load_probe_dataset(name, cfg.probe_train_set_size, cfg.probe_test_set_size,
                                       cfg.random_seed)
    acts = {}
    for split, rows in (("train", ds.train), ("test", ds.test)):
        texts = [t for t, _ in rows]
        labels = [lab for _, lab in rows]
        llm_ND, sae_NF = pooled_activations(
            ctx.lm, ctx.layer, texts, cfg.context_length, cfg.llm_batch_size, ctx.sae_encode_saebench,
            cfg.sae_batch_size, ctx.progress, desc=f"{name} {split}")
        acts[split] = (_split_by_class(llm_ND, labels, ds.classes), _split_by_class(sae_NF, labels, ds.classes))
    tasks: dict = {}
    k_values = [int(k) for k in cfg.k_values]
    llm_res, _ = probe_suite(acts["train"][0], acts["test"][0], k_values, "llm", cfg.random_seed,
                             cfg.full_probe, tasks, ctx.progress, correct)
    sae_full = None if cfg.lower_vram_usage else cfg.full_probe
    sae_res, sae_top = probe_suite(acts["train"][1], acts["test"][1], k_values, "sae", cfg.random_seed,
                                   sae_full, tasks, ctx.progress, correct)
    per_class = {**llm_res, **sae_res}
    averages = {m: _mean(v) for m, v in per_class.items()}
    if cfg.lower_vram_usage:
        averages["sae_test_accuracy"] = None
    return averages, per_class, sae_top, ds.provenance


CI_METRICS = ("llm_test_accuracy", "sae_test_accuracy", "sae_top_1_test_accuracy")


def accuracy_intervals(correct: dict[str, dict[str, dict]], metrics: tuple[str, ...], cfg: Config) -> dict:
    """Confidence intervals of the averaged accuracies: a bootstrap over each dataset's classes and
    their test texts, datasets kept (evals.stats.stratified_bootstrap_ci). correct[dataset][metric]
    [class]: per-test-text bool arrays. A full probe picked at its best test epoch (SAEBench's
    way) makes its interval optimistic, as its accuracy is."""
    from msae_core.evals.stats import stratified_bootstrap_ci

    out: dict[str, Any] = {"confidence": cfg.confidence, "n_bootstrap": cfg.n_bootstrap}
    for metric in metrics:
        strata = [list(per[metric].values()) for per in correct.values() if per.get(metric)]
        lo = hi = None
        if strata and len(strata) == len(correct):
            lo, hi = stratified_bootstrap_ci(strata, n_boot=cfg.n_bootstrap, conf=cfg.confidence,
                                             seed=cfg.random_seed)
        out[f"{metric}_ci_low"], out[f"{metric}_ci_high"] = lo, hi
    return out


def run(ctx: Any, cfg: Config) -> dict:
    """Sparse probing on the run in `ctx`; SAEBench's result layout (see the module docstring)."""
    from msae_core.configutil import validate

    validate(cfg)
    if cfg.model_name and cfg.model_name != ctx.model_name:
        raise MsaeError(f"model_name {cfg.model_name!r} is not the run's model {ctx.model_name!r}; "
                        "leave it empty")
    known = set(probe_data.OFFLINE) | set(probe_data.SAEBENCH)
    unknown = [n for n in cfg.dataset_names if n not in known]
    if unknown:
        raise MsaeError(f"unknown probing dataset(s) {', '.join(unknown)}; offline: "
                        f"{', '.join(probe_data.OFFLINE)}; SAEBench's: {', '.join(probe_data.SAEBENCH)}")
    t0 = time.time()
    lm = ctx.lm
    # SAEBench records the model and its dtype in the config; ours are the run's
    cfg = dataclasses.replace(cfg, model_name=ctx.model_name, llm_dtype=str(lm.dtype).replace("torch.", ""),
                              k_values=[int(k) for k in cfg.k_values])
    results: dict[str, dict] = {}
    unstructured: dict[str, Any] = {}
    top_latents: dict[str, dict] = {}
    provenance: dict[str, dict] = {}
    correct: dict[str, dict] = {}
    for name in cfg.dataset_names:
        log.info("sparse probing: %s", name)
        correct[name] = {}
        averages, per_class, top, prov = evaluate_dataset(ctx, cfg, name, correct[name])
        results[name] = averages
        unstructured[f"{name}_results"] = per_class
        top_latents[name] = top
        provenance[name] = prov
    keys = list(next(iter(results.values())))
    overall = {}
    for key in keys:
        vals = [r[key] for r in results.values() if r.get(key) is not None]
        overall[key] = sum(vals) / len(vals) if vals else None
    order = ["test_accuracy"] + [f"top_{k}_test_accuracy" for k in cfg.k_values]
    metrics = {"llm": {f"llm_{s}": overall.get(f"llm_{s}") for s in order},
               "sae": {f"sae_{s}": overall.get(f"sae_{s}") for s in order},
               "uncertainty": accuracy_intervals(correct, CI_METRICS, cfg)}
    details = [{"dataset_name": f"{name}_results",
                **{f"{p}_{s}": r.get(f"{p}_{s}") for p in ("llm", "sae") for s in order}}
               for name, r in results.items()]
    unstructured["msae_sae_top_latents"] = top_latents
    unstructured["msae_dataset_provenance"] = provenance
    unstructured["msae_wall_time_s"] = round(time.time() - t0, 2)
    return make_result(ctx, EVAL_TYPE_ID, cfg, metrics, details, unstructured)
