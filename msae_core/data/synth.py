"""`msae synth`: an activation store generated from known features, with the structure that causes
feature absorption, and its ground truth saved beside it.

Each row is x = sum_i a_i d_i + noise, over F true features with unit directions d_i (random in
d_model dimensions, so F > d_model is superposition) and magnitudes a_i >= 0, zero when i is off.
The features are, in index order:

1. Hierarchies: `n_trees` trees, each a root with `branching` children per node down `depth`
   levels. A root fires with probability `p_root`. When a node fires, with probability `p_child`
   exactly one of its children fires (chosen uniformly): children are mutually exclusive and never
   fire without their parent. This is the set-up where an SAE that pays for each firing latent
   gains by folding the parent's direction into each child's latent and leaving the parent's
   latent silent whenever a child fires: absorption (Chanin et al. 2024).
2. Correlated groups: `n_correlated` features in groups of `group_size`; within a group the firing
   events share a Gaussian copula with correlation `correlation` (feature i fires when
   sqrt(rho) g + sqrt(1 - rho) e_i < Phi^-1(p_i), g shared by the group).
3. Independent features: the rest, each firing on its own.

Firing probabilities of groups 2 and 3 are log-uniform in [p_min, p_max]. Each feature has a mean
magnitude uniform in magnitude * [1 - magnitude_spread, 1 + magnitude_spread]; a firing draws
mean * (1 + magnitude_std * N(0, 1)), floored at a tenth of the mean. Noise is N(0, noise^2) per
dimension.

Files (names in artifacts.py), owned here:
- the store itself (data.store): float32 rows in shards of whole 128-row "windows" (token id 0,
  no text; the manifest's `synthetic` entry holds these settings);
- SYNTH_FEATURES: directions (F, D), parent (F,) (-1 for none), level (F,) (0 for roots and
  non-hierarchical features), kind (F,) (0 hierarchy, 1 correlated, 2 independent), group (F,)
  (-1 outside a correlated group), p_fire (F,) (unconditional for roots and groups 2-3, given the
  parent for children), mean_magnitude (F,);
- SYNTH_ROWS per shard: which features fire in each row and how strongly, as compressed sparse
  rows (indptr (N + 1,), feature (nnz,), magnitude (nnz,)). Written before its shard is listed, so
  every listed shard has its truth; a killed `msae synth` resumes after the last listed shard.

Every shard is drawn from its own generator (seed, shard index), so a resumed store equals an
uninterrupted one; `sample_rows(..., split="eval")` draws fresh rows from the same distribution
for the `synthetic` eval (evals.synthetic), never the rows trained on.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from msae_core.artifacts import SYNTH_FEATURES, SYNTH_ROWS, atomic_save_safetensors
from msae_core.configutil import add_dataclass_args, overrides_from_args, validate
from msae_core.data.store import ActivationStore, StoreSettings, StoreWriter, read_manifest
from msae_core.errors import MsaeError

log = logging.getLogger(__name__)

WINDOW_ROWS = 128          # rows per store "window" (the store format's unit; no text behind it)
SHARD_WINDOWS = 256        # windows per shard: 32,768 rows
KIND_HIERARCHY, KIND_CORRELATED, KIND_INDEPENDENT = 0, 1, 2
_SPLITS = {"train": 0, "eval": 1}


def _memory_available() -> int:
    """Bytes of memory free for a new allocation (the OS's available figure; 2**62 where unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 62


@dataclass(frozen=True)
class SynthConfig:
    """The generator's knobs; equal settings give the same store, bit for bit."""

    n_features: int = field(default=256, metadata={"help": "true features, all kinds"})
    d_model: int = field(default=64, metadata={"help": "width of the activations"})
    n_trees: int = field(default=8, metadata={"help": "hierarchies (each a root feature)"})
    depth: int = field(default=2, metadata={"help": "levels of children below each root (0: no hierarchy)"})
    branching: int = field(default=3, metadata={"help": "children per node (mutually exclusive)"})
    p_root: float = field(default=0.1, metadata={"help": "firing probability of a root"})
    p_child: float = field(default=0.9, metadata={"help": "probability that one child fires when its parent fires"})
    n_correlated: int = field(default=32, metadata={"help": "features in correlated groups"})
    group_size: int = field(default=4, metadata={"help": "features per correlated group"})
    correlation: float = field(default=0.5, metadata={"help": "copula correlation within a group, in [0, 1)"})
    p_min: float = field(default=0.005, metadata={"help": "lowest firing probability (groups, independent)"})
    p_max: float = field(default=0.05, metadata={"help": "highest firing probability (groups, independent)"})
    magnitude: float = field(default=1.0, metadata={"help": "mean firing magnitude"})
    magnitude_spread: float = field(default=0.5, metadata={
        "help": "per-feature means uniform in magnitude * [1 - spread, 1 + spread]"})
    magnitude_std: float = field(default=0.2, metadata={"help": "per-firing spread, relative to the feature's mean"})
    noise: float = field(default=0.01, metadata={"help": "std of the Gaussian noise per dimension"})
    rows: int = field(default=100_000, metadata={"help": "rows to generate"})
    seed: int = field(default=0, metadata={"help": "seed of the features and the rows"})

    @property
    def n_hierarchy(self) -> int:
        return self.n_trees * sum(self.branching ** lv for lv in range(self.depth + 1)) if self.n_trees else 0

    def _hierarchy_over(self, limit: int) -> bool:
        """Whether the hierarchies hold more than `limit` features, without building a number of
        `depth` digits (a depth of 100,000 is refused, not computed)."""
        total, level = 0, max(self.n_trees, 0)
        for _ in range(max(self.depth, 0) + 1):
            total += level
            if total > limit:
                return True
            level *= max(self.branching, 1)
        return False

    def memory_bytes(self) -> int:
        """What generating needs at once: the feature directions (F, D) and a shard's rows (its
        activations (N, D) and firing magnitudes (N, F)), float32."""
        shard = min(self.rows, SHARD_WINDOWS * WINDOW_ROWS)
        return 4 * (self.n_features * self.d_model + shard * (self.d_model + self.n_features))

    def problems(self) -> list[str]:
        out = []
        floats = [f.name for f in dataclasses.fields(self) if f.type in ("float", float)]
        bad = [f"{name} must be a finite number (got {getattr(self, name)})" for name in floats
               if not math.isfinite(getattr(self, name))]
        if bad:
            return bad
        for name in ("n_features", "d_model", "rows", "group_size"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        for name in ("n_trees", "depth", "n_correlated"):
            if getattr(self, name) < 0:
                out.append(f"{name} must be >= 0 (got {getattr(self, name)})")
        if self.n_trees and self.depth and self.branching < 2:
            out.append(f"branching must be >= 2 so that children can exclude each other (got {self.branching})")
        for name in ("p_root", "p_child", "p_min", "p_max"):
            if not 0 < getattr(self, name) <= 1:
                out.append(f"{name} must be in (0, 1] (got {getattr(self, name)})")
        if self.p_min > self.p_max:
            out.append(f"p_min {self.p_min} is above p_max {self.p_max}")
        if not 0 <= self.correlation < 1:
            out.append(f"correlation must be in [0, 1) (got {self.correlation})")
        if self.n_correlated % max(1, self.group_size):
            out.append(f"n_correlated {self.n_correlated} is not a multiple of group_size {self.group_size}")
        if self.magnitude <= 0 or not 0 <= self.magnitude_spread < 1 or self.magnitude_std < 0 or self.noise < 0:
            out.append("magnitude must be > 0, magnitude_spread in [0, 1), magnitude_std and noise >= 0")
        if not out and self._hierarchy_over(self.n_features - self.n_correlated):
            held = f"{self.n_hierarchy}" if self.depth <= 64 else f"more than {self.n_features}"
            out.append(f"{self.n_trees} trees of depth {self.depth} and branching {self.branching} hold "
                       f"{held} features and the groups {self.n_correlated}: more than "
                       f"n_features {self.n_features}")
        if not out and self.memory_bytes() > _memory_available():
            out.append(f"n_features {self.n_features} x d_model {self.d_model} needs about "
                       f"{self.memory_bytes() / 2**30:.1f} GiB at once, more than the "
                       f"{_memory_available() / 2**30:.1f} GiB free here")
        return out

    def settings_hash(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def store_settings(self) -> StoreSettings:
        """The store settings that name this generator (its hash is in `corpus`)."""
        return StoreSettings(model="synthetic", layer=0, corpus=f"synthetic-{self.settings_hash()}",
                             target_tokens=self.rows, context_size=WINDOW_ROWS, dtype="float32",
                             prepend_bos=False, exclude_special=False, hook="synthetic")


class SynthFeatures(NamedTuple):
    """The ground truth that does not change from row to row (see the module docstring)."""

    directions_FD: torch.Tensor
    parent_F: torch.Tensor
    level_F: torch.Tensor
    kind_F: torch.Tensor
    group_F: torch.Tensor
    p_fire_F: torch.Tensor
    mean_magnitude_F: torch.Tensor

    @property
    def n_features(self) -> int:
        return int(self.directions_FD.shape[0])

    def children(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for i, p in enumerate(self.parent_F.tolist()):
            if p >= 0:
                out.setdefault(p, []).append(i)
        return out

    def descendants(self, i: int) -> list[int]:
        kids = self.children()
        out, todo = [], list(kids.get(i, []))
        while todo:
            j = todo.pop()
            out.append(j)
            todo += kids.get(j, [])
        return sorted(out)


def _generator(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:7], "little"))


def make_features(cfg: SynthConfig) -> SynthFeatures:
    """The features of `cfg`: hierarchies first (each tree breadth first), then the correlated
    groups, then the independent features."""
    validate(cfg)
    F = cfg.n_features
    g = _generator(cfg.seed, -1)
    directions_FD = torch.randn(F, cfg.d_model, generator=g, dtype=torch.float64)
    directions_FD = (directions_FD / directions_FD.norm(dim=1, keepdim=True)).float()
    parent_F = torch.full((F,), -1, dtype=torch.int64)
    level_F = torch.zeros(F, dtype=torch.int64)
    kind_F = torch.full((F,), KIND_INDEPENDENT, dtype=torch.int64)
    group_F = torch.full((F,), -1, dtype=torch.int64)
    p_fire_F = torch.zeros(F, dtype=torch.float32)
    nxt = 0
    for _ in range(cfg.n_trees):
        frontier = [nxt]
        kind_F[nxt], p_fire_F[nxt] = KIND_HIERARCHY, cfg.p_root
        nxt += 1
        for lv in range(1, cfg.depth + 1):
            new = []
            for node in frontier:
                for _ in range(cfg.branching):
                    parent_F[nxt], level_F[nxt], kind_F[nxt] = node, lv, KIND_HIERARCHY
                    p_fire_F[nxt] = cfg.p_child / cfg.branching
                    new.append(nxt)
                    nxt += 1
            frontier = new
    n_rest = F - nxt
    log_p = torch.empty(n_rest, dtype=torch.float64).uniform_(math.log(cfg.p_min), math.log(cfg.p_max), generator=g)
    p_fire_F[nxt:] = log_p.exp().float()
    kind_F[nxt:nxt + cfg.n_correlated] = KIND_CORRELATED
    group_F[nxt:nxt + cfg.n_correlated] = torch.arange(cfg.n_correlated) // cfg.group_size
    spread = torch.empty(F, dtype=torch.float64).uniform_(-cfg.magnitude_spread, cfg.magnitude_spread, generator=g)
    mean_magnitude_F = (cfg.magnitude * (1 + spread)).float()
    return SynthFeatures(directions_FD, parent_F, level_F, kind_F, group_F, p_fire_F, mean_magnitude_F)


def sample_rows(cfg: SynthConfig, feats: SynthFeatures, n: int, *, chunk: int, split: str = "train"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (n, D) float32, magnitudes (n, F) float32, zero where off) for chunk `chunk` of `split`:
    deterministic in (cfg.seed, split, chunk), independent across chunks and splits."""
    g = _generator(cfg.seed, _SPLITS[split], chunk)
    F = feats.n_features
    on_NF = torch.zeros(n, F, dtype=torch.bool)
    roots = torch.nonzero((feats.kind_F == KIND_HIERARCHY) & (feats.parent_F < 0)).flatten()
    on_NF[:, roots] = torch.rand(n, len(roots), generator=g) < cfg.p_root
    for lv in range(1, cfg.depth + 1):
        kids = torch.nonzero(feats.level_F == lv).flatten()            # (P * b,), grouped by parent
        if not len(kids):
            break
        parents = feats.parent_F[kids[::cfg.branching]]                # (P,)
        fires_NP = on_NF[:, parents] & (torch.rand(n, len(parents), generator=g) < cfg.p_child)
        pick_NP = torch.randint(cfg.branching, (n, len(parents)), generator=g)
        chosen_NPb = torch.nn.functional.one_hot(pick_NP, cfg.branching).bool() & fires_NP[..., None]
        on_NF[:, kids] = chosen_NPb.reshape(n, -1)
    rest = torch.nonzero(feats.kind_F != KIND_HIERARCHY).flatten()
    if len(rest):
        thresh = torch.special.ndtri(feats.p_fire_F[rest].double())
        z = torch.randn(n, len(rest), generator=g, dtype=torch.float64)
        grp = feats.group_F[rest]
        in_group = grp >= 0
        if in_group.any():
            rho = cfg.correlation
            shared = torch.randn(n, int(grp.max()) + 1, generator=g, dtype=torch.float64)
            z[:, in_group] = math.sqrt(rho) * shared[:, grp[in_group]] + math.sqrt(1 - rho) * z[:, in_group]
        on_NF[:, rest] = z < thresh
    mean_F = feats.mean_magnitude_F
    mag_NF = mean_F * (1 + cfg.magnitude_std * torch.randn(n, F, generator=g))
    mag_NF = torch.maximum(mag_NF, 0.1 * mean_F) * on_NF
    x_ND = mag_NF @ feats.directions_FD + cfg.noise * torch.randn(n, cfg.d_model, generator=g)
    return x_ND, mag_NF


# --- files -----------------------------------------------------------------------------------------

def save_features(path: Path, feats: SynthFeatures) -> None:
    atomic_save_safetensors(path / SYNTH_FEATURES, feats._asdict())


def load_features(store_path: str | os.PathLike) -> SynthFeatures:
    from safetensors.torch import load_file

    path = Path(store_path) / SYNTH_FEATURES
    if not path.exists():
        raise MsaeError(f"{store_path} holds no ground truth ({SYNTH_FEATURES} missing): "
                        "it was not written by `msae synth`")
    return SynthFeatures(**load_file(str(path)))


def synth_config(manifest: dict | None) -> SynthConfig | None:
    """The generator settings of a synthetic store's manifest; None for any other store."""
    if not manifest or not isinstance(manifest.get("synthetic"), dict):
        return None
    from msae_core.configutil import from_dict

    try:
        return from_dict(SynthConfig, manifest["synthetic"])
    except (TypeError, ValueError) as exc:
        raise MsaeError(f"the store's synthetic settings are unreadable: {exc}") from exc


def save_row_truth(path: Path, shard: int, mag_NF: torch.Tensor) -> None:
    rows, feat = torch.nonzero(mag_NF, as_tuple=True)
    indptr = torch.zeros(mag_NF.shape[0] + 1, dtype=torch.int64)
    indptr[1:] = torch.bincount(rows, minlength=mag_NF.shape[0]).cumsum(0)
    atomic_save_safetensors(path / SYNTH_ROWS.format(index=shard), {
        "indptr": indptr, "feature": feat.to(torch.int32), "magnitude": mag_NF[rows, feat]})


def load_row_truth(store_path: str | os.PathLike, shard: int, n_features: int) -> torch.Tensor:
    """The magnitudes (rows, F) of shard `shard`'s rows, dense."""
    from safetensors.torch import load_file

    t = load_file(str(Path(store_path) / SYNTH_ROWS.format(index=shard)))
    n = len(t["indptr"]) - 1
    rows = torch.repeat_interleave(torch.arange(n), t["indptr"].diff())
    out = torch.zeros(n, n_features)
    out[rows, t["feature"].long()] = t["magnitude"]
    return out


def synth(cfg: SynthConfig, out: str | os.PathLike, *, progress: bool = True) -> ActivationStore:
    """Write the store of `cfg` into `out` (resumed when `out` holds the same one, refused when it
    holds anything else); returns it opened."""
    validate(cfg)
    out = Path(out)
    settings = cfg.store_settings()
    existing = read_manifest(out) if out.is_dir() else None
    if existing is not None and existing.get("complete") and existing.get("settings_hash") == settings.settings_hash():
        log.info("%s already holds this synthetic store (%d rows)", out, existing["n_rows"])
        return ActivationStore(out)
    feats = make_features(cfg)
    meta = {"d_model": cfg.d_model, "n_layers": 0, "tokenizer": None, "bos_token_id": None, "special_ids": [],
            "corpus": {"name": "synthetic", "provenance": f"msae synth, settings {cfg.settings_hash()}"},
            "synthetic": dataclasses.asdict(cfg)}
    writer = StoreWriter(out, settings, meta)  # refuses a folder holding anything else
    save_features(out, feats)
    shard_rows = SHARD_WINDOWS * WINDOW_ROWS
    n_shards = -(-cfg.rows // shard_rows)
    done = len(writer.manifest["shards"])
    bar = tqdm(total=cfg.rows, initial=writer.n_rows_done, unit="row", desc="synth", disable=not progress)
    for s in range(done, n_shards):
        n = min(shard_rows, cfg.rows - s * shard_rows)
        x_ND, mag_NF = sample_rows(cfg, feats, n, chunk=s)
        save_row_truth(out, s, mag_NF)
        first = s * SHARD_WINDOWS
        n_win = -(-n // WINDOW_ROWS)
        row = torch.arange(n)
        windows = torch.zeros(n_win, WINDOW_ROWS, dtype=torch.int32)
        windows.view(-1)[n:] = -1  # the last window's unused positions are padding
        writer.write_shard(x_ND, torch.zeros(n, dtype=torch.int32), first + row // WINDOW_ROWS,
                           row % WINDOW_ROWS, windows, first + torch.arange(n_win), first + torch.arange(n_win))
        bar.update(n)
    bar.close()
    writer.finish()
    return ActivationStore(out)


def _run(args: argparse.Namespace) -> int:
    from msae_core.configutil import from_dict

    try:
        cfg = from_dict(SynthConfig, overrides_from_args(args, SynthConfig))
    except (TypeError, ValueError) as exc:
        raise MsaeError(f"bad synth setting: {exc}") from exc
    store = synth(cfg, args.out, progress=not args.no_progress)
    print(f"{store.path}: {store.n_rows} rows of width {store.d_in} from {cfg.n_features} features "
          f"({cfg.n_hierarchy} in {cfg.n_trees} hierarchies, {cfg.n_correlated} correlated); "
          f"train on it with `msae train --acts {store.path}`, score with `msae eval RUN --evals synthetic`")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "synth", help="generate an activation store from known features (ground truth for absorption)",
        description="Write an activation store generated from known feature directions: hierarchies "
                    "whose children are mutually exclusive and never fire without their parent, "
                    "correlated groups and independent features. The ground truth is saved beside "
                    "it; `msae eval RUN --evals synthetic` scores a run trained on it.")
    p.add_argument("--out", required=True, help="store folder (created; resumed if it holds this store)")
    add_dataclass_args(p, SynthConfig)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
