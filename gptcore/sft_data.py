"""Instruction data for supervised fine-tuning: records -> prompt/response tokens -> masked batches.

    data = prepare_sft("instruction-data.json")       # Alpaca layout or chat `messages`, JSON or JSONL
    data = prepare_sft("tasks")                        # the built-in generated task set (offline)
    x, y = data.get_batch("train", 8, 256, generator)  # y is -100 on prompt and padding positions

Layouts (detected per record; ``template=`` forces one):

alpaca  ``{"instruction": str, "input": str (optional, may be ""), "output": str}`` rendered with
        the Alpaca prompt template, as *LLMs from scratch* (ch. 7) uses it::

            Below is an instruction that describes a task. Write a response that appropriately completes the request.

            ### Instruction:
            {instruction}

            ### Input:            <- this section only when input is not empty
            {input}

            ### Response:
            {output}<|endoftext|>

chat    ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` rendered with
        gptcore's plain chat template (no special tokens beyond GPT-2's <|endoftext|>)::

            ### System:
            {content}

            ### User:
            {content}

            ### Assistant:
            {content}<|endoftext|>

        turns joined by a blank line ("\\n\\n"); a system turn may only come first; the last turn
        must be the assistant's. Loss falls on every assistant turn's content and its <|endoftext|>.

Loss mask. Only response tokens (alpaca: the output and its <|endoftext|>; chat: each assistant
turn's content and <|endoftext|>) are targets; prompt tokens and padding get ``IGNORE_INDEX``
(-100, which gptcore.loss and F.cross_entropy skip). Each segment is tokenized on its own, so the
boundary between prompt and response is exact.

Batching: padded per batch, not packed. A batch draws ``batch_size`` records (uniformly, with
replacement, from a generator the trainer seeds by step: the batch is a function of the step, so
resuming needs no loader state), right-pads them with <|endoftext|> to the longest one rounded up
to ``pad_multiple`` (or to the full context with ``pad_to="context"``: one static shape, which
CUDA graphs and torch.compile prefer), capped at the context. Padding sits after each record's
last real token, so causal attention keeps real tokens blind to it and no attention mask is
needed; the padded targets are ignored. Nothing crosses between records.

Over-long records (more than context_length + 1 tokens): ``overlong="truncate"`` (default) drops
tokens from the *start* of the prompt (its end, with the "### Response:" marker, stays); a
response that alone does not fit keeps its first tokens. How many records were cut is reported.
``overlong="error"`` refuses instead, naming the record.

Bad records (missing or non-string fields, an empty output or assistant turn, unknown roles) are a
DataError naming the file, record number and fix; ``skip_invalid=True`` drops them and reports
the count instead.

Cache: the token ids, the loss mask and the record offsets of each file are written once under
``~/.cache/gptcore/data/sft-*`` (``GPTCORE_DATA_DIR``), keyed by the file's SHA-256, the template
version and the tokenizer; an unchanged file is never re-tokenized.

Built-in offline set: ``"tasks"`` generates word puzzles with one right answer (reverse, sort,
first/last word, count) from a fixed seed (gptcore.sft_tasks); ``exact_match`` scores a model on them.

One cohesive thing, hence ~520 lines: the path of an instruction record from its file through
template, tokens and loss mask to a padded batch, and back to a scored response.
"""
from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from gptcore.data import DataError, cache_root
from gptcore.sft_tasks import TASKS, generate_tasks
from gptcore.tokenizer import ENDOFTEXT, get_encoding

IGNORE_INDEX = -100
TEMPLATE_VERSION = 1
TEMPLATES = ("auto", "alpaca", "chat")
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
# Real instruction sets, read from a path; ``download_dataset`` fetches them when online.
DATASETS = {
    "instruction-data": "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/"
                        "instruction-data.json",
    "alpaca": "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json",
}
BUILTIN = "tasks"


