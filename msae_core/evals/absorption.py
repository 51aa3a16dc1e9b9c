"""SAEBench's feature-absorption eval on the first-letter task (`absorption_first_letter`).

Follows sae_bench/evals/absorption (sae-bench 0.6.0: main.py, eval_config.py, vocab.py, prompting.py,
probing.py, k_sparse_probing.py, feature_absorption.py, feature_absorption_calculator.py):

One module of about 750 lines on purpose: it is one definition, read against SAEBench's eight
files step by step (the numbered steps below are its sections, in order), and splitting it would
scatter the comparison a reviewer makes; the probe training it shares with sparse probing lives in
probe_data.py.

1. Words: the model's own vocabulary, tokens whose text is ASCII letters with at most one leading
   space (`get_alpha_tokens`; a SentencePiece "▁" counts as that space).
2. Prompts: `{word} has the first letter:` after `max_icl_examples` (10) in-context examples
   `{example} has the first letter: E`, each line led by a newline, BOS first. The activation read
   is the layer's resid_post at the word token, `prompt_token_pos` (-6) from the prompt's end.
3. A 26-way one-vs-rest logistic-regression probe on the LM activations of 80% of the words
   (Adam 1e-2 -> 1e-5 over 50 epochs, batch 64, weight decay 1e-4, positive-class weights), tested
   on the other 20%; a letter counts when its probe's test F1 (logit > 0) exceeds `min_GT_probe_f1`,
   and the eval needs `min_feats_for_eval` such letters.
4. k-sparse probing on SAE latents: an L1-penalised multi-probe on the latents picks, per letter, the
   k latents with the largest (signed) weights; for k = 1..`max_k_value` a balanced scikit-learn
   logistic regression on those k latents is fitted and its test F1 taken. The main (split) latents
   of a letter are those of the last k whose F1 rose by more than `f1_jump_threshold` over the best
   before it, counting from k = 1 (`add_feature_splits_to_metrics_df`).
5. Absorption, per letter, over the test words of that letter that the probe gets right (probe true
   positives), each in a fresh prompt whose examples come from the whole word list: with p the unit
   probe direction, the word's probe projection x.p and each latent's projection a_i (d_i.p):
   - absorption fraction: 0 when the main latents' projection reaches x.p or the (at most 3) latents
     with cosine >= 0.1 to p that project positively give less than 0.4 of x.p; 1 when the main
     latents' projection is <= 0; otherwise min(absorbers, x.p - main) / (that + main).
   - full absorption: no main latent fires, the top projecting latent has cosine >= 0.025 to p and
     gives at least 0.4 of x.p (>= 0).
   Per letter: mean absorption fraction and full-absorption rate over the probe true positives,
   number of split features = number of main latents; the scores are their means (and sample
   standard deviations) over the letters whose probe passed.

Where we differ, and why:
- Words are a seeded sample of `max_words` of the filtered vocabulary (SAEBench uses all of it:
  Gemma 3 has ~140k such tokens, far beyond a CPU budget); duplicate texts (byte-fallback tokens
  such as <0x61> decode to "a") are kept once; a word whose prompt does not tokenize with the word
  as one token at `prompt_token_pos` is left out (SAEBench would misread its position).
- `queries_per_prompt` words share one prompt: the first word's line follows the 10 examples, every
  next word's line follows the previous ones (answers shown), so word j sees 10 + j examples. The LM
  is causal, so the activation at a word is exactly that of a SAEBench prompt with those examples,
  for about a seventh of the tokens (16 words a prompt). `queries_per_prompt=1` gives SAEBench's
  one-word prompts.
- Latent activations are read in SAEBench's units. SAEBench folds decoder norms into the activations
  (SAELens's `fold_W_dec_norm`) and then takes a latent's probe projection as a_i cos_i. Our SAEs
  scale their inputs internally, so their decoder rows are not unit-norm in input units: we take
  each latent's decoder direction in input units, d_i = `sae.decode(e_i) - sae.decode(0)`, and use
  a_i |d_i| as its activation everywhere (k-sparse probes too, whose regularisation is not scale
  free), so a_i |d_i| cos_i = a_i (d_i.p) is its contribution to the reconstruction along p.
- Probes, LM and SAE run in float32 on the run's device with the run's language model (loaded by
  the eval context: any Hugging Face model, the embedded Gemma 3 270M offline); SAEBench loads the
  model through TransformerLens. A letter with no training example gets a positive-class weight of
  1 (SAEBench would divide by zero), and with too few passing letters we raise a one-line error
  (SAEBench prints a warning and writes no result).
- `eval_result_unstructured` holds our diagnostics (per-letter probe F1 and main latents, word
  counts, each test word's absorption fraction and full absorption), one entry per seed under
  "seeds"; SAEBench leaves it empty.
- Uncertainty (ours; sae-bench's absorption eval never applies its `random_seed`): `seeds` repeats
  the whole eval with seeds random_seed, random_seed + 1, ..., the scores are the seeds' mean, and
  the `uncertainty` metric group holds their 95 % interval (evals.stats.score_interval: a bootstrap
  over letters and their words for one seed, a t interval over the seeds for more) and the seeds'
  standard deviation.

Why one file of ~680 lines: it is one definition spread over eight SAEBench modules, and the steps
above map onto the code top to bottom (words, prompts, activations, the letter probe, k-sparse
probing and split latents, per-word absorption, `evaluate` over the letters, `run`). The probes
here follow SAEBench's absorption probing (Adam, its schedule, the L1-penalised multi-probe), not
the sparse-probing eval's scikit-learn probes, so nothing here is shared with another eval.
"""

