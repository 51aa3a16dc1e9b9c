"""Experiment trackers, mirrored from the run folder (the source of truth: metrics.jsonl).

`--log-to tensorboard` writes every metrics line of a run as TensorBoard scalars into
RUN/tensorboard/ (`tensorboard --logdir results/runs` shows every run of a sweep side by side);
`--log-to wandb` logs them to Weights & Biases when the `wandb` package is installed (offline unless
WANDB_MODE says otherwise: `wandb sync` uploads later). A resumed run first rewrites its mirror from
its metrics.jsonl as the checkpoint left it, so the mirror never holds the steps a kill undid.

The TensorBoard files are written here, without TensorFlow or the tensorboard package: the event
file format is TFRecord framing (length, masked CRC-32C of the length, the record, masked CRC-32C
of the record) around `Event` protocol buffers (wall_time = 1, step = 2, file_version = 3,
summary = 5; Summary.value = 1; Value.tag = 1, Value.simple_value = 2), encoded below by hand.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

from msae_core.artifacts import RUN_METRICS
from msae_core.errors import MsaeError

TRACKERS = ("tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"
_SKIP = {"step", "time"}  # metrics keys that are not scalars to plot


# ------------------------------------------------------------------------------- CRC-32C, protobuf
def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord frames use it."""
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def event(wall_time: float, step: int = 0, scalars: dict[str, float] | None = None,
          file_version: str | None = None) -> bytes:
    """One serialised `Event`: its wall time and step, and either scalars or the file version."""
    out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(int(step)))
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", v)))
                          for tag, v in scalars.items())
        out += _bytes_field(5, values)
    return out


def record(data: bytes) -> bytes:
    """`data` in TFRecord framing."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked(crc32c(length))) + data + struct.pack("<I", _masked(crc32c(data)))


def read_records(path: str | os.PathLike) -> list[bytes]:
    """The records of a TFRecord file, their CRCs checked (for tests and tools)."""
    raw, out, i = Path(path).read_bytes(), [], 0
    while i < len(raw):
        (n,) = struct.unpack_from("<Q", raw, i)
        if struct.unpack_from("<I", raw, i + 8)[0] != _masked(crc32c(raw[i:i + 8])):
            raise MsaeError(f"{path}: a record's length fails its CRC at byte {i}")
        data = raw[i + 12:i + 12 + n]
        if struct.unpack_from("<I", raw, i + 12 + n)[0] != _masked(crc32c(data)):
            raise MsaeError(f"{path}: a record fails its CRC at byte {i}")
        out.append(data)
        i += 16 + n
    return out


# ---------------------------------------------------------------------------------------- mirrors
def scalars_of(row: dict) -> dict[str, float]:
    """The plottable numbers of a metrics line."""
    return {k: float(v) for k, v in row.items()
            if k not in _SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardMirror:
    """Writes a run's metrics lines as scalars into RUN/tensorboard/ (one event file per start)."""

    def __init__(self, run_dir: Path):
        folder = Path(run_dir) / TENSORBOARD_DIR
        for old in folder.glob("events.out.tfevents.*"):  # rewritten whole from metrics.jsonl
            old.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.msae"
        self._fh = open(self.path, "ab")
        self._fh.write(record(event(time.time(), file_version="brain.Event:2")))

    def add(self, row: dict) -> None:
        self._fh.write(record(event(float(row.get("time") or time.time()), int(row["step"]), scalars_of(row))))
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class WandbMirror:
    """Logs a run's metrics lines to Weights & Biases (offline unless WANDB_MODE is set), one wandb
    run per run folder (its id from the folder's name, so a resume continues it)."""

    def __init__(self, run_dir: Path, config: dict):
        try:
            import wandb
        except ImportError:
            raise MsaeError("--log-to wandb needs the wandb package (pip install wandb)") from None
        os.environ.setdefault("WANDB_MODE", "offline")
        self._run = wandb.init(project="msae", name=Path(run_dir).name, id=Path(run_dir).name, resume="allow",
                               dir=str(run_dir), config=config, reinit="create_new")

    def add(self, row: dict) -> None:
        self._run.log(scalars_of(row), step=int(row["step"]))

    def close(self) -> None:
        self._run.finish()


def open_mirrors(kinds: list[str], run_dir: Path, config: dict) -> list[Any]:
    """The trackers `kinds` names for a run, each given the metrics lines the folder holds now."""
    mirrors: list[Any] = []
    for kind in kinds:
        mirrors.append(TensorBoardMirror(run_dir) if kind == "tensorboard" else WandbMirror(run_dir, config))
    if mirrors and (Path(run_dir) / RUN_METRICS).is_file():
        for line in (Path(run_dir) / RUN_METRICS).read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                for m in mirrors:
                    m.add(row)
    return mirrors
