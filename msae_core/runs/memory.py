"""Memory planned before a run or a one-pass group starts, not discovered by running out of it.

Per SAE (fp32 parameters: W_enc, W_dec (D x F each), b_enc (F), b_dec (D), JumpReLU's F thresholds):

    weights + grads + Adam's two moments   16 P bytes,  P = 2 D F + F + D (+ F)
    the step's (B, F) tensors              4 (B, F) at the step's width (fp32, or bf16 under --bf16):
                                           pre-activation, latents, and their two gradients
    momentum's candidate table              F C (int32 partner, fp32 kappa, int32 first/last) = 16 F C

A group keeps every member's weights and Adam state at once, but steps one member at a time, so its
(B, F) tensors are the largest member's, not their sum. The source adds the loader's buffers
((depth + 3) batches of B x D fp32) and, on a GPU, the store itself when the loader will hold it
there (data.loader: when it takes at most RESIDENT_FRACTION of the free memory); a streamed source
adds the language model's weights and the mixing buffer (its rows x D fp32). The estimate leaves
out the allocator's slack and the CUDA context (about 0.5 GB); `plan` asks for 10 % headroom.
"""

from __future__ import annotations

from typing import NamedTuple

from msae_core.errors import MsaeError
from msae_core.runs.config import RunConfig

HEADROOM = 0.9  # plan to use at most this fraction of what is free
LOADER_BATCHES = 5  # the loader's buffers: depth 2 + 3 (data.loader)


class Estimate(NamedTuple):
    """Bytes one run needs: its SAE's state (kept for the run's life) and one step's (B, F) tensors."""

    state: int
    step: int


def sae_bytes(config: RunConfig) -> Estimate:
    """The estimate above for one run's SAE."""
    s, t = config.sae, config.train
    D, F, B = max(s.d_in, 1), s.d_sae, t.batch_size
    params = 2 * D * F + F + D + (F if s.base_arch == "jumprelu" else 0)
    state = 16 * params
    if s.arch == "momentum":
        state += 16 * F * min(s.momentum.n_candidates, max(F - 1, 1))
    width = 2 if t.bf16 and _on_gpu(t.device) else 4
    return Estimate(state, 4 * B * F * width)


def source_bytes(config: RunConfig, lm_params: int = 0, resident_bytes: int = 0, layers: int = 1) -> int:
    """The source's share: the loader's batches, a store resident on the GPU (`resident_bytes`),
    and for a stream the model (in the dtype it loads in) and its buffer; `layers`: the layers a
    streamed row holds side by side (a one-pass group at several layers)."""
    from msae_core.data.lm import model_dtype
    from msae_core.devices import resolve_device

    d, t = config.data, config.train
    D = max(config.sae.d_in, 1) * layers
    out = LOADER_BATCHES * t.batch_size * D * 4 + resident_bytes
    if d.source == "stream":
        rows = d.buffer_rows or (d.buffer_batches * t.batch_size if d.buffer_batches else 20 * 32 * d.context_size)
        itemsize = 4 if model_dtype(d.model_dtype, resolve_device(t.device)) == "float32" else 2
        out += rows * D * 4 + lm_params * itemsize
    return out


def group_bytes(configs: list[RunConfig], names: list[str], lm_params: int = 0,
                resident_bytes: int = 0) -> tuple[int, list[tuple[str, int]]]:
    """(bytes the group needs at its peak, each member's (name, bytes), largest first)."""
    each = [sae_bytes(c) for c in configs]
    layers = len({c.data.layer for c in configs}) if configs[0].data.source == "stream" else 1
    total = (sum(e.state for e in each) + max(e.step for e in each)
             + source_bytes(configs[0], lm_params, resident_bytes, layers))
    members = sorted(((n, e.state + e.step) for n, e in zip(names, each)), key=lambda m: -m[1])
    return total, members


def source_size(config: RunConfig, source=None) -> tuple[int, int]:
    """(the language model's parameters when streamed, the store's bytes when `source` is an opened
    store): what `plan` adds for the data."""
    if config.data.source == "stream":
        from msae_core.data.lm import model_params

        return model_params(config.data.model), 0
    if source is None:
        return 0, 0
    return 0, source.n_rows * source.d_in * (2 if source.dtype == "float16" else 4)


def free_bytes(device: str) -> int:
    """Memory free for this process: the GPU's free memory, or the machine's available memory."""
    import torch

    from msae_core.devices import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62  # unknown: not refused


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def plan(configs: list[RunConfig], names: list[str], lm_params: int = 0, store_bytes: int = 0,
         free: int | None = None) -> int:
    """The group's peak bytes; MsaeError in one line, naming the largest members, when that is more
    than HEADROOM of what the device has free (`free`: measured when not given). `store_bytes`: the
    store's rows, which the loader keeps on a GPU when they fit."""
    from msae_core.data.loader import RESIDENT_FRACTION

    device = configs[0].train.device
    free = free_bytes(device) if free is None else free
    resident = store_bytes if _on_gpu(device) and store_bytes <= RESIDENT_FRACTION * free else 0
    need, members = group_bytes(configs, names, lm_params, resident)
    if need > HEADROOM * free:
        largest = ", ".join(f"{n} {gb(b)}" for n, b in members[:3])
        raise MsaeError(f"these {len(configs)} run(s) need about {gb(need)} on {device} where {gb(free)} "
                        f"is free (largest: {largest}): train fewer at once, or smaller d_sae or batch_size")
    return need


def _on_gpu(device: str) -> bool:
    """Whether a run with this device setting trains on a GPU ("auto" on a machine with one)."""
    from msae_core.devices import resolve_device

    return resolve_device(device).type == "cuda"


def sweep_plan(configs: list[RunConfig], names: list[str], store=None) -> str:
    """One line for the Launch page beside a sweep grid: how many processes train the points in one
    pass each (runs.onepass), and the largest one's memory against what is free. `store`: the
    opened activation store of the points (their d_in and the resident store come from it)."""
    from msae_core.runs.onepass import one_pass_groups

    if store is not None:
        configs = [c.resolved(store) for c in configs]
    groups = one_pass_groups(configs)
    lm_params, store_bytes = source_size(configs[0], store)
    need = max(group_bytes([configs[i] for i in g], [names[i] for i in g], lm_params,
                           resident_bytes=store_bytes if _on_gpu(configs[g[0]].train.device) else 0)[0]
               for g in groups)
    free = free_bytes(configs[0].train.device)
    return (f"{len(groups)} process{'es' if len(groups) > 1 else ''} ({len(configs)} runs, each process one pass "
            f"over its data); the largest needs about {gb(need)} of {gb(free)} free"
            + (": too much, split the grid" if need > HEADROOM * free else ""))
