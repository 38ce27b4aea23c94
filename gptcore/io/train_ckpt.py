"""gptcore's training checkpoint: written atomically, checked on load, read without unpickling code.

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
never a mix. ``gptcore.io.read_checkpoint`` reads these among every other format; the trainer's
resume reads them here, with ``state.pt``.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from gptcore.config import GPTConfig
from gptcore.io.common import FORMAT_VERSION, Checkpoint, CheckpointError, existing_path
from gptcore.io.durable import atomic_write_text, fsync_dir, fsync_file, replace_dir, sha256, umask
from gptcore.io.weights import finish_state_dict, model_state_dict

MODEL_FILE, STATE_FILE, META_FILE, LATEST_FILE = "model.safetensors", "state.pt", "meta.json", "latest"
_CKPT_RE = re.compile(r"^ckpt-(\d{7,})$")


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
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700
        weights = {k: v.cpu() for k, v in model_state_dict(model).items()}
        save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt", "gptcore_format": str(FORMAT_VERSION)})
        names = [MODEL_FILE]
        if state is not None:
            torch.save(state, tmp / STATE_FILE)
            names.append(STATE_FILE)
        files = {}
        for name in names:
            os.chmod(tmp / name, 0o666 & ~umask())
            fsync_file(tmp / name)
            files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": sha256(tmp / name)}
        meta = {**meta, "format_version": FORMAT_VERSION, "files": files}
        with open(tmp / META_FILE, "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        replace_dir(tmp, final)
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
def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run directory (follows its ``latest``)."""
    p = existing_path(path)
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
    if sha256(f) != info["sha256"]:
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
                   "unpickle code; to read such a file's weights use python -m gptcore.inspect_ckpt PATH --trust-pickle "
                   "(only for files you trust)" if refused else "it is corrupt or not a gptcore state file")
            ) from None
    try:
        config = GPTConfig.from_dict(meta["model_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt / META_FILE}: invalid model_config ({e}); the file was edited or is "
                              f"corrupt: restore it or use another checkpoint") from None
    desc = "gptcore training checkpoint (model.safetensors + meta.json + state.pt)"
    return Checkpoint(ckpt, "gptcore-train", desc, finish_state_dict(weights, config), config, meta, state=state)


def is_training_checkpoint(p: Path) -> bool:
    """Whether ``p`` is (a file of) a training checkpoint or a run directory holding them."""
    if p.is_file():
        return p.name in (META_FILE, STATE_FILE) or (p.name == MODEL_FILE and (p.parent / META_FILE).is_file())
    return p.is_dir() and ((p / META_FILE).is_file() or (p / STATE_FILE).is_file() or (p / LATEST_FILE).is_file()
                           or bool(list_checkpoints(p)))