# ---- templates ------------------------------------------------------------------------------------
def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt up to and including "### Response:\\n" (the model writes what follows)."""
    text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}"
    if input:
        text += f"\n\n### Input:\n{input}"
    return text + "\n\n### Response:\n"


def chat_prompt(messages: Sequence[dict]) -> str:
    """The chat template of ``messages`` (any turns) followed by the assistant's header."""
    parts = [f"### {CHAT_ROLES[m['role']]}:\n{m['content']}" for m in messages]
    return "\n\n".join(parts + ["### Assistant:\n"])


def render(record: dict, template: str = "auto", where: str = "record") -> list[tuple[str, bool]]:
    """A record as text segments (text, is_target) in order; DataError if the record is malformed."""
    kind = record_layout(record, template, where)
    if kind == "alpaca":
        for k in ("instruction", "output"):
            if k not in record:
                raise DataError(f"{where}: missing field {k!r} (the Alpaca layout needs instruction, output and "
                                f"optionally input)")
        for k in ("instruction", "input", "output"):
            if k in record and not isinstance(record[k], str):
                raise DataError(f"{where}: field {k!r} must be a string, got {type(record[k]).__name__}")
        if not record["output"].strip():
            raise DataError(f"{where}: empty output: there is nothing to learn from it; fill it in or drop the record")
        if not record["instruction"].strip():
            raise DataError(f"{where}: empty instruction")
        prompt = alpaca_prompt(record["instruction"], record.get("input", "") or "")
        return [(prompt, False), (record["output"] + ENDOFTEXT, True)]
    msgs = record["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    segs: list[tuple[str, bool]] = []
    for i, m in enumerate(msgs):
        w = f"{where}, message {i}"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{w}: each message needs 'role' and 'content'")
        if m["role"] not in CHAT_ROLES:
            raise DataError(f"{w}: unknown role {m['role']!r}; use one of {', '.join(CHAT_ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{w}: content must be a string, got {type(m['content']).__name__}")
        if m["role"] == "system" and i:
            raise DataError(f"{w}: a system message may only come first")
        head = ("" if i == 0 else "\n\n") + f"### {CHAT_ROLES[m['role']]}:\n"
        if m["role"] == "assistant":
            if not m["content"].strip():
                raise DataError(f"{w}: empty assistant message: there is nothing to learn from it")
            segs += [(head, False), (m["content"] + ENDOFTEXT, True)]
        else:
            segs.append((head + m["content"], False))
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's (the response to learn)")
    return segs


def record_layout(record, template: str = "auto", where: str = "record") -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if template not in TEMPLATES:
        raise DataError(f"template must be one of {TEMPLATES}, got {template!r}")
    if template != "auto":
        if template == "chat" and "messages" not in record:
            raise DataError(f"{where}: missing field 'messages' (template chat)")
        return template
    if "messages" in record:
        return "chat"
    if "instruction" in record or "output" in record:
        return "alpaca"
    raise DataError(f"{where}: neither the Alpaca layout (instruction, input, output) nor the chat layout "
                    f"(messages); keys found: {sorted(record)[:8]}")


def prompt_of(record: dict, template: str = "auto") -> str:
    """What the model is given at generation time: everything before the (last) response."""
    if record_layout(record, template) == "alpaca":
        return alpaca_prompt(record["instruction"], record.get("input", "") or "")
    return chat_prompt(record["messages"][:-1])


def answer_of(record: dict, template: str = "auto") -> str:
    """The reference response (alpaca output, or the last assistant turn)."""
    if record_layout(record, template) == "alpaca":
        return record["output"]
    return record["messages"][-1]["content"]


# ---- reading files --------------------------------------------------------------------------------
def read_records(path: str | os.PathLike) -> list:
    """Records of a .json file (a list, or an object with a 'data'/'train' list) or of JSONL."""
    p = Path(path).expanduser()
    if not p.is_file():
        hint = ""
        if str(path) in DATASETS:
            hint = f" ({path!r} is a known dataset: download it with gptcore.sft_data.download_dataset or pass --data PATH)"
        raise DataError(f"instruction data {p} not found{hint}; give a .json / .jsonl file, or --data {BUILTIN} "
                        f"for the built-in generated task set")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text (byte {e.start}); re-encode the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"{p} is empty")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj = None
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{n}: not valid JSON or JSONL ({e.msg}); one JSON object per line, or a "
                                f"JSON list of objects") from None
        return records
    if isinstance(obj, dict):
        for key in ("data", "train", "examples", "records"):
            if isinstance(obj.get(key), list):
                return obj[key]
        return [obj]  # one record: a JSONL file of one line
    if not isinstance(obj, list):
        raise DataError(f"{p}: expected a JSON list of records, got {type(obj).__name__}")
    return obj


