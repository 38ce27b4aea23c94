"""Fused LM head + cross-entropy (gptcore.loss) against its twin F.cross_entropy(F.linear(h, W).float(), y).

The correctness rule (tests/errcheck.py) throughout: oracle = the twin in float64, lowprec = the twin in the test dtype,
fast = the chunked op; losses and the gradients of h and W. Also the row step (Triton kernel and
torch version) against torch's own cross-entropy, the torch.library registration under
torch.compile, the model's default loss path, and bad input.
"""

import pytest
import torch
import torch.nn.functional as F

from errcheck import assert_error_within, poison_
from gptcore import GPT, GPTConfig
from gptcore.loss import ce_rows_torch_, linear_cross_entropy, linear_cross_entropy_ref

ON_GPU = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (row step, dtype). The interpreter truncates fp32 -> bf16 where the GPU rounds to nearest, so
# bf16 outputs of the Triton kernel are checked on a GPU only.
IMPL_DTYPES = [pytest.param(impl, dt, marks=pytest.mark.gpu) if (impl, dt) == ("triton", torch.bfloat16)
               else (impl, dt) for impl in ("triton", "torch") for dt in DTYPES]
# Floors per dtype (loss, grads): the rounding of a sum of a few hundred terms; the loss floor is
# relative to the loss (a summed loss of ~100 in fp32 has an ulp of ~1e-5).
ATOL = {torch.float32: (1e-5, 1e-6), torch.float16: (1e-4, 1e-5), torch.bfloat16: (1e-3, 1e-4)}