from __future__ import annotations

import logging
import math
import random
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch
from torch import nn

from msae_core.errors import MsaeError

log = logging.getLogger(__name__)

EVAL_TYPE_ID = "absorption_first_letter"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
_ALPHA = frozenset(LETTERS + LETTERS.upper())

# SAEBench's feature_absorption.py / feature_absorption_calculator.py constants
FULL_ABSORPTION_PROBE_COS_THRESHOLD = 0.025
ABSORPTION_FRACTION_PROBE_COS_THRESHOLD = 0.1
ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD = 0.4
ABSORPTION_FRACTION_MAX_ABSORBING_LATENTS = 3
EPS = 1e-8  # a main latent "fires" when its activation is at least this
# SAEBench's LM probe training (common.train_and_save_probes, probing.train_linear_probe_for_task)
PROBE_BATCH_SIZE = 64
PROBE_NUM_EPOCHS = 50
PROBE_LR = 1e-2
PROBE_END_LR = 1e-5
PROBE_WEIGHT_DECAY = 1e-4
TRAIN_FRACTION = 0.8
K_SPARSE_L2_DECAY = 1e-6


@dataclass
class Config:
    """SAEBench's AbsorptionEvalConfig fields (same names and meaning) plus three of ours."""

    model_name: str = field(default="", metadata={
        "help": "model name (filled in with the run's model)"})
    random_seed: int = field(default=42, metadata={"help": "seed of the word sample, splits, prompts and probes"})
    f1_jump_threshold: float = field(default=0.03, metadata={
        "help": "a k-sparse probe whose F1 beats the best smaller k by more than this adds a split feature"})
    max_k_value: int = field(default=10, metadata={"help": "largest k of the k-sparse probes"})
    prompt_template: str = field(default="{word} has the first letter:", metadata={
        "help": "prompt template; {word} is the word"})
    prompt_token_pos: int = field(default=-6, metadata={
        "help": "position of the word token counted from the prompt's end (-6 for the default template "
                "on Gemma and GPT-2 style tokenizers)"})
    llm_batch_size: int = field(default=8, metadata={"help": "prompts per language-model forward"})
    k_sparse_probe_l1_decay: float = field(default=0.01, metadata={
        "help": "L1 coefficient of the multi-probe on SAE latents that picks the k-sparse latents"})
    k_sparse_probe_batch_size: int = field(default=4096, metadata={
        "help": "batch size of that multi-probe's training"})
    k_sparse_probe_num_epochs: int = field(default=50, metadata={"help": "epochs of that multi-probe's training"})
    min_GT_probe_f1: float = field(default=0.6, metadata={
        "help": "a letter is evaluated when its LM probe's test F1 exceeds this"})
    min_feats_for_eval: int = field(default=20, metadata={
        "help": "letters whose probe passes that are needed to evaluate absorption"})
    eval_k_sparse_probe_batch_size: int = field(default=24, metadata={
        "help": "words per SAE encode when scoring the test words"})
    precalc_k_sparse_probe_sae_acts: bool = field(default=True, metadata={
        "help": "encode all training words once before the k-sparse multi-probe (else per batch)"})
    # ours
    max_words: int = field(default=5000, metadata={
        "help": "words sampled from the filtered vocabulary (SAEBench: all of them; 0 = all)"})
    queries_per_prompt: int = field(default=16, metadata={
        "help": "words read from one prompt, each after the previous ones' lines (1 = SAEBench's prompts)"})
    max_icl_examples: int = field(default=10, metadata={"help": "in-context examples before the first word"})
    seeds: int = field(default=1, metadata={
        "help": "independent repeats, seeds random_seed, random_seed + 1, ... (each its own word sample, "
                "split, prompts and probes); the scores are their mean"})
    n_bootstrap: int = field(default=2000, metadata={"help": "bootstrap replicates of the confidence interval"})
    confidence: float = field(default=0.95, metadata={"help": "level of the confidence interval"})

    def problems(self) -> list[str]:
        out = []
        if "{word}" not in self.prompt_template:
            out.append("prompt_template must contain {word}")
        if self.prompt_token_pos >= 0:
            out.append(f"prompt_token_pos must be negative (got {self.prompt_token_pos})")
        for name in ("max_k_value", "llm_batch_size", "k_sparse_probe_batch_size", "k_sparse_probe_num_epochs",
                     "min_feats_for_eval", "eval_k_sparse_probe_batch_size", "queries_per_prompt", "seeds",
                     "n_bootstrap"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.max_words < 0 or 0 < self.max_words < 10:
            out.append(f"max_words must be 0 (all) or >= 10 (got {self.max_words})")
        if self.max_icl_examples < 0:
            out.append(f"max_icl_examples must be >= 0 (got {self.max_icl_examples})")
        if not 0 < self.confidence < 1:
            out.append(f"confidence must be in (0, 1) (got {self.confidence})")
        return out


# ----------------------------------------------------------------------------------------------
# vocabulary (SAEBench vocab.py)


def is_alpha_word(word: str, allow_leading_space: bool = True) -> bool:
    """ASCII letters only, after at most one leading space (SAEBench's `get_alpha_tokens` filter)."""
    if allow_leading_space and word.startswith(" "):
        word = word[1:]
    return len(word) > 0 and all(c in _ALPHA for c in word)


def token_text(token: str, tokenizer) -> str:
    """A vocabulary entry's text; a SentencePiece '▁' start is a leading space even where the
    tokenizer drops it (SAEBench's `convert_tokens_to_string`)."""
    text = tokenizer.convert_tokens_to_string([token])
    if token.startswith("▁") and (not text or text[0] != " "):
        text = " " + text
    return text


def alpha_vocab(tokenizer) -> dict[str, int]:
    """word -> token id for every vocabulary token passing `is_alpha_word` (lowest id of equal texts)."""
    out: dict[str, int] = {}
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token, tid in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        if token in special:
            continue
        word = token_text(token, tokenizer)
        if is_alpha_word(word) and word not in out:
            out[word] = int(tid)
    return out


def first_letter_class(word: str) -> int:
    """0..25: the word's first letter (SAEBench's answer class)."""
    chars = [c for c in word.strip() if c.isalpha()]
    return LETTERS.index(chars[0].lower())


def answer_text(word: str) -> str:
    """' C' for 'cat' (SAEBench's `first_letter_formatter()`)."""
    return " " + [c for c in word.strip() if c.isalpha()][0].upper()


# ----------------------------------------------------------------------------------------------
# prompts


@dataclass
class _Lines:
    """Token ids of each word's prompt line and of the answers, tokenized once."""

    tokenizer: object
    template: str
    line: dict[str, list[int]] = field(default_factory=dict)
    answer: dict[str, list[int]] = field(default_factory=dict)

    def line_ids(self, word: str) -> list[int]:
        if word not in self.line:
            self.line[word] = _encode(self.tokenizer, "\n" + self.template.format(word=word))
        return self.line[word]

    def answer_ids(self, word: str) -> list[int]:
        a = answer_text(word)
        if a not in self.answer:
            self.answer[a] = _encode(self.tokenizer, a)
        return self.answer[a]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def word_token_pos(tokenizer, template: str, word: str, token_id: int) -> int | None:
    """Where token `token_id` (the word's) first sits in the word's prompt line, counted from the
    line's end: the `prompt_token_pos` for this tokenizer and template (None: not in the line)."""
    ids = _encode(tokenizer, "\n" + template.format(word=word))
    return ids.index(token_id) - len(ids) if token_id in ids else None


def usable_words(words: dict[str, int], lines: _Lines, pos: int) -> list[str]:
    """Words whose prompt line has the word's own token at `pos` from its end."""
    out = []
    for w, tid in words.items():
        ids = lines.line_ids(w)
        if len(ids) >= -pos and ids[pos] == tid:
            out.append(w)
    return out


@dataclass
class Prompt:
    ids: list[int]         # BOS, examples, queries (one token sequence)
    positions: list[int]   # index of each query word's token in `ids`
    words: list[str]       # the query words, in order


def build_prompts(queries: Sequence[str], examples: Sequence[str], lines: _Lines, *, bos: int | None,
                  pos: int, max_icl_examples: int, queries_per_prompt: int, rng: random.Random) -> list[Prompt]:
    """SAEBench's ICL prompts, `queries_per_prompt` query words each (see the module docstring).

    The examples of a prompt are drawn from `examples` without the prompt's own query words."""
    out = []
    for start in range(0, len(queries), queries_per_prompt):
        chunk = list(queries[start:start + queries_per_prompt])
        exclude = set(chunk)
        pool = [w for w in examples if w not in exclude]
        n_ex = min(max_icl_examples, len(pool))
        ex = rng.sample(pool, n_ex)
        ids = [] if bos is None else [bos]
        for w in ex:
            ids += lines.line_ids(w) + lines.answer_ids(w)
        positions = []
        for j, w in enumerate(chunk):
            line = lines.line_ids(w)
            positions.append(len(ids) + len(line) + pos)
            ids += line
            if j < len(chunk) - 1:
                ids += lines.answer_ids(w)
        out.append(Prompt(ids, positions, chunk))
    return out


@torch.no_grad()
def collect_acts(lm, layer: int, prompts: Sequence[Prompt], batch_size: int, *, progress: bool = True,
                 desc: str = "absorption: LM") -> torch.Tensor:
    """resid_post of block `layer` at every query position, (n_queries, D) float32 on CPU, in the
    order of the prompts' words. Prompts are right-padded (causal: padding never reaches them)."""
    from tqdm.auto import tqdm

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].ids))
    pad = getattr(lm.tokenizer, "pad_token_id", None)
    pad = 0 if pad is None else int(pad)
    per_prompt: dict[int, torch.Tensor] = {}
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for b in tqdm(batches, desc=desc, disable=None if progress else True, leave=False):
        T = max(len(prompts[i].ids) for i in b)
        ids_BT = torch.full((len(b), T), pad, dtype=torch.long)
        mask_BT = torch.zeros((len(b), T), dtype=torch.long)
        for r, i in enumerate(b):
            ids_BT[r, :len(prompts[i].ids)] = torch.tensor(prompts[i].ids)
            mask_BT[r, :len(prompts[i].ids)] = 1
        h_BTD = lm.resid_post(ids_BT, layer, stop_early=True, attention_mask=mask_BT)
        for r, i in enumerate(b):
            per_prompt[i] = h_BTD[r, prompts[i].positions].float().cpu()
    if not prompts:
        return torch.zeros(0, lm.d_model)
    return torch.cat([per_prompt[i] for i in range(len(prompts))])


