"""Which runs can train in one pass (msae_core.training.group): those that share an activation
source (the same store, or the same model, layer, corpus, context and buffer when streamed), a batch
size, a data order, a device and bf16. `msae sweep` groups its points by `shared_key`
and starts each group of two or more as one `msae train-group` process (runs.jobs.launch_group)."""

from __future__ import annotations

import dataclasses

from msae_core.devices import resolve_device
from msae_core.runs.config import RunConfig


def _data(config: RunConfig) -> dict:
    """The data settings a group shares: streamed, every one but the layer and its cache (one
    forward serves several layers, each cached into its own store); from a store, all."""
    d = dataclasses.asdict(config.data)
    if config.data.source == "stream":
        d.pop("layer")
        d.pop("cache")
    return d


def shared_key(config: RunConfig) -> str:
    """What members of one group must share, as text: two configs with equal keys train together."""
    t = config.train
    return repr((sorted(_data(config).items()), t.batch_size, t.seed, str(resolve_device(t.device)), t.bf16))


def shared_source_problems(configs: list[RunConfig]) -> list[str]:
    """Why `configs` cannot train in one pass ([] when they can), one line per member that differs
    from the first."""
    out = []
    first = configs[0]
    caches: dict[int, set[str]] = {}
    for c in configs:
        caches.setdefault(c.data.layer, set()).add(c.data.cache)
    for layer, paths in sorted(caches.items()):
        if len(paths) > 1:
            out.append(f"the runs at layer {layer} name different caches ({', '.join(sorted(p or '(none)' for p in paths))}): "
                       "one stream writes one cache per layer")
    for i, c in enumerate(configs[1:], start=1):
        diffs = [name for name, a, b in (
            ("data", _data(first), _data(c)),
            ("train.batch_size", first.train.batch_size, c.train.batch_size),
            ("train.seed (the data order)", first.train.seed, c.train.seed),
            ("train.device", str(resolve_device(first.train.device)), str(resolve_device(c.train.device))),
            ("train.bf16", first.train.bf16, c.train.bf16)) if a != b]
        if diffs:
            out.append(f"member {i + 1} differs from member 1 in {', '.join(diffs)}")
    return out


def one_pass_groups(configs: list[RunConfig]) -> list[list[int]]:
    """The indices of `configs` in groups that can train in one pass, in order of first member."""
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(configs):
        groups.setdefault(shared_key(c), []).append(i)
    return list(groups.values())
