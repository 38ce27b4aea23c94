"""Triton fused attention (gptcore.kernels.attention) against its reference twin.

Correctness rule (tests/errcheck.py): the kernel's error against a float64 attention_ref may be
at most 2x the error of attention_ref run in the kernel's own dtype, plus a small floor; outputs,
gradients and the kernel's workspaces are NaN-poisoned before each call.

On CPU the kernels run under TRITON_INTERPRET=1 with short sequences (fp32 and fp16: the
interpreter cannot do bf16 dots); on a GPU the same tests run at full size, plus bf16, every
autotuning candidate and determinism checks.

    python -m pytest -q tests/test_attention.py
"""
import math

import pytest
import torch

import gptcore.kernels.attention as attn
import gptcore.kernels.attention_configs as attn_configs
from gptcore.kernels.attention import attention, dropout_mask
from gptcore.kernels.reference import attention_ref
from errcheck import assert_error_within, poison_

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

if ON_GPU:
    SEQ_LENS = [1, 17, 97, 128, 1023, 1025]
    HEAD_DIMS = [16, 32, 64, 128]
    DTYPES = [torch.float16, torch.bfloat16]
    # (Tq, Tk) pairs with queries at the end of the keys
    OFFSETS = [(1, 1025), (97, 1023), (128, 1024), (500, 1025)]
else:
    SEQ_LENS = [1, 17, 33]
    HEAD_DIMS = [16, 32]
    DTYPES = [torch.float32, torch.float16]
    OFFSETS = [(1, 33), (5, 33), (17, 40)]

# Absolute floor of the error rule. Where the exact answer is 0 (dk at T = 1: one key, so the
# softmax cannot move) the reference gets exactly 0 but the kernel computes dP - rowsum(dO * O),
# two fp32 sums of the same products in different orders: a few fp32 ulps of |dO| |V| ~ 1e-6.
ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def _poisoned(shape, dtype, device):
    t = torch.empty(shape, dtype=dtype, device=device)
    return poison_(t) if t.is_floating_point() else t.fill_(0xFF)  # 0xFF: no valid keep-mask byte


@pytest.fixture(autouse=True)
def _table_configs_and_poisoned_outputs(monkeypatch):
    """Use the config table (no autotuning) and poison every buffer the kernels must write."""
    monkeypatch.setattr(attn_configs, "_AUTOTUNE", False)
    monkeypatch.setattr(attn, "_alloc", _poisoned)