def download_dataset(name: str, dest: Optional[Path] = None) -> Path:
    """Fetch a known instruction set (``DATASETS``) once into the cache; offline: DataError naming
    the URL and the --data PATH alternative."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)} (or pass a file with --data PATH)")
    url = DATASETS[name]
    dest = Path(dest or cache_root() / "downloads" / "sft")
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / url.rsplit("/", 1)[-1]
    if path.exists():
        return path
    tmp = path.with_suffix(path.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            f.write(r.read())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"could not download {name!r} from {url} ({e}). If this machine is offline, fetch the file "
                        f"elsewhere and pass --data PATH, or use --data {BUILTIN} (the built-in task set)") from None
    tmp.replace(path)
    return path


# ---- tokenized records --------------------------------------------------------------------------
@dataclass
class Tokenized:
    tokens: np.ndarray   # (N,) int32: every record's ids, concatenated
    mask: np.ndarray     # (N,) bool: True where the token is a target (response side)
    offsets: np.ndarray  # (R + 1,) int64: record r is tokens[offsets[r]:offsets[r + 1]]


def tokenize_records(records: list, template: str = "auto", tokenizer: str = "gpt2", where: str = "data",
                     skip_invalid: bool = False) -> tuple[Tokenized, list[int], list[str]]:
    """(token arrays, indices of the records kept, problems skipped)."""
    enc = get_encoding(tokenizer)
    toks, mask, offsets, kept, skipped = [], [], [0], [], []
    for i, rec in enumerate(records):
        try:
            segs = render(rec, template, f"{where}, record {i}")
        except DataError as e:
            if not skip_invalid:
                raise DataError(f"{e} (or pass --skip-invalid to drop such records)") from None
            skipped.append(str(e))
            continue
        for text, target in segs:
            ids = enc.encode(text, allowed_special={ENDOFTEXT})
            toks += ids
            mask += [target] * len(ids)
        offsets.append(len(toks))
        kept.append(i)
    if not kept:
        raise DataError(f"{where}: no usable records" + (f" ({len(skipped)} skipped as invalid)" if skipped else ""))
    return (Tokenized(np.asarray(toks, dtype=np.int32), np.asarray(mask, dtype=bool),
                      np.asarray(offsets, dtype=np.int64)), kept, skipped)


def fit_record(ids: np.ndarray, mask: np.ndarray, max_tokens: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Cut a record of more than max_tokens (= context_length + 1) tokens: prompt tokens go from the
    start; if the response alone is too long its end goes. Returns (ids, mask, was_cut)."""
    if len(ids) <= max_tokens:
        return ids, mask, False
    first = int(np.argmax(mask)) if mask.any() else len(ids)  # first target token
    n_prompt, n_resp = first, len(ids) - first
    keep_prompt = max(1, max_tokens - n_resp) if n_prompt else 0
    keep_prompt = min(keep_prompt, n_prompt)
    ids = np.concatenate([ids[first - keep_prompt:first], ids[first:]])[:max_tokens]
    mask = np.concatenate([mask[first - keep_prompt:first], mask[first:]])[:max_tokens]
    return ids, mask, True


