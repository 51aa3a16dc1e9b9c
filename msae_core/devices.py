"""The one device resolver: every entry point (train, harvest, evals, the workbench) turns a
`--device` value into a torch.device here, with the same rules."""

from __future__ import annotations

import torch

from msae_core.errors import MsaeError


def resolve_device(name: str | torch.device | None) -> torch.device:
    """None or "auto": CUDA when it is available, else the CPU. Anything else is taken as torch
    spells it ("cpu", "cuda", "cuda:1"); MsaeError (one line) for a name torch does not know, a CUDA
    device on a machine without CUDA, or a CUDA index past the last GPU."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise MsaeError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MsaeError(f"device {name} asked for but CUDA is not available: use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MsaeError(f"device {name} asked for but this machine has "
                            f"{torch.cuda.device_count()} GPU(s)")
    return dev
