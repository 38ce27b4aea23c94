"""Text -> tokens -> batches.

    data = prepare("default")             # the embedded corpus (CPython's pydoc topics)
    data = prepare("notes/*.txt")         # files, a folder, or a glob
    x, y = data.get_batch("train", batch_size=8, block_size=256, generator=g)

``prepare`` tokenizes every source once (all cores, progress bar), documents separated by
<|endoftext|>, and caches train.bin / val.bin (uint16 memmaps) next to a manifest.json holding
the source hashes, tokenizer and counts; a later call with unchanged sources reuses them.
A cache entry is built under a lock (``<entry>.lock``, so concurrent prepares of one corpus
tokenize it once), each file written through a uniquely named temp file and renamed into place,
the manifest last; a failed write (full disk) removes its temp file and names the fix. Every
source file is read once, by its real path: symlinks and repeated patterns add nothing, and a
symlink loop in a folder or under a ``**`` glob is walked once.

The seeds' sliding-window ``GPTDataset(ids, max_length, stride)`` and ``create_dataloader``
serve evaluation. Named corpora ``tinystories`` and ``shakespeare`` are downloaded on first use
(online only; offline the error names the URL and the --data PATH alternative).

Non-UTF-8 input: an error naming the file and byte offset by default; with
``errors="replace"`` bad bytes become U+FFFD and the count is reported.

One cohesive thing, hence ~500 lines: the pre-training data path, sources -> tokens -> cached
splits -> batches (instruction data for fine-tuning is gptcore.sft_data).
"""
from __future__ import annotations

import fnmatch
import glob as _glob
import hashlib
import json
import os
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from gptcore.tokenizer import ENDOFTEXT, get_encoding

MANIFEST_VERSION = 1
TEXT_SUFFIXES = (".txt", ".md", ".text")
DOWNLOADS = {
    "shakespeare": [
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    ],
    "tinystories": [
        "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-train.txt",
        "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-valid.txt",
    ],
}
_PIECE_CHARS = 1 << 20  # tokenize in ~1 MB pieces so every core has work


class DataError(ValueError):
    """Bad input data: the message names the problem and the fix."""


def cache_root() -> Path:
    return Path(os.environ.get("GPTCORE_DATA_DIR", Path.home() / ".cache" / "gptcore" / "data"))


