"""`msae harvest`: run a language model over a corpus and store one layer's residual stream.

Windows come from `text.context_windows` in a fixed order; each batch runs the model only up to
block `layer` (the forward stops there). Rows of special tokens (BOS/EOS/PAD) are dropped by default.
Rows are gathered into shards of about `shard_tokens` rows, each written by `StoreWriter` (renamed
into place, then listed). Shards start at batch boundaries, so a harvest killed at any point and run
again resumes after its last listed shard and ends with exactly the store an uninterrupted run
writes. The store holds exactly `target_tokens` rows unless the corpus runs out first.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import logging
import os
import platform
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from msae_core.artifacts import check_can_create
from msae_core.configutil import validate
from msae_core.data.store import (
    SHARD_KEYS,
    ActivationStore,
    StoreSettings,
    StoreWriter,
    outlier_line,
    read_manifest,
    same_but_target,
)
from msae_core.errors import MsaeError

log = logging.getLogger(__name__)

DEFAULT_SHARD_TOKENS = 32_768
FLOAT16_MAX = 65504.0


def check_store_folder(out: Path, settings: StoreSettings, retarget: bool = False) -> dict | None:
    """The manifest already in `out` if it is this harvest's; refuse another harvest's folder, or a
    folder holding anything else (a run, a sweep), early, before the model loads. StoreWriter
    checks again when it opens the folder. (A stream's --cache folder is checked the same way, with
    `retarget`: the same harvest with another target_tokens is accepted.)"""
    if not out.is_dir():  # a usable path, or the OS's own error for it, before the model loads
        check_can_create(out)
        return None
    manifest = read_manifest(out)
    if manifest is None:
        if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
            raise MsaeError(f"{out} is not empty and holds no activation store: choose an empty or "
                            "new --out folder")
        return None
    if manifest.get("settings_hash") != settings.settings_hash() and not (
            retarget and same_but_target(manifest, settings)):
        raise MsaeError(f"{out} already holds a different harvest (model {manifest.get('model')}, "
                        f"layer {manifest.get('layer')}, {manifest.get('target_tokens')} tokens): "
                        "choose another --out folder or delete it")
    return manifest


class WindowRows(NamedTuple):
    """The activation rows of a batch of context windows, in window then position order."""

    acts: torch.Tensor        # (N, D) block `layer`'s output, the model's dtype, on its device
    token_ids: torch.Tensor   # (N,) long, CPU
    window_ids: torch.Tensor  # (N,) long, CPU: global window index
    positions: torch.Tensor   # (N,) long, CPU


def window_rows(lm: Any, ids_BT: torch.Tensor, layer: int | tuple[int, ...], first_window: int,
                special: torch.Tensor | None) -> WindowRows:
    """Run the windows `ids_BT` (B, T) through the model up to block `layer` (early stop) and keep
    the rows whose token is not in `special` (all rows when None): what harvest stores and the
    stream (data.stream) trains on, so both see the same activations. `layer` a tuple: those
    blocks' outputs from one forward, side by side in each row ((N, len(layer) x D))."""
    B, T = ids_BT.shape
    with torch.inference_mode():
        if isinstance(layer, tuple):
            acts_BTD = torch.cat(lm.resid_posts(ids_BT, layer, stop_early=True), dim=-1)
        else:
            acts_BTD = lm.resid_post(ids_BT, layer, stop_early=True)
    keep_BT = ~torch.isin(ids_BT, special) if special is not None else torch.ones_like(ids_BT, dtype=torch.bool)
    flat = keep_BT.reshape(-1)
    wid_BT = (first_window + torch.arange(B))[:, None].expand(B, T)
    pos_BT = torch.arange(T)[None, :].expand(B, T)
    acts = acts_BTD.reshape(B * T, -1)[flat.to(acts_BTD.device)]
    return WindowRows(acts, ids_BT.reshape(-1)[flat], wid_BT.reshape(-1)[flat], pos_BT.reshape(-1)[flat])


