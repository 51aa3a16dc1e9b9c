"""A run's resumable checkpoint: the one reader and writer of `checkpoint/`.

    checkpoint/    sae.safetensors + sae_config.json   weights and buffers (msae_core.sae_io)
                   optimizer.pt                         Adam state (torch.save of a state dict)
                   stream_buffer.safetensors            a streamed run's mixing buffer (data.stream)
                   trainer_state.json                   {step, rng, time, config, log_sums, log_n,
                                                         stream (its corpus position, round)}

A streamed one-pass group (training.group) checkpoints its stream once, beside the runs:
`.group-stream/stream-<step>.json` + `.safetensors` in its first run's folder (write_group_stream).

`trainer_state.json` is written last: a folder that has it is whole. `write_checkpoint` fills a
temporary folder (`.checkpoint.tmp-<pid>`) and swaps it in by two renames, so `checkpoint/` is
always whole; a kill between the renames leaves `.checkpoint.old`, which `find_checkpoint` returns
and `load_checkpoint` renames back. A write that fails (disk full) removes its temporary folder.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch

from msae_core import sae_io
from msae_core.artifacts import (
    GROUP_STREAM_BUFFER,
    GROUP_STREAM_STATE,
    OPTIMIZER_STATE,
    RUN_CHECKPOINT_DIR,
    STREAM_BUFFER,
    RUN_OLD_CHECKPOINT_DIR,
    RUN_TMP_CHECKPOINT_DIR,
    RUN_TMP_CHECKPOINT_GLOB,
    TRAINER_STATE,
    atomic_save_safetensors,
    atomic_write_json,
)


class Checkpoint(NamedTuple):
    """What a resumed run starts from."""

    sae: Any                      # the SAE, on the device, in train mode
    opt_state: dict               # the optimizer's state dict, on the device
    state: dict                   # trainer_state.json
    stream: dict                  # a streamed run's buffer tensors (CPU), {} for a store


def rng_state() -> dict:
    """The global torch (and CUDA) RNG states, as json-safe text."""
    out = {"torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict) -> None:
    """Restore what rng_state saved. CUDA generators are restored one per device this process
    sees, as far as both go: a checkpoint written seeing 8 GPUs resumes seeing 1 (set_rng_state_all
    indexes a device per saved state and failed there), and one written on a CPU resumes on a GPU."""
    if "torch" in state:
        torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(_unb64(s), i)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def find_checkpoint(run_dir: Path) -> Path | None:
    """The latest whole checkpoint folder (trainer_state.json is written last), or None."""
    for name in (RUN_CHECKPOINT_DIR, RUN_OLD_CHECKPOINT_DIR):
        p = Path(run_dir) / name
        if (p / TRAINER_STATE).is_file():
            return p
    return None


def checkpoint_step(ckpt_dir: Path) -> int | None:
    """The step of the checkpoint in `ckpt_dir` (its trainer_state.json), None when unreadable."""
    try:
        return int(json.loads((Path(ckpt_dir) / TRAINER_STATE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None


def promote_checkpoint(run_dir: Path, ckpt: Path) -> Path:
    """`checkpoint/` itself, after renaming a `.checkpoint.old` (left by a kill between the two
    renames of a write) back to it."""
    if ckpt.name != RUN_CHECKPOINT_DIR:
        shutil.rmtree(run_dir / RUN_CHECKPOINT_DIR, ignore_errors=True)
        os.rename(ckpt, run_dir / RUN_CHECKPOINT_DIR)
    return run_dir / RUN_CHECKPOINT_DIR


def load_checkpoint(run_dir: Path, ckpt: Path, device: torch.device) -> Checkpoint:
    """Read the checkpoint `ckpt` (from find_checkpoint) onto `device`, promoting a
    `.checkpoint.old` first (promote_checkpoint)."""
    state = json.loads((ckpt / TRAINER_STATE).read_text())
    ckpt = promote_checkpoint(run_dir, ckpt)
    sae = sae_io.load_sae(ckpt, device=device)
    opt_state = torch.load(ckpt / OPTIMIZER_STATE, map_location=device, weights_only=True)
    stream = {}
    if (ckpt / STREAM_BUFFER).is_file():
        from safetensors.torch import load_file

        stream = load_file(str(ckpt / STREAM_BUFFER))
    return Checkpoint(sae, opt_state, state, stream)


def cpu_copy(obj: Any) -> Any:
    """`obj` (a state dict, nested dicts and lists of tensors) with every tensor copied to the CPU:
    what a checkpoint written beside training holds while the originals keep changing."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


class SAESnapshot:
    """An SAE's config and its state dict copied to the CPU, tensor by tensor: what a checkpoint
    written beside training saves (sae_io.save_sae reads `cfg` and `state_dict()`). A deep copy of
    the module on its device first would hold a second copy of the weights there (1.2 GB at
    F 65,536, D 2,304)."""

    def __init__(self, sae: Any):
        self.cfg = sae.cfg
        self._state = cpu_copy(sae.state_dict())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def write_checkpoint(run_dir: Path, sae: Any, opt_state: dict, state: dict,
                     stream: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint/ atomically: fill a temporary folder, then swap it in by renames.
    `opt_state`: the optimizer's state dict; `stream`: a streamed run's buffer tensors (CPU)."""
    tmp = run_dir / RUN_TMP_CHECKPOINT_DIR.format(pid=os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        sae_io.save_sae(sae, tmp)
        buf = io.BytesIO()  # serialised in memory: a full disk is then a plain OSError on write
        torch.save(opt_state, buf)
        with open(tmp / OPTIMIZER_STATE, "wb") as fh:
            fh.write(buf.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
        if stream is not None:
            atomic_save_safetensors(tmp / STREAM_BUFFER, stream)
        atomic_write_json(tmp / TRAINER_STATE, state)  # last: marks the folder whole
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write (disk full) leaves nothing behind
        raise
    ck, old = run_dir / RUN_CHECKPOINT_DIR, run_dir / RUN_OLD_CHECKPOINT_DIR
    if ck.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(ck, old)
    os.rename(tmp, ck)
    _fsync_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)
    return ck


def write_group_stream(folder: Path, step: int, fields: dict, tensors: dict[str, torch.Tensor]) -> None:
    """A streamed one-pass group's stream state before batch `step` (data.stream's `state`), once
    for the group: its buffer first, then the json that marks it whole."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(folder / GROUP_STREAM_BUFFER.format(step=step), tensors)
    atomic_write_json(folder / GROUP_STREAM_STATE.format(step=step), fields)


def read_group_stream(folder: Path, step: int) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """What write_group_stream wrote for `step`, or None when there is none (whole)."""
    state = folder / GROUP_STREAM_STATE.format(step=step)
    if not state.is_file():
        return None
    from safetensors.torch import load_file

    return json.loads(state.read_text()), load_file(str(folder / GROUP_STREAM_BUFFER.format(step=step)))


def prune_group_streams(folder: Path, keep: set[int]) -> None:
    """Remove the group's stream states of steps no member's latest checkpoint needs."""
    for p in folder.glob("stream-*.*") if folder.is_dir() else []:
        m = re.match(r"stream-(\d+)\.", p.name)
        if m and int(m.group(1)) not in keep:
            p.unlink(missing_ok=True)


def remove_temporaries(run_dir: Path) -> None:
    """Remove the temporary folders of checkpoint writes that a kill interrupted."""
    for p in Path(run_dir).glob(RUN_TMP_CHECKPOINT_GLOB):
        shutil.rmtree(p, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