# ----------------------------------------------------------------------------------------------
# probes (SAEBench probing.py / k_sparse_probing.py), pure torch + scikit-learn


@dataclass
class LinearProbes:
    """P one-vs-rest logistic-regression probes: logits = x @ W.T + b."""

    W: torch.Tensor  # (P, D)
    b: torch.Tensor  # (P,)

    def __call__(self, x_ND: torch.Tensor) -> torch.Tensor:
        return x_ND.float() @ self.W.T + self.b


def train_multi_probe(x_ND: torch.Tensor, y_NP: torch.Tensor, *, batch_size: int, num_epochs: int,
                      lr: float, end_lr: float, weight_decay: float, l1_decay: float = 0.0, seed: int = 0,
                      map_acts: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      probe_dim: int | None = None) -> LinearProbes:
    """SAEBench's `train_multi_probe`: BCE with positive-class weights (negatives / positives per
    probe), Adam with exponential decay from `lr` to `end_lr` over the epochs, shuffled batches,
    plus `l1_decay` * mean over probes of the L1 norm of their weights (the k-sparse selection)."""
    g = torch.Generator().manual_seed(seed)
    y_NP = y_NP.float()
    P = y_NP.shape[1]
    D = probe_dim or x_ND.shape[1]
    fc = nn.Linear(D, P)
    with torch.no_grad():  # nn.Linear's init, from our generator
        bound = 1.0 / math.sqrt(D)
        fc.weight.uniform_(-bound, bound, generator=g)
        fc.bias.uniform_(-bound, bound, generator=g)
    n_pos = y_NP.sum(0)
    pos_weight = torch.where(n_pos > 0, (len(y_NP) - n_pos) / n_pos.clamp_min(1), torch.ones_like(n_pos))
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    opt = torch.optim.Adam(fc.parameters(), lr=lr, weight_decay=weight_decay)
    gamma = math.exp(math.log(end_lr / lr) / num_epochs)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma)
    N = len(x_ND)
    # small probes: one thread (many tiny ops, which extra threads only slow down on a busy CPU)
    threads = torch.get_num_threads()
    if min(batch_size, N) * D * P < 10_000_000:
        torch.set_num_threads(1)
    try:
        _train_loop(fc, opt, sched, loss_fn, x_ND, y_NP, batch_size, num_epochs, l1_decay, map_acts, g)
    finally:
        torch.set_num_threads(threads)
    return LinearProbes(fc.weight.detach().clone(), fc.bias.detach().clone())