def store_meta(lm: Any, corpus: Any, settings: StoreSettings, **extra: Any) -> dict:
    """What a store's manifest learns from the model and the corpus (StoreWriter's `meta`);
    `extra` goes into its "harvest" entry (how the rows were made)."""
    import transformers

    return {
        "corpus": {"name": corpus.name, "provenance": corpus.provenance},
        "d_model": lm.d_model, "n_layers": lm.n_layers, "tokenizer": settings.model,
        "bos_token_id": lm.bos_token_id, "special_ids": sorted(lm.special_ids),
        "harvest": {**extra, "model_dtype": str(lm.dtype), "torch": torch.__version__,
                    "transformers": transformers.__version__, "machine": platform.machine()},
    }


class ShardSink:
    """Rows of whole windows, gathered into shards of about `shard_tokens` rows and written by a
    StoreWriter, up to the store's target_tokens rows: what `harvest` writes, and what a stream
    writes into its cache (data.stream, `--cache`). Windows must come in order; those the store
    already holds are skipped (a resumed stream reads them again). Every row is checked before it
    is kept: finite, and within float16's range for a float16 store."""

    def __init__(self, writer: StoreWriter, shard_tokens: int = DEFAULT_SHARD_TOKENS):
        self.writer, self.shard_tokens = writer, shard_tokens
        self.target = writer.settings.target_tokens
        self._clear()

    def _clear(self) -> None:
        self.parts: dict[str, list[torch.Tensor]] = {k: [] for k in SHARD_KEYS}
        self.rows, self.windows = 0, 0  # buffered, not yet in a shard

    @property
    def rows_done(self) -> int:
        return self.writer.n_rows_done + self.rows

    @property
    def windows_done(self) -> int:
        return self.writer.n_windows_done + self.windows

    @property
    def full(self) -> bool:
        return self.rows_done >= self.target

    def add(self, rows: WindowRows, ids_BT: torch.Tensor, doc_ids: torch.Tensor, first_window: int) -> int:
        """Take in `rows`, the rows of windows first_window .. first_window + B - 1 (`ids_BT`, B
        windows, their `doc_ids`). Rows past the target are cut, and the windows after the cut
        with them; a shard is written when enough rows are buffered or the target is reached.
        Returns the rows kept. MsaeError on a non-finite row or a float16 overflow."""
        acts, tok, wid, pos = rows.acts.float().cpu(), rows.token_ids, rows.window_ids, rows.positions
        skip = self.windows_done - first_window
        if skip < 0:
            raise ValueError(f"windows must come in order: got window {first_window}, "
                             f"expected {self.windows_done}")
        if skip:  # windows the store already holds
            keep = wid >= self.windows_done
            acts, tok, wid, pos = acts[keep], tok[keep], wid[keep], pos[keep]
            ids_BT, doc_ids, first_window = ids_BT[skip:], doc_ids[skip:], first_window + skip
        n_win, need = ids_BT.shape[0], self.target - self.rows_done
        if n_win <= 0 or need <= 0:
            return 0
        if len(acts) > need:  # the last rows: cut, and the windows after the cut
            acts, tok, wid, pos = acts[:need], tok[:need], wid[:need], pos[:need]
            n_win = int(wid[-1]) - first_window + 1
        self._check(acts, wid, pos)
        for k, v in (("acts", acts), ("token_ids", tok), ("window_ids", wid), ("positions", pos),
                     ("windows", ids_BT[:n_win]), ("window_index", first_window + torch.arange(n_win)),
                     ("doc_ids", doc_ids[:n_win])):
            self.parts[k].append(v)
        self.rows += len(acts)
        self.windows += n_win
        if self.rows >= self.shard_tokens or self.full:
            self.flush()
        return len(acts)

    def _check(self, acts: torch.Tensor, wid: torch.Tensor, pos: torch.Tensor) -> None:
        layer = self.writer.settings.layer
        bad_N = ~torch.isfinite(acts).all(dim=1)
        if bool(bad_N.any()):  # never write NaN/inf: a store holds only finite rows
            first = int(bad_N.nonzero()[0])
            raise MsaeError(f"the model gave non-finite activations (NaN or inf) at layer "
                            f"{layer} in {int(bad_N.sum())} row(s), the first in window "
                            f"{int(wid[first])} at position {int(pos[first])}: nothing written "
                            f"for that batch; try --model-dtype float32 or another layer")
        if self.writer.settings.dtype == "float16" and len(acts) and acts.abs().max().item() > FLOAT16_MAX:
            raise MsaeError(f"layer {layer} activations exceed the float16 range "
                            f"({acts.abs().max().item():.3g}): store them as float32 "
                            f"(msae harvest --dtype float32, msae train --cache-dtype float32)")

    def flush(self) -> None:
        """Write what is buffered as a shard (nothing when nothing is)."""
        if not self.windows:
            return
        tensors = {k: torch.cat(v) for k, v in self.parts.items()}
        writer = self.writer
        try:
            writer.write_shard(**tensors)
        except OSError as exc:
            done = f"{len(writer.manifest['shards'])} complete shard(s), {writer.n_rows_done} rows"
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise MsaeError(f"disk full while writing to {writer.path}: {done} are intact and readable; "
                                "free some space and run the same command again to resume") from exc
            raise MsaeError(f"cannot write to {writer.path} ({exc.strerror or exc}): {done} are intact; "
                            "run the same command again to resume") from exc
        self._clear()


