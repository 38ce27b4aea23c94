"""Run directories: one owner at a time, nothing of an earlier run lost or replaced by surprise.

    with RunLock(out_dir):              # refuses while another live process owns out_dir
        state = find_resume_state(out_dir)  # newest complete state: ckpt-* or best/, whichever is later

The lock is ``out_dir/.gptcore.lock``: a JSON line with the owner's pid, host, start time and
command, held with ``flock`` for the owner's lifetime (where the platform has it). A second
process is refused with the owner's pid and host. A lock whose process is gone (killed, crashed,
or the flock is free) is stale: the next owner takes it over and says so. A lock from another
host whose flock cannot be checked is refused with the command that removes it.

metrics.jsonl is append-only: a new run or a resume appends a ``{"kind": "run", ...}`` row and
never truncates the rows before it; ``read_metrics`` applies those rows (a resume from step N
supersedes the older rows past N), so every reader sees one consistent history.
"""
from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

try:
    import fcntl
except ImportError:  # Windows: pid/host check only
    fcntl = None

LOCK_FILE = ".gptcore.lock"
RUN_ARTIFACTS = ("latest", "metrics.jsonl", "loss.png", "best")
_CKPT_RE = re.compile(r"^ckpt-(\d{7,})$")
_TEMP_RE = re.compile(r"^\.(ckpt-\d+|best)\.(tmp-|old-)|^\.latest\..*\.tmp$")


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (owned, not empty, unwritable); says how to proceed."""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _read_owner(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(errors="replace") or "{}")
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(owner: dict) -> str:
    return (f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, since {owner.get('started', '?')}"
            + (f" ({owner['command']})" if owner.get("command") else ""))


def check_writable_dir(path: Path, what: str, fix: str) -> list[Path]:
    """Create ``path`` (parents too) or raise RunDirError naming the problem and ``fix``; returns
    the directories it created, deepest first."""
    p = Path(path)
    created = [d for d in [p, *p.parents] if not d.exists()]
    for parent in [p, *p.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise RunDirError(f"{what} {p}: {parent} exists and is not a directory; {fix}")
            break
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"{what} {p} cannot be created ({e.strerror or e}); {fix}") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise RunDirError(f"{what} {p} is not writable by this user; {fix}")
    return created


class RunLock:
    """Exclusive ownership of a run directory by this process (see the module docstring)."""

    def __init__(self, out_dir: str | os.PathLike, command: Optional[str] = None):
        self.dir = Path(out_dir)
        self.path = self.dir / LOCK_FILE
        self.command = command if command is not None else " ".join(sys.argv)
        self.fd: Optional[int] = None
        self.note: Optional[str] = None  # set when a stale lock was taken over
        self.created: list[Path] = []     # directories made for the lock: removed again if left empty

    def acquire(self) -> "RunLock":
        self.created = check_writable_dir(self.dir, "out dir", "give another --out-dir")
        host = socket.gethostname()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(f"cannot create the lock file {self.path} ({e.strerror or e}); give another "
                              f"--out-dir") from None
        try:
            owner = _read_owner(self.path)
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    raise RunDirError(
                        f"{self.dir} is in use by another training run ({_describe(owner)}); wait for it to "
                        f"finish, stop it, or give another --out-dir") from None
            if owner.get("pid") and owner.get("pid") != os.getpid():
                same_host = owner.get("host") == host
                pid = owner.get("pid") if isinstance(owner.get("pid"), int) else -1
                if fcntl is None and same_host and _pid_alive(pid):
                    raise RunDirError(
                        f"{self.dir} is in use by another training run ({_describe(owner)}); wait for it to "
                        f"finish, stop it, or give another --out-dir")
                if not same_host and fcntl is None:
                    raise RunDirError(
                        f"{self.dir} is locked by {_describe(owner)}, which this host cannot check; if that run "
                        f"is over, delete {self.path} and start again")
                self.note = (f"note: took over the stale lock of {_describe(owner)} in {self.dir} (that process "
                             f"is gone)")
            info = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "command": self.command}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            self._remove_created()
            raise
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if _read_owner(self.path).get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)  # closing drops the flock
            self.fd = None
            self._remove_created()

    def _remove_created(self) -> None:
        """A run that failed before writing anything leaves no empty out dir behind."""
        for d in self.created:
            try:
                d.rmdir()  # only if empty
            except OSError:
                break

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---- what a run directory holds ---------------------------------------------------------------------
@dataclass
class State:
    path: Path
    step: int
    val_loss: Optional[float]


def _meta(path: Path) -> Optional[dict]:
    try:
        m = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def _state_of(path: Path) -> Optional[State]:
    """A checkpoint that can be resumed: meta.json lists state.pt and both files are there."""
    m = _meta(path)
    if m is None or not isinstance(m.get("files"), dict) or "state.pt" not in m["files"]:
        return None
    if not (path / "state.pt").is_file() or not (path / "model.safetensors").is_file():
        return None
    step = m.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return None
    val = m.get("val_loss")
    return State(path, step, val if isinstance(val, (int, float)) and not isinstance(val, bool) else None)


def resumable_states(out_dir: str | os.PathLike) -> list[State]:
    """Every resumable checkpoint in ``out_dir`` (ckpt-* and best/), newest step first; at equal
    steps a ckpt-* comes before best/."""
    root = Path(out_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if (_CKPT_RE.match(p.name) or p.name == "best") and p.is_dir() and not p.is_symlink():
            st = _state_of(p)
            if st is not None:
                found.append(st)
    return sorted(found, key=lambda s: (-s.step, s.path.name == "best", s.path.name))


def find_resume_state(out_dir: str | os.PathLike) -> Optional[State]:
    states = resumable_states(out_dir)
    return states[0] if states else None


def best_state(out_dir: str | os.PathLike) -> Optional[State]:
    p = Path(out_dir) / "best"
    return _state_of(p) if p.is_dir() else None


def run_contents(out_dir: str | os.PathLike) -> list[str]:
    """Names in ``out_dir`` that belong to a run or to the user (the lock and crashed-save temps
    left out); empty when the directory is missing or empty."""
    root = Path(out_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.name != LOCK_FILE and not _TEMP_RE.match(p.name))


def overwrite(out_dir: str | os.PathLike) -> list[str]:
    """--overwrite: delete the previous run's own files (ckpt-*, best/, latest, metrics.jsonl,
    loss.png); anything else in the directory stays. Returns what was removed."""
    import shutil

    root = Path(out_dir)
    removed = []
    for name in run_contents(root):
        p = root / name
        if _CKPT_RE.match(name) or name in RUN_ARTIFACTS:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(name)
    return removed


# ---- metrics.jsonl ------------------------------------------------------------------------------------
def append_run_marker(path: Path, row: dict) -> None:
    """Append ``row`` (kind 'run') to metrics.jsonl; a torn last line from a killed run is ended
    first, so no row is glued to it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = False
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    with open(path, "a") as f:
        f.write(("\n" if torn else "") + json.dumps({"kind": "run", **row}) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of metrics.jsonl as one history: unreadable (torn) lines are skipped; a
    ``run`` row with step N drops the earlier rows past step N (a resume from N, or 0 for a
    fresh start)."""
    rows: list[dict] = []
    p = Path(path)
    if not p.is_file():
        return rows
    for line in p.read_text(errors="replace").splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if not isinstance(r, dict) or not isinstance(r.get("step"), int):
            continue
        if r.get("kind") == "run":
            rows = [x for x in rows if x["step"] <= r["step"]]
            continue
        rows.append(r)
    return rows