def _seed():
    """Inputs come from the per-test seed (conftest: derived from the node id, printed on failure);
    each call draws the next seed from that stream, so repeated calls in one test differ."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))


def _rows_step(name):
    if name == "triton":
        from gptcore.kernels.cross_entropy import ce_rows_

        return ce_rows_
    return ce_rows_torch_


def _inputs(N, C, V, dtype, device, ignore_index=-100, ignore_frac=0.2):
    h = torch.randn(N, C, device=device).to(dtype)
    w = (torch.randn(V, C, device=device) * 2 / C**0.5).to(dtype)  # logits of std ~2
    y = torch.randint(0, V, (N,), device=device)
    y[torch.rand(N, device=device) < ignore_frac] = ignore_index
    y[0] = (ignore_index + 1) % V  # at least one row counts
    return h, w, y


def _oracle(h, w, y, ignore_index=-100, reduction="mean"):
    """The twin, computed in float64 throughout."""
    return F.cross_entropy(F.linear(h, w).double(), y, ignore_index=ignore_index, reduction=reduction)


def _loss_and_grads(fn, h, w, y, **kw):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = fn(h, w, y, **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _check_against_twin(h, w, y, dtype, **kw):
    fast = _loss_and_grads(linear_cross_entropy, h, w, y, **kw)
    kw.pop("chunk_rows", None), kw.pop("impl", None)
    low = _loss_and_grads(linear_cross_entropy_ref, h, w, y, **kw)
    oracle = _loss_and_grads(_oracle, h.double(), w.double(), y, **kw)
    assert fast[1].dtype == h.dtype and fast[2].dtype == w.dtype
    atol_loss, atol_grad = ATOL[dtype]
    atol_loss *= max(1.0, oracle[0].abs().item())
    assert_error_within(fast[0], low[0], oracle[0], atol=atol_loss, name="loss")
    assert_error_within(fast[1], low[1], oracle[1], atol=atol_grad, name="grad h")
    assert_error_within(fast[2], low[2], oracle[2], atol=atol_grad, name="grad W")


# ---- the row step ------------------------------------------------------------------------------
@pytest.mark.parametrize("step,dtype", IMPL_DTYPES)
@pytest.mark.parametrize("n,V", [(1, 7), (13, 97), (5, 50257)])
def test_row_step_matches_torch_cross_entropy(step, dtype, n, V, device):
    _seed()
    x = (torch.randn(n, V, device=device) * 3).to(dtype)
    y = torch.randint(0, V, (n,), device=device)
    y[0] = -100  # one ignored row at least
    # lowprec: torch's own cross-entropy on the same logits in fp32, its gradient stored in dtype
    xf = x.float().clone().requires_grad_()
    low_loss = F.cross_entropy(xf, y, reduction="none")
    low_loss.sum().backward()
    # oracle: float64
    xd = x.double().clone().requires_grad_()
    ora_loss = F.cross_entropy(xd, y, reduction="none")
    ora_loss.sum().backward()

    g = x.clone()
    loss = poison_(torch.empty(n, device=device))
    _rows_step(step)(g, y, -100, loss)
    assert_error_within(loss, low_loss, ora_loss, atol=1e-5, name="row loss")
    assert_error_within(g, xf.grad.to(dtype), xd.grad, atol=1e-6, name="row grad")
    assert torch.all(g[0] == 0) and loss[0] == 0


@pytest.mark.parametrize("step", ["triton", "torch"])
def test_row_step_out_of_range_target_gives_nan_loss(step, device):
    x = torch.randn(3, 11, device=device)
    y = torch.tensor([2, 11, -100], device=device)
    loss = torch.empty(3, device=device)
    _rows_step(step)(x, y, -100, loss)
    assert torch.isnan(loss[1]) and not torch.isnan(loss[0]) and loss[2] == 0


# ---- the fused op against its twin --------------------------------------------------------------
@pytest.mark.parametrize("impl,dtype", IMPL_DTYPES)
@pytest.mark.parametrize("N,C,V,chunk", [(1, 16, 7, 4), (37, 24, 97, 16), (9, 16, 128, 4), (20, 32, 50257, 8)])
def test_fused_matches_twin(impl, dtype, N, C, V, chunk, device):
    _seed()
    if ON_GPU:  # full size on a GPU: GPT-2's head, rows not a multiple of the chunk
        N, C, V, chunk = (N * 101, 768, V, 1024) if V == 50257 else (N * 53, C, V, chunk * 16)
    h, w, y = _inputs(N, C, V, dtype, device)
    _check_against_twin(h, w, y, dtype, chunk_rows=chunk, impl=impl)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_ignore_index_sum_reduction_and_all_ignored(impl, device):
    _seed()
    h, w, y = _inputs(29, 16, 53, torch.float32, device, ignore_index=3, ignore_frac=0.3)
    y[5] = 3
    _check_against_twin(h, w, y, torch.float32, ignore_index=3, chunk_rows=8, impl=impl)
    _check_against_twin(h, w, y, torch.float32, reduction="sum", chunk_rows=8, impl=impl)
    # every row ignored: loss NaN and zero gradients, as F.cross_entropy
    y_all = torch.full_like(y, -100)
    fast = _loss_and_grads(linear_cross_entropy, h, w, y_all, chunk_rows=8, impl=impl)
    twin = _loss_and_grads(linear_cross_entropy_ref, h, w, y_all)
    assert torch.isnan(fast[0]) and torch.isnan(twin[0])
    assert torch.all(fast[1] == 0) and torch.all(fast[2] == 0)
    assert torch.all(twin[1] == 0) and torch.all(twin[2] == 0)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_autocast_fp32_master_weights(impl, device):
    """Under bf16 autocast the matmuls run in bf16 and fp32 inputs get fp32 gradients."""
    _seed()
    h, w, y = _inputs(45, 32, 211, torch.float32, device)
    with torch.autocast(device, dtype=torch.bfloat16):
        fast = _loss_and_grads(linear_cross_entropy, h, w, y, chunk_rows=16, impl=impl)
        low = _loss_and_grads(linear_cross_entropy_ref, h, w, y)
    oracle = _loss_and_grads(_oracle, h.double(), w.double(), y)
    assert fast[1].dtype == torch.float32 and fast[2].dtype == torch.float32
    assert_error_within(fast[0], low[0], oracle[0], atol=1e-3, name="loss")
    assert_error_within(fast[1], low[1], oracle[1], atol=1e-4, name="grad h")
    assert_error_within(fast[2], low[2], oracle[2], atol=1e-4, name="grad W")


def test_no_grad_and_leading_dims(device):
    _seed()
    h, w, y = _inputs(24, 16, 31, torch.float32, device)
    with torch.no_grad():
        loss = linear_cross_entropy(h.view(4, 6, 16).requires_grad_(), w, y.view(4, 6), chunk_rows=5)
    assert loss.grad_fn is None
    assert_error_within(loss, linear_cross_entropy_ref(h, w, y), _oracle(h.double(), w.double(), y),
                        atol=1e-5, name="no-grad loss")


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_peak_memory_stays_below_one_full_logits_copy(impl):
    """The point of the op: forward + backward never holds the (N, V) logits, not even in bf16."""
    N, C, V = 8192, 768, 50257
    h, w, y = _inputs(N, C, V, torch.bfloat16, "cuda")
    h.requires_grad_(), w.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    linear_cross_entropy(h, w, y, chunk_rows=1024, impl=impl).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    full_bf16_logits = N * V * 2
    assert extra < full_bf16_logits, f"peak {extra / 2**30:.2f} GiB >= one bf16 logits copy {full_bf16_logits / 2**30:.2f} GiB"


# ---- torch.library registration and torch.compile ------------------------------------------------
def test_custom_op_registration_passes_opcheck(device):
    from gptcore.loss import _fused_forward_op

    h, w, y = _inputs(9, 8, 13, torch.float32, device)
    args = (h, w, y, -100, "mean", 4, "torch", torch.float32, True)
    torch.library.opcheck(_fused_forward_op.op, args)


def test_compiled_fused_loss_matches_eager(device):
    """torch.compile (aot_eager: traces forward and backward through the op's fake and autograd
    registrations, without needing a C++ compiler) in one graph, under autocast."""
    _seed()
    h, w, y = _inputs(37, 24, 97, torch.float32, device)
    fn = torch.compile(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_rows=16), backend="aot_eager",
                       fullgraph=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        compiled = _loss_and_grads(fn, h, w, y)
        eager = _loss_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_rows=16), h, w, y)
    for a, b, name in zip(compiled, eager, ("loss", "grad h", "grad W")):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_launcher_op_on_a_toy_op(device):
    """launcher_op: eager calls run the launcher itself, compiled calls the schema-only op; an
    absent (None) result becomes an empty tensor in the op; one Function's backward serves both."""
    from typing import Optional

    from gptcore.kernels._oplib import launcher_op

    calls = []

    def fwd(x: torch.Tensor, b: Optional[torch.Tensor], s: float) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(x)
        t = torch.tanh(x if b is None else x + b)
        return t * s, (t.clone() if b is not None else None)

    op = launcher_op("gptcore_test::scaled_tanh_fwd", fwd,
                     lambda x, b, s: (torch.empty_like(x), x.new_empty(0) if b is None else torch.empty_like(x)))

    class F(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, b, s):
            y, t = op(x, b, s)
            ctx.save_for_backward(torch.tanh(x if b is None else x + b))
            ctx.s, ctx.has_b = s, b is not None
            return y

        @staticmethod
        def backward(ctx, dy):
            (t,) = ctx.saved_tensors
            dx = dy * ctx.s * (1 - t * t)
            return dx, dx.sum(0) if ctx.has_b else None, None

    x = torch.randn(5, 3, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: F.apply(x, b, 2.0), (x, b))
    assert op(x, None, 2.0)[1] is None  # eager: the launcher's own result
    assert op.op(x.detach(), None, 2.0)[1].shape == (0,)  # the op: an empty tensor in its place
    torch.library.opcheck(op.op, (x.detach(), b.detach(), 2.0))
    torch._dynamo.reset()
    f = torch.compile(lambda x, b: F.apply(x, b, 2.0).sum(), backend="aot_eager", fullgraph=True)
    f(x, b).backward()
    torch.testing.assert_close(b.grad, (2.0 * (1 - torch.tanh(x + b) ** 2)).sum(0).detach())


