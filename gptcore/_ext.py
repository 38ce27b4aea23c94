"""Loads the compiled extension ``gptcore._C`` and says how to fix it when it is missing.

Loading also registers each op's fake (meta) implementation, so ``torch.compile`` can trace
through ``torch.ops.gptcore.*`` without running them: the mutating ops return nothing and
``paged_gather`` returns a (B, H, max_len, D) tensor like its cache.
"""
from __future__ import annotations

import functools

import torch

_FIX = (
    "Build it with torch installed first:\n"
    "    pip install --no-build-isolation -e .\n"
    "(the build compiles against your installed torch; if torch was upgraded since, rebuild)."
)


@functools.lru_cache(maxsize=None)
def load() -> None:
    """Import gptcore._C so its ops appear under torch.ops.gptcore; raise a clear error if not built."""
    try:
        from gptcore import _C  # noqa: F401  (import registers the ops)
    except ImportError as e:
        msg = str(e)
        if "undefined symbol" in msg or "ABI" in msg:
            raise ImportError(
                f"gptcore._C was built against a different torch than the one installed "
                f"({torch.__version__}): {msg}\n{_FIX}"
            ) from e
        raise ImportError(f"gptcore's C++ extension gptcore._C is not built ({msg}).\n{_FIX}") from e
    _register_fakes()


def _register_fakes() -> None:
    def no_output(*args, **kwargs):
        return None

    for name in ("kv_append", "kv_append_kv", "paged_append", "kv_reorder"):
        torch.library.register_fake(f"gptcore::{name}", no_output)

    @torch.library.register_fake("gptcore::paged_gather")
    def _paged_gather_fake(cache, block_table, lengths, max_len, host_check=True):
        # cache [num_blocks, H, block_size, D], block_table [B, max_blocks] -> [B, H, max_len, D]
        return cache.new_empty((block_table.shape[0], cache.shape[1], max_len, cache.shape[3]))


def available() -> bool:
    try:
        load()
        return True
    except ImportError:
        return False


def ops():
    """torch.ops.gptcore, with the extension loaded."""
    load()
    return torch.ops.gptcore