def _train_loop(fc, opt, sched, loss_fn, x_ND, y_NP, batch_size, num_epochs, l1_decay, map_acts, g) -> None:
    N = len(x_ND)
    with torch.enable_grad():
        for _ in range(num_epochs):
            perm = torch.randperm(N, generator=g)
            for s in range(0, N, batch_size):
                idx = perm[s:s + batch_size]
                xb = x_ND[idx]
                if map_acts is not None:
                    xb = map_acts(xb)
                opt.zero_grad()
                loss = loss_fn(fc(xb.float()), y_NP[idx])
                if l1_decay:
                    loss = loss + l1_decay * fc.weight.abs().sum(-1).mean()
                loss.backward()
                opt.step()
            sched.step()


def train_letter_probe(x_ND: torch.Tensor, labels_N: torch.Tensor, seed: int = 0) -> LinearProbes:
    """The 26-letter ground-truth probe on LM activations, with SAEBench's settings."""
    y = torch.nn.functional.one_hot(labels_N.long(), num_classes=len(LETTERS))
    return train_multi_probe(x_ND, y, batch_size=PROBE_BATCH_SIZE, num_epochs=PROBE_NUM_EPOCHS, lr=PROBE_LR,
                             end_lr=PROBE_END_LR, weight_decay=PROBE_WEIGHT_DECAY, seed=seed)


@dataclass
class KSparseProbe:
    feature_ids: torch.Tensor  # (k,) latent ids
    weight: torch.Tensor       # (k,)
    bias: float

    def __call__(self, f_NF: torch.Tensor) -> torch.Tensor:
        return f_NF[:, self.feature_ids].float() @ self.weight + self.bias