def harvest(settings: StoreSettings, out: str | os.PathLike, *, batch_size: int = 8,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, device: str | None = None,
            progress: bool = True, lm=None, corpus=None, model_dtype: str = "auto") -> ActivationStore:
    """Harvest `settings.target_tokens` rows of block `settings.layer`'s output into `out`.

    `model_dtype`: the language model's dtype (data.lm.model_dtype: auto = bfloat16 on CUDA,
    float32 on the CPU); the manifest records it (harvest.model_dtype).
    Resumes a killed harvest of the same settings; returns at once when `out` is complete.
    `lm` / `corpus` may be passed already loaded (they must be the ones the settings name)."""
    from msae_core.data.lm import load_lm
    from msae_core.data.text import context_windows, corpus_of

    validate(settings)
    if settings.hook != "resid_post":
        raise MsaeError(f"hook {settings.hook!r} is not supported: only resid_post")
    if batch_size < 1 or shard_tokens < 1:
        raise MsaeError(f"batch size and shard tokens must be >= 1 (got {batch_size}, {shard_tokens})")
    out = Path(out)
    existing = check_store_folder(out, settings)
    if existing is not None and existing.get("complete"):
        log.info("%s already holds this harvest (%d rows)", out, existing.get("n_rows", 0))
        return ActivationStore(out)

    corpus = corpus if corpus is not None else corpus_of(settings)
    if lm is None:
        from msae_core.data.lm import model_dtype as resolve_model_dtype
        from msae_core.devices import resolve_device

        lm = load_lm(settings.model, device=device,
                     dtype=resolve_model_dtype(model_dtype, resolve_device(device)))
    lm.check_layer(settings.layer)
    meta = store_meta(lm, corpus, settings, batch_size=batch_size, shard_tokens=shard_tokens)
    try:
        writer = StoreWriter(out, settings, meta)
    except OSError as exc:
        raise MsaeError(f"cannot create the activation store {out}: {exc.strerror or exc}") from exc
    if writer.complete:
        return ActivationStore(out)

    special = torch.tensor(sorted(lm.special_ids), dtype=torch.long)
    windows = context_windows(corpus, lm.tokenizer, settings.context_size, settings.prepend_bos,
                              separator=settings.separator)
    windows = itertools.islice(windows, writer.n_windows_done, None)  # resume after the last shard
    sink = ShardSink(writer, shard_tokens)
    win_next = writer.n_windows_done
    exhausted = False
    bar = tqdm(total=settings.target_tokens, initial=writer.n_rows_done, unit="tok", unit_scale=True,
               desc=f"harvest L{settings.layer}", disable=None if progress else True)
    try:
        while not sink.full:
            batch = list(itertools.islice(windows, batch_size))
            if not batch:
                exhausted = True
                break
            doc_ids = torch.tensor([d for d, _ in batch], dtype=torch.long)
            ids_BT = torch.tensor([w for _, w in batch], dtype=torch.long)
            rows = window_rows(lm, ids_BT, settings.layer, win_next,
                               special if settings.exclude_special else None)
            bar.update(sink.add(rows, ids_BT, doc_ids, win_next))
            win_next += ids_BT.shape[0]
        sink.flush()
    finally:
        bar.close()
    if writer.n_rows_done == 0:
        raise MsaeError(f"corpus {corpus.name!r} gave no tokens to harvest")
    if exhausted:
        log.warning("corpus %s ran out after %d of %d tokens", corpus.name, writer.n_rows_done,
                    settings.target_tokens)
    try:
        writer.finish(corpus_exhausted=exhausted)
    except OSError as exc:
        raise MsaeError(f"cannot finish {out} ({exc.strerror or exc}): run the same command again") from exc
    return ActivationStore(out)