# ---- sources ------------------------------------------------------------------------------------
@dataclass
class Source:
    name: str           # path, or "default:pydoc_data"
    text: str | None = None   # in-memory text (the embedded corpus)

    def read(self, errors: str = "strict") -> str:
        if self.text is not None:
            return self.text
        try:
            raw = Path(self.name).read_bytes()
        except OSError as e:
            raise DataError(f"{self.name} cannot be read ({e.strerror or e})") from None
        if not raw.strip():
            raise DataError(f"{self.name} is empty (or only whitespace): nothing to train on")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if errors == "replace":
                text = raw.decode("utf-8", errors="replace")
                n = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
                print(f"gptcore.data: {self.name}: replaced {n} invalid UTF-8 sequence(s) with U+FFFD",
                      file=sys.stderr)
                return text
            raise DataError(
                f"{self.name} is not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r}). "
                f"Convert it (e.g. iconv -f latin1 -t utf-8), or pass errors='replace' "
                f"(--data-errors replace) to substitute U+FFFD for bad bytes"
            ) from None

    def size(self) -> int:
        """Approximate size in characters (bytes for files), for progress reporting."""
        return len(self.text) if self.text is not None else os.path.getsize(self.name)

    def fingerprint(self) -> dict:
        if self.text is not None:
            data = self.text.encode("utf-8")
            return {"name": self.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        h = hashlib.sha256()
        with open(self.name, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        return {"name": os.path.abspath(self.name), "bytes": os.path.getsize(self.name), "sha256": h.hexdigest()}


def default_corpus() -> list[Source]:
    """Real English text present on every machine with CPython: the pydoc help topics."""
    from pydoc_data import topics

    return [Source(f"default:pydoc_data/{k}", text=v) for k, v in sorted(topics.topics.items()) if v.strip()]


def download(name: str, dest: Path | None = None) -> list[Path]:
    """Fetch a named corpus into the cache (once). Offline: DataError naming the URLs."""
    dest = Path(dest or cache_root() / "downloads" / name)
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for url in DOWNLOADS[name]:
        path = dest / url.rsplit("/", 1)[-1]
        if not path.exists():
            tmp = path.with_suffix(path.suffix + ".part")
            try:
                with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
                    total = int(r.headers.get("Content-Length") or 0) or None
                    with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {path.name}") as bar:
                        for block in iter(lambda: r.read(1 << 20), b""):
                            f.write(block)
                            bar.update(len(block))
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise DataError(
                    f"could not download the {name!r} corpus from {url} ({e}). If this machine is "
                    f"offline, fetch the file elsewhere and pass --data PATH (a file, folder or glob), "
                    f"or train on the embedded default corpus (--data default)"
                ) from None
            tmp.replace(path)
        paths.append(path)
    return paths


def _walk_text_files(root: Path) -> list[str]:
    """The text files under ``root``, following symlinked folders once each (a symlink loop
    is walked once, not forever)."""
    out = []
    for dirpath, filenames in _walk_once(root):
        out += [os.path.join(dirpath, f) for f in filenames if Path(f).suffix.lower() in TEXT_SUFFIXES]
    return sorted(out)


def _walk_once(top) -> Iterator[tuple[str, list[str]]]:
    """(folder, its file names) under ``top``, following symlinked folders, each real folder once
    (a symlink loop is walked once, not forever), subfolders in name order."""
    seen_dirs = set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames.sort()
        yield dirpath, filenames


def _glob_match(pat: list[str], parts: list[str]) -> bool:
    """Path components ``parts`` against glob components ``pat`` as glob(recursive=True) does:
    ``**`` is zero or more folders, and a wildcard never matches a name starting with '.'."""
    if not pat:
        return not parts
    if pat[0] == "**":
        return _glob_match(pat[1:], parts) or (bool(parts) and not parts[0].startswith(".")
                                                 and _glob_match(pat, parts[1:]))
    if not parts or (parts[0].startswith(".") and not pat[0].startswith(".")):
        return False
    return fnmatch.fnmatchcase(parts[0], pat[0]) and _glob_match(pat[1:], parts[1:])


def _recursive_glob_files(spec: str) -> list[str]:
    """The files a ``**`` pattern matches, each real folder walked once: a symlink loop under
    the pattern is followed once, not until the path is too long."""
    parts = spec.split(os.sep)
    n = next(i for i, c in enumerate(parts) if _glob.has_magic(c))
    top = os.sep.join(parts[:n]) or (os.sep if spec.startswith(os.sep) else os.curdir)
    out = []
    for dirpath, filenames in _walk_once(top):
        rel = os.path.relpath(dirpath, top)
        rel_parts = [] if rel == os.curdir else rel.split(os.sep)
        for f in filenames:
            path = os.path.join(dirpath, f)
            if _glob_match(parts[n:], rel_parts + [f]) and os.path.isfile(path):
                out.append(os.path.relpath(path, top) if n == 0 else path)  # as glob names them
    return sorted(out)


def _glob_files(spec: str) -> list[str]:
    spec = os.path.expanduser(spec)
    if "**" in spec.split(os.sep):
        return _recursive_glob_files(spec)
    out = []
    for f in _glob.iglob(spec, recursive=True):
        if len(Path(f).parts) > 64:
            raise DataError(f"the pattern {spec!r} runs into a symlink loop ({f[:120]}...): fix the link or "
                            f"use a pattern without **")
        if os.path.isfile(f):
            out.append(f)
    return sorted(out)


def _unique(sources: list[Source]) -> list[Source]:
    """Each file once: a symlink, a second pattern or a repeated path to a file already in the
    corpus is dropped (no document is trained on twice by accident)."""
    seen, out, dropped = set(), [], 0
    for s in sources:
        key = s.name if s.text is not None else os.path.realpath(s.name)
        if key in seen:
            dropped += 1
            continue
        seen.add(key)
        out.append(s)
    if dropped:
        print(f"gptcore.data: {dropped} path(s) named a file already in the corpus (symlink or repeat); "
              f"each file is read once", file=sys.stderr)
    return out


def resolve_sources(spec: str | os.PathLike | Sequence) -> list[Source]:
    """'default', a named corpus, a file, a folder (its *.txt/*.md, recursively) or a glob;
    every file once (by its real path)."""
    return _unique(_resolve_sources(spec))


def _resolve_sources(spec: str | os.PathLike | Sequence) -> list[Source]:
    if isinstance(spec, (list, tuple)):
        return [s for item in spec for s in _resolve_sources(item)]
    spec = str(spec)
    if spec == "default":
        return default_corpus()
    if spec in DOWNLOADS:
        return [Source(str(p)) for p in download(spec)]
    p = Path(spec).expanduser()
    if p.is_file():
        return [Source(str(p))]
    if p.is_dir():
        files = _walk_text_files(p)
        if not files:
            raise DataError(f"folder {p} holds no text files ({', '.join(TEXT_SUFFIXES)})")
        return [Source(f) for f in files]
    if any(c in spec for c in "*?["):
        files = _glob_files(spec)
        if not files:
            raise DataError(f"the pattern {spec!r} matches no files")
        return [Source(f) for f in files]
    raise DataError(
        f"data source {spec!r} not found: give a text file, a folder, a glob, 'default' "
        f"(the embedded corpus) or one of {sorted(DOWNLOADS)}"
    )


# ---- tokenization -----------------------------------------------------------------------------
def _pieces(text: str) -> Iterable[str]:
    """Cut a document into ~1 MB pieces just before a blank line, where GPT-2's pre-tokenizer
    splits anyway, so the tokens equal those of the whole text."""
    start = 0
    while len(text) - start > _PIECE_CHARS:
        cut = text.find("\n\n", start + _PIECE_CHARS)
        while cut > 0 and text[cut - 1].isspace():
            cut = text.find("\n\n", cut + 2)
        if cut <= 0:
            break
        yield text[start:cut]
        start = cut
    yield text[start:]


def tokenize_sources(sources: list[Source], tokenizer: str = "gpt2", errors: str = "strict",
                     progress: bool = True) -> np.ndarray:
    """All sources as one token array; each document ends with <|endoftext|>."""
    enc = get_encoding(tokenizer)
    eot = enc.eot_token
    dtype = np.uint16 if enc.n_vocab <= 1 << 16 else np.uint32
    threads = os.cpu_count() or 1
    out: list[np.ndarray] = []
    total = sum(src.size() for src in sources)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenize",
               disable=not progress or total < _PIECE_CHARS)
    for src in sources:
        text = src.read(errors)
        for doc in text.split(ENDOFTEXT):  # a literal <|endoftext|> in the text separates documents
            if not doc.strip():
                continue
            pieces = list(_pieces(doc))
            # batches of pieces keep every core busy and the progress bar moving on huge files
            for i in range(0, len(pieces), 4 * threads):
                batch = pieces[i: i + 4 * threads]
                for part in enc.encode_ordinary_batch(batch, num_threads=threads):
                    out.append(np.asarray(part, dtype=dtype))
                bar.update(sum(len(p) for p in batch))
            out.append(np.array([eot], dtype=dtype))
    bar.close()
    if not out:
        raise DataError("the data holds no text: every source was empty")
    return np.concatenate(out)


# ---- the prepared dataset -----------------------------------------------------------------------
class TokenData:
    """train.bin / val.bin memmaps and their manifest."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.manifest = json.loads((self.root / "manifest.json").read_text())
        dtype = np.dtype(self.manifest["dtype"])
        self.splits = {
            s: np.memmap(self.root / f"{s}.bin", dtype=dtype, mode="r") if self.manifest[f"{s}_tokens"] else
            np.zeros(0, dtype=dtype)
            for s in ("train", "val")
        }

    @property
    def hash(self) -> str:
        return self.manifest["hash"]

    def __len__(self) -> int:
        return sum(len(a) for a in self.splits.values())

    def check_vocab(self, vocab_size: int) -> None:
        """Raise if any token id is >= vocab_size (a model too small for this tokenizer)."""
        for name, arr in self.splits.items():
            if len(arr) and int(arr.max()) >= vocab_size:
                raise DataError(
                    f"{name} split holds token id {int(arr.max())} but the model's vocab_size is "
                    f"{vocab_size}; use a model with vocab_size >= {self.manifest['n_vocab']} "
                    f"(tokenizer {self.manifest['tokenizer']!r})"
                )

    def check_block(self, split: str, block_size: int) -> None:
        n = len(self.splits[split])
        if n < block_size + 1:
            raise DataError(
                f"the {split} split has {n} tokens, fewer than one window of block_size+1 = "
                f"{block_size + 1}; use a shorter --context-length, more data"
                + (", or a larger val fraction" if split == "val" else "")
            )

    def get_batch(self, split: str, batch_size: int, block_size: int,
                  generator: torch.Generator | None = None, device="cpu"):
        """Random windows (nanoGPT style): x (B, T) and y = x shifted by one, int64."""
        self.check_block(split, block_size)
        arr = self.splits[split]
        starts = torch.randint(len(arr) - block_size, (batch_size,), generator=generator)
        rows = np.stack([arr[s: s + block_size + 1] for s in starts.tolist()]).astype(np.int64)
        xy = torch.from_numpy(rows)
        if device != "cpu" and torch.device(device).type == "cuda":
            xy = xy.pin_memory().to(device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]


def _atomic_write_bytes(path: Path, data) -> None:
    """Write ``data`` (bytes or an array) to ``path`` through a temp file of a unique name in the
    same directory and an atomic rename; a failed write (full disk) removes its temp file."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, np.ndarray):
                data.tofile(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _CacheLock:
    """An exclusive lock on one cache entry (``<root>.lock`` beside it) while it is built, so two
    processes preparing the same corpus tokenize it once and never write the same files."""

    def __init__(self, root: Path):
        self.path = root.with_name(root.name + ".lock")
        self.fd = None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
        except ImportError:
            return self
        fcntl.flock(self.fd, fcntl.LOCK_EX)  # waits for the other builder
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # drops the lock; the lock file stays (deleting it would race)


def _cached(root: Path, key: str):
    man = root / "manifest.json"
    if man.exists():
        try:
            if json.loads(man.read_text()).get("hash") == key:
                return TokenData(root)
        except (ValueError, OSError, KeyError, TypeError):
            pass  # a damaged cache is rebuilt
    return None


def _cache_error(root: Path, e: OSError) -> DataError:
    return DataError(
        f"cannot write the token cache at {root} ({e.strerror or e}); free space there, fix its permissions, "
        f"or point GPTCORE_DATA_DIR at a writable directory with room")


def prepare(spec="default", cache_dir: str | os.PathLike | None = None, tokenizer: str = "gpt2",
            val_fraction: float = 0.1, errors: str = "strict", progress: bool = True) -> TokenData:
    """Tokenize ``spec`` once and return the cached TokenData (reused while sources are unchanged)."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if errors not in ("strict", "replace"):
        raise DataError(f"errors must be 'strict' or 'replace', got {errors!r}")
    sources = resolve_sources(spec)
    prints = [s.fingerprint() for s in sources]
    key_obj = {"v": MANIFEST_VERSION, "sources": prints, "tokenizer": tokenizer,
               "val_fraction": val_fraction, "errors": errors}
    key = hashlib.sha256(json.dumps(key_obj, sort_keys=True).encode()).hexdigest()
    label = "default" if str(spec) == "default" else Path(str(spec)).name.replace("*", "_") or "data"
    root = Path(cache_dir) if cache_dir else cache_root() / f"{label}-{key[:12]}"
    found = _cached(root, key)
    if found is not None:
        return found
    for parent in [root, *root.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise DataError(f"the token cache {root} cannot be made: {parent} is a file, not a directory; "
                                f"point GPTCORE_DATA_DIR at a directory")
            break
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _cache_error(root, e) from None
    try:
        lock = _CacheLock(root).__enter__()
    except OSError as e:
        raise _cache_error(root, e) from None
    try:
        found = _cached(root, key)  # another process may have built it while this one waited
        if found is not None:
            return found
        for stale in root.glob(".*.tmp"):  # under the lock every temp file is a dead writer's
            stale.unlink(missing_ok=True)
        for old in ("train.bin.tmp", "val.bin.tmp", "manifest.json.tmp"):  # names of older versions
            (root / old).unlink(missing_ok=True)
        tokens = tokenize_sources(sources, tokenizer, errors, progress)
        n_val = int(len(tokens) * val_fraction)
        train, val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:]
        enc = get_encoding(tokenizer)
        manifest = {**key_obj, "hash": key, "n_tokens": int(len(tokens)), "train_tokens": int(len(train)),
                    "val_tokens": int(len(val)), "dtype": tokens.dtype.name, "n_vocab": enc.n_vocab}
        try:
            (root / "manifest.json").unlink(missing_ok=True)  # the old entry is incomplete until the new one is
            _atomic_write_bytes(root / "train.bin", train)
            _atomic_write_bytes(root / "val.bin", val)
            # written last: marks the cache complete
            _atomic_write_bytes(root / "manifest.json", json.dumps(manifest, indent=1).encode())
        except OSError as e:
            raise _cache_error(root, e) from None
        return TokenData(root)
    finally:
        lock.__exit__()


# ---- sliding windows (LLMs-from-scratch style) ----------------------------------------------------
class GPTDataset(torch.utils.data.Dataset):
    """Windows of max_length tokens every ``stride`` tokens; targets are inputs shifted by one.

    ``data`` is text (tokenized with ``tokenizer``) or a sequence/array of token ids.
    """

    def __init__(self, data, max_length: int, stride: int, tokenizer: str = "gpt2"):
        if max_length <= 0 or stride <= 0:
            raise DataError(f"max_length and stride must be positive, got {max_length}, {stride}")
        if isinstance(data, str):
            if not data.strip():
                raise DataError("GPTDataset got empty text")
            data = get_encoding(tokenizer).encode(data, allowed_special={ENDOFTEXT})
        self.ids = torch.as_tensor(np.asarray(data, dtype=np.int64))
        if len(self.ids) < max_length + 1:
            raise DataError(f"{len(self.ids)} tokens are fewer than one window of max_length+1 = {max_length + 1}")
        self.max_length, self.stride = max_length, stride
        self.n = (len(self.ids) - max_length - 1) // stride + 1

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        s = i * self.stride
        return self.ids[s: s + self.max_length], self.ids[s + 1: s + self.max_length + 1]


def create_dataloader(data, batch_size: int = 4, max_length: int = 256, stride: int = 128,
                      shuffle: bool = True, drop_last: bool = True, num_workers: int = 0,
                      tokenizer: str = "gpt2") -> torch.utils.data.DataLoader:
    ds = GPTDataset(data, max_length, stride, tokenizer)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle,
                                       drop_last=drop_last, num_workers=num_workers)