def train_k_sparse_probes(f_NF: torch.Tensor, labels_N: torch.Tensor, ks: Sequence[int], *, l1_decay: float,
                          batch_size: int, num_epochs: int, seed: int = 0,
                          map_acts: Callable[[torch.Tensor], torch.Tensor] | None = None,
                          d_sae: int | None = None) -> dict[int, dict[int, KSparseProbe]]:
    """SAEBench's `train_k_sparse_probes`: an L1 multi-probe on the latents ranks them per letter
    (largest weight first, not |weight|); for each k a balanced logistic regression on the top k.

    `f_NF` are the latents (or, with `map_acts`, LM activations that map to them per batch).
    Returns {k: {letter: probe}} for letters with examples of both classes."""
    from sklearn.linear_model import LogisticRegression

    F = d_sae or f_NF.shape[1]
    y = torch.nn.functional.one_hot(labels_N.long(), num_classes=len(LETTERS))
    l1 = train_multi_probe(f_NF, y, batch_size=batch_size, num_epochs=num_epochs, lr=0.01, end_lr=1e-5,
                           weight_decay=K_SPARSE_L2_DECAY, l1_decay=l1_decay, seed=seed, map_acts=map_acts,
                           probe_dim=F)
    if map_acts is not None:
        with torch.no_grad():
            f_NF = torch.cat([map_acts(f_NF[s:s + batch_size]) for s in range(0, len(f_NF), batch_size)])
    labels = labels_N.long().numpy()
    present = [int(c) for c in sorted(set(labels.tolist())) if 0 < (labels == c).sum() < len(labels)]
    out: dict[int, dict[int, KSparseProbe]] = {}
    for k in ks:
        k = min(int(k), F)
        out[k] = {}
        for c in present:
            ids = l1.W[c].topk(k).indices
            x = f_NF[:, ids].float().numpy()
            lr = LogisticRegression(max_iter=500, class_weight="balanced").fit(x, (labels == c).astype("int64"))
            out[k][c] = KSparseProbe(ids, torch.tensor(lr.coef_[0], dtype=torch.float32), float(lr.intercept_[0]))
    return out


def f1_score(y_true: torch.Tensor, y_pred: torch.Tensor) -> float:
    """Binary F1 (scikit-learn's, 0 when there is no positive in either)."""
    y_true, y_pred = y_true.bool(), y_pred.bool()
    tp = int((y_true & y_pred).sum())
    denom = 2 * tp + int((~y_true & y_pred).sum()) + int((y_true & ~y_pred).sum())
    return 2 * tp / denom if denom else 0.0


def split_features(f1_by_k: Sequence[float], feats_by_k: Sequence[Sequence[int]], threshold: float) -> list[int]:
    """SAEBench's `add_feature_splits_to_metrics_df`: walk k = 1, 2, ...; while a k's F1 beats the best
    so far by more than `threshold`, its latents become the letter's main latents; stop at the first
    k that does not."""
    best, feats = -100.0, []
    for f1, ids in zip(f1_by_k, feats_by_k):
        if f1 > best + threshold:
            best, feats = f1, [int(i) for i in ids]
        else:
            break
    return feats


# ----------------------------------------------------------------------------------------------
# absorption (SAEBench feature_absorption_calculator.py), pure torch


def decoder_directions(sae) -> torch.Tensor:
    """(F, D) each latent's contribution to the reconstruction per unit activation, input units
    (decode is f W_dec / s + b_dec / s: the rows of W_dec / s, msae_core.sae_io.folded_weights)."""
    from msae_core.sae_io import folded_weights

    return folded_weights(sae)["W_dec"].cpu()


@dataclass
class WordAbsorption:
    absorption_fraction: torch.Tensor   # (B,) in [0, 1]
    is_full_absorption: torch.Tensor    # (B,) bool
    probe_projection: torch.Tensor      # (B,) x . p
    main_projection: torch.Tensor       # (B,) summed projection of the main latents
    top_projection_feat: torch.Tensor   # (B,) latent with the largest projection


