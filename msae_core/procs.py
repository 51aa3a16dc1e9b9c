"""Processes: the one way msae starts one (`spawn`), whether a pid is alive, a SIGTERM/SIGINT flag,
and an exclusive lock on a folder held by one process.

`FolderLock(path)` takes an OS file lock (flock) on `path/.lock` and writes its pid there. The
kernel drops the lock when the holder exits, however it exits (SIGKILL included), so a killed
holder never leaves a folder locked. A second process is refused at once with MsaeError naming the
holder's pid; the same process may take the lock again (nested entry points: the CLI, then train()).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from msae_core.artifacts import FOLDER_LOCK
from msae_core.errors import MsaeError


_CHILDREN: list[subprocess.Popen] = []


def msae_command(*args: str) -> list[str]:
    """The command line of an `msae` subcommand, run by this interpreter."""
    return [sys.executable, "-m", "msae_core.cli", *map(str, args)]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment, with msae_core importable even when it is not installed (the repository
    root first on PYTHONPATH) and unbuffered output, plus `extra`."""
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def spawn(cmd: list[str], *, log: str | os.PathLike | None = None, detach: bool = True,
          env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `cmd` (the one place msae starts a process): stdin closed; output appended to `log`
    after a line with the command (inherited when None); its own session when `detach`, so that
    closing the page or a Ctrl-C in the terminal that started it does not kill it; environment
    `child_env(env)`; tracked, so `reap` collects it when it exits."""
    kw: dict[str, Any] = dict(stdin=subprocess.DEVNULL, start_new_session=detach, env=child_env(env))
    if log is None:
        return track_child(subprocess.Popen(cmd, **kw))
    with open(log, "ab") as fh:
        fh.write(f"\n$ {shlex.join(cmd)}\n".encode())
        fh.flush()
        return track_child(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, **kw))


class StopFlag:
    """SIGTERM/SIGINT set `signum`, which a loop reads at its own safe points (main thread only).
    Re-entrant: an entry point enters it first (before anything is written) and the code it calls
    enters the same one again; the old handlers come back when the outermost `with` ends."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}
        self._depth = 0

    def __enter__(self) -> "StopFlag":
        self._depth += 1
        if self._depth == 1 and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            for sig, h in self._old.items():
                signal.signal(sig, h)
            self._old = {}


def track_child(proc: subprocess.Popen) -> subprocess.Popen:
    """Remember a started child so that `reap` collects it when it exits (no zombies linger)."""
    _CHILDREN.append(proc)
    return proc


def reap() -> None:
    """Collect the exited children started through `track_child`."""
    for p in list(_CHILDREN):
        if p.poll() is not None:
            _CHILDREN.remove(p)


def pid_alive(pid: Any) -> bool:
    """Whether a process with this pid exists; a zombie (exited, not yet reaped) counts as gone."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    reap()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


# path (resolved) -> [fd, depth]: the locks this process holds
_HELD: dict[str, list[int]] = {}


class FolderLock:
    """Exclusive, process-lifetime lock on a folder (see the module docstring).

        with FolderLock(run_dir, what="run"):
            ...   # only this process reads and writes the folder's files here
    """

    def __init__(self, path: str | os.PathLike, what: str = "folder", lock_file: str = FOLDER_LOCK) -> None:
        self.path = Path(path)
        self.what = what
        self.lock_file = lock_file
        self._key = ""

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        self._key = str(self.path.resolve() / self.lock_file)
        held = _HELD.get(self._key)
        if held is not None:
            held[1] += 1
            return
        fd = os.open(self.path / self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise MsaeError(f"{self.path} is locked by another {self.what} process"
                                + (f" (pid {holder})" if holder else "")
                                + ": wait for it to end or cancel it") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[self._key] = [fd, 1]

    def release(self) -> None:
        held = _HELD.get(self._key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _HELD[self._key]
            os.close(held[0])  # closing the descriptor drops the flock


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None
