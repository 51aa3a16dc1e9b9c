"""Activations streamed from the language model into a mixing buffer: training without a store.

    msae train --source stream --model M --layer L --corpus C --steps N --out RUN

Windows come from `text.context_windows` in the corpus's fixed order, `lm_batch` at a time through
the model with early stop after block `layer` (`harvest.window_rows`, the same rows a harvest
stores: special tokens dropped). The rows go into a mixing buffer, after SAELens's: it holds
`StreamSettings.buffer_capacity` rows (by default SAELens's, 20 x 32 context windows: 655,360
rows at context 1,024, 81,920 at 128; `buffer_rows` or `buffer_batches` set it); each round it
takes in half a buffer of new rows, shuffles all it holds with a generator seeded by (seed, round)
and hands out half, keeping the other half for the next round, so a batch mixes rows of many
windows and rounds. The buffer is float32 on the model's device (655,360 rows of gemma-2-2b's 2,304
are 6.0 GB). The model runs in bfloat16 on CUDA and float32 on the CPU unless `model_dtype` says
otherwise.

The SAE's input scale is fitted on a sample drawn at random from the buffer's first fill (its
whole capacity, read anyway before the first batch), so it sees hundreds of windows, not the
corpus's first few (SAELens estimates it over many batches).

Data-parallel (`part` = (rank, ranks), under torchrun): the windows are dealt out in chunks of
`lm_batch`, chunk c to rank c mod ranks, so each rank runs the model over its own windows only;
each rank's buffer (its own shuffles) serves its batch_size / ranks rows of every batch, and the
ranks' rows together are the global batch. `merge_rank_states` puts the ranks' buffers into one
checkpoint; each rank restores its own.

Batch s is a deterministic function of (settings, seed, s, part). Resume: `state(step)` is the buffer as
it stood before batch `step` (the rows kept and the rows handed out but not yet taken, as tensors,
plus the corpus position and the round), which the trainer writes into the checkpoint
(runs.checkpoint); `restore` puts it back, the corpus is re-read from the recorded window on,
and the resumed run takes exactly the batches an uninterrupted one would.

Cache (`--cache DIR`): every window the model runs over is also written into DIR as an activation
store (harvest.ShardSink: the same shards, checks and manifest fields as `msae harvest`). While the
run trains the cache is unfinished; when it ends (`finish_cache`) the manifest becomes that of a
harvest of exactly the rows it holds (target_tokens = its rows), complete: later runs train on it
with `--acts DIR`, and the workbench reads a streamed run's token examples from it. `state()`
writes what the cache holds buffered first, so at every checkpoint the cache holds every window
the stream has read; a resumed stream skips the windows the cache holds, and a run resumed for
more steps takes its finished cache over again.

The same interface as an ActivationStore where the trainer and the loader use one: `d_in`,
`torch_dtype`, `batch_raw(step, B, seed, out)` (steps in order, as data.loader asks for them),
`input_sample(n, seed)` and `nonfinite_problem()`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from msae_core.data.lm import model_dtype
from msae_core.devices import resolve_device
from msae_core.errors import MsaeError

log = logging.getLogger(__name__)

_OPEN_TARGET = 1 << 62  # an unfinished cache's target_tokens: it takes every window the stream reads
SAELENS_BUFFER_WINDOWS = 20 * 32  # SAELens's n_batches_in_buffer x store_batch_size_prompts


@dataclass(frozen=True)
class StreamSettings:
    """What defines a stream: equal settings and seed give equal batches."""

    model: str = "embedded"
    layer: int = 6
    corpus: str = "embedded"
    corpus_config: str = ""           # a Hugging Face dataset's config, split and text column
    corpus_split: str = "train"
    text_column: str = "text"
    context_size: int = 128
    prepend_bos: bool = True
    exclude_special: bool = True
    model_dtype: str = "auto"
    separator: str = "bos"            # token between packed documents (text.context_windows)
    lm_batch: int = 8                 # windows per model forward
    buffer_rows: int = 0              # rows the mixing buffer holds (0: buffer_batches, else SAELens's)
    buffer_batches: int = 0           # ... or this many batches of the run (0: buffer_rows)
    layers: tuple[int, ...] = ()      # several blocks from one forward, side by side in each row, in
    #                                   this order (a one-pass group at several layers); (): `layer`

    @property
    def stream_layers(self) -> tuple[int, ...]:
        """The blocks whose outputs a row holds, in order."""
        return self.layers or (self.layer,)

    def buffer_capacity(self, batch_size: int) -> int:
        """Rows the mixing buffer holds: buffer_rows, else buffer_batches batches, else SAELens's
        default of 20 x 32 context windows (its n_batches_in_buffer x store_batch_size_prompts)."""
        if self.buffer_rows:
            return self.buffer_rows
        if self.buffer_batches:
            return self.buffer_batches * batch_size
        return SAELENS_BUFFER_WINDOWS * self.context_size

    def store_settings(self, rows: int, dtype: str = "float16") -> Any:
        """The StoreSettings of a harvest of `rows` rows of the same windows."""
        from msae_core.data.store import StoreSettings

        return StoreSettings(model=self.model, layer=self.layer, corpus=self.corpus, target_tokens=rows,
                             corpus_config=self.corpus_config, corpus_split=self.corpus_split,
                             text_column=self.text_column,
                             context_size=self.context_size, dtype=dtype, prepend_bos=self.prepend_bos,
                             exclude_special=self.exclude_special, separator=self.separator)


@dataclass
class _Buffer:
    """The mixing buffer between two batches (tensors are never changed in place, so a state is a
    set of references)."""

    next_window: int = 0              # windows of the corpus taken in so far
    round: int = 0                    # refills done so far
    kept: torch.Tensor | None = None  # (K, D) rows kept for the next round
    ready: torch.Tensor | None = None  # (R, D) rows handed out, in order, not yet taken
    done: bool = False                # the corpus ran out


class ActivationStream:
    streamed = True  # data.loader serves it in the training thread (its batches are on the device); a
    # StreamedSource (data.source)

    def __init__(self, settings: StreamSettings, batch_size: int, seed: int, device: Any = None,
                 lm: Any = None, corpus: Any = None, width: int | None = None, cache: str | dict[int, str] = "",
                 cache_dtype: str = "float16", part: tuple[int, int] = (0, 1)):
        self.settings, self.batch_size, self.seed = settings, batch_size, seed
        self.part, self.local_size = part, batch_size // part[1]
        if cache and part[1] > 1:
            raise MsaeError("--cache is not supported under torchrun yet: stream with --cache in one "
                            "process (or harvest a store), then train on it with --acts")
        self._width = width
        # `cache`: one folder (the stream's one layer), or layer -> folder when the rows hold several
        caches = cache if isinstance(cache, dict) else ({settings.stream_layers[0]: cache} if cache else {})
        if set(caches) - set(settings.stream_layers):
            raise ValueError(f"caches of layers {sorted(set(caches) - set(settings.stream_layers))} not streamed")
        self._caches = {layer: _Cache(path, dataclasses.replace(settings, layer=layer, layers=()), cache_dtype,
                                      settings.stream_layers.index(layer), len(settings.stream_layers))
                        for layer, path in caches.items() if path}
        self.device = resolve_device(device)
        self._lm, self._corpus = lm, corpus
        self._buf = _Buffer()
        # the row norms of everything streamed (this rank's rows): the outlier summary a store's
        # manifest holds (store.norm_outliers), for a stream with no cache to hold it
        # (several layers: one per layer)
        self.layer_norms: dict[int, dict] = {layer: _fresh_norms() for layer in settings.stream_layers}
        self._windows: Iterator | None = None
        # where the packed window stream stands (text.WindowCursor) after window `_cursor_at` - 1:
        # the checkpoint keeps it, so a resume (and the core eval's hold-out) starts there instead
        # of tokenising every window before it again
        self._packed: Any = None
        self._cursor: Any = None
        self._cursor_at = 0
        self._next_step = 0
        self._first_fill = 0  # rows the first round takes in at least (input_sample)

    # -- the model and the corpus, loaded on first use -----------------------------------------------
    @property
    def lm(self) -> Any:
        if self._lm is None:
            from msae_core.data.lm import load_lm

            dtype = model_dtype(self.settings.model_dtype, self.device)
            self._lm = load_lm(self.settings.model, device=self.device, dtype=dtype)
            for layer in self.settings.stream_layers:
                self._lm.check_layer(layer)
        return self._lm

    @property
    def corpus(self) -> Any:
        if self._corpus is None:
            from msae_core.data.text import corpus_of

            self._corpus = corpus_of(self.settings)
        return self._corpus

    @property
    def d_in(self) -> int:
        """A row's width: the model's (from its config when given, `width`, before the weights
        load), times the layers a row holds side by side (one but for a one-pass group's stream)."""
        return self.layer_width * len(self.settings.stream_layers)

    @property
    def layer_width(self) -> int:
        """One layer's width (d_in is that times the layers a row holds)."""
        return self._width if self._width is not None else int(self.lm.d_model)

    @property
    def norm_stats(self) -> dict:
        """The row norms of the first (or only) layer streamed."""
        return self.layer_norms[self.settings.stream_layers[0]]

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float32

    dtype = "float32"

    def _special(self) -> torch.Tensor | None:
        if not self.settings.exclude_special:
            return None
        return torch.tensor(sorted(self.lm.special_ids), dtype=torch.long)

    def _window_iter(self, start: int) -> Iterator[tuple[int, int, list]]:
        """(global window index, doc id, token ids) of this rank's windows from window `start`:
        from the cursor kept for it when there is one, else by reading the corpus from its start."""
        from msae_core.data.text import context_windows

        at_cursor = self._cursor is not None and self._cursor_at == start
        self._packed = context_windows(self.corpus, self.lm.tokenizer, self.settings.context_size,
                                       self.settings.prepend_bos, separator=self.settings.separator,
                                       start=self._cursor if at_cursor else None)
        windows = self._packed if at_cursor else itertools.islice(self._packed, start, None)
        self._cursor_at = start if at_cursor else 0
        rank, ranks = self.part
        chunk = self.settings.lm_batch
        for g, (doc_id, ids) in enumerate(windows, start):
            self._cursor_at = g + 1
            if ranks == 1 or (g // chunk) % ranks == rank:
                yield g, doc_id, ids

    def cursor(self) -> dict | None:
        """Where the packed window stream stands after the windows taken in (`windows_used`), as
        json (text.WindowCursor), or None when that is not known (nothing read yet)."""
        if self._packed is not None and self._cursor_at == self._buf.next_window:
            return self._packed.cursor()._asdict()
        if self._cursor is not None and self._cursor_at == self._buf.next_window:
            return self._cursor._asdict()
        return None

    def _to_cache(self, rows: Any, batch: list[tuple[int, int, list]], first_window: int) -> None:
        for cache in self._caches.values():
            cache.add(self, rows, batch, first_window)

    def flush_cache(self) -> None:
        """Write the caches' buffered rows as shards: each then holds every window read."""
        for cache in self._caches.values():
            cache.flush()

    def finish_cache(self) -> None:
        """The run is done: each cache becomes a complete harvest of the rows it holds (also when
        this process wrote nothing into it: a run resumed after its last window was cached)."""
        for cache in self._caches.values():
            cache.finish()

    def _rows(self, n: int, windows: Iterator, first_window: int) -> tuple[torch.Tensor, int, bool]:
        """At least `n` rows (whole windows, `lm_batch` at a time) from `windows` (`_window_iter`
        from `first_window`): (rows (N, D) float32 on the device, the window after the last one
        taken, whether the corpus ran out). With a cache, the windows go into it too."""
        from msae_core.data.harvest import window_rows

        parts, got, nxt, special = [], 0, first_window, self._special()
        while got < n:
            batch = list(itertools.islice(windows, self.settings.lm_batch))
            if not batch:
                return (torch.cat(parts) if parts else torch.zeros(0, self.d_in, device=self.device)), nxt, True
            g0 = batch[0][0]  # a batch is one chunk: consecutive windows
            ids_BT = torch.tensor([w for _, _, w in batch], dtype=torch.long)
            layers = self.settings.stream_layers
            rows = window_rows(self.lm, ids_BT, layers if len(layers) > 1 else layers[0], g0, special)
            self._to_cache(rows, batch, g0)
            acts = rows.acts.float()
            if not bool(torch.isfinite(acts).all()):
                raise MsaeError(f"the model gave non-finite activations (NaN or inf) at layer "
                                f"{self.settings.layer} in windows {g0}..{batch[-1][0]}: try "
                                f"--model-dtype float32")
            self._count_norms(acts, rows.token_ids)
            parts.append(acts)
            got += len(acts)
            nxt = batch[-1][0] + 1
        return torch.cat(parts), nxt, False

    def _count_norms(self, acts: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Add rows to each layer's norm stats; the median is that of the first rows streamed (the
        input-scale sample), the threshold OUTLIER_FACTOR times it."""
        width = acts.shape[1] // len(self.settings.stream_layers)
        for i, layer in enumerate(self.settings.stream_layers):
            self._count_layer_norms(self.layer_norms[layer], acts[:, i * width:(i + 1) * width], token_ids)

    @staticmethod
    def _count_layer_norms(st: dict, acts: torch.Tensor, token_ids: torch.Tensor) -> None:
        from msae_core.data.store import OUTLIER_FACTOR

        if not len(acts):
            return
        n = acts.norm(dim=1).double().cpu()
        if st["median"] is None:
            st["median"] = float(n.median())
        over = n > OUTLIER_FACTOR * st["median"]
        st["rows"] += len(n)
        st["above"] += int(over.sum())
        st["sq"] += float((n ** 2).sum())
        st["sq_above"] += float((n[over] ** 2).sum())
        st["max"] = max(st["max"], float(n.max()))
        for t in token_ids[over.to(token_ids.device)].tolist():
            st["tokens"][str(t)] = st["tokens"].get(str(t), 0) + 1

    def outlier_summary(self, layer: int | None = None) -> dict | None:
        """A layer's norm stats (the first's by default) in the layout of a store manifest's
        `outliers` (store.outlier_record), with the rows seen."""
        from msae_core.data.store import OUTLIER_FACTOR, outlier_record

        st = self.layer_norms[self.settings.stream_layers[0] if layer is None else layer]
        if not st["rows"]:
            return None
        return {**outlier_record(st["median"], OUTLIER_FACTOR, st["above"], st["rows"], st["sq"], st["sq_above"],
                                 st["max"], st["tokens"]), "rows_seen": st["rows"]}

    # -- batches -----------------------------------------------------------------------------------
    def _refill(self) -> None:
        """One round: take in new rows (a whole buffer the first time, half after), shuffle all that
        is held, hand out half and keep half."""
        b = self._buf
        half = max(self.settings.buffer_capacity(self.batch_size) // self.part[1] // 2, 1)
        need = half if b.kept is not None else max(2 * half, self._first_fill)
        start = b.next_window
        if self._windows is None:
            self._windows = self._window_iter(start)
        new, nxt, done = self._rows(need, self._windows, start)
        pool = new if b.kept is None else torch.cat([b.kept, new])
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + b.round + (self.part[0] << 40))
        pool = pool[torch.randperm(len(pool), generator=g).to(pool.device)]
        out_n = len(pool) if done else len(pool) // 2  # the corpus ran out: hand everything out
        ready = pool[:out_n] if b.ready is None else torch.cat([b.ready, pool[:out_n]])
        self._buf = _Buffer(nxt, b.round + 1, pool[out_n:], ready, done)

    def batch_raw(self, step: int, batch_size: int, seed: int = 0, out: torch.Tensor | None = None,
                  part: tuple[int, int] | None = None) -> torch.Tensor:
        """Batch `step` (this rank's batch_size / ranks rows of it), float32 (B, D) on the model's
        device; steps are served in order."""
        if (batch_size, seed) != (self.batch_size, self.seed) or part not in (None, self.part):
            raise ValueError("a stream serves the batch size, seed and part it was made for")
        batch_size = self.local_size
        if step != self._next_step:
            raise ValueError(f"a stream serves steps in order: expected {self._next_step}, got {step}")
        while (self._buf.ready is None or len(self._buf.ready) < batch_size) and not self._buf.done:
            self._refill()
        b = self._buf
        if b.ready is None or len(b.ready) < batch_size:
            raise MsaeError(f"corpus {self.settings.corpus!r} ran out after {b.next_window} windows "
                            f"(batch {step + 1} needs {batch_size} rows): use a larger corpus or fewer steps")
        x_BD = b.ready[:batch_size]
        self._buf = _Buffer(b.next_window, b.round, b.kept, b.ready[batch_size:], b.done)
        self._next_step += 1
        if out is not None and out.device == x_BD.device:
            return out.copy_(x_BD)
        return x_BD

    def input_sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """`n` rows drawn at random from the buffer's first fill (its capacity, or n rows if that is
        more), for the SAE's input scale: many windows, not the corpus's first few, and read once
        (the first round is that fill, so the model runs over no window twice). Call it before the
        first batch, or not at all."""
        if self._buf.round != 0 or self._next_step != 0:
            raise ValueError("input_sample comes before the stream's first batch")
        self._first_fill = n
        self._refill()
        pool = torch.cat([t for t in (self._buf.ready, self._buf.kept) if t is not None])
        g = torch.Generator().manual_seed(seed * 1_000_003 + 999_983 + (self.part[0] << 40))
        return pool[torch.randperm(len(pool), generator=g)[:n].to(pool.device)]

    @property
    def windows_used(self) -> int:
        """Context windows of the corpus read so far: the index after the last one taken into the
        buffer (data-parallel: this rank's; windows of other ranks before it are counted)."""
        return self._buf.next_window

    def nonfinite_problem(self) -> str | None:
        return None  # non-finite rows are refused as they are produced (_rows)

    # -- resume ------------------------------------------------------------------------------------
    def state(self, step: int) -> tuple[dict, dict[str, torch.Tensor]]:
        """(json-safe fields, tensors) of the buffer before batch `step`, the next one to serve
        (data.loader serves a stream in the training thread, so the checkpoint's step is always
        the next batch: no state of earlier steps is kept)."""
        if step != self._next_step:
            raise ValueError(f"the stream's state is the one before batch {self._next_step}, not {step}")
        self.flush_cache()  # the cache holds every window read before this checkpoint
        b = self._buf
        tensors = {k: v.detach().cpu().contiguous() for k, v in (("kept", b.kept), ("ready", b.ready))
                   if v is not None}
        return {"next_window": b.next_window, "round": b.round, "done": b.done, "step": step,
                "cursor": self.cursor(),
                "norms": _copy_norms(self.norm_stats),
                **({"layer_norms": {str(k): _copy_norms(v) for k, v in self.layer_norms.items()}}
                   if len(self.layer_norms) > 1 else {})}, tensors

    def restore(self, fields: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Put back the buffer `state` returned (this rank's, from `merge_rank_states`' entry);
        the next batch served is fields["step"]."""
        rank, ranks = self.part
        written = len(fields["ranks"]) if "ranks" in fields else 1
        if written != ranks:
            raise MsaeError(f"the checkpoint's stream was written by {written} rank(s): resume it with "
                            f"{written} (torchrun --nproc_per_node {written})" if written > 1 else
                            f"the checkpoint's stream was written by one process: resume it without torchrun")
        if ranks > 1:
            fields = fields["ranks"][rank]
            tensors = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"rank{rank}.")}
        self._buf = _Buffer(int(fields["next_window"]), int(fields["round"]),
                            tensors["kept"].to(self.device) if "kept" in tensors else None,
                            tensors["ready"].to(self.device) if "ready" in tensors else None,
                            bool(fields.get("done", False)))
        self._windows = self._packed = None
        if isinstance(fields.get("cursor"), dict):  # checkpoints before cursors: the corpus is read again
            from msae_core.data.text import WindowCursor

            self._cursor, self._cursor_at = WindowCursor.of(fields["cursor"]), self._buf.next_window
        if isinstance(fields.get("layer_norms"), dict):
            self.layer_norms = {int(k): _copy_norms(v) for k, v in fields["layer_norms"].items()}
        elif isinstance(fields.get("norms"), dict):
            self.layer_norms = {self.settings.stream_layers[0]: _copy_norms(fields["norms"])}
        self._next_step = int(fields["step"])


class _Cache:
    """One layer's cache: an activation store the stream writes as it reads (`--cache`), a harvest
    without an end until the run is done. `column`/`of`: the layer's place among the layers a row
    holds side by side (0 of 1 for a stream of one layer)."""

    def __init__(self, path: str, settings: StreamSettings, dtype: str, column: int, of: int):
        from msae_core.data.harvest import check_store_folder

        self.path, self.settings, self.column, self.of = path, settings, column, of
        # unfinished, a cache is a harvest without an end (its target set when it is finished)
        self.store_settings = settings.store_settings(_OPEN_TARGET, dtype)
        # another harvest's folder is refused now; this cache with other --steps is taken over
        check_store_folder(Path(path), self.store_settings, retarget=True)
        self.sink: Any = None  # harvest.ShardSink, opened with the model

    def _open(self, stream: "ActivationStream") -> Any:
        """The ShardSink (opened on first use, with the model), None once the cache is complete."""
        if self.sink is None:
            from msae_core.data.harvest import ShardSink, store_meta
            from msae_core.data.store import StoreWriter

            meta = store_meta(stream.lm, stream.corpus, self.store_settings, source="stream",
                              batch_size=self.settings.lm_batch)
            try:
                self.sink = ShardSink(StoreWriter(self.path, self.store_settings, meta, retarget=True))
            except OSError as exc:
                raise MsaeError(f"cannot create the cache {self.path}: {exc.strerror or exc}") from exc
        return None if self.sink.writer.complete else self.sink

    def add(self, stream: "ActivationStream", rows: Any, batch: list[tuple[int, int, list]], first_window: int) -> None:
        sink = self._open(stream)
        if sink is None:
            return
        if first_window > sink.windows_done:
            raise MsaeError(f"the cache {self.path} holds windows 0..{sink.windows_done - 1} but the "
                            f"stream reads from window {first_window}: delete the cache folder, or give "
                            f"another --cache")
        if self.of > 1:  # this layer's columns
            width = rows.acts.shape[1] // self.of
            rows = rows._replace(acts=rows.acts[:, self.column * width:(self.column + 1) * width].contiguous())
        ids_BT = torch.tensor([w for _, _, w in batch], dtype=torch.long)
        sink.add(rows, ids_BT, torch.tensor([d for _, d, _ in batch], dtype=torch.long), first_window)

    def flush(self) -> None:
        if self.sink is not None and not self.sink.writer.complete:
            self.sink.flush()

    def finish(self) -> None:
        if self.sink is None:
            from msae_core.data.harvest import ShardSink
            from msae_core.data.store import StoreWriter, read_manifest

            held = read_manifest(self.path)  # its meta is already in the manifest: no model load
            if held is not None:
                self.sink = ShardSink(StoreWriter(self.path, self.store_settings,
                                                  {"d_model": held.get("d_model")}, retarget=True))
        if self.sink is None or self.sink.writer.complete:
            return
        self.sink.flush()
        writer = self.sink.writer
        done = self.settings.store_settings(max(writer.n_rows_done, 1), self.store_settings.dtype)
        writer.finish(source="stream", target_tokens=done.target_tokens, settings_hash=done.settings_hash())
        log.info("cache %s complete: %d rows", self.path, writer.n_rows_done)


def _fresh_norms() -> dict:
    return {"rows": 0, "above": 0, "sq": 0.0, "sq_above": 0.0, "median": None, "max": 0.0, "tokens": {}}


def _copy_norms(st: dict) -> dict:
    return {**st, "tokens": dict(st.get("tokens") or {})}


def merge_rank_states(states: list[tuple[dict, dict[str, torch.Tensor]]]) -> tuple[dict, dict[str, torch.Tensor]]:
    """One checkpoint entry from the ranks' `state()`s, in rank order (a single process's as it
    is): {"ranks": [fields...]} and tensors named "rank{r}.{name}"."""
    if len(states) == 1:
        return states[0]
    fields = {"ranks": [f for f, _ in states]}
    tensors = {f"rank{r}.{k}": v for r, (_, t) in enumerate(states) for k, v in t.items()}
    return fields, tensors
