"""Checkpoints: written atomically, checked on load, read without unpickling code.

A checkpoint is a directory, ``out_dir/ckpt-{step:07d}/`` or ``out_dir/best/``:

    model.safetensors   the weights (a tied LM head is stored once, as transformer.wte.weight;
                        no ``_orig_mod.`` / ``module.`` prefixes from torch.compile or DDP)
    state.pt            optimizer, grad scaler, step, tokens seen, RNG states, configs, data hash:
                        tensors and plain containers only, read with torch.load(weights_only=True)
    meta.json           format version, step, tokens, configs, tokenizer, data hash, and the size
                        and SHA-256 of the two files above (checked on every load)

Each is written as a hidden temp directory beside its target (every file fsynced), renamed
into place, and the parent directory fsynced; ``out_dir/latest`` (one line naming the newest
``ckpt-*``) is replaced the same way. A crash leaves the old checkpoint or the new one,
never a mix.

    from gptcore.checkpoint import load_model
    model = load_model("out/ckpt-0000200")      # or "out": follows out/latest
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from gptcore.config import GPTConfig
from gptcore.model import GPT
from gptcore.ops import default_backend

FORMAT_VERSION = 1
MODEL_FILE, STATE_FILE, META_FILE, LATEST_FILE = "model.safetensors", "state.pt", "meta.json", "latest"
_CKPT_RE = re.compile(r"^ckpt-(\d{7,})$")
_STRIP_PREFIXES = ("_orig_mod.", "module.")  # torch.compile's OptimizedModule, DDP's wrapper


class CheckpointError(RuntimeError):
    """A missing, corrupt, truncated or incompatible checkpoint; the message says which and why."""


# ---- durable file operations ------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX; Windows cannot open a directory)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path``: temp file in the same directory, fsync, os.replace, fsync dir."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished directory ``tmp`` to ``final``, replacing an existing one."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temps(out_dir: str | os.PathLike) -> list[Path]:
    """Delete temp directories/files left by a save that crashed; returns what was removed."""
    removed = []
    for p in Path(out_dir).glob(".*"):
        if re.match(r"^\.(ckpt-\d+|best)\.(tmp-|old-)", p.name) or re.match(r"^\.latest\..*\.tmp$", p.name):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# ---- weights ----------------------------------------------------------------------------------
def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def strip_prefixes(state: dict) -> dict:
    """Keys without torch.compile's ``_orig_mod.`` or DDP's ``module.`` prefixes."""
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for p in _STRIP_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights to save: no wrapper prefixes, a tied LM head once (as transformer.wte.weight)."""
    state = strip_prefixes(unwrap(model).state_dict())
    cfg = getattr(unwrap(model), "config", None)
    if cfg is not None and cfg.tie_weights:
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in state.items()}