def word_absorption(x_BD: torch.Tensor, f_BF: torch.Tensor, dec_FD: torch.Tensor, probe_D: torch.Tensor,
                    main_ids: Sequence[int], *,
                    full_cos_threshold: float = FULL_ABSORPTION_PROBE_COS_THRESHOLD,
                    fraction_cos_threshold: float = ABSORPTION_FRACTION_PROBE_COS_THRESHOLD,
                    proportion_threshold: float = ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD,
                    max_absorbing: int = ABSORPTION_FRACTION_MAX_ABSORBING_LATENTS) -> WordAbsorption:
    """SAEBench's per-word absorption fraction and full absorption for one letter.

    x_BD: LM activations at the words; f_BF: the SAE's latents on them; dec_FD: decoder directions
    in input units (`decoder_directions`); probe_D: the letter's probe weights; main_ids: its main
    (split) latents."""
    x_BD, f_BF, dec_FD = x_BD.float(), f_BF.float(), dec_FD.float()
    p_D = probe_D.float() / probe_D.float().norm()
    dec_proj_F = dec_FD @ p_D                                   # per unit activation
    cos_F = dec_proj_F / dec_FD.norm(dim=1).clamp_min(1e-12)
    proj_BF = f_BF * dec_proj_F                                 # each latent's projection
    act_B = x_BD @ p_D
    main = torch.zeros(f_BF.shape[1], dtype=torch.bool)
    main[list(main_ids)] = True
    main_B = proj_BF[:, main].sum(1)

    # absorption fraction: up to `max_absorbing` aligned, positively projecting non-main latents
    cand_BF = (~main & (cos_F >= fraction_cos_threshold)).unsqueeze(0) & (proj_BF > 0)
    cand_proj = torch.where(cand_BF, proj_BF, torch.zeros_like(proj_BF))
    k = min(max_absorbing, f_BF.shape[1])
    absorbers_B = cand_proj.topk(k, dim=1).values.sum(1)
    safe_act = torch.where(act_B == 0, torch.ones_like(act_B), act_B)
    proportion_B = torch.where(act_B == 0, torch.zeros_like(act_B), absorbers_B / safe_act)
    partial = torch.minimum(absorbers_B, act_B - main_B)
    frac = (partial / (partial + main_B)).clamp(0.0, 1.0)
    frac = torch.where(main_B <= 0, torch.ones_like(frac), frac)
    frac = torch.where((main_B >= act_B) | (proportion_B < proportion_threshold), torch.zeros_like(frac), frac)

    # full absorption by the single top projecting latent
    top_val, top_idx = proj_BF.max(dim=1)
    none_fire = (f_BF[:, main] < EPS).all(1)
    top_prop = torch.where(act_B == 0, torch.zeros_like(act_B), top_val / safe_act)
    full = none_fire & (cos_F[top_idx] >= full_cos_threshold) & (act_B >= 0) & (top_prop >= proportion_threshold)
    return WordAbsorption(frac, full, act_B, main_B, top_idx)


# ----------------------------------------------------------------------------------------------
# the eval, from activations (testable without a language model)


@dataclass
class LetterResult:
    first_letter: str
    mean_absorption_fraction: float
    full_absorption_rate: float
    num_full_absorption: int
    num_probe_true_positives: int
    num_split_features: int


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(x[s:s + batch]).float().cpu() for s in range(0, len(x), batch)]) if len(x) else \
            fn(x[:1]).float().cpu()[:0]


