"""The activation store: residual-stream activations on disk, written in resumable shards and read
memory-mapped in shuffled batches.

The store's format has one owner, this module (about 660 lines): the manifest's fields and checks,
the writer, the shard layout and the reader must change together, so they stay together.

A store is a folder with `manifest.json` and shards `shard_00000.safetensors`, ... Each shard holds
whole context windows, so every activation row traces back to its window and position:

    acts        (N, D) float16 | float32   the activations
    token_ids   (N,)   int32               the token at that position
    window_ids  (N,)   int64               global index of the context window
    positions   (N,)   int32               position inside the window
    windows     (W, T) int32               token ids of the shard's windows (-1 = padding)
    window_index(W,)   int64               their global indices
    doc_ids     (W,)   int64               the corpus document each window came from
    norms       (N,)   float32             each row's L2 norm (absent in stores written before msae
                                           recorded it: computed from acts when asked)

A finished store's manifest holds `outliers` (`norm_outliers`): the median row norm, the rows
above OUTLIER_FACTOR x the median, their share of the total squared norm and their commonest
tokens, since a handful of huge rows (Gemma's apostrophes: 0.09 % of rows, 6.3 % of the squared
norm) can drive reconstruction and competition scores.

A shard is written to a temporary name and renamed into place, and only then listed in the manifest
(itself written atomically). Readers read only listed shards, so a harvest killed at any moment
leaves a store whose listed shards are whole, and a resumed harvest starts after the last of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
import os
import struct
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from msae_core import __version__
from msae_core.artifacts import (
    STORE_MANIFEST,
    STORE_SHARD,
    STORE_SHARD_GLOB,
    atomic_save_safetensors,
    atomic_write_json,
)
from msae_core.errors import MsaeError

STORE_FORMAT = "msae-activation-store/1"
SHARD_KEYS = ("acts", "token_ids", "window_ids", "positions", "windows", "window_index", "doc_ids")
OUTLIER_FACTOR = 5.0       # a row whose norm exceeds this many times the median norm is an outlier
_MEDIAN_SAMPLE = 1 << 20   # rows of the evenly spaced sample the median norm is taken over
_ST_DTYPES = {"F16": np.float16, "BF16": None, "F32": np.float32, "F64": np.float64,
              "I32": np.int32, "I64": np.int64, "I16": np.int16, "U8": np.uint8}


@dataclass(frozen=True)
class StoreSettings:
    """What defines a harvest: two harvests with equal settings produce the same store."""

    model: str = field(default="embedded", metadata={"help": "language model name or path"})
    layer: int = field(default=6, metadata={"help": "block whose output (resid_post) is read"})
    corpus: str = field(default="embedded", metadata={"help": "text corpus name"})
    corpus_config: str = field(default="", metadata={"help": "a Hugging Face dataset's config name"})
    corpus_split: str = field(default="train", metadata={"help": "a Hugging Face dataset's split"})
    text_column: str = field(default="text", metadata={"help": "a Hugging Face dataset's text column"})
    target_tokens: int = field(default=200_000, metadata={"help": "activation rows to harvest"})
    context_size: int = field(default=128, metadata={"help": "tokens per context window"})
    dtype: str = field(default="float16", metadata={"help": "float16 or float32 on disk"})
    prepend_bos: bool = field(default=True, metadata={"help": "BOS at the start of each window"})
    exclude_special: bool = field(default=True, metadata={"help": "drop BOS/EOS/PAD rows"})
    hook: str = field(default="resid_post", metadata={"help": "which activation"})
    separator: str = field(default="bos", metadata={
        "help": "token between packed documents: bos (SAELens's default), eos or none"})

    def problems(self) -> list[str]:
        out = []
        if self.target_tokens <= 0:
            out.append(f"tokens must be > 0 (got {self.target_tokens})")
        if self.layer < 0:
            out.append(f"layer must be >= 0 (got {self.layer})")
        if self.context_size < 2:
            out.append(f"context size must be >= 2 (got {self.context_size})")
        if self.dtype not in ("float16", "float32"):
            out.append(f"dtype must be float16 or float32 (got {self.dtype!r})")
        from msae_core.data.text import SEPARATORS

        if self.separator not in SEPARATORS:
            out.append(f"separator must be one of {', '.join(SEPARATORS)} (got {self.separator!r})")
        return out

    def settings_hash(self) -> str:
        """A hash of the settings; a store harvested before a setting existed keeps its hash (the
        separator, EOS then; the dataset's config, split and text column, the defaults then)."""
        from msae_core.data.text import LEGACY_SEPARATOR

        fields = dataclasses.asdict(self)
        # settings added later hash as before at the value every earlier harvest had
        for name, before in (("separator", LEGACY_SEPARATOR), ("corpus_config", ""), ("corpus_split", "train"),
                             ("text_column", "text")):
            if fields[name] == before:
                del fields[name]
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# the manifest fields readers rely on, with their json types (bool is no int here)
_MANIFEST_FIELDS: dict[str, tuple[type, ...]] = {
    "d_model": (int,), "dtype": (str,), "n_rows": (int,), "n_windows": (int,),
    "settings_hash": (str,), "shards": (list,),
}
_SHARD_FIELDS: dict[str, tuple[type, ...]] = {"file": (str,), "rows": (int,), "windows": (int,),
                                              "first_window": (int,)}


def _field_problem(obj: dict, name: str, types: tuple[type, ...], where: str) -> str | None:
    if name not in obj:
        return f"{where}{name} is missing"
    v = obj[name]
    if isinstance(v, bool) or not isinstance(v, types):
        return f"{where}{name} must be {' or '.join(t.__name__ for t in types)}, got {json.dumps(v)[:40]}"
    return None


def manifest_problems(m: dict) -> list[str]:
    """What is wrong with a parsed manifest (its format already checked): missing fields, wrong
    types, negative counts, shards that are not objects, a dtype other than float16/float32."""
    out = [p for name, types in _MANIFEST_FIELDS.items()
           if (p := _field_problem(m, name, types, "")) is not None]
    if out:
        return out
    if m["d_model"] < 1 or m["n_rows"] < 0 or m["n_windows"] < 0:
        out.append(f"d_model, n_rows and n_windows must be positive (got {m['d_model']}, "
                   f"{m['n_rows']}, {m['n_windows']})")
    if m["dtype"] not in ("float16", "float32"):
        out.append(f"dtype must be float16 or float32, got {m['dtype']!r}")
    for i, shard in enumerate(m["shards"]):
        if not isinstance(shard, dict):
            out.append(f"shards[{i}] must be an object, got {json.dumps(shard)[:40]}")
            continue
        out += [p for name, types in _SHARD_FIELDS.items()
                if (p := _field_problem(shard, name, types, f"shards[{i}].")) is not None]
        if len(out) > 3:
            break
    return out


def read_manifest(path: str | os.PathLike) -> dict | None:
    """The parsed, checked manifest of the store folder `path`; None when there is none. The one
    parser of manifest.json: MsaeError "not a valid activation store: ..." naming the field when
    it is unreadable, of another format, or has missing or wrongly typed fields."""
    path = Path(path)
    try:
        with open(path / STORE_MANIFEST) as fh:
            m = json.load(fh)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise MsaeError(f"not a valid activation store: {path / STORE_MANIFEST} is unreadable "
                        f"({exc})") from exc
    if not isinstance(m, dict):
        raise MsaeError(f"not a valid activation store: {path / STORE_MANIFEST} is not a json object")
    if m.get("format") != STORE_FORMAT:
        raise MsaeError(f"not a valid activation store: {path} has format {m.get('format')!r} "
                        f"(expected {STORE_FORMAT!r})")
    problems = manifest_problems(m)
    if problems:
        raise MsaeError(f"not a valid activation store: {path / STORE_MANIFEST}: " + "; ".join(problems))
    return m




def same_but_target(manifest: dict, settings: StoreSettings) -> bool:
    """Whether the store of `manifest` is a harvest of `settings` but for its target_tokens (its
    rows are the first rows of that harvest)."""
    target = manifest.get("target_tokens")
    if not isinstance(target, int) or isinstance(target, bool) or target < 1:
        return False
    return manifest.get("settings_hash") == dataclasses.replace(settings, target_tokens=target).settings_hash()


class StoreWriter:
    """Writes shards of a harvest; resumes after the last complete shard of the same harvest.

    `meta` carries what the harvest learns from the model (d_model, tokenizer, bos_token_id, corpus
    provenance) and is merged into the manifest. `retarget`: a store of the same harvest with
    another target_tokens is taken over with this one's (a stream's cache, whose run was resumed
    with other --steps): complete again only once it holds the new target's rows."""

    def __init__(self, path: str | os.PathLike, settings: StoreSettings, meta: dict, retarget: bool = False):
        self.path = Path(path)
        self.settings = settings
        existing = read_manifest(self.path) if self.path.exists() else None
        if existing is not None and retarget and existing.get("settings_hash") != settings.settings_hash() \
                and same_but_target(existing, settings):
            existing = {**existing, "target_tokens": settings.target_tokens,
                        "settings_hash": settings.settings_hash(),
                        "complete": existing["n_rows"] >= settings.target_tokens}
            atomic_write_json(self.path / STORE_MANIFEST, existing)
        if existing is not None:
            if existing.get("settings_hash") != settings.settings_hash():
                raise MsaeError(
                    f"{self.path} already holds a different harvest (model {existing.get('model')}, "
                    f"layer {existing.get('layer')}, {existing.get('target_tokens')} tokens): "
                    "choose another --out folder or delete it")
            if existing.get("d_model") != meta.get("d_model"):
                raise MsaeError(f"{self.path} holds activations of width {existing.get('d_model')}, "
                                f"the model gives {meta.get('d_model')}")
            self.manifest = existing
        else:
            if self.path.exists() and any(p for p in self.path.iterdir() if not p.name.startswith(".")):
                raise MsaeError(f"{self.path} is not empty and holds no activation store: "
                                "choose an empty or new --out folder")
            self.path.mkdir(parents=True, exist_ok=True)
            self.manifest = {
                "format": STORE_FORMAT, "msae_version": __version__,
                **dataclasses.asdict(settings), **meta,
                "settings_hash": settings.settings_hash(),
                "n_rows": 0, "n_windows": 0, "complete": False, "shards": [],
            }
            atomic_write_json(self.path / STORE_MANIFEST, self.manifest)
        self._remove_unlisted_shards()

    def _remove_unlisted_shards(self) -> None:
        listed = {s["file"] for s in self.manifest["shards"]}
        for p in self.path.glob(STORE_SHARD_GLOB):
            if p.name not in listed:
                p.unlink()  # a shard renamed into place but never listed: rewritten on resume

    @property
    def n_windows_done(self) -> int:
        return int(self.manifest["n_windows"])

    @property
    def n_rows_done(self) -> int:
        return int(self.manifest["n_rows"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def write_shard(self, acts: torch.Tensor, token_ids: torch.Tensor, window_ids: torch.Tensor,
                    positions: torch.Tensor, windows: torch.Tensor, window_index: torch.Tensor,
                    doc_ids: torch.Tensor) -> Path:
        n, d = acts.shape
        if d != self.manifest["d_model"]:
            raise ValueError(f"acts width {d} != store d_model {self.manifest['d_model']}")
        if not (len(token_ids) == len(window_ids) == len(positions) == n):
            raise ValueError("per-row tensors must all have the activations' row count")
        if not (len(window_index) == len(doc_ids) == windows.shape[0]):
            raise ValueError("per-window tensors must all have the windows' count")
        if len(window_index) and int(window_index[0]) != self.n_windows_done:
            raise ValueError(f"shard starts at window {int(window_index[0])}, expected {self.n_windows_done}")
        dtype = torch.float16 if self.manifest["dtype"] == "float16" else torch.float32
        stored = acts.to(dtype)
        tensors = {
            "acts": stored, "norms": stored.float().norm(dim=1), "token_ids": token_ids.to(torch.int32),
            "window_ids": window_ids.to(torch.int64), "positions": positions.to(torch.int32),
            "windows": windows.to(torch.int32), "window_index": window_index.to(torch.int64),
            "doc_ids": doc_ids.to(torch.int64),
        }
        name = STORE_SHARD.format(index=len(self.manifest["shards"]))
        atomic_save_safetensors(self.path / name, tensors)
        manifest = dict(self.manifest)
        manifest["shards"] = self.manifest["shards"] + [
            {"file": name, "rows": int(n), "windows": int(windows.shape[0]),
             "first_window": self.n_windows_done}]
        manifest["n_rows"] = self.n_rows_done + int(n)
        manifest["n_windows"] = self.n_windows_done + int(windows.shape[0])
        atomic_write_json(self.path / STORE_MANIFEST, manifest)
        self.manifest = manifest
        return self.path / name

    def finish(self, **extra) -> None:
        """Mark the store complete, with its norm outliers (`norm_outliers`) in the manifest."""
        outliers = norm_outliers(ActivationStore(self.path)) if self.manifest["shards"] else None
        self.manifest = {**self.manifest, **extra, "outliers": outliers, "complete": True}
        atomic_write_json(self.path / STORE_MANIFEST, self.manifest)


def _shard_header(path: Path) -> dict[str, tuple[np.dtype, tuple[int, ...], int]]:
    """name -> (dtype, shape, byte offset in the file) of every tensor of a safetensors file."""
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
    base = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        np_dtype = _ST_DTYPES.get(info["dtype"])
        if np_dtype is None:
            raise MsaeError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        shape = tuple(int(d) for d in info["shape"])
        if end - start != int(np.prod(shape, dtype=np.int64)) * np.dtype(np_dtype).itemsize:
            raise ValueError(f"tensor {name}: {end - start} bytes for shape {shape}")
        out[name] = (np.dtype(np_dtype), shape, base + start)
    return out


def _map_shard(path: Path, header: dict) -> dict[str, np.ndarray]:
    """Every tensor of a shard as a read-only numpy view of one memory mapping of the whole file:
    one open file and one mapping per shard, whatever the number of tensors."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    out = {}
    for name, (dtype, shape, offset) in header.items():
        n = int(np.prod(shape, dtype=np.int64))
        if n == 0:
            out[name] = np.zeros(shape, dtype=dtype)
            continue
        if offset + n * dtype.itemsize > size:
            raise ValueError(f"tensor {name} runs past the end of the file ({size} bytes)")
        out[name] = np.frombuffer(mm, dtype=dtype, count=n, offset=offset).reshape(shape)
    return out


def _mapped_tensor(array: np.ndarray) -> torch.Tensor:
    """A torch view of a read-only mapped array, without a copy, for reading only (torch warns that
    it cannot mark a tensor read-only; nothing here writes to it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


# Rows of a store up to which an epoch is one permutation of all rows (int64: 8 bytes a row). Above
# it an epoch is shuffled in blocks: SHUFFLE_BLOCK_ROWS consecutive rows form a block, the blocks
# are permuted, and the rows of each run of SHUFFLE_GROUP_BLOCKS permuted blocks are shuffled among
# themselves, so an epoch costs O(blocks) memory and a batch reads a few contiguous runs per block.
FULL_SHUFFLE_ROWS = 1 << 23
SHUFFLE_BLOCK_ROWS = 4096
SHUFFLE_GROUP_BLOCKS = 16
# Shards mapped at once (least recently used unmapped first): one file and one mapping each.
MAX_MAPPED_SHARDS = 64


class _BlockOrder:
    """The row order of one epoch of a large store (see FULL_SHUFFLE_ROWS): position p of the
    epoch -> global row. Deterministic in (n_rows, seed, epoch)."""

    def __init__(self, n_rows: int, seed: int, epoch: int):
        R, G = SHUFFLE_BLOCK_ROWS, SHUFFLE_GROUP_BLOCKS
        self.n_rows, self.seed, self.epoch = n_rows, seed, epoch
        n_blocks = -(-n_rows // R)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        self.block_perm = torch.randperm(n_blocks, generator=g).numpy()
        sizes = np.full(n_blocks, R, dtype=np.int64)
        sizes[-1] = n_rows - R * (n_blocks - 1)
        group_rows = np.add.reduceat(sizes[self.block_perm], np.arange(0, n_blocks, G))
        self.group_starts = np.concatenate([[0], np.cumsum(group_rows)])
        self._cache: dict[int, np.ndarray] = {}

    def _group(self, gi: int) -> np.ndarray:
        if gi not in self._cache:
            R, G = SHUFFLE_BLOCK_ROWS, SHUFFLE_GROUP_BLOCKS
            blocks = self.block_perm[gi * G:(gi + 1) * G]
            rows = np.concatenate([np.arange(b * R, min((b + 1) * R, self.n_rows)) for b in blocks])
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_033 + gi + 1)
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            self._cache[gi] = rows[torch.randperm(len(rows), generator=g).numpy()]
        return self._cache[gi]

    def slice(self, off: int, take: int) -> np.ndarray:
        parts, pos, end = [], off, off + take
        while pos < end:
            gi = int(np.searchsorted(self.group_starts, pos, side="right") - 1)
            lo = pos - int(self.group_starts[gi])
            hi = min(end, int(self.group_starts[gi + 1])) - int(self.group_starts[gi])
            parts.append(self._group(gi)[lo:hi])
            pos += hi - lo
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class ActivationStore:
    """Reads a store memory-mapped. Batches are shuffled deterministically from (seed, step), so a
    resumed training run reads exactly the batches an uninterrupted one would.

    Shards are mapped when first read and unmapped least-recently-used past MAX_MAPPED_SHARDS, so
    the open files and mappings stay bounded whatever the shard count. An ActivationSource
    (data.source)."""

    streamed = False  # read in any order, by a loader thread (data.loader)

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise MsaeError(f"no activation store at {self.path}: create one with `msae harvest --out {self.path}`")
        manifest = read_manifest(self.path)
        if manifest is None:
            raise MsaeError(f"{self.path} has no {STORE_MANIFEST}: it is not an activation store "
                            "(or its harvest never wrote a shard)")
        self.manifest = manifest
        if not manifest["shards"]:
            raise MsaeError(f"activation store {self.path} holds no complete shard yet")
        self._files = [self.path / s["file"] for s in manifest["shards"]]
        for f in self._files:
            if not f.exists():
                raise MsaeError(f"activation store {self.path} lists {f.name} but it is missing")
        self._lock = threading.RLock()
        self._headers: dict[int, dict] = {}
        self._mapped: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._shard(0)  # a first shard that does not read fails here, not at the first batch
        rows = np.array([s["rows"] for s in manifest["shards"]], dtype=np.int64)
        self._row_starts = np.concatenate([[0], np.cumsum(rows)])
        self._win_starts = np.array([s["first_window"] for s in manifest["shards"]] +
                                    [manifest["n_windows"]], dtype=np.int64)
        self._order_key: tuple[int, int] | None = None
        self._order: torch.Tensor | _BlockOrder | None = None

    def _shard(self, i: int) -> dict[str, np.ndarray]:
        """The tensors of shard i, mapped (LRU of MAX_MAPPED_SHARDS shards). Thread-safe: the
        batch loader's thread and the training thread may both read."""
        with self._lock:
            return self._shard_locked(i)

    def _shard_locked(self, i: int) -> dict[str, np.ndarray]:
        got = self._mapped.get(i)
        if got is not None:
            self._mapped.move_to_end(i)
            return got
        f = self._files[i]
        try:
            if i not in self._headers:
                self._headers[i] = _shard_header(f)
            got = _map_shard(f, self._headers[i])
        except (OSError, ValueError, json.JSONDecodeError, struct.error) as exc:
            raise MsaeError(f"activation store shard {f} is unreadable: {exc}") from exc
        self._mapped[i] = got
        while len(self._mapped) > MAX_MAPPED_SHARDS:
            self._mapped.popitem(last=False)  # unmapped once no array of it is referenced
        return got

    @property
    def n_shards(self) -> int:
        return len(self._files)

    @property
    def d_in(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def n_rows(self) -> int:
        return int(self._row_starts[-1])

    @property
    def dtype(self) -> str:
        return str(self.manifest["dtype"])

    @property
    def settings_hash(self) -> str:
        return str(self.manifest["settings_hash"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def _gather(self, key: str, idx: np.ndarray) -> np.ndarray:
        """Rows `idx` (global, any order) of per-row tensor `key`, in the order given."""
        shard_of = np.searchsorted(self._row_starts, idx, side="right") - 1
        first = self._shard(0)[key]
        out = np.empty((len(idx),) + first.shape[1:], dtype=first.dtype)
        for s in np.unique(shard_of):
            sel = np.nonzero(shard_of == s)[0]
            local = idx[sel] - self._row_starts[s]
            order = np.argsort(local, kind="stable")  # sequential reads from the mapping
            out[sel[order]] = self._shard(int(s))[key][local[order]]
        return out

    def _check_idx(self, idx: torch.Tensor | np.ndarray) -> np.ndarray:
        a = np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx, dtype=np.int64).reshape(-1)
        if len(a) and (a.min() < 0 or a.max() >= self.n_rows):
            raise IndexError(f"row index out of range [0, {self.n_rows})")
        return a

    def rows(self, idx: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Activations of global rows `idx` as float32, shape (n, D)."""
        return self.rows_raw(idx).float()

    def rows_raw(self, idx: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Activations of global rows `idx` in the store's dtype (float16 or float32), (n, D)."""
        a = self._check_idx(idx)
        return torch.from_numpy(self._gather("acts", a))

    def all_rows_raw(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Every activation row in the store's dtype, (n_rows, D), in one tensor on `device`
        (filled shard by shard; data.loader keeps a store that fits on the GPU there)."""
        out = torch.empty((self.n_rows, self.d_in), dtype=self.torch_dtype, device=device)
        for s in range(self.n_shards):
            lo, hi = int(self._row_starts[s]), int(self._row_starts[s + 1])
            out[lo:hi].copy_(_mapped_tensor(self._shard(s)["acts"]))  # one copy, straight from the mapping
        return out

    def row_info(self, idx: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        a = self._check_idx(idx)
        return {k: torch.from_numpy(np.ascontiguousarray(self._gather(k, a)))
                for k in ("token_ids", "window_ids", "positions")}

    def window_tokens(self, window_id: int) -> list[int]:
        """Token ids of one context window, padding removed."""
        if not 0 <= window_id < int(self._win_starts[-1]):
            raise IndexError(f"window {window_id} out of range [0, {int(self._win_starts[-1])})")
        s = int(np.searchsorted(self._win_starts, window_id, side="right") - 1)
        row = self._shard(s)["windows"][window_id - self._win_starts[s]]
        return [int(t) for t in row if t >= 0]

    def _epoch_rows(self, seed: int, epoch: int, off: int, take: int) -> torch.Tensor:
        """Rows at positions [off, off + take) of epoch `epoch`'s order: one seeded permutation of
        all rows up to FULL_SHUFFLE_ROWS, block-shuffled above it (_BlockOrder)."""
        with self._lock:
            return self._epoch_rows_locked(seed, epoch, off, take)

    def _epoch_rows_locked(self, seed: int, epoch: int, off: int, take: int) -> torch.Tensor:
        if self._order_key != (seed, epoch):
            if self.n_rows <= FULL_SHUFFLE_ROWS:
                g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
                self._order = torch.randperm(self.n_rows, generator=g)
            else:
                self._order = _BlockOrder(self.n_rows, seed, epoch)
            self._order_key = (seed, epoch)
        if isinstance(self._order, _BlockOrder):
            return torch.from_numpy(self._order.slice(off, take))
        assert self._order is not None
        return self._order[off:off + take]

    def shard_norms(self, s: int) -> np.ndarray:
        """Row norms of shard s, float32: recorded at harvest, else computed from its rows."""
        got = self._shard(s)
        if "norms" in got:
            return got["norms"]
        acts = got["acts"]
        return np.concatenate([np.linalg.norm(acts[lo:lo + 65_536].astype(np.float32), axis=1)
                               for lo in range(0, len(acts), 65_536)]) if len(acts) else np.zeros(0, np.float32)

    def row_norms(self, idx: torch.Tensor | np.ndarray) -> np.ndarray:
        """Norms of global rows `idx`, in the order given."""
        a = self._check_idx(idx)
        if "norms" in self._shard(0):
            return self._gather("norms", a)
        return np.linalg.norm(self._gather("acts", a).astype(np.float32), axis=1)

    def nonfinite_rows(self, limit: int = 8, chunk_rows: int = 65_536) -> tuple[int, list[int]]:
        """(number of rows holding NaN or inf, the first `limit` of them): a scan of every shard,
        for naming bad rows when something downstream turned non-finite."""
        count, first = 0, []
        for s in range(self.n_shards):
            acts = self._shard(s)["acts"]
            for lo in range(0, len(acts), chunk_rows):
                bad = np.nonzero(~np.isfinite(acts[lo:lo + chunk_rows]).all(axis=1))[0]
                count += len(bad)
                first += [int(self._row_starts[s] + lo + b) for b in bad[:max(0, limit - len(first))]]
        return count, first

    def nonfinite_problem(self) -> str | None:
        """None when every row is finite, else one line naming the bad rows."""
        count, first = self.nonfinite_rows()
        if not count:
            return None
        return (f"the activation store {self.path} holds non-finite values (NaN or inf) in {count} "
                f"row(s): {', '.join(map(str, first))}{' ...' if count > len(first) else ''}; "
                "re-harvest it (--dtype float32 for late layers)")

    def batch_indices(self, step: int, batch_size: int, seed: int = 0) -> torch.Tensor:
        """Global row indices of batch `step`, ascending: the rows at positions [step * B, (step +
        1) * B) of the epochs' orders laid end to end. A batch is a set of rows; ascending, each
        shard's rows are one run and read in file order."""
        start = step * batch_size
        parts, pos, need = [], start, batch_size
        while need > 0:
            epoch, off = divmod(pos, self.n_rows)
            take = min(need, self.n_rows - off)
            parts.append(self._epoch_rows(seed, epoch, off, take))
            pos += take
            need -= take
        return torch.sort(torch.cat(parts)).values

    def batch(self, step: int, batch_size: int, seed: int = 0) -> torch.Tensor:
        """Batch `step` of a shuffled pass over the store, float32 (B, D)."""
        return self.batch_raw(step, batch_size, seed).float()

    def input_sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """Up to `n` rows (the first batch of that size), float32: the SAE's input-scale sample."""
        return self.batch(0, min(self.n_rows, n), seed)

    def batch_raw(self, step: int, batch_size: int, seed: int = 0,
                  out: torch.Tensor | None = None, part: tuple[int, int] = (0, 1)) -> torch.Tensor:
        """Batch `step` in the store's dtype (float16 for a default harvest), gathered into `out`
        when given (a (B, D) tensor of that dtype, e.g. the loader's reused or pinned buffers).
        `part` (r, n): the r-th of n equal slices of the batch's (ascending) rows, a data-parallel
        rank's share; the slices in rank order are the whole batch."""
        idx = self.batch_indices(step, batch_size, seed).numpy()
        r, n = part
        if n > 1:
            idx = idx[r * (batch_size // n):(r + 1) * (batch_size // n)]
        if out is None:
            out = torch.empty((len(idx), self.d_in), dtype=self.torch_dtype)
        return self._gather_sorted_into(idx, out)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.from_numpy(np.empty(0, dtype=self._shard(0)["acts"].dtype)).dtype

    def _gather_sorted_into(self, idx: np.ndarray, out_ND: torch.Tensor) -> torch.Tensor:
        """Activation rows of ascending global indices `idx` into out_ND, one torch.index_select per
        shard (multi-threaded, GIL released) straight from its mapping into a slice of out_ND."""
        if len(idx) and (idx[0] < 0 or idx[-1] >= self.n_rows):
            raise IndexError(f"row index out of range [0, {self.n_rows})")
        shard_of = np.searchsorted(self._row_starts, idx, side="right") - 1
        cuts = np.concatenate([[0], np.flatnonzero(np.diff(shard_of)) + 1, [len(idx)]])
        for a, b in zip(cuts[:-1], cuts[1:]):
            s = int(shard_of[a])
            src_ND = _mapped_tensor(self._shard(s)["acts"])
            local = torch.from_numpy(idx[a:b] - self._row_starts[s])
            torch.index_select(src_ND, 0, local, out=out_ND[a:b])
        return out_ND

    def batches(self, batch_size: int, seed: int = 0, start_step: int = 0) -> Iterator[torch.Tensor]:
        step = start_step
        while True:
            yield self.batch(step, batch_size, seed)
            step += 1


def norm_outliers(store: ActivationStore, factor: float = OUTLIER_FACTOR, top_tokens: int = 5) -> dict:
    """The store's rows with a norm above `factor` x the median row norm (the median over an evenly
    spaced sample of at most 2^20 rows; the count and shares over every row): {median_norm,
    factor, threshold, n_rows, fraction, share_sq_norm (their part of the total squared norm),
    max_norm, top_tokens: [[token id, rows], ...] (the commonest tokens among them)}."""
    n = store.n_rows
    step = max(1, n // _MEDIAN_SAMPLE)
    sample = np.concatenate([store.shard_norms(s)[(-int(store._row_starts[s])) % step::step]
                             for s in range(store.n_shards)])
    median = float(np.median(sample)) if len(sample) else 0.0
    thr = factor * median
    count, sq_all, sq_out, top = 0, 0.0, 0.0, 0.0
    tokens: dict[int, int] = {}
    for s in range(store.n_shards):
        norms = store.shard_norms(s).astype(np.float64)
        out = norms > thr
        count += int(out.sum())
        sq_all += float((norms ** 2).sum())
        sq_out += float((norms[out] ** 2).sum())
        top = max(top, float(norms.max(initial=0.0)))
        if out.any():
            ids, counts = np.unique(store._shard(s)["token_ids"][out], return_counts=True)
            for t, c in zip(ids.tolist(), counts.tolist()):
                tokens[t] = tokens.get(t, 0) + c
    return outlier_record(median, factor, count, n, sq_all, sq_out, top, tokens, top_tokens)


def outlier_record(median: float, factor: float, n_above: int, n_rows: int, sq_all: float, sq_above: float,
                   max_norm: float, tokens: dict[int, int], top_tokens: int = 5) -> dict:
    """A manifest's `outliers` entry from its sums (norm_outliers over a store, the stream over what
    it streamed): `tokens` counts the outlier rows per token id."""
    return {"median_norm": median, "factor": factor, "threshold": factor * median, "n_rows": n_above,
            "fraction": n_above / n_rows if n_rows else 0.0, "share_sq_norm": sq_above / sq_all if sq_all else 0.0,
            "max_norm": max_norm, "top_tokens": sorted(([int(t), c] for t, c in tokens.items()),
                                                       key=lambda tc: (-tc[1], tc[0]))[:top_tokens]}


def outlier_line(outliers: dict | None, token_text=None) -> str:
    """One line for a manifest's `outliers` entry; `token_text(ids) -> [str]` names the tokens."""
    if not outliers:
        return "row norms not recorded (a store written before msae recorded them)"
    o = outliers
    if not o["n_rows"]:
        return f"no row above {o['factor']:g}x the median norm ({o['median_norm']:.4g}); largest {o['max_norm']:.4g}"
    ids = [t for t, _ in o["top_tokens"]]
    names = token_text(ids) if token_text is not None else [str(t) for t in ids]
    toks = ", ".join(f"{n!r} ({c})" for n, (_, c) in zip(names, o["top_tokens"]))
    return (f"{o['n_rows']} rows ({o['fraction']:.2%}) above {o['factor']:g}x the median norm "
            f"({o['median_norm']:.4g}), up to {o['max_norm']:.4g}, carry {o['share_sq_norm']:.1%} of the "
            f"squared norm; commonest tokens: {toks}")