def load_weights(model: GPT, weights: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy ``weights`` into ``model``; any missing, unexpected or mis-shaped tensor is an error."""
    weights = strip_prefixes(weights)
    expected = model_state_dict(model)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = [f"{k}: {tuple(weights[k].shape)} in {source}, {tuple(v.shape)} in the model"
              for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected}")
        if shapes:
            parts.append("shape mismatches: " + "; ".join(shapes))
        raise CheckpointError(f"{source} does not fit the model config: " + "; ".join(parts))
    unwrap(model).load_state_dict(weights, strict=False)  # strict=False: the tied lm_head is not stored


# ---- RNG state as tensors and plain lists (torch.load(weights_only=True) can read it) -----------------
def capture_rng() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    rng = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict) -> None:
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    n = rng["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        states = rng["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)


# ---- save -------------------------------------------------------------------------------------------
def save_checkpoint(path: str | os.PathLike, model: nn.Module, state: Optional[dict], meta: dict) -> Path:
    """Write a checkpoint directory at ``path`` atomically (replacing one that exists).

    ``state`` (may be None: weights only) must hold only tensors and plain containers;
    ``meta`` must be JSON-serializable and should carry ``model_config``.
    """
    from safetensors.torch import save_file

    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        weights = {k: v.cpu() for k, v in model_state_dict(model).items()}
        save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt", "gptcore_format": str(FORMAT_VERSION)})
        names = [MODEL_FILE]
        if state is not None:
            torch.save(state, tmp / STATE_FILE)
            names.append(STATE_FILE)
        files = {}
        for name in names:
            os.chmod(tmp / name, 0o666 & ~_umask())
            _fsync_file(tmp / name)
            files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
        meta = {**meta, "format_version": FORMAT_VERSION, "files": files}
        with open(tmp / META_FILE, "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def update_latest(out_dir: str | os.PathLike, ckpt: str | os.PathLike) -> None:
    atomic_write_text(Path(out_dir) / LATEST_FILE, Path(ckpt).name + "\n")


def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete ``ckpt-*`` directory, oldest first."""
    out = []
    root = Path(out_dir)
    if root.is_dir():
        for p in root.iterdir():
            m = _CKPT_RE.match(p.name)
            if m and (p / META_FILE).is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def read_latest(out_dir: str | os.PathLike) -> Optional[Path]:
    """The checkpoint ``out_dir/latest`` names, or None when there is none. The pointer may only
    name a ``ckpt-NNNNNNN`` directory inside ``out_dir``: anything else (a path, ``..``, a
    symlink leading out, binary junk) is a CheckpointError."""
    root = Path(out_dir)
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        return None
    try:
        raw = pointer.read_bytes()[:4096]
        name = raw.decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{pointer} is unreadable or not text ({e}); delete it (the newest ckpt-* is "
                              f"then used) or give the checkpoint directory itself") from None
    if not _CKPT_RE.match(name):
        raise CheckpointError(f"{pointer} names {name[:80]!r}, not a ckpt-NNNNNNN directory of {root}; a latest "
                              f"pointer may only name a checkpoint inside its run directory. Delete it (the newest "
                              f"ckpt-* is then used) or give the checkpoint directory itself")
    target = root / name
    try:
        inside = target.resolve(strict=False).parent == root.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        inside = False
    if not inside:
        raise CheckpointError(f"{pointer} names {name}, which leads outside {root} (a symlink?); a latest "
                              f"pointer may only name a checkpoint inside its run directory")
    return target if (target / META_FILE).is_file() else None


def find_latest(out_dir: str | os.PathLike) -> Optional[Path]:
    """The checkpoint ``out_dir/latest`` names, else the highest-step ``ckpt-*``; None if none."""
    root = Path(out_dir)
    target = read_latest(root)
    if target is not None:
        return target
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def prune_checkpoints(out_dir: str | os.PathLike, keep_last: int, only=None) -> list[Path]:
    """Delete all but the newest ``keep_last`` ``ckpt-*`` directories (never the one ``latest``
    names, never ``best/``); returns the deleted paths. With ``only`` (paths), only those may be
    deleted: a resumed run passes the checkpoints it wrote itself, so what an earlier run left
    stays (it still counts among the newest ``keep_last``)."""
    ckpts = list_checkpoints(out_dir)
    latest = find_latest(out_dir)
    mine = None if only is None else {Path(p).resolve() for p in only}
    doomed = [p for _, p in ckpts[:-keep_last] if p != latest and (mine is None or p.resolve() in mine)] \
        if keep_last > 0 else []
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


# ---- load -------------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    path: Path
    meta: dict
    weights: dict          # name -> tensor
    state: Optional[dict]  # None when loaded with load_state=False or saved weights-only

    @property
    def model_config(self) -> GPTConfig:
        try:
            return GPTConfig.from_dict(self.meta["model_config"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{self.path / META_FILE}: invalid model_config ({e})") from None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run directory (follows its ``latest``)."""
    p = Path(path).expanduser()
    try:
        exists = p.exists()
    except OSError as e:  # a symlink loop, a name too long
        raise CheckpointError(f"checkpoint {p} cannot be opened ({e.strerror or e})") from None
    if not exists:
        raise CheckpointError(f"checkpoint {p} does not exist")
    if p.is_file() and p.name in (META_FILE, MODEL_FILE, STATE_FILE):
        p = p.parent
    if (p / META_FILE).is_file() or (p / MODEL_FILE).is_file():
        return p
    if p.is_dir():
        latest = find_latest(p)
        if latest is not None:
            return latest
    raise CheckpointError(
        f"{p} is not a gptcore checkpoint: expected a directory with {MODEL_FILE}, {STATE_FILE} and "
        f"{META_FILE} (e.g. out/ckpt-0000200), or a run directory holding ckpt-* and a 'latest' file"
    )


def read_meta(path: str | os.PathLike) -> dict:
    p = resolve_checkpoint(path)
    meta_path = p / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{p} has no {META_FILE}: the checkpoint is incomplete (interrupted copy?)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{meta_path} is not valid JSON ({e}): the file is truncated or corrupt") from None
    except OSError as e:
        raise CheckpointError(f"{meta_path} cannot be read ({e.strerror or e})") from None
    if not isinstance(meta, dict) or "format_version" not in meta or "model_config" not in meta:
        raise CheckpointError(f"{meta_path} lacks format_version/model_config: not a gptcore checkpoint")
    _check_meta(meta_path, meta)
    if meta["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{p} has checkpoint format {meta['format_version']}, newer than this gptcore reads "
            f"({FORMAT_VERSION}); upgrade gptcore"
        )
    return meta


def _check_meta(meta_path: Path, meta: dict) -> None:
    """The types every reader relies on; an edited meta.json is named, not a TypeError later."""
    def bad(what: str):
        return CheckpointError(f"{meta_path}: {what}; the file was edited or is corrupt: restore it or use "
                               f"another checkpoint")

    fv = meta["format_version"]
    if not isinstance(fv, int) or isinstance(fv, bool):
        raise bad(f"format_version must be an integer, got {fv!r}")
    if not isinstance(meta["model_config"], dict):
        raise bad(f"model_config must be an object, got {type(meta['model_config']).__name__}")
    for key in ("step", "tokens"):
        v = meta.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise bad(f"{key} must be a non-negative integer, got {v!r}")
    tc = meta.get("train_config", {})
    if not isinstance(tc, dict) or not isinstance(tc.get("model", {}), dict):
        raise bad("train_config (and its model section) must be objects")
    if "tokenizer" in meta and not isinstance(meta["tokenizer"], str):
        raise bad(f"tokenizer must be a string, got {meta['tokenizer']!r}")
    files = meta.get("files", {})
    if not isinstance(files, dict):
        raise bad("files must be an object")
    for name, info in files.items():
        if name not in (MODEL_FILE, STATE_FILE):
            raise bad(f"files lists {name!r}; a checkpoint holds only {MODEL_FILE} and {STATE_FILE}")
        if (not isinstance(info, dict) or not isinstance(info.get("bytes"), int) or isinstance(info.get("bytes"), bool)
                or not isinstance(info.get("sha256"), str)):
            raise bad(f"files[{name!r}] must hold an integer 'bytes' and a string 'sha256'")


def _verify_file(ckpt: Path, name: str, info: dict) -> None:
    f = ckpt / name
    if not f.is_file():
        raise CheckpointError(f"{f} is missing: the checkpoint is incomplete")
    size = f.stat().st_size
    if size != info["bytes"]:
        raise CheckpointError(
            f"{f} is {size} bytes but meta.json records {info['bytes']}: the file is truncated or was "
            f"replaced; use another checkpoint (e.g. an older ckpt-* or best/)"
        )
    if _sha256(f) != info["sha256"]:
        raise CheckpointError(
            f"{f} does not match the SHA-256 in meta.json: the file is corrupt; use another "
            f"checkpoint (e.g. an older ckpt-* or best/)"
        )


def load_checkpoint(path: str | os.PathLike, map_location="cpu", load_state: bool = True,
                    verify: bool = True) -> Checkpoint:
    """Read and check a checkpoint. Nothing is unpickled beyond tensors and plain containers."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    files = meta.get("files", {})
    wanted = [MODEL_FILE] + ([STATE_FILE] if load_state and STATE_FILE in files else [])
    for name in wanted:
        if name not in files:
            raise CheckpointError(f"{ckpt / META_FILE} does not list {name}: the checkpoint is incomplete")
        if verify:
            _verify_file(ckpt, name, files[name])
    try:
        weights = load_file(str(ckpt / MODEL_FILE), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {ckpt / MODEL_FILE}: {e}") from None
    state = None
    if STATE_FILE in wanted:
        try:
            state = torch.load(ckpt / STATE_FILE, map_location=map_location, weights_only=True)
        except Exception as e:  # zip/pickle errors of many kinds all mean: unreadable
            refused = "weights_only" in str(e) or "WeightsUnpickler" in str(e)
            raise CheckpointError(
                f"cannot read {ckpt / STATE_FILE} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                + ("it holds objects beyond tensors and plain containers, which a weights-only load refuses: a "
                   "gptcore state file never does, so this one is foreign or tampered with. The trainer does not "
                   "unpickle code; to read such a file's weights use python -m gptcore.inspect PATH --trust-pickle "
                   "(only for files you trust)" if refused else "it is corrupt or not a gptcore state file")
            ) from None
    return Checkpoint(ckpt, meta, weights, state)


def backend_for(device) -> str:
    """The default backend for models on ``device``: the fastest that runs there."""
    return default_backend() if torch.device(device).type == "cuda" else "torch"


def load_model(path: str | os.PathLike, device="cpu", backend: Optional[str] = None,
               verify: bool = True) -> GPT:
    """The GPT stored at ``path`` (a checkpoint dir or a run dir), in eval mode, on ``device``
    (backend: default the fastest that runs on ``device``)."""
    ck = load_checkpoint(path, map_location="cpu", load_state=False, verify=verify)
    try:
        cfg = ck.model_config
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{ck.path / META_FILE}: invalid model_config ({e})") from None
    model = GPT(cfg, backend=backend or backend_for(device))
    load_weights(model, ck.weights, source=str(ck.path))
    return model.to(device).eval()