def evaluate(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
             encode: Callable[[torch.Tensor], torch.Tensor], dec_FD: torch.Tensor, cfg: Config,
             reprompt: Callable[[list[int]], torch.Tensor] | None = None,
             progress: bool = True) -> tuple[dict, list[dict], dict]:
    """Probe, k-sparse probing, split features and absorption from LM activations.

    train_x/test_x (N, D) with letter classes train_y/test_y (N,); `encode` maps activations to SAE
    latents, `dec_FD` their decoder directions in input units; `reprompt(test indices)` gives those test words' activations in fresh prompts
    (SAEBench's absorption pass; None reuses test_x). Returns (metrics, details, unstructured)."""
    from tqdm.auto import tqdm

    d_sae = dec_FD.shape[0]
    # SAEBench's units: decoder rows of norm 1 in input units, the norm folded into the activations
    # (SAELens's fold_W_dec_norm, which SAEBench applies): probes on latents see the same numbers
    dec_norm_F = dec_FD.float().norm(dim=1).clamp_min(1e-12)
    dec_FD = dec_FD.float() / dec_norm_F[:, None]
    raw_encode = encode

    def encode(x: torch.Tensor) -> torch.Tensor:
        return raw_encode(x).float().cpu() * dec_norm_F

    probe = train_letter_probe(train_x, train_y, seed=cfg.random_seed)
    enc_batch = cfg.k_sparse_probe_batch_size
    if cfg.precalc_k_sparse_probe_sae_acts:
        train_f = _batched(encode, train_x, enc_batch)
        k_probes = train_k_sparse_probes(train_f, train_y, range(1, cfg.max_k_value + 1),
                                         l1_decay=cfg.k_sparse_probe_l1_decay, batch_size=enc_batch,
                                         num_epochs=cfg.k_sparse_probe_num_epochs, seed=cfg.random_seed)
    else:
        k_probes = train_k_sparse_probes(train_x, train_y, range(1, cfg.max_k_value + 1),
                                         l1_decay=cfg.k_sparse_probe_l1_decay, batch_size=enc_batch,
                                         num_epochs=cfg.k_sparse_probe_num_epochs, seed=cfg.random_seed,
                                         map_acts=lambda x: encode(x).float().cpu(), d_sae=d_sae)
    test_f = _batched(encode, test_x, cfg.eval_k_sparse_probe_batch_size)
    with torch.no_grad():
        test_logits = probe(test_x)

    probe_f1, main_feats, passing = {}, {}, []
    for c, letter in enumerate(LETTERS):
        y = test_y == c
        probe_f1[letter] = f1_score(y, test_logits[:, c] > 0)
        f1s, feats = [], []
        for k in sorted(k_probes):
            if c not in k_probes[k]:
                break
            kp = k_probes[k][c]
            f1s.append(f1_score(y, kp(test_f) > 0))
            feats.append(kp.feature_ids.tolist())
        main_feats[letter] = split_features(f1s, feats, cfg.f1_jump_threshold)
        if probe_f1[letter] > cfg.min_GT_probe_f1:
            passing.append(c)
    if len(passing) < cfg.min_feats_for_eval:
        raise MsaeError(f"absorption: only {len(passing)} letters have a first-letter probe with test F1 above "
                        f"{cfg.min_GT_probe_f1} (min_feats_for_eval={cfg.min_feats_for_eval}): the model does not "
                        f"spell well enough at this layer, or too few words (max_words={cfg.max_words})")

    details: list[dict] = []
    n_tp, per_word = {}, {}
    for c in tqdm(passing, desc="absorption: letters", disable=None if progress else True, leave=False):
        letter = LETTERS[c]
        tp_idx = torch.nonzero((test_y == c) & (test_logits[:, c] > 0)).flatten().tolist()
        n_tp[letter] = len(tp_idx)
        if not tp_idx:  # SAEBench has no row for such a letter
            continue
        x = reprompt(tp_idx) if reprompt is not None else test_x[tp_idx]
        f = _batched(encode, x, cfg.eval_k_sparse_probe_batch_size)
        res = word_absorption(x, f, dec_FD, probe.W[c], main_feats[letter])
        n_full = int(res.is_full_absorption.sum())
        per_word[letter] = {"test_index": tp_idx,
                            "absorption_fraction": [round(float(v), 6) for v in res.absorption_fraction],
                            "full_absorption": [int(v) for v in res.is_full_absorption]}
        details.append(LetterResult(
            first_letter=letter,
            mean_absorption_fraction=float(res.absorption_fraction.sum()) / len(tp_idx),
            full_absorption_rate=n_full / len(tp_idx),
            num_full_absorption=n_full,
            num_probe_true_positives=len(tp_idx),
            num_split_features=len(main_feats[letter])).__dict__)
    if not details:
        raise MsaeError("absorption: no letter has a probe true positive among the test words")

    def _mean_sd(key: str) -> tuple[float, float | None]:
        vals = [float(d[key]) for d in details]
        return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)

    af, af_sd = _mean_sd("mean_absorption_fraction")
    fa, fa_sd = _mean_sd("full_absorption_rate")
    ns, ns_sd = _mean_sd("num_split_features")
    metrics = {"mean": {"mean_absorption_fraction_score": af, "mean_full_absorption_score": fa,
                        "mean_num_split_features": ns, "std_dev_absorption_fraction_score": af_sd,
                        "std_dev_full_absorption_score": fa_sd, "std_dev_num_split_features": ns_sd}}
    unstructured = {"probe_f1": probe_f1, "main_latents": main_feats,
                    "letters_evaluated": [LETTERS[c] for c in passing],
                    "n_train_words": int(len(train_x)), "n_test_words": int(len(test_x)),
                    "num_probe_true_positives": n_tp, "per_word": per_word}
    return metrics, details, unstructured


# ----------------------------------------------------------------------------------------------
# the eval on a run


def _word_sample(tokenizer, cfg: Config, lines: _Lines, rng: random.Random) -> tuple[list[str], int, int]:
    vocab = alpha_vocab(tokenizer)
    n_vocab = len(vocab)
    words = sorted(vocab)
    if cfg.max_words and len(words) > cfg.max_words:
        words = rng.sample(words, cfg.max_words)
    else:
        rng.shuffle(words)
    usable = set(usable_words({w: vocab[w] for w in words}, lines, cfg.prompt_token_pos))
    if words and len(usable) < len(words) / 2:  # a template/tokenizer mismatch, not a few odd words
        w = words[0]
        found = word_token_pos(tokenizer, cfg.prompt_template, w, vocab[w])
        hint = f"; for {w!r} the word sits at {found}: set prompt_token_pos={found}" if found else ""
        raise MsaeError(f"absorption: only {len(usable)} of {len(words)} words have their token at "
                        f"prompt_token_pos={cfg.prompt_token_pos} of the template {cfg.prompt_template!r} with "
                        f"this tokenizer{hint}")
    kept = [w for w in words if w in usable]
    return kept, n_vocab, len(words) - len(kept)