# ---- the model's loss path -----------------------------------------------------------------------
def _model_loss_and_grads(model, idx, tgt, fused):
    model.zero_grad(set_to_none=True)
    loss = model.loss(idx, tgt, fused=fused)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_model_default_loss_is_fused_and_matches_plain(backend, device):
    _seed()
    cfg = GPTConfig.from_preset("tiny", vocab_size=515)
    model = GPT(cfg, backend="reference").to(device)
    idx = torch.randint(0, cfg.vocab_size, (3, 17), device=device)
    tgt = torch.randint(0, cfg.vocab_size, (3, 17), device=device)
    tgt[0, :4] = -100
    oracle = _model_loss_and_grads(model.double(), idx, tgt, fused=False)
    model.float().set_backend(backend)
    low = _model_loss_and_grads(model, idx, tgt, fused=False)  # same backend, plain loss
    fast = _model_loss_and_grads(model, idx, tgt, fused=None)
    assert_error_within(fast[0], low[0], oracle[0], atol=1e-5, name="loss")
    for n in oracle[1]:
        assert_error_within(fast[1][n], low[1][n], oracle[1][n], atol=1e-6, name=f"grad {n}")
    # the default path really is the chunked op: no (rows, vocab) logits are kept for backward
    model.zero_grad(set_to_none=True)
    loss = model.loss(idx, tgt)
    assert "LinearCrossEntropy" in type(loss.grad_fn).__name__ or "LinearCrossEntropy" in loss.grad_fn.name()


