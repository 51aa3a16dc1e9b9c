"""Run configs: what a training run is (the SAE, how to train it, on which activations), checked
once per entry point against its activation source (`RunConfig.check`, which opens the source once
and returns the config resolved against it), and which settings may change when a run is resumed
(`config_mismatch`). Configs are values: checking changes none. Problems are structured (field and
line: configutil.Problem), so a form marks the widget from the field."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from msae_core.artifacts import EVAL_NAMES, atomic_write_json
from msae_core.configutil import InvalidSettings, Problem, collect_problems, from_dict, to_dict
from msae_core.errors import MsaeError

if TYPE_CHECKING:
    from msae_core.data.source import ActivationSource, StreamedSource
from msae_core.sae import SAEConfig
from msae_core.sae.base import auto_dead_tokens, nest_momentum

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """How to train: optimiser, schedule, logging and checkpoint cadence."""

    SNAPSHOTS_PER_RUN = 100  # snapshot_every -1: traces with about this many points, whatever the length

    steps: int = field(default=10_000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=4096, metadata={"help": "activation rows per step"})
    lr: float = field(default=3e-4, metadata={"help": "Adam learning rate"})
    grad_clip: float = field(default=1.0, metadata={
        "help": "clip the gradient's total norm to this before each Adam step, as SAELens does (0: off)"})
    warmup_steps: int = field(default=1000, metadata={
        "help": "linear learning-rate warm-up steps (capped at --steps)"})
    seed: int = field(default=0, metadata={"help": "seed of the batch order (and of the SAE init "
                                                   "when given on the command line)"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present, else CPU), cpu, cuda, cuda:N"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast on CUDA (TF32 matmuls are always on)"})
    log_every: int = field(default=50, metadata={"help": "steps between lines of metrics.jsonl"})
    checkpoint_every: int = field(default=500, metadata={"help": "steps between resumable checkpoints"})
    checkpoint_minutes: float = field(default=0.0, metadata={
        "help": "also checkpoint at the first log step this many minutes after the last checkpoint (0: off)"})
    snapshot_every: int = field(default=-1, metadata={
        "help": "steps between momentum trace snapshots; -1: about 100 per run (steps // 100); 0: none"})
    evals: list[str] = field(default_factory=list, metadata={
        "help": "evals to run when training is done (core, absorption, sparse_probing; synthetic on a msae synth store)"})
    log_to: list[str] = field(default_factory=list, metadata={
        "help": "also mirror the metrics lines to tensorboard (RUN/tensorboard) and/or wandb (when installed; "
                "offline unless WANDB_MODE says otherwise); the run folder stays the source of truth"})

    @property
    def effective_warmup(self) -> int:
        return max(0, min(self.warmup_steps, self.steps))

    @property
    def snapshot_interval(self) -> int:
        """Steps between trace snapshots (0: none), snapshot_every -1 resolved."""
        if self.snapshot_every == -1:
            return max(1, self.steps // self.SNAPSHOTS_PER_RUN)
        return self.snapshot_every

    def problems(self) -> list[Problem]:
        out = []
        if self.steps < 1:
            out.append(Problem("steps", f"steps must be >= 1 (got {self.steps})"))
        if self.batch_size < 1:
            out.append(Problem("batch_size", f"batch_size must be >= 1 (got {self.batch_size})"))
        if not self.lr > 0:
            out.append(Problem("lr", f"lr must be > 0 (got {self.lr})"))
        if not self.grad_clip >= 0:
            out.append(Problem("grad_clip", f"grad_clip must be >= 0 (got {self.grad_clip})"))
        if self.warmup_steps < 0:
            out.append(Problem("warmup_steps", f"warmup_steps must be >= 0 (got {self.warmup_steps})"))
        for name in ("log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                out.append(Problem(name, f"{name} must be >= 1 (got {getattr(self, name)})"))
        if not self.checkpoint_minutes >= 0:
            out.append(Problem("checkpoint_minutes", f"checkpoint_minutes must be >= 0 (got {self.checkpoint_minutes})"))
        if self.snapshot_every < -1:
            out.append(Problem("snapshot_every", f"snapshot_every must be -1 (about 100 per run), 0 (none) or a step count "
                       f"(got {self.snapshot_every})"))
        from msae_core.runs.tracking import TRACKERS

        if [t for t in self.log_to if t not in TRACKERS]:
            out.append(Problem("log_to", f"log_to: unknown tracker(s) {', '.join(t for t in self.log_to if t not in TRACKERS)} "
                                         f"(known: {', '.join(TRACKERS)})"))
        elif "wandb" in self.log_to and importlib.util.find_spec("wandb") is None:
            out.append(Problem("log_to", "log_to: wandb is not installed (pip install wandb), or log to tensorboard"))
        unknown = [e for e in self.evals if e not in EVAL_NAMES]
        if unknown:
            out.append(Problem("evals", f"evals: unknown eval(s) {', '.join(map(str, unknown))} (known: {', '.join(EVAL_NAMES)})"))
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", str(self.device)):
            out.append(Problem("device", f"device must be auto, cpu, cuda or cuda:N (got {self.device!r})"))
        return out


OUTLIER_MODES = ("keep", "exclude", "clip")


@dataclass
class DataConfig:
    """Where the training activations come from: an activation store (`source` store, `acts`), or
    the language model itself (`source` stream: msae_core.data.stream)."""

    source: str = field(default="store", metadata={
        "help": "store (an activation store, --acts) or stream (run --model over --corpus while training)"})
    acts: str = field(default="", metadata={"help": "activation store folder (written by msae harvest)"})
    model: str = field(default="embedded", metadata={"help": "stream: language model name or path"})
    layer: int = field(default=6, metadata={"help": "stream: block whose output (resid_post) is read"})
    corpus: str = field(default="embedded", metadata={"help": "stream: text corpus name"})
    corpus_config: str = field(default="", metadata={"help": "stream: a Hugging Face dataset's config name"})
    corpus_split: str = field(default="train", metadata={"help": "stream: a Hugging Face dataset's split"})
    text_column: str = field(default="text", metadata={
        "help": "stream: a Hugging Face dataset's text column; a column of token ids is read as pre-tokenised, "
                "and a dataset with no 'text' column but 'input_ids' is"})
    context_size: int = field(default=128, metadata={"help": "stream: tokens per context window"})
    model_dtype: str = field(default="auto", metadata={
        "help": "stream: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16"})
    separator: str = field(default="bos", metadata={
        "help": "stream: token between packed documents: bos (SAELens's default), eos or none"})
    lm_batch: int = field(default=8, metadata={"help": "stream: context windows per model forward"})
    buffer_rows: int = field(default=0, metadata={
        "help": "stream: rows the mixing buffer holds, half refilled each round (0: buffer_batches "
                "batches, else SAELens's 20 x 32 context windows: 655,360 rows at context 1,024, 6.0 GB "
                "at width 2,304)"})
    buffer_batches: int = field(default=0, metadata={
        "help": "stream: the mixing buffer in batches of the run instead of rows (0: buffer_rows)"})
    cache: str = field(default="", metadata={
        "help": "stream: also write every streamed activation into this folder as an activation store, "
                "for later runs (--acts) and the workbench's token examples"})
    cache_dtype: str = field(default="float16", metadata={"help": "stream: the cache's dtype, float16 or float32"})
    outliers: str = field(default="keep", metadata={
        "help": "rows with a norm above outlier_factor x the median: keep (as SAEBench evaluates on "
                "all non-special tokens), exclude (drop them from the batch) or clip (scale them down "
                "to that norm)"})
    outlier_factor: float = field(default=5.0, metadata={"help": "the outlier threshold, in medians of the row norm"})

    def problems(self) -> list[Problem]:
        out_rows = []
        if self.outliers not in OUTLIER_MODES:
            out_rows.append(Problem("outliers", f"outliers must be one of {', '.join(OUTLIER_MODES)} (got {self.outliers!r})"))
        if not self.outlier_factor > 1:
            out_rows.append(Problem("outlier_factor", f"outlier_factor must be > 1 (got {self.outlier_factor})"))
        return out_rows + self._source_problems()

    def _source_problems(self) -> list[Problem]:
        if self.source == "store":
            out = [] if self.acts else [Problem("acts", "acts: no activation store given (--acts DIR, or --source stream)")]
            return out + ([Problem("cache", "cache: only a streamed run writes a cache (--source stream)")]
                          if self.cache else [])
        if self.source != "stream":
            return [Problem("source", f"source must be store or stream (got {self.source!r})")]
        from msae_core.data.lm import MODEL_DTYPES

        out = []
        if self.cache_dtype not in ("float16", "float32"):
            out.append(Problem("cache_dtype", f"cache_dtype must be float16 or float32 (got {self.cache_dtype!r})"))
        if self.layer < 0:
            out.append(Problem("layer", f"layer must be >= 0 (got {self.layer})"))
        if self.context_size < 2:
            out.append(Problem("context_size", f"context_size must be >= 2 (got {self.context_size})"))
        if self.model_dtype not in MODEL_DTYPES:
            out.append(Problem("model_dtype", f"model_dtype must be one of {', '.join(MODEL_DTYPES)} (got {self.model_dtype!r})"))
        if self.lm_batch < 1:
            out.append(Problem("lm_batch", f"lm_batch must be >= 1 (got {self.lm_batch})"))
        if self.buffer_batches < 0 or self.buffer_batches == 1:
            out.append(Problem("buffer_batches", f"buffer_batches must be 0 (buffer_rows) or >= 2 "
                                                 f"(got {self.buffer_batches})"))
        if self.buffer_rows < 0:
            out.append(Problem("buffer_rows", f"buffer_rows must be >= 0 (got {self.buffer_rows})"))
        return out

    def open_source(self, batch_size: int, seed: int, device: str,
                    layers: tuple[int, ...] = (), caches: dict[int, str] | None = None) -> "ActivationSource":
        """The activation source these settings name, opened: the store at `acts`, or the stream
        (`open_stream`; `layers`: several blocks from one forward, a one-pass group's). InvalidSettings
        naming the field (acts, layer, cache or model) when it cannot be opened."""
        from msae_core.data.store import ActivationStore

        if self.source == "stream":
            try:
                return self.open_stream(batch_size, seed, device, layers, caches)
            except MsaeError as exc:
                where = ("layer" if str(exc).startswith("layer ") else
                         "cache" if self.cache and "cache" in str(exc) else "model")
                raise InvalidSettings([Problem(where, f"{where}: {exc}")]) from None
        try:
            return ActivationStore(self.acts)
        except MsaeError as exc:
            raise InvalidSettings([Problem("acts", f"acts: {exc}")]) from None

    def open_stream(self, batch_size: int, seed: int, device: str, layers: tuple[int, ...] = (),
                    caches: dict[int, str] | None = None) -> "StreamedSource":
        """The ActivationStream these settings describe; its width read from the model's config
        (the weights load when the first batch is asked for), with its cache if it has one.
        `layers`: several blocks from one forward, side by side in each row (StreamSettings.layers),
        each cached into its folder in `caches` (layer -> folder) instead of `cache`.
        MsaeError for a layer past the model's blocks, or a cache folder holding something else."""
        from msae_core import dist
        from msae_core.data.lm import model_shape
        from msae_core.data.stream import ActivationStream, StreamSettings

        width, n_layers = model_shape(self.model)
        for layer in layers or (self.layer,):
            if n_layers is not None and layer >= n_layers:
                raise MsaeError(f"layer {layer} is past the last block of {self.model} "
                                f"({n_layers} blocks: 0..{n_layers - 1})")
        settings = StreamSettings(model=self.model, layer=self.layer, corpus=self.corpus,
                                  corpus_config=self.corpus_config, corpus_split=self.corpus_split,
                                  text_column=self.text_column,
                                  context_size=self.context_size, model_dtype=self.model_dtype,
                                  separator=self.separator,
                                  lm_batch=self.lm_batch, buffer_rows=self.buffer_rows,
                                  buffer_batches=self.buffer_batches, layers=tuple(layers))
        return ActivationStream(settings, batch_size, seed, device=device, width=width,
                                cache=caches if caches is not None else self.cache,
                                cache_dtype=self.cache_dtype, part=(dist.rank(), dist.world_size()))

    @property
    def store_path(self) -> str:
        """The activation store the run's rows can be read back from: `acts`, or a stream's
        `cache` ("" when there is none)."""
        return self.acts if self.source == "store" else self.cache


@dataclass
class RunConfig:
    """One training run: the SAE to build, how to train it, and on which activations."""

    sae: SAEConfig = field(default_factory=lambda: SAEConfig(d_in=0, d_sae=4096),
                           metadata={"help": "the SAE (msae_core.sae.SAEConfig)"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "training settings"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "activations"})

    def check(self, source: "ActivationSource | None" = None) -> tuple["RunConfig", "ActivationSource"]:
        """Validate once, at an entry point: InvalidSettings (an MsaeError) listing every problem, each
        with its field; else (this config resolved against its source, the source). The source is
        opened here unless given (once per entry point: pass both down). The config itself is a
        value: nothing in it changes."""
        problems = collect_problems(self)  # d_in 0 ("fill from the store") is not a problem
        typed = [p for p in problems if ": expected " in p]
        if typed:  # wrong types first: nothing else can be checked on them
            raise InvalidSettings(typed)
        if source is None and not any(p.field.startswith("data.") for p in problems):
            try:
                source = self.data.open_source(self.train.batch_size, self.train.seed, self.train.device)
            except InvalidSettings as exc:
                problems += [p.under("data.") for p in exc.problems]
        if source is None:
            raise InvalidSettings(problems)
        resolved = self.resolved(source)
        problems += resolved.source_problems(source)
        if problems:
            raise InvalidSettings(problems)
        return resolved, source

    def resolved(self, source: "ActivationSource") -> "RunConfig":
        """A copy with what the source and the run's length decide: sae.d_in when 0 (the source's
        width) and sae.dead_tokens_threshold when 0 (from the run's tokens, msae_core.sae.base)."""
        sae = self.sae
        if not sae.d_in:
            sae = dataclasses.replace(sae, d_in=source.d_in)
        if not sae.dead_tokens_threshold:
            sae = dataclasses.replace(sae, dead_tokens_threshold=auto_dead_tokens(
                max(self.train.steps, 1) * max(self.train.batch_size, 1)))
        return self if sae is self.sae else dataclasses.replace(self, sae=sae)

    def source_problems(self, source: "ActivationSource") -> list[Problem]:
        """What does not fit the opened source: the width, a batch larger than the store, evals that
        cannot score its kind of activations."""
        out = []
        if self.sae.d_in != source.d_in:
            out.append(Problem("sae.d_in", f"sae.d_in {self.sae.d_in} does not match the store's activation width "
                               f"{source.d_in} ({self.data.acts or self.data.model})"))
        if not source.streamed and self.train.batch_size > source.n_rows:
            out.append(Problem("train.batch_size", f"train.batch_size {self.train.batch_size} exceeds the "
                                                   f"store's {source.n_rows} rows"))
        synthetic = isinstance(getattr(source, "manifest", {}).get("synthetic"), dict)
        wrong = [e for e in self.train.evals if (e == "synthetic") != synthetic]
        if wrong:
            out.append(Problem("train.evals", f"train.evals: {', '.join(wrong)} cannot score a run on "
                               + ("a synthetic store (no language model; use synthetic)" if synthetic else
                                  "a language model's activations (synthetic needs a store written by msae synth)")))
        return out

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict, recorded: bool = False) -> "RunConfig":
        """Build from json; a missing section gets its defaults. `recorded`: the config a run wrote
        (its folder's config.json): a setting added since it was written gets the value such runs
        had (ADDED_SINCE), not today's default."""
        if not isinstance(data, dict):
            raise MsaeError(f"run config must be a json object, got {type(data).__name__}")
        if recorded:
            data = with_added_settings(data)
        unknown = sorted(set(data) - {"sae", "train", "data"})
        if unknown:
            raise MsaeError(f"run config: unknown section(s) {', '.join(unknown)} (sae, train, data)")
        if isinstance(data.get("sae"), dict):  # momentum knobs written flat (before sae.momentum)
            data = {**data, "sae": nest_momentum(data["sae"])}
        try:
            sections = {name: data.get(name, {}) for name in ("sae", "train", "data")}
            for name, v in sections.items():
                if not isinstance(v, dict):
                    raise MsaeError(f"run config: section {name} must be an object, got {json.dumps(v)}")
            built, problems = {}, []
            for name, section_cls in (("sae", SAEConfig), ("train", TrainConfig), ("data", DataConfig)):
                given = {"d_in": 0, "d_sae": 4096, **sections[name]} if name == "sae" else sections[name]
                try:
                    built[name] = from_dict(section_cls, given, prefix=f"{name}.")
                except MsaeError as exc:
                    problems.append(str(exc))
            if problems:
                raise MsaeError("; ".join(problems))
            sae, train, dcfg = built["sae"], built["train"], built["data"]
        except TypeError as exc:
            raise MsaeError(f"run config: {exc}") from exc
        return cls(sae=sae, train=train, data=dcfg)

    @classmethod
    def load(cls, path: str | os.PathLike, recorded: bool = False) -> "RunConfig":
        try:
            with open(path) as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise MsaeError(f"no run config at {path}") from None
        except (json.JSONDecodeError, OSError) as exc:
            raise MsaeError(f"run config {path} is not valid json: {exc}") from exc
        return cls.from_dict(data, recorded=recorded)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_dict())