def _one_seed(ctx, cfg: Config) -> tuple[dict, list[dict], dict]:
    """The eval with seed `cfg.random_seed`: its word sample, split, prompts and probes."""
    lm = ctx.lm
    tok = lm.tokenizer
    rng = random.Random(cfg.random_seed)
    lines = _Lines(tok, cfg.prompt_template)
    words, n_vocab, n_dropped = _word_sample(tok, cfg, lines, rng)
    if len(words) < 10:
        raise MsaeError(f"absorption: only {len(words)} usable alphabetic words in the tokenizer's vocabulary")
    # SAEBench's create_dataset_probe_training: a shuffled 80/20 split of the words
    n_train = int(len(words) * TRAIN_FRACTION)
    train_w, test_w = words[:n_train], words[n_train:]
    kw = dict(bos=lm.bos_token_id, pos=cfg.prompt_token_pos, max_icl_examples=cfg.max_icl_examples,
              queries_per_prompt=cfg.queries_per_prompt, rng=rng)
    log.info("absorption (seed %d): %d words (of %d alphabetic tokens), %d train / %d test", cfg.random_seed,
             len(words), n_vocab, len(train_w), len(test_w))
    train_x = collect_acts(lm, ctx.layer, build_prompts(train_w, train_w, lines, **kw), cfg.llm_batch_size,
                           progress=ctx.progress, desc="absorption: train words")
    test_x = collect_acts(lm, ctx.layer, build_prompts(test_w, test_w, lines, **kw), cfg.llm_batch_size,
                          progress=ctx.progress, desc="absorption: test words")
    train_y = torch.tensor([first_letter_class(w) for w in train_w])
    test_y = torch.tensor([first_letter_class(w) for w in test_w])

    def reprompt(idx: list[int]) -> torch.Tensor:
        # FeatureAbsorptionCalculator: fresh prompts, examples from the whole word list
        qs = [test_w[i] for i in idx]
        return collect_acts(lm, ctx.layer, build_prompts(qs, words, lines, **kw), cfg.llm_batch_size,
                            progress=False)

    metrics, details, unstructured = evaluate(train_x, train_y, test_x, test_y, ctx.sae_encode,
                                              decoder_directions(ctx.sae), cfg, reprompt=reprompt,
                                              progress=ctx.progress)
    for per in unstructured["per_word"].values():  # the words themselves, not their test indices
        per["word"] = [test_w[i] for i in per.pop("test_index")]
    unstructured.update({"n_alpha_vocab": n_vocab, "n_words_dropped_tokenization": n_dropped})
    return metrics, details, unstructured


SCORES = ("absorption_fraction", "full_absorption")  # per-word values behind the two SAEBench scores
_SCORE_KEY = {"absorption_fraction": "mean_absorption_fraction_score", "full_absorption": "mean_full_absorption_score"}


def combine_seeds(runs: Sequence[tuple[dict, list[dict], dict]], seeds: Sequence[int], cfg: Config
                  ) -> tuple[dict, list[dict], dict]:
    """One result from per-seed (metrics, details, unstructured): SAEBench's scores as the mean
    over seeds, their confidence interval (evals.stats.score_interval: a bootstrap over letters and
    words for one seed, a t interval over the seeds for more) and spread over seeds in the
    `uncertainty` group, per-seed scores and words in eval_result_unstructured["seeds"]."""
    from msae_core.evals.stats import nested_mean, score_interval

    mean_keys = list(runs[0][0]["mean"])
    metrics = {"mean": {k: (statistics.mean(v) if (v := [r[0]["mean"][k] for r in runs if r[0]["mean"][k] is not None])
                            else None) for k in mean_keys}}
    unc: dict = {"n_seeds": len(runs), "confidence": cfg.confidence, "n_bootstrap": cfg.n_bootstrap}
    for name in SCORES:
        per_seed = [[per[name] for per in r[2]["per_word"].values()] for r in runs]
        lo, hi = score_interval(per_seed, n_boot=cfg.n_bootstrap, conf=cfg.confidence, seed=seeds[0])
        score = _SCORE_KEY[name]
        assert abs(nested_mean(per_seed) - metrics["mean"][score]) < 1e-4, "scores and per-word values disagree"
        vals = [r[0]["mean"][score] for r in runs]
        unc.update({f"{score}_ci_low": lo, f"{score}_ci_high": hi,
                    f"{score}_seed_sd": statistics.stdev(vals) if len(vals) > 1 else None})
    metrics["uncertainty"] = unc
    details = [{**d, "seed": s} if len(runs) > 1 else d for r, s in zip(runs, seeds) for d in r[1]]
    unstructured = {"saebench_definitions": "sae-bench 0.6.0",
                    "seeds": [{"seed": s, **r[0]["mean"], **r[2]} for r, s in zip(runs, seeds)]}
    return metrics, details, unstructured


def run(ctx, cfg: Config) -> dict:
    from msae_core.configutil import validate
    from msae_core.evals.schema import make_result

    validate(cfg)
    cfg = replace(cfg, model_name=cfg.model_name or ctx.model_name)
    t0 = time.time()
    seeds = [cfg.random_seed + i for i in range(cfg.seeds)]
    runs = []
    for s in seeds:
        runs.append(_one_seed(ctx, replace(cfg, random_seed=s)))
        if len(seeds) > 1:
            log.info("absorption seed %d: mean absorption fraction %.4f", s,
                     runs[-1][0]["mean"]["mean_absorption_fraction_score"])
    metrics, details, unstructured = combine_seeds(runs, seeds, cfg)
    unstructured["seconds"] = round(time.time() - t0, 1)
    return make_result(ctx, EVAL_TYPE_ID, cfg, metrics, details, unstructured)