def _randn(shape, dtype, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(shape, generator=g, device=DEVICE, dtype=torch.float32).to(dtype)


def _qkv(B, H, Tq, Tk, D, dtype, seed=0):
    return tuple(_randn((B, H, T, D), dtype, seed + i).requires_grad_() for i, T in enumerate((Tq, Tk, Tk)))


def _grads(out, inputs, do):
    return torch.autograd.grad(out, inputs, do)


def _check(q, k, v, causal, dropout_p=0.0, seed=None, factor=2.0):
    """Kernel vs float64 oracle vs low-precision reference, output and all three gradients."""
    mask = None
    if dropout_p > 0.0:
        B, H, Tq, _ = q.shape
        mask = dropout_mask(seed, B, H, Tq, k.shape[2], dropout_p, device=q.device)
    out = attention(q, k, v, causal=causal, dropout_p=dropout_p, seed=seed)
    do = _randn(out.shape, out.dtype, seed=out.numel())
    grads = _grads(out, (q, k, v), do)

    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_ref(*ref_in, causal=causal, dropout_p=dropout_p, dropout_mask=mask)
    ref_grads = _grads(ref, ref_in, do.double())

    low_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    low = attention_ref(*low_in, causal=causal, dropout_p=dropout_p, dropout_mask=mask)
    low_grads = _grads(low, low_in, do)

    atol = ATOL[q.dtype]
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_error_within(out, low, ref, factor=factor, atol=atol, name="out")
    for name, g, gl, gr in zip(("dq", "dk", "dv"), grads, low_grads, ref_grads):
        assert g.shape == gr.shape and g.dtype == q.dtype
        assert_error_within(g, gl, gr, factor=factor, atol=atol, name=name)


# ---- against the reference ----------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("T", SEQ_LENS)
def test_matches_reference(T, D, causal, dtype):
    B, H = (2, 3) if ON_GPU else (1, 2)
    _check(*_qkv(B, H, T, T, D, dtype, seed=T * D), causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_head_dim_64_batch_1_head_1(dtype):
    T = 1025 if ON_GPU else 33
    _check(*_qkv(1, 1, T, T, 64, dtype, seed=1), causal=True)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("Tq,Tk", OFFSETS)
def test_queries_at_end_of_keys(Tq, Tk, causal):
    """Prefill over a KV cache: Tq < Tk, query i at position Tk - Tq + i."""
    D = 64 if ON_GPU else 32
    _check(*_qkv(2, 2, Tq, Tk, D, DTYPES[-1], seed=Tq + Tk), causal=causal)


def test_more_queries_than_keys_non_causal():
    Tq, Tk = (1025, 97) if ON_GPU else (33, 17)
    _check(*_qkv(1, 2, Tq, Tk, 32, DTYPES[-1], seed=3), causal=False)


def test_non_contiguous_inputs_like_the_model():
    """q, k, v as the model makes them: a permuted view of one (B, T, 3, H, D) projection."""
    B, T, H, D = (2, 1023, 12, 64) if ON_GPU else (2, 33, 2, 16)
    dtype = DTYPES[-1]
    qkv = _randn((B, T, 3 * H * D), dtype, seed=0).requires_grad_()
    q, k, v = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
    assert not q.is_contiguous()
    out = attention(q, k, v, causal=True)
    # the output lives in (B, T, H, D) memory, so the model's (B, H, T, D) -> (B, T, H*D) reshape
    # is a view (no copy); the incoming gradient then reaches the kernel non-contiguous
    assert out.transpose(1, 2).is_contiguous()
    y = out.transpose(1, 2).reshape(B, T, H * D)
    assert y.data_ptr() == out.data_ptr()
    dy = _randn(y.shape, dtype, seed=1)
    (dqkv,) = torch.autograd.grad(y, qkv, dy)

    ref_qkv = qkv.detach().double().requires_grad_()
    rq, rk, rv = ref_qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
    ref = attention_ref(rq, rk, rv, causal=True).transpose(1, 2).reshape(B, T, H * D)
    (ref_d,) = torch.autograd.grad(ref, ref_qkv, dy.double())
    low_qkv = qkv.detach().clone().requires_grad_()
    lq, lk, lv = low_qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
    low = attention_ref(lq, lk, lv, causal=True).transpose(1, 2).reshape(B, T, H * D)
    (low_d,) = torch.autograd.grad(low, low_qkv, dy)
    assert_error_within(y, low, ref, atol=ATOL[dtype], name="out")
    assert_error_within(dqkv, low_d, ref_d, atol=ATOL[dtype], name="dqkv")


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_attention_qkv_packed_equals_split_views(dropout_p):
    """attention_qkv (packed qkv in, packed dqkv out) gives exactly what attention over the split
    views gives, output and gradient; also non-causal and with a custom scale."""
    from gptcore.kernels.attention import attention_qkv, split_qkv

    B, T, H, D = (2, 1023, 12, 64) if ON_GPU else (2, 19, 2, 16)
    dtype = DTYPES[-1]
    for causal, scale in ((True, None), (False, 0.3)):
        qkv = _randn((B, T, 3 * H * D), dtype, seed=5).requires_grad_()
        dy = _randn((B, H, T, D), dtype, seed=6)
        out = attention_qkv(qkv, H, causal=causal, dropout_p=dropout_p, scale=scale, seed=11)
        (dqkv,) = torch.autograd.grad(out, qkv, dy)
        ref_qkv = qkv.detach().clone().requires_grad_()
        want = attention(*split_qkv(ref_qkv, H), causal=causal, dropout_p=dropout_p, scale=scale, seed=11)
        (want_d,) = torch.autograd.grad(want, ref_qkv, dy)
        assert torch.equal(out, want) and torch.equal(dqkv, want_d)
        assert dqkv.is_contiguous() and dqkv.shape == qkv.shape


def test_attention_qkv_rejects_bad_shapes():
    from gptcore.kernels.attention import attention_qkv

    x = _randn((2, 5, 3 * 2 * 16), DTYPES[-1], seed=0)
    with pytest.raises(ValueError, match="3 \\* n_heads"):
        attention_qkv(x, 5)
    with pytest.raises(ValueError, match="qkv must be"):
        attention_qkv(x[0], 2)
    with pytest.raises(ValueError, match="head_dim"):
        attention_qkv(_randn((1, 5, 3 * 2 * 24), DTYPES[-1], seed=0), 2)


def test_custom_scale():
    q, k, v = _qkv(1, 2, 17, 17, 32, DTYPES[0], seed=5)
    out = attention(q, k, v, causal=True, scale=0.3)
    ref = attention_ref(q.detach().double(), k.detach().double(), v.detach().double(), causal=True, scale=0.3)
    low = attention_ref(q.detach(), k.detach(), v.detach(), causal=True, scale=0.3)
    assert_error_within(out, low, ref, atol=ATOL[q.dtype])


def test_other_block_shapes():
    """The masking logic with block_m < block_n in fwd/dq and block_m > block_n in dkdv (the
    table's interpreter configs have the opposite ratios), on ragged, offset causal shapes."""
    C = attn.KernelConfig
    with attn.use_config(fwd=C(16, 32, 4, 1), dkdv=C(32, 16, 4, 1), dq=C(16, 32, 4, 1)):
        assert attn.chosen_config(32, DTYPES[0])["source"] == "forced"
        for Tq, Tk in [(33, 33), (17, 40), (1, 9)]:
            _check(*_qkv(1, 2, Tq, Tk, 32, DTYPES[0], seed=Tq), causal=True)
        _check(*_qkv(1, 1, 33, 33, 32, DTYPES[0], seed=7), causal=False)


def test_tma_descriptor_path():
    """The tensor-descriptor (TMA) variant of every kernel: the interpreter emulates descriptors,
    including their zero-filled out-of-bounds rows, so this runs on CPU too."""
    C = attn.KernelConfig
    if ON_GPU:
        T, cfgs = 1025, (C(128, 64, 4, 3, True), C(64, 128, 8, 3, True), C(128, 64, 8, 3, True))
    else:
        T, cfgs = 33, (C(32, 16, 4, 1, True), C(16, 32, 4, 1, True), C(32, 16, 4, 1, True))
    cases = [((2, 2, T, T, 32), dict(causal=True)),
             ((1, 2, T // 3, T, 16), dict(causal=True, dropout_p=0.25, seed=4)),
             ((1, 1, T, T // 2 + 1, 32), dict(causal=False))]
    with attn.use_config(*cfgs):
        for i, (shape, kw) in enumerate(cases):
            q, k, v = _qkv(*shape, DTYPES[-1], seed=31 + i)
            assert attn._tma_ok(q, k, v)  # so the kernels really take the descriptor path
            _check(q, k, v, **kw)


# ---- dropout ------------------------------------------------------------------------------
def _drop_shape():
    return (2, 3, 257, 257, 64) if ON_GPU else (1, 2, 33, 33, 16)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_dropout_matches_reference_with_the_kernels_mask(causal):
    """Forward and backward apply the mask dropout_mask() returns for the seed."""
    B, H, Tq, Tk, D = _drop_shape()
    _check(*_qkv(B, H, Tq, Tk, D, DTYPES[-1], seed=11), causal=causal, dropout_p=0.3, seed=1234)


def test_dropout_offset_queries():
    B, H, _, Tk, D = _drop_shape()
    _check(*_qkv(B, H, Tk // 3, Tk, D, DTYPES[-1], seed=12), causal=True, dropout_p=0.2, seed=99)


def test_dropout_same_seed_reproduces_and_seeds_differ():
    B, H, Tq, Tk, D = _drop_shape()
    q, k, v = _qkv(B, H, Tq, Tk, D, DTYPES[-1], seed=13)
    a = attention(q, k, v, dropout_p=0.5, seed=7)
    b = attention(q, k, v, dropout_p=0.5, seed=7)
    c = attention(q, k, v, dropout_p=0.5, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the default seed comes from torch's generator
    torch.manual_seed(3)
    d = attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(3)
    e = attention(q, k, v, dropout_p=0.5)
    assert torch.equal(d, e)


def test_dropout_keep_rate():
    B, H, T = (4, 8, 512) if ON_GPU else (1, 2, 64)
    for p in (0.1, 0.5):
        mask = dropout_mask(21, B, H, T, T, p, device=DEVICE)
        assert mask.dtype == torch.bool and mask.view(torch.uint8).max() <= 1  # every byte written
        n = mask.numel()
        sigma = math.sqrt(p * (1 - p) / n)
        rate = mask.float().mean().item()
        assert abs(rate - (1 - p)) < 5 * sigma, f"keep rate {rate:.4f} for p={p}, expected {1 - p}"
        # rows and heads get different masks
        assert not torch.equal(mask[0, 0, 0], mask[0, 0, 1])
        assert not torch.equal(mask[0, 0], mask[0, 1])
    assert torch.equal(dropout_mask(21, B, H, T, T, 0.5, device=DEVICE), dropout_mask(21, B, H, T, T, 0.5, device=DEVICE))


# ---- the model uses it; errors --------------------------------------------------------------
def test_triton_backend_uses_this_kernel():
    from gptcore.ops import get_ops

    ops = get_ops("triton")
    assert ops.report["attention"] == "triton"
    assert ops.attention is attention  # one definition, eager and compiled (kernels/_oplib.py)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: _bad(D=48), r"head_dim 48 is not supported.*\(16, 32, 64, 128\)"),
        (lambda: _bad(Tq=9, Tk=8), r"causal attention needs Tq <= Tk"),
        (lambda: _bad(kdtype=torch.float16 if DTYPES[0] != torch.float16 else torch.float32), r"share a dtype"),
        (lambda: _bad(dtype=torch.float64), r"dtype torch.float64 is not supported"),
        (lambda: _bad(kshape=(1, 3, 8, 16)), r"must agree on batch, heads and head_dim"),
        (lambda: _bad(vshape=(1, 2, 7, 16)), r"k and v shapes differ"),
        (lambda: _bad(dropout_p=1.0), r"dropout_p must be in \[0, 1\)"),
        (lambda: _bad(scale=-1.0), r"scale must be a positive"),
        (lambda: _bad(q3d=True), r"must be 4-D"),
    ],
)
def test_bad_inputs_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def _bad(D=16, Tq=8, Tk=8, dtype=None, kdtype=None, kshape=None, vshape=None, dropout_p=0.0, scale=None, q3d=False):
    dtype = dtype or DTYPES[0]
    q = torch.randn(1, 2, Tq, D, device=DEVICE).to(dtype)
    k = torch.randn(*(kshape or (1, 2, Tk, D)), device=DEVICE).to(kdtype or dtype)
    v = torch.randn(*(vshape or kshape or (1, 2, Tk, D)), device=DEVICE).to(dtype)
    if q3d:
        q = q[0]
    return attention(q, k, v, causal=True, dropout_p=dropout_p, scale=scale)


@pytest.mark.gpu
def test_mixed_devices_raise():
    q = torch.randn(1, 2, 8, 16, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="must be on one device"):
        attention(q, q.cpu(), q)


def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        attention(q, q, q)


# ---- GPU only: bf16 at size, autotuning, determinism ------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
def test_every_autotune_candidate_is_correct(D):
    """Autotuning may pick any candidate (the benchmark's bf16 causal setting, plus offset queries
    and ragged lengths): each one must compute the same function."""
    arch = attn._arch(torch.device("cuda"))
    dtype = torch.bfloat16
    fwd, dkdv, dq = (attn.candidates(kind, D, dtype, arch) for kind in attn.KERNELS)
    for i in range(max(len(fwd), len(dkdv), len(dq))):
        pick = lambda cands: cands[min(i, len(cands) - 1)]
        with attn.use_config(fwd=pick(fwd), dkdv=pick(dkdv), dq=pick(dq)):
            _check(*_qkv(1, 2, 333, 1025, D, dtype, seed=i), causal=True)


@pytest.mark.gpu
def test_autotuning_picks_a_candidate_and_stays_correct(monkeypatch):
    monkeypatch.setattr(attn_configs, "_AUTOTUNE", True)
    monkeypatch.setattr(attn_configs, "_TUNED", {})
    monkeypatch.setattr(attn_configs, "_TUNING_LOG", [])
    D, T = 64, 2048
    _check(*_qkv(2, 4, T, T, D, torch.bfloat16, seed=4), causal=True)
    cfg = attn.chosen_config(D, torch.bfloat16, True, T, T)
    assert cfg["source"] == "autotuned"
    arch = attn._arch(torch.device("cuda"))
    for kind in attn.KERNELS:
        assert cfg[kind] in {str(c) for c in attn.candidates(kind, D, torch.bfloat16, arch)}
    assert sorted(e["kernel"] for e in attn.tuning_log()) == sorted(attn.KERNELS)


@pytest.mark.gpu
@pytest.mark.parametrize("D,causal", [(64, True), (64, False), (128, True)])
def test_float32_inputs(D, causal):
    """fp32 runs ieee (not TF32) dots, so it tracks the fp32 reference closely."""
    _check(*_qkv(2, 2, 257, 257, D, torch.float32, seed=D), causal=causal)


@pytest.mark.gpu
def test_backward_is_deterministic():
    q, k, v = _qkv(2, 4, 1025, 1025, 64, torch.bfloat16, seed=9)
    do = _randn(q.shape, q.dtype, seed=10)
    runs = [_grads(attention(q, k, v, causal=True, dropout_p=0.1, seed=5), (q, k, v), do) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_long_sequence_bf16():
    """Long causal sequences (the benchmark's regime), with a 4-head batch."""
    _check(*_qkv(1, 4, 4096, 4096, 128, torch.bfloat16, seed=2), causal=True)