# settings added after runs had recorded their configs, with the value a record without them
# means: streamed runs joined documents with EOS before `separator` existed
ADDED_SINCE = {("data", "separator"): "eos"}


def with_added_settings(recorded: dict) -> dict:
    """A recorded run config (json) with the settings added since filled in as such runs had them."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in recorded.items()}
    for (section, name), value in ADDED_SINCE.items():
        if isinstance(out.get(section, {}), dict):
            out.setdefault(section, {}).setdefault(name, value)
    return out


# settings that may change when a run is resumed (they do not change the trajectory)
_RESUMABLE_CHANGES = {"steps", "device", "log_every", "checkpoint_every", "checkpoint_minutes", "snapshot_every",
                      "evals", "log_to"}


def config_mismatch(old: dict, new: dict) -> str:
    """'' when a run with config `old` can be resumed under `new`, else what differs (first few)."""
    diffs = []
    old = with_added_settings(old)  # `old` is a run's record
    for section, cls in (("sae", SAEConfig), ("train", TrainConfig), ("data", DataConfig)):
        # a field a config was written without (an older msae) has its default
        defaults = _flat(to_dict(cls(d_in=0, d_sae=4096) if cls is SAEConfig else cls()))
        given = [old.get(section) or {}, new.get(section) or {}]
        if section == "sae":
            given = [nest_momentum(g) if isinstance(g, dict) else g for g in given]
        a, b = ({**defaults, **_flat(g)} if isinstance(g, dict) else g for g in given)
        for key in sorted(set(a) | set(b)):
            if section == "train" and key in _RESUMABLE_CHANGES:
                continue
            va, vb = a.get(key), b.get(key)
            if section == "data" and key in ("acts", "cache") and va and vb:
                va, vb = str(Path(va).resolve()), str(Path(vb).resolve())
            if section == "sae" and key == "d_in" and (not va or not vb):
                continue  # filled from the store
            if va != vb:
                diffs.append(f"{section}.{key} {va!r} -> {vb!r}")
    return ", ".join(diffs[:4]) + (" ..." if len(diffs) > 4 else "")


def _flat(section: dict, prefix: str = "") -> dict:
    """{"momentum": {"lam": 0.3}} -> {"momentum.lam": 0.3}: nested settings compared one by one."""
    out = {}
    for k, v in section.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out
