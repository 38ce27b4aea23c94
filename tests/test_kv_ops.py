"""The KV-cache extension ops (torch.ops.gptcore.*) against plain Python loops, and their errors.

CPU always; the same tests run on CUDA where a GPU is present (the `device` fixture), plus
GPU-only tests for CUDA-graph capture. Every op must reject bad input with a clear message and
write nothing: positions past the capacity, block ids out of range, wrong dtype/device/shape.
"""
import pytest
import torch

from gptcore import _ext

ops = _ext.ops()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _rand(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, device=device).to(dtype)


def _strided_new(B, H, T, D, dtype, device):
    """(B, H, T, D) view with the model's qkv strides (last dim contiguous, the rest not)."""
    qkv = _rand(B, T, 3, H, D, dtype=dtype, device=device)
    return qkv.permute(2, 0, 3, 1, 4)[1]


# ---- loop references -------------------------------------------------------------------------
def loop_append(cache, new, pos):
    out = cache.clone()
    for b in range(cache.shape[0]):
        p = int(pos[b])
        out[b, :, p: p + new.shape[2]] = new[b]
    return out


def loop_paged_append(cache, new, table, pos):
    out = cache.clone()
    bs = cache.shape[2]
    for b in range(new.shape[0]):
        for t in range(new.shape[2]):
            p = int(pos[b]) + t
            out[int(table[b, p // bs]), :, p % bs] = new[b, :, t]
    return out


def loop_paged_gather(cache, table, lengths, max_len):
    NB, H, bs, D = cache.shape
    out = torch.zeros(table.shape[0], H, max_len, D, dtype=cache.dtype, device=cache.device)
    for b in range(table.shape[0]):
        for t in range(int(lengths[b])):
            out[b, :, t] = cache[int(table[b, t // bs]), :, t % bs]
    return out


def loop_reorder(cache, index, length):
    out = cache.clone()
    for i, src in enumerate(index.tolist()):
        out[:, i, :, :length] = cache[:, src, :, :length]
    return out


def _paged_setup(B, H, bs, D, max_blocks, dtype, device, table_dtype=torch.int32):
    num_blocks = B * max_blocks + 3
    table = torch.randperm(num_blocks)[: B * max_blocks].view(B, max_blocks).to(table_dtype).to(device)
    k = _rand(num_blocks, H, bs, D, dtype=dtype, device=device)
    v = _rand(num_blocks, H, bs, D, dtype=dtype, device=device)
    return k, v, table


# ---- correctness -----------------------------------------------------------------------------
def test_extension_registers_every_op():
    for name in ("kv_append", "kv_append_kv", "paged_append", "paged_gather", "kv_reorder"):
        assert hasattr(torch.ops.gptcore, name), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [3, 64])
def test_kv_append_matches_loop(dtype, D, device):
    B, H, Tmax, Tn = 3, 2, 19, 4
    cache = _rand(B, H, Tmax, D, dtype=dtype, device=device)
    new = _strided_new(B, H, Tn, D, dtype, device)
    pos = torch.tensor([0, 7, Tmax - Tn], device=device)
    expect = loop_append(cache, new, pos)
    ops.kv_append(cache, new, pos)
    assert torch.equal(cache, expect)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Tn", [1, 5])
def test_kv_append_kv_matches_loop(dtype, Tn, device):
    B, H, Tmax, D = 4, 3, 23, 16
    kc, vc = _rand(B, H, Tmax, D, dtype=dtype, device=device), _rand(B, H, Tmax, D, dtype=dtype, device=device)
    k, v = _strided_new(B, H, Tn, D, dtype, device), _strided_new(B, H, Tn, D, dtype, device)
    pos = torch.tensor([0, 3, 11, Tmax - Tn], device=device)
    ek, ev = loop_append(kc, k, pos), loop_append(vc, v, pos)
    ops.kv_append_kv(kc, vc, k, v, pos)
    assert torch.equal(kc, ek) and torch.equal(vc, ev)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("table_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("Tn", [1, 7, 21])
def test_paged_append_matches_loop(dtype, table_dtype, Tn, device):
    B, H, bs, D, max_blocks = 3, 2, 8, 32, 5
    kc, vc, table = _paged_setup(B, H, bs, D, max_blocks, dtype, device, table_dtype)
    k, v = _strided_new(B, H, Tn, D, dtype, device), _strided_new(B, H, Tn, D, dtype, device)
    pos = torch.tensor([0, 6, max_blocks * bs - Tn], device=device)  # crosses block boundaries
    ek, ev = loop_paged_append(kc, k, table, pos), loop_paged_append(vc, v, table, pos)
    ops.paged_append(kc, vc, k, v, table, pos)
    assert torch.equal(kc, ek) and torch.equal(vc, ev)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("table_dtype", [torch.int32, torch.int64])
def test_paged_gather_matches_loop(dtype, table_dtype, device):
    B, H, bs, D, max_blocks = 3, 2, 4, 24, 6
    kc, _, table = _paged_setup(B, H, bs, D, max_blocks, dtype, device, table_dtype)
    lengths = torch.tensor([1, 13, 24], device=device)
    table[0, 1:] = -1  # blocks past a sequence's length may be unallocated
    for max_len in (24, 30):
        out = ops.paged_gather(kc, table, lengths, max_len)
        assert out.shape == (B, H, max_len, D)
        assert torch.equal(out, loop_paged_gather(kc, table, lengths, max_len))


@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_reorder_matches_loop(dtype, device):
    N, B, H, T, D = 4, 5, 2, 11, 8
    for index, length in (([4, 0, 2, 1, 3], T), ([1, 1, 3], 7), ([2], 0)):  # permutation, beam fork, shrink
        cache = _rand(N, B, H, T, D, dtype=dtype, device=device)
        idx = torch.tensor(index, device=device)
        expect = loop_reorder(cache, idx, length)
        ops.kv_reorder(cache, idx, length)
        assert torch.equal(cache, expect)


def test_ops_trace_under_torch_compile_and_opcheck():
    """Fake (meta) implementations let torch.compile trace the ops; opcheck validates schema + fakes."""
    B, H, bs, D, mb = 2, 2, 4, 8, 3
    kc, vc, table = _paged_setup(B, H, bs, D, mb, torch.float32, "cpu")
    k, v = _rand(B, H, 2, D), _rand(B, H, 2, D)
    pos = torch.tensor([0, 5])
    lengths = torch.tensor([2, 7])
    sc, sv = _rand(B, H, 9, D), _rand(B, H, 9, D)
    torch.library.opcheck(ops.paged_append.default, (kc.clone(), vc.clone(), k, v, table, pos))
    torch.library.opcheck(ops.paged_gather.default, (kc, table, lengths, 9))
    torch.library.opcheck(ops.kv_append_kv.default, (sc.clone(), sv.clone(), k, v, pos))
    torch.library.opcheck(ops.kv_append.default, (sc.clone(), k, pos))
    torch.library.opcheck(ops.kv_reorder.default, (_rand(2, B, H, 9, D), torch.tensor([1, 0]), 5))

    def step(kc, vc, k, v, table, pos, lengths):
        ops.paged_append(kc, vc, k, v, table, pos)
        return ops.paged_gather(kc, table, lengths, 9) * 2

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    a, b = kc.clone(), vc.clone()
    got = compiled(a, b, k, v, table, pos, lengths)
    c, d = kc.clone(), vc.clone()
    assert torch.equal(got, step(c, d, k, v, table, pos, lengths))
    assert torch.equal(a, c) and torch.equal(b, d)


# ---- errors: clear messages, nothing written ------------------------------------------------
def test_append_bounds_and_input_checks(device):
    cache = torch.zeros(2, 2, 8, 4, device=device)
    vcache = torch.zeros(2, 2, 8, 4, device=device)
    new = torch.ones(2, 2, 3, 4, device=device)
    with pytest.raises(RuntimeError, match=r"sequence 1 writes positions \[6, 9\) but the cache holds 8 positions"):
        ops.kv_append(cache, new, torch.tensor([0, 6], device=device))
    with pytest.raises(RuntimeError, match=r"sequence 0 writes positions \[-1, 2\)"):
        ops.kv_append_kv(cache, vcache, new, new, torch.tensor([-1, 0], device=device))
    assert cache.abs().sum() == 0 and vcache.abs().sum() == 0  # nothing written on error
    with pytest.raises(RuntimeError, match="dtype mismatch"):
        ops.kv_append(cache, new.half(), torch.tensor([0, 0], device=device))
    with pytest.raises(RuntimeError, match="pos must be int64"):
        ops.kv_append(cache, new, torch.tensor([0, 0], device=device, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="pos must be contiguous"):
        ops.kv_append(cache, new, torch.tensor([0, 9, 0, 9], device=device)[::2])
    with pytest.raises(RuntimeError, match=r"pos must be \[B\] with B = 2"):
        ops.kv_append(cache, new, torch.tensor([0, 0, 0], device=device))
    with pytest.raises(RuntimeError, match="does not fit cache"):
        ops.kv_append(cache, torch.ones(2, 3, 1, 4, device=device), torch.tensor([0, 0], device=device))
    with pytest.raises(RuntimeError, match="cache must be contiguous"):
        ops.kv_append(cache.transpose(2, 3), new.transpose(2, 3), torch.tensor([0, 0], device=device))
    with pytest.raises(RuntimeError, match="matching shapes"):
        ops.kv_append_kv(cache, torch.zeros(2, 2, 9, 4, device=device), new, new, torch.tensor([0, 0], device=device))


def test_paged_bounds_and_input_checks(device):
    B, H, bs, D = 2, 2, 4, 8
    kc = torch.zeros(7, H, bs, D, device=device)
    vc = torch.zeros(7, H, bs, D, device=device)
    k = torch.ones(B, H, 2, D, device=device)
    table = torch.tensor([[0, 1, -1], [2, 9, 3]], dtype=torch.int32, device=device)
    pos = torch.tensor([0, 0], device=device)
    with pytest.raises(RuntimeError, match=r"block_table\[1, 1\] = 9 is not a block of the cache \(num_blocks = 7\)"):
        ops.paged_append(kc, vc, k, k, table, torch.tensor([0, 3], device=device))
    with pytest.raises(RuntimeError, match=r"block_table\[0, 2\] = -1 is not a block"):
        ops.paged_append(kc, vc, k, k, table, torch.tensor([8, 0], device=device))
    with pytest.raises(RuntimeError, match=r"writes positions \[11, 13\) but its block table holds 3 blocks of 4"):
        ops.paged_append(kc, vc, k, k, table, torch.tensor([0, 11], device=device))
    assert kc.abs().sum() == 0 and vc.abs().sum() == 0
    with pytest.raises(RuntimeError, match="block_table must be int32 or int64"):
        ops.paged_append(kc, vc, k, k, table.float(), pos)
    with pytest.raises(RuntimeError, match="dtype mismatch"):
        ops.paged_append(kc, vc, k.double(), k, table, pos)
    with pytest.raises(RuntimeError, match="H and D must match"):
        ops.paged_append(kc, vc, torch.ones(B, H, 2, D + 1, device=device), torch.ones(B, H, 2, D + 1, device=device),
                         table, pos)
    with pytest.raises(RuntimeError, match=r"lengths\[0\] = 5 must be in \[0, max_len = 4\]"):
        ops.paged_gather(kc, table, torch.tensor([5, 1], device=device), 4)
    with pytest.raises(RuntimeError, match=r"block_table\[0, 2\] = -1 is not a block"):
        ops.paged_gather(kc, table, torch.tensor([9, 1], device=device), 12)
    with pytest.raises(RuntimeError, match=r"lengths\[1\] = 13 exceeds the 12 positions"):
        ops.paged_gather(kc, table, torch.tensor([1, 13], device=device), 13)


def test_reorder_checks(device):
    cache = torch.zeros(2, 3, 2, 5, 4, device=device)
    with pytest.raises(RuntimeError, match=r"index\[1\] = 3 is not a sequence of the cache \(B = 3\)"):
        ops.kv_reorder(cache, torch.tensor([0, 3], device=device), 5)
    with pytest.raises(RuntimeError, match=r"length 6 must be in \[0, T = 5\]"):
        ops.kv_reorder(cache, torch.tensor([0], device=device), 6)
    with pytest.raises(RuntimeError, match=r"index must be \[B'\] with B' <= B = 3"):
        ops.kv_reorder(cache, torch.tensor([0, 1, 2, 0], device=device), 5)
    with pytest.raises(RuntimeError, match=r"cache must be \[N, B, H, T, D\]"):
        ops.kv_reorder(cache[0], torch.tensor([0], device=device), 5)


@pytest.mark.gpu
def test_mixed_devices_are_an_error():
    cache = torch.zeros(2, 2, 8, 4, device="cuda")
    new = torch.ones(2, 2, 1, 4, device="cuda")
    with pytest.raises(RuntimeError, match="must be on one device"):
        ops.kv_append(cache, new, torch.tensor([0, 0]))
    with pytest.raises(RuntimeError, match="must be on one device"):
        ops.paged_gather(cache, torch.zeros(2, 2, dtype=torch.int32), torch.tensor([1, 1], device="cuda"), 4)


# ---- GPU: full size and CUDA graphs ------------------------------------------------------------
@pytest.mark.gpu
def test_large_appends_match_indexing():
    B, H, T, D, Tn = 8, 12, 1024, 64, 300
    kc = torch.zeros(B, H, T, D, device="cuda", dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    k = _strided_new(B, H, Tn, D, torch.bfloat16, "cuda")
    v = _strided_new(B, H, Tn, D, torch.bfloat16, "cuda")
    pos = torch.randint(0, T - Tn, (B,), device="cuda")
    ek, ev = loop_append(kc, k, pos), loop_append(vc, v, pos)
    ops.kv_append_kv(kc, vc, k, v, pos)
    assert torch.equal(kc, ek) and torch.equal(vc, ev)
    pk, pv, table = _paged_setup(B, H, 16, D, T // 16, torch.bfloat16, "cuda")
    ek, ev = loop_paged_append(pk, k, table, pos), loop_paged_append(pv, v, table, pos)
    ops.paged_append(pk, pv, k, v, table, pos)
    assert torch.equal(pk, ek) and torch.equal(pv, ev)
    lengths = pos + Tn
    assert torch.equal(ops.paged_gather(pk, table, lengths, T), loop_paged_gather(pk, table, lengths, T))


@pytest.mark.gpu
def test_ops_replay_in_a_cuda_graph_and_never_write_out_of_bounds():
    """Under capture the host-side bounds read is skipped; positions come from a device tensor at
    replay time, and a bad position is skipped by the kernel instead of corrupting memory."""
    B, H, T, D = 3, 2, 16, 8
    big = torch.zeros(2, B, H, T, D, device="cuda")
    kc, vc = big[0], big[1]
    k = torch.empty(B, H, 1, D, device="cuda")
    v = torch.empty(B, H, 1, D, device="cuda")
    pos = torch.zeros(B, dtype=torch.long, device="cuda")
    pk, pv, table = _paged_setup(B, H, 4, D, 4, torch.float32, "cuda")
    ops.kv_append_kv(kc, vc, k.normal_(), v.normal_(), pos)  # warm-up (kernels loaded before capture)
    ops.paged_append(pk, pv, k, v, table, pos)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ops.kv_append_kv(kc, vc, k, v, pos)
        ops.paged_append(pk, pv, k, v, table, pos)
    ref_s, ref_pk = kc.clone(), pk.clone()
    for step_pos in ([1, 5, 15], [2, 0, 7]):
        k.normal_(), v.normal_()
        pos.copy_(torch.tensor(step_pos))
        ref_s = loop_append(ref_s, k, pos)
        ref_pk = loop_paged_append(ref_pk, k, table, pos)
        g.replay()
    torch.cuda.synchronize()
    assert torch.equal(kc, ref_s) and torch.equal(pk, ref_pk)
    before, before_p = big.clone(), pk.clone()
    pos.copy_(torch.tensor([T, -1, 4 * 4]))  # every one out of bounds: nothing may be written
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(big, before) and torch.equal(pk, before_p)


def test_append_without_host_check(device):
    """host_check=False (what gptcore.kv_cache passes: its host shadows guarantee the bounds)
    writes like the checked op; on CUDA it skips the host read (no sync) and the kernel drops an
    out-of-bounds write, on the CPU the check is free and still runs."""
    B, H, T, D = 2, 2, 8, 4
    kc, vc = torch.zeros(B, H, T, D, device=device), torch.zeros(B, H, T, D, device=device)
    k, v = _rand(B, H, 1, D, device=device), _rand(B, H, 1, D, device=device)
    pos = torch.tensor([3, 7], device=device)
    ops.kv_append_kv(kc, vc, k, v, pos, False)
    assert torch.equal(kc, loop_append(torch.zeros_like(kc), k, pos))
    assert torch.equal(vc, loop_append(torch.zeros_like(vc), v, pos))
    pk, pv, table = _paged_setup(B, H, 4, D, 4, torch.float32, device)
    ek = loop_paged_append(pk, k, table, pos)
    ops.paged_append(pk, pv, k, v, table, pos, False)
    assert torch.equal(pk, ek)
    bad = torch.tensor([T, 0], device=device)
    before = kc.clone()
    if device == "cpu":
        with pytest.raises(RuntimeError, match="the cache holds 8 positions"):
            ops.kv_append_kv(kc, vc, k, v, bad, False)
        assert torch.equal(kc, before)
    else:
        ops.kv_append_kv(kc, vc, k, v, bad, False)
        torch.cuda.synchronize()
        expect = before.clone()
        expect[1, :, 0] = k[1, :, 0]  # sequence 1 is in bounds; sequence 0's write is dropped
        assert torch.equal(kc, expect)


def test_gather_without_host_check(device):
    """paged_gather(host_check=False) (what PagedKVCache passes each layer: reserve() keeps the
    bounds) reads like the checked op. On CUDA it must not sync with the GPU (checked with
    torch.cuda.set_sync_debug_mode, which raises on a synchronizing call) and a bad length or block
    id reads zeros instead of out of bounds; on the CPU the check is free and still runs."""
    B, H, bs, D, max_blocks = 3, 2, 4, 8, 5
    kc, _, table = _paged_setup(B, H, bs, D, max_blocks, torch.float32, device)
    lengths = torch.tensor([2, 9, 20], device=device)
    want = loop_paged_gather(kc, table, lengths, 20)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = ops.paged_gather(kc, table, lengths, 20, False)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    else:
        out = ops.paged_gather(kc, table, lengths, 20, False)
    assert torch.equal(out, want)
    bad = torch.tensor([2, 9, 21], device=device)  # longer than max_len
    if device == "cpu":
        with pytest.raises(RuntimeError, match="paged_gather: lengths"):
            ops.paged_gather(kc, table, bad, 20, False)
    else:
        out = ops.paged_gather(kc, table, bad, 20, False)
        assert torch.equal(out[:2], want[:2])  # in-bounds rows are read; nothing outside the cache is


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_eager_paged_decode_with_torch_attention_does_not_sync():
    """The paged cache's decode step with the torch attention (gather, then SDPA) runs without a
    device-to-host sync: set_sync_debug_mode('error') raises on any synchronizing call."""
    from gptcore.config import GPTConfig
    from gptcore.kv_cache import PagedKVCache
    from gptcore.model import GPT

    model = GPT(GPTConfig.from_preset("tiny"), backend="torch").cuda().eval()
    cache = PagedKVCache.for_model(model, batch_size=2, max_seq_len=32, attention="torch")
    with torch.no_grad():
        model(torch.randint(0, 100, (2, 5), device="cuda"), kv_cache=cache)  # prefill (reserves itself)
        tok = torch.randint(0, 100, (2, 1), device="cuda")
        cache.reserve(1)  # host shadows and block table, outside the checked region
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with cache.external_reservation():
                model(tok, kv_cache=cache)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert cache.host_lengths() == [6, 6]