# ---- the prepared data set ---------------------------------------------------------------------------
class SFTData:
    """Tokenized instruction records split into train / val, drawn as padded masked batches.

    Quacks like gptcore.data.TokenData where the trainer needs it (get_batch, hash, manifest,
    check_vocab, check_block, splits), so gptcore.train.Trainer's step runs on it unchanged.
    """

    def __init__(self, tok: Tokenized, records: list, spec: str, hash_: str, val_fraction: float = 0.1,
                 template: str = "auto", pad_multiple: int = 64, pad_to: str = "batch",
                 pad_id: int = 50256, split_seed: int = 0, skipped: Sequence[str] = ()):
        if pad_to not in ("batch", "context"):
            raise DataError(f"pad_to must be 'batch' or 'context', got {pad_to!r}")
        if pad_multiple < 1:
            raise DataError(f"pad_multiple must be >= 1, got {pad_multiple}")
        self.tok, self.records, self.spec, self.template = tok, records, spec, template
        self.pad_multiple, self.pad_to, self.pad_id = pad_multiple, pad_to, pad_id
        self.skipped = list(skipped)
        R = len(records)
        order = np.random.default_rng(split_seed).permutation(R)
        n_val = int(round(R * val_fraction)) if R > 1 else 0
        if val_fraction > 0 and R > 1:
            n_val = max(1, min(R - 1, n_val))
        self.split_idx = {"val": np.sort(order[:n_val]), "train": np.sort(order[n_val:])}
        self._hash = hashlib.sha256(f"{hash_}/{val_fraction}/{split_seed}".encode()).hexdigest()
        self.tokens_drawn = 0  # positions (B x padded length) handed out by get_batch("train")
        self.context: Optional[int] = None
        self.cut = 0
        lens = np.diff(tok.offsets)
        n_tr = int(lens[self.split_idx["train"]].sum())
        self.manifest = {
            "hash": self._hash, "spec": spec, "records": R, "train_records": len(self.split_idx["train"]),
            "val_records": n_val, "train_tokens": n_tr, "val_tokens": int(lens[self.split_idx["val"]].sum()),
            "n_vocab": get_encoding("gpt2").n_vocab, "template": template, "tokenizer": "gpt2",
            "response_tokens": int(tok.mask.sum()), "skipped_invalid": len(self.skipped),
        }

    # -- what the trainer reads ---------------------------------------------------------------------
    @property
    def hash(self) -> str:
        return self._hash

    @property
    def splits(self) -> dict:
        """Per split, a sized stand-in (len = tokens of its records), for the trainer's checks."""
        lens = np.diff(self.tok.offsets)
        return {s: range(int(lens[idx].sum())) for s, idx in self.split_idx.items()}

    def check_vocab(self, vocab_size: int) -> None:
        if len(self.tok.tokens) and int(self.tok.tokens.max()) >= vocab_size:
            raise DataError(f"the data holds token id {int(self.tok.tokens.max())} but the model's vocab_size is "
                            f"{vocab_size}; use a model with vocab_size >= {self.manifest['n_vocab']}")

    def check_block(self, split: str, block_size: int) -> None:
        if not len(self.split_idx[split]):
            raise DataError(f"the {split} split holds no records; add data or lower --val-fraction")

    def set_context(self, T: int, overlong: str = "truncate") -> int:
        """Fix the context (longest input); over-long records are cut or refused (see the module doc).
        Returns how many records are cut."""
        if overlong not in ("truncate", "error"):
            raise DataError(f"overlong must be 'truncate' or 'error', got {overlong!r}")
        lens = np.diff(self.tok.offsets)
        long = np.nonzero(lens > T + 1)[0]
        if len(long) and overlong == "error":
            r = int(long[0])
            raise DataError(f"record {r} of {self.spec} has {int(lens[r])} tokens, more than context_length + 1 = "
                            f"{T + 1} ({len(long)} records are that long); shorten them, raise --context-length, "
                            f"or pass --overlong truncate (drops prompt tokens from the start)")
        self.context, self.cut = T, len(long)
        return self.cut

    def record(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, target mask) of record r, cut to the context."""
        a, b = self.tok.offsets[r], self.tok.offsets[r + 1]
        ids, mask = self.tok.tokens[a:b], self.tok.mask[a:b]
        if self.context is not None:
            ids, mask, _ = fit_record(ids, mask, self.context + 1)
        return ids, mask

    def collate(self, rows: Sequence[int], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, L) token ids and y (B, L) targets (IGNORE_INDEX off the response) of these records."""
        pairs = [self.record(int(r)) for r in rows]
        if self.pad_to == "context":
            L = block_size
        else:
            longest = max(len(ids) - 1 for ids, _ in pairs)
            L = min(block_size, -(-max(1, longest) // self.pad_multiple) * self.pad_multiple)
        x = np.full((len(pairs), L), self.pad_id, dtype=np.int64)
        y = np.full((len(pairs), L), IGNORE_INDEX, dtype=np.int64)
        for i, (ids, mask) in enumerate(pairs):
            ids, mask = ids[:L + 1], mask[:L + 1]
            n = len(ids) - 1
            x[i, :n] = ids[:-1]
            y[i, :n] = np.where(mask[1:], ids[1:], IGNORE_INDEX)  # target t+1 counts if it is a response token
        return torch.from_numpy(x), torch.from_numpy(y)

    def get_batch(self, split: str, batch_size: int, block_size: int,
                  generator: Optional[torch.Generator] = None, device="cpu"):
        """batch_size records drawn uniformly with replacement -> (x, y), padded as configured."""
        idx = self.split_idx[split]
        self.check_block(split, block_size)
        pick = torch.randint(len(idx), (batch_size,), generator=generator).tolist()
        x, y = self.collate([idx[i] for i in pick], block_size)
        if split == "train":
            self.tokens_drawn += x.numel()
        if device != "cpu" and torch.device(device).type == "cuda":
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x, y

    def eval_batches(self, batch_size: int, block_size: int, max_batches: int) -> list:
        """The val records in order, in batches (the first max_batches * batch_size records)."""
        idx = self.split_idx["val"][: batch_size * max_batches]
        return [self.collate(idx[i:i + batch_size], block_size) for i in range(0, len(idx), batch_size)]

    def val_records(self, n: Optional[int] = None) -> list[dict]:
        idx = self.split_idx["val"] if n is None else self.split_idx["val"][:n]
        return [self.records[int(r)] for r in idx]


def _cache_dir(key: str, label: str) -> Path:
    return cache_root() / f"sft-{label}-{key[:12]}"


def _load_cached(root: Path, key: str) -> Optional[tuple[Tokenized, list[int], list[str]]]:
    man = root / "manifest.json"
    try:
        m = json.loads(man.read_text())
        if m.get("key") != key:
            return None
        z = np.load(root / "tokens.npz")
        return Tokenized(z["tokens"], z["mask"], z["offsets"]), z["kept"].tolist(), m.get("skipped", [])
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None


def _store_cache(root: Path, key: str, tok: Tokenized, kept: list[int], skipped: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / "tokens.tmp.npz"
    np.savez(tmp, tokens=tok.tokens, mask=tok.mask, offsets=tok.offsets, kept=np.asarray(kept, dtype=np.int64))
    os.replace(tmp, root / "tokens.npz")
    t2 = root / "manifest.json.tmp"
    t2.write_text(json.dumps({"key": key, "records": len(kept), "tokens": int(len(tok.tokens)),
                              "skipped": skipped}))
    os.replace(t2, root / "manifest.json")  # written last: marks the cache complete


def prepare_sft(spec: str = BUILTIN, template: str = "auto", val_fraction: float = 0.1, pad_multiple: int = 64,
                pad_to: str = "batch", skip_invalid: bool = False, n_tasks: int = 2000, task_seed: int = 0,
                tasks: Sequence[str] = TASKS, cache: bool = True) -> SFTData:
    """Read, check, tokenize (once, cached) and split an instruction set: a .json/.jsonl path, or
    "tasks" (``n_tasks`` generated puzzles from ``task_seed``)."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if spec == BUILTIN:
        bad = [t for t in tasks if t not in TASKS]
        if bad or not tasks:
            raise DataError(f"unknown built-in task(s) {bad}; choose from {', '.join(TASKS)}")
        records = generate_tasks(n_tasks, seed=task_seed, tasks=tasks)
        raw = json.dumps(records).encode()
        label, where = BUILTIN, f"{BUILTIN} (generated)"
    else:
        if str(spec) in DATASETS and not Path(spec).exists():
            path = download_dataset(str(spec))
        else:
            path = Path(spec).expanduser()
        records = read_records(path)
        raw = path.read_bytes()
        label, where = path.stem[:40], str(path)
    key = hashlib.sha256(raw + f"/v{TEMPLATE_VERSION}/{template}/gpt2/{skip_invalid}".encode()).hexdigest()
    root = _cache_dir(key, label)
    got = _load_cached(root, key) if cache else None
    if got is None:
        got = tokenize_records(records, template, where=where, skip_invalid=skip_invalid)
        if cache:
            try:
                _store_cache(root, key, *got)
            except OSError:
                pass  # a read-only cache: the data is still usable, tokenized again next time
    tok, kept, skipped = got
    return SFTData(tok, [records[i] for i in kept], str(spec), key, val_fraction=val_fraction, template=template,
                   pad_multiple=pad_multiple, pad_to=pad_to, skipped=skipped)


# ---- scoring -------------------------------------------------------------------------------------
@torch.no_grad()
def generate_responses(model, records: Sequence[dict], max_new_tokens: int = 32, template: str = "auto",
                       batch_size: int = 32) -> list[str]:
    """Greedy responses of ``model`` to each record's prompt (stopping at <|endoftext|>); runs under
    the caller's autocast, if any.

    Prompts are kept whole where they fit: a batch whose longest prompt leaves fewer than
    ``max_new_tokens`` positions of the context gets a shorter response budget (down to
    min(max_new_tokens, context // 8)), and only a prompt longer than what is left is cut, from its
    start, as training cuts it (a cut prompt starts at another position than in training)."""
    from gptcore.generate import Generator

    enc = get_encoding("gpt2")
    was = model.training
    model.eval()
    T = model.config.context_length
    gen = Generator(model)
    dev = next(model.parameters()).device.type
    # The KV cache holds the weights' dtype: under autocast, or with a base held in bf16 beside fp32
    # tensors, recompute instead (a few short responses per evaluation)
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    use_cache = len(dtypes) == 1 and not torch.is_autocast_enabled(dev)
    out = []
    try:
        for s in range(0, len(records), batch_size):
            chunk = records[s:s + batch_size]
            prompts = [enc.encode(prompt_of(r, template), allowed_special={ENDOFTEXT}) for r in chunk]
            n_new = max(min(max_new_tokens, T - max(map(len, prompts))), min(max_new_tokens, max(1, T // 8)))
            prompts = [ids[-(T - n_new):] if len(ids) > T - n_new else ids for ids in prompts]
            new = gen.generate(prompts, n_new, temperature=0.0, stop_tokens=[enc.eot_token], use_cache=use_cache)
            for ids in new:
                if ids and ids[-1] == enc.eot_token:
                    ids = ids[:-1]
                out.append(enc.decode(ids))
    finally:
        model.train(was)
    return out


def exact_match(model, records: Sequence[dict], max_new_tokens: int = 16, template: str = "auto") -> float:
    """Share of records whose greedy response equals the reference (whitespace-stripped). Generates
    at most one token more than the longest reference (enough to tell a right answer that stops from
    one that goes on), so the prompts keep more of the context (see generate_responses)."""
    if not records:
        return float("nan")
    enc = get_encoding("gpt2")
    longest = max(len(enc.encode(answer_of(r, template), allowed_special={ENDOFTEXT})) for r in records)
    got = generate_responses(model, records, min(max_new_tokens, longest + 1), template)
    return sum(g.strip() == answer_of(r, template).strip() for g, r in zip(got, records)) / len(records)