def test_compiled_model_loss_matches_eager(device):
    """torch.compile(model.loss) with the fused loss inside (aot_eager on the CPU, inductor on a GPU)."""
    _seed()
    cfg = GPTConfig.from_preset("tiny", vocab_size=515)
    model = GPT(cfg, backend="torch").to(device)
    idx = torch.randint(0, cfg.vocab_size, (2, 33), device=device)
    tgt = torch.randint(0, cfg.vocab_size, (2, 33), device=device)
    eager = _model_loss_and_grads(model, idx, tgt, fused=True)
    compiled_loss = torch.compile(model.loss, backend="inductor" if ON_GPU else "aot_eager")
    model.zero_grad(set_to_none=True)
    loss = compiled_loss(idx, tgt, fused=True)
    loss.backward()
    # same math; Inductor may fuse and reorder the fp32 reductions around the op
    torch.testing.assert_close(loss.detach(), eager[0], rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[1][n], rtol=1e-4, atol=1e-6, msg=n)


# ---- bad input -----------------------------------------------------------------------------------
def test_bad_input_is_a_clear_error():
    h, w, y = _inputs(6, 8, 11, torch.float32, "cpu")
    with pytest.raises(ValueError, match="must end in C = 8"):
        linear_cross_entropy(h[:, :5], w, y)
    with pytest.raises(ValueError, match="target .* must have h's leading shape"):
        linear_cross_entropy(h, w, y[:4])
    with pytest.raises(TypeError, match="integer class ids"):
        linear_cross_entropy(h, w, y.float())
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        linear_cross_entropy(h, w, y, reduction="none")
    with pytest.raises(ValueError, match=r"target ids must be in \[0, 11\) or ignore_index"):
        linear_cross_entropy(h, w, torch.full_like(y, 11))
    with pytest.raises(ValueError, match="impl must be one of"):
        linear_cross_entropy(h, w, y, impl="cuda")
    with pytest.raises(ValueError, match="chunk_rows must be a positive int"):
        linear_cross_entropy(h, w, y, chunk_rows=0)
