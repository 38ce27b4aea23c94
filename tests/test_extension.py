"""The compiled extension gptcore._C builds, imports and its op matches a Python loop."""
import pytest
import torch

from gptcore import _ext


def test_extension_loads_and_registers_ops():
    _ext.load()
    assert hasattr(torch.ops.gptcore, "kv_append")


def _loop_append(cache, new, pos):
    out = cache.clone()
    for b in range(cache.shape[0]):
        out[b, :, pos[b]: pos[b] + new.shape[2]] = new[b]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [3, 64])
def test_kv_append_matches_loop(dtype, D, device):
    B, H, Tmax, Tn = 3, 2, 19, 4
    cache = torch.randn(B, H, Tmax, D, device=device).to(dtype)
    new = torch.randn(B, H, Tn, D, device=device).to(dtype)
    pos = torch.tensor([0, 7, Tmax - Tn], device=device)
    expect = _loop_append(cache, new, pos)
    _ext.ops().kv_append(cache, new, pos)
    assert torch.equal(cache, expect)


def test_kv_append_bounds_and_checks(device):
    cache = torch.zeros(2, 2, 8, 4, device=device)
    new = torch.ones(2, 2, 3, 4, device=device)
    with pytest.raises(RuntimeError, match="cache holds 8 positions|exceed the cache's 8 positions"):
        _ext.ops().kv_append(cache, new, torch.tensor([0, 6], device=device))
    assert cache.abs().sum() == 0  # nothing written on error
    with pytest.raises(RuntimeError, match="dtype mismatch"):
        _ext.ops().kv_append(cache, new.half(), torch.tensor([0, 0], device=device))
    with pytest.raises(RuntimeError, match="pos must be int64"):
        _ext.ops().kv_append(cache, new, torch.tensor([0, 0], device=device, dtype=torch.int32))