# ----------------------------------------------------------------------------------------------
# command line


def _run(args: argparse.Namespace) -> int:
    settings = StoreSettings(model=args.model, layer=args.layer, corpus=args.corpus,
                             corpus_config=args.dataset_config, corpus_split=args.split, text_column=args.text_column,
                             target_tokens=args.tokens, context_size=args.context_size,
                             dtype=args.dtype, exclude_special=args.exclude_special, separator=args.separator)
    store = harvest(settings, args.out, batch_size=args.batch_size, shard_tokens=args.shard_tokens,
                    device=args.device, progress=not args.no_progress, model_dtype=args.model_dtype)
    log.info("activation store %s: %d rows of width %d (%s), %d shards", args.out, store.n_rows,
             store.d_in, store.dtype, len(store.manifest["shards"]))
    log.info("outliers: %s", outlier_line(store.manifest.get("outliers")))
    return 0


def add_cli(subparsers) -> None:
    d = StoreSettings()
    p = subparsers.add_parser(
        "harvest", help="store a layer's residual stream over a corpus",
        description="Run a language model over a corpus and store the output of one block "
                    "(resid_post) as safetensors shards. A killed harvest resumes when run again.")
    p.add_argument("--model", default=d.model, help="'embedded' (Gemma 3 270M), a Hugging Face name or "
                   "a local folder (default: %(default)s)")
    p.add_argument("--layer", type=int, default=d.layer, help="block index (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=d.target_tokens,
                   help="activation rows to store (default: %(default)s)")
    p.add_argument("--out", required=True, help="store folder (created; resumed if it holds this harvest)")
    p.add_argument("--corpus", default=d.corpus, help="'embedded' (Debian English fortunes), "
                   "'fortunes-de|es|it', a Hugging Face dataset or a local .txt file (default: %(default)s)")
    p.add_argument("--dataset-config", default=d.corpus_config,
                   help="a Hugging Face dataset's config name (default: none)")
    p.add_argument("--split", default=d.corpus_split, help="a Hugging Face dataset's split (default: %(default)s)")
    p.add_argument("--text-column", default=d.text_column,
                   help="a Hugging Face dataset's text column; a column of token ids is read as "
                        "pre-tokenised, and a dataset with no 'text' column but 'input_ids' is "
                        "(default: %(default)s)")
    p.add_argument("--separator", choices=["bos", "eos", "none"], default=d.separator,
                   help="token between packed documents: bos (SAELens's default sequence separator), eos "
                        "(stores harvested before this option), none (default: %(default)s)")
    p.add_argument("--dtype", choices=["float16", "float32"], default=d.dtype,
                   help="on-disk dtype (default: %(default)s)")
    p.add_argument("--context-size", type=int, default=d.context_size,
                   help="tokens per window, BOS included (default: %(default)s)")
    p.add_argument("--exclude-special", action=argparse.BooleanOptionalAction, default=d.exclude_special,
                   help="drop BOS/EOS/PAD rows (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward (default: %(default)s)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help="rows per shard, about (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--model-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="the language model's dtype (auto: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)

