"""torch.compile of the kernels' one autograd path (launcher ops, gptcore.kernels._oplib).

- Each op compiled (aot_eager, fullgraph) equals the same op eager bit for bit (outputs and every
  gradient; the same Function and launchers, so any difference is a glue bug), on fresh random
  inputs with and without residual / weight / bias, mixed dtypes, strided inputs, dropout.
  Buffers start as NaN.
- torch.library.opcheck on every launcher op (schema, fake impl).
- torch.compile(model.loss, backend="aot_eager", fullgraph=True) of a tiny triton GPT traces with
  no graph break, keeps the kernels as gptcore:: nodes, and matches eager bit for bit (also with
  dropout: the seeds come from the same generator).
- GPU (marked gpu): Inductor on a GPT-2-sized model in bf16 autocast against eager, by the correctness
  rule (errors against a float64 reference-backend run), and dropout seeding under Inductor.

    python -m pytest -q tests/test_compile_ops.py            # CPU: Triton interpreter, small shapes
    python -m pytest -q -m gpu tests/test_compile_ops.py     # GPU
"""
import pytest
import torch
from torch._dynamo.utils import counters

from errcheck import assert_error_within
from gptcore.config import GPTConfig
from gptcore.kernels.attention import attention
from gptcore.kernels.gelu import gelu
from gptcore.kernels.layer_norm import layer_norm
from gptcore.model import GPT
from gptcore.ops import get_ops

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
f32, f16 = torch.float32, torch.float16


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # each test compiles afresh (no recompile limit reached across tests)
    yield


def _compiled(fn):
    return torch.compile(fn, backend="aot_eager", fullgraph=True)


def _leaves(*ts):
    return [None if t is None else t.detach().requires_grad_() for t in ts]


def _outs_and_grads(outs, grads_out, leaves):
    """outs, then the grads of sum(out * g) over the given outs w.r.t. the non-None leaves."""
    wrt = [t for t in leaves if t is not None]
    return list(outs) + list(torch.autograd.grad(outs, wrt, grads_out))


def _assert_equal(got, want, exact=True):
    """Bit for bit; exact=False allows one ulp of the dtype (the gelu wrapper applies out_dtype as a
    cast after the op, where the kernel stores it directly: same values, rounded at another step)."""
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"item {i}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
        if exact:
            assert torch.equal(a, b), f"item {i}: max diff {(a.double() - b.double()).abs().max().item():.3e}"
        else:
            eps = torch.finfo(a.dtype).eps
            torch.testing.assert_close(a, b, rtol=eps, atol=eps, msg=f"item {i}")


# ---- each op: custom op == eager kernel ------------------------------------------------------------
@pytest.mark.parametrize(
    "x_dtype, res_dtype, p_dtype, has_w, has_b, use_h",
    [
        (f32, None, f32, True, True, False),
        (f32, None, f32, True, False, False),
        (f16, None, f32, False, True, False),
        (f32, None, f32, False, False, False),
        (f32, f32, f32, True, True, True),
        (f32, f32, f32, True, True, False),  # h unused: no gradient flows into it
        (f16, f32, f16, True, False, True),  # h is fp32; d x fp16, d residual fp32
        (f32, f16, f32, False, True, True),
        (f16, f16, f32, False, False, True),
    ],
)
@pytest.mark.parametrize("y_dtype", [None, f16], ids=["y_default", "y_f16"])
def test_layer_norm_op_matches_kernel(poisoned, x_dtype, res_dtype, p_dtype, has_w, has_b, use_h, y_dtype):
    M, N = (5, 3), 40
    x = torch.randn(*M, N, device=DEV, dtype=x_dtype)
    r = None if res_dtype is None else torch.randn(*M, N, device=DEV, dtype=res_dtype)
    w = torch.randn(N, device=DEV, dtype=p_dtype) if has_w else None
    b = torch.randn(N, device=DEV, dtype=p_dtype) if has_b else None
    out_dtype = x_dtype if r is None else torch.promote_types(x_dtype, res_dtype)
    gy = torch.randn(*M, N, device=DEV, dtype=y_dtype or out_dtype)
    gh = torch.randn(*M, N, device=DEV, dtype=out_dtype)

    def run(fn):
        xs, ws, bs, rs = leaves = _leaves(x, w, b, r)
        out = fn(xs, ws, bs, 1e-5, residual=rs, out_dtype=y_dtype)
        if rs is None:
            return _outs_and_grads([out], [gy], leaves)
        y, h = out
        got = _outs_and_grads([y, h] if use_h else [y], [gy, gh] if use_h else [gy], leaves)
        return got if use_h else [h.detach()] + got

    _assert_equal(run(_compiled(layer_norm)), run(layer_norm), exact=True)  # the same kernels, out_dtype included


@pytest.mark.parametrize("bias_dtype", [None, f32, f16])
@pytest.mark.parametrize("x_dtype", [f32, f16])
@pytest.mark.parametrize("y_dtype", [None, f16], ids=["y_default", "y_f16"])
def test_gelu_op_matches_kernel(poisoned, x_dtype, bias_dtype, y_dtype):
    x = torch.randn(24, 6, device=DEV, dtype=x_dtype).t()  # (6, 24), strided: as_rows copies it
    b = None if bias_dtype is None else torch.randn(24, device=DEV, dtype=bias_dtype)
    default = x_dtype if b is None else torch.promote_types(x_dtype, bias_dtype)
    gy = torch.randn(6, 24, device=DEV, dtype=y_dtype or default)

    def run(fn):
        xs, bs = leaves = _leaves(x, b)
        return _outs_and_grads([fn(xs, bs, out_dtype=y_dtype)], [gy], leaves)

    _assert_equal(run(_compiled(gelu)), run(gelu))  # the kernel stores out_dtype either way


def _qkv(B, H, Tq, Tk, D, dtype):
    """q, k, v as the model makes them: permuted views of one projection (last dim unit-stride)."""
    q = torch.randn(B, Tq, H, D, device=DEV, dtype=dtype).transpose(1, 2)
    kv = torch.randn(B, Tk, 2, H, D, device=DEV, dtype=dtype).permute(2, 0, 3, 1, 4)
    return q, kv[0], kv[1]


@pytest.mark.parametrize(
    "causal, Tq, Tk, dtype, dropout_p, seed",
    [
        (True, 19, 19, f32, 0.0, None),
        (True, 7, 19, f16, 0.0, None),
        (False, 9, 13, f32, 0.0, None),
        (True, 19, 19, f32, 0.25, 1234),
        (False, 5, 11, f16, 0.5, 7),
    ],
)
def test_attention_op_matches_kernel(poisoned, causal, Tq, Tk, dtype, dropout_p, seed):
    q, k, v = _qkv(2, 2, Tq, Tk, 16, dtype)
    go = torch.randn(2, 2, Tq, 16, device=DEV, dtype=dtype)

    def run(fn):
        leaves = _leaves(q, k, v)
        return _outs_and_grads([fn(*leaves, causal, dropout_p, None, seed)], [go], leaves)

    _assert_equal(run(_compiled(attention)), run(attention))


@pytest.mark.parametrize("causal,dropout_p,seed", [(True, 0.0, None), (False, 0.25, 1234)])
def test_attention_qkv_op_matches_kernel(causal, dropout_p, seed):
    from gptcore.kernels.attention import attention_qkv

    B, T, H, D = 2, 13, 2, 16
    qkv = torch.randn(B, T, 3 * H * D, device=DEV)
    go = torch.randn(B, H, T, D, device=DEV)

    def run(fn):
        leaves = _leaves(qkv)
        return _outs_and_grads([fn(*leaves, H, causal, dropout_p, None, seed)], [go], leaves)

    _assert_equal(run(_compiled(attention_qkv)), run(attention_qkv))


def test_attention_draws_the_seed_like_the_kernel():
    """seed=None with dropout: compiled, the seed is drawn from torch's CPU generator as eagerly
    (same mask after the same torch.manual_seed); a new seed, a new mask."""
    q, k, v = _qkv(1, 2, 16, 16, 16, f32)
    compiled = _compiled(attention)

    def run(fn, s):
        torch.manual_seed(s)
        leaves = _leaves(q, k, v)
        return _outs_and_grads([fn(*leaves, True, 0.3)], [torch.ones_like(q)], leaves)

    want = run(attention, 0)
    _assert_equal(run(compiled, 0), want)
    assert not torch.equal(run(compiled, 1)[0], want[0])


# ---- torch.library.opcheck --------------------------------------------------------------------------
def _opcheck_cases():
    x, r = torch.randn(3, 24, device=DEV), torch.randn(3, 24, device=DEV)
    w, b = torch.randn(24, device=DEV), torch.randn(24, device=DEV)
    mean, rstd = torch.randn(3, device=DEV), torch.rand(3, device=DEV) + 0.5
    q, k, v = _qkv(1, 2, 8, 8, 16, f32)
    o, lse = torch.randn_like(q), torch.randn(1, 2, 8, device=DEV)
    qkv = torch.randn(1, 8, 3 * 2 * 16, device=DEV)
    seed = torch.tensor([3])
    g = torch.ops.gptcore
    h, wte, tgt = torch.randn(6, 16, device=DEV), torch.randn(40, 16, device=DEV), torch.randint(0, 40, (6,), device=DEV)
    return {
        "layer_norm": (g.layer_norm_fwd, (x, None, w, b, 1e-5, None)),
        "layer_norm_no_params": (g.layer_norm_fwd, (x, None, None, None, 1e-5, None)),
        "layer_norm_out_f16": (g.layer_norm_fwd, (x, None, w, b, 1e-5, f16)),
        "add_layer_norm": (g.layer_norm_fwd, (x, r.half(), w, None, 1e-5, None)),
        "add_layer_norm_out_f16": (g.layer_norm_fwd, (x, r, w, b, 1e-5, f16)),
        "gelu": (g.gelu_fwd, (x, b, f32)),
        "attention": (g.attention_fwd, (q, k, v, True, 0.3, 0.25, seed, False)),
        "attention_bthd": (g.attention_fwd, (q, k, v, True, 0.0, 0.25, None, True)),
        "layer_norm_backward": (g.layer_norm_bwd, (r, None, x, w, None, mean, rstd, f32, None)),
        "add_layer_norm_backward": (g.layer_norm_bwd, (r, x, x, w, f32, mean, rstd, f16, f32)),
        "gelu_backward": (g.gelu_bwd, (r, x, None)),
        "attention_backward": (g.attention_bwd, (torch.randn_like(q), q, k, v, o, lse, False, 0.0, 0.25, None)),
        "attention_qkv": (g.attention_qkv_fwd, (qkv, 2, True, 0.3, 0.25, seed, False)),
        "attention_qkv_backward": (g.attention_qkv_bwd, (torch.randn_like(q), qkv, o, lse, 2, True, 0.0, 0.25,
                                                         None)),
        "linear_cross_entropy": (g.linear_cross_entropy_fwd, (h, wte, tgt, -100, "mean", 4, "triton", f32, True)),
    }


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)  # schema-only ops: their autograd is the kernel's Function


# ---- checks and dispatch --------------------------------------------------------------------------
def test_bad_input_errors_eager_and_compiled():
    x, b = torch.randn(4, 8, device=DEV), torch.randn(9, device=DEV)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        gelu(x, b)
    with pytest.raises(Exception, match=r"bias must have shape \(8,\)"):
        _compiled(gelu)(x, b)
    q = torch.randn(1, 1, 4, 48, device=DEV)
    with pytest.raises(ValueError, match="head_dim 48 is not supported"):
        attention(q, q, q)
    # while compiling, the fake impls run the same checks on the traced shapes
    torch._dynamo.reset()  # static shapes: a recompile would name the dim by its symbol (s0) instead
    with pytest.raises(Exception, match="head_dim 48 is not supported"):
        _compiled(attention)(q, q, q)
    with pytest.raises(ValueError, match="seed must be in"):
        attention(q[..., :16], q[..., :16], q[..., :16], dropout_p=0.1, seed=-1)


def _tiny(**kw):
    return GPTConfig.from_preset("tiny", vocab_size=97, context_length=32, **kw)


def test_triton_backend_eager_runs_the_functions_compiled_the_ops():
    ops = get_ops("triton")
    assert ops.layer_norm is layer_norm and ops.attention is attention  # one definition per op
    # eager: the autograd.Function kernels (no custom-op dispatch on the host)
    x = torch.randn(2, 8, device=DEV, requires_grad=True)
    assert type(ops.layer_norm(x, None, None, 1e-5).grad_fn).__name__ == "_LayerNormBackward"
    assert type(ops.gelu(x, None).grad_fn).__name__ == "_GeluBackward"
    # compiled: one gptcore:: node per kernel call in the captured graph
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = GPT(_tiny(n_layers=1), backend="triton").to(DEV)
    idx = torch.randint(0, 97, (2, 8), device=DEV)
    torch.compile(model.loss, backend=capture, fullgraph=True)(idx, idx)
    # the Functions' forward subgraphs hold the launcher ops (backward subgraphs the _bwd ones)
    names = [str(n.target) for g in graphs for m in g.modules() if isinstance(m, torch.fx.GraphModule)
             for n in m.graph.nodes if n.op == "call_function"]
    ops_seen = ("layer_norm_fwd", "gelu_fwd", "attention_fwd", "attention_qkv_fwd", "linear_cross_entropy_fwd")
    counts = {op: names.count(f"gptcore.{op}.default") for op in ops_seen}
    # the model's attention takes the packed c_attn output (attention_qkv), not three views
    assert counts == {"layer_norm_fwd": 3, "gelu_fwd": 1, "attention_fwd": 0, "attention_qkv_fwd": 1,
                      "linear_cross_entropy_fwd": 1}, (counts, names)


def test_ops_become_explicit_inductor_fallbacks_when_traced():
    """The fake impls register every gptcore op as an explicit Inductor fallback (kernels/_oplib.py
    _inductor_fallbacks): torch 2.11's implicit path printed the whole op chain's IR per op."""
    from torch._inductor import lowering

    torch._dynamo.reset()
    model = GPT(_tiny(n_layers=1), backend="triton").to(DEV)
    idx = torch.randint(0, 97, (2, 8), device=DEV)
    torch.compile(model.loss, backend="aot_eager", fullgraph=True)(idx, idx)
    for name in ("layer_norm_fwd", "layer_norm_bwd", "gelu_fwd", "gelu_bwd", "attention_qkv_fwd",
                 "attention_qkv_bwd", "linear_cross_entropy_fwd"):
        assert getattr(torch.ops.gptcore, name).default in lowering.lowerings, name


def test_inductor_cpu_deep_gpt_fp16_autocast_matches_eager():
    """Inductor itself (CPU codegen) over a 6-layer triton GPT under fp16 autocast: the LN ops store
    fp16 y inside the op and GELU gets an fp16 bias, the opaque-op chains that once made compile
    time explode. Loss and grads equal the eager triton run's up to fp16 rounding."""
    torch.manual_seed(0)
    model = GPT(_tiny(n_layers=6), backend="triton").to(DEV)
    idx = torch.randint(0, 97, (2, 8), device=DEV)

    def f16(fn):
        def run(*a):
            with torch.autocast(DEV, dtype=torch.float16):
                return fn(*a)
        return run

    torch._dynamo.reset()
    got = _loss_and_grads(f16(torch.compile(model.loss, fullgraph=True)), model, idx, idx)
    want = _loss_and_grads(f16(model.loss), model, idx, idx)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-3, msg=f"item {i}")


# ---- a whole training step under torch.compile ---------------------------------------------------
def _loss_and_grads(loss_fn, model, idx, targets, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = loss_fn(idx, targets)
    loss.backward()
    return [loss.detach()] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("drop_rate", [0.0, 0.1])
def test_tiny_gpt_compiles_fullgraph_and_matches_eager(drop_rate):
    torch.manual_seed(0)
    model = GPT(_tiny(drop_rate=drop_rate), backend="triton").to(DEV).train()
    with torch.no_grad():  # generic LayerNorm weights and biases, so their paths are exercised
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    idx = torch.randint(0, 97, (2, 19), device=DEV)
    targets = torch.randint(0, 97, (2, 19), device=DEV)
    torch._dynamo.reset()
    compiled = torch.compile(model.loss, backend="aot_eager", fullgraph=True)  # a graph break would raise
    got = _loss_and_grads(compiled, model, idx, targets)
    want = _loss_and_grads(model.loss, model, idx, targets)
    _assert_equal(got, want)
    if drop_rate:  # another seed, other masks: the seed is not baked into the graph
        assert not torch.equal(_loss_and_grads(compiled, model, idx, targets, seed=1)[0], want[0])


def test_tiny_gpt_compiled_with_dynamic_shapes():
    """A second batch shape recompiles with symbolic B and T: the fake impls and the launchers
    take symbolic shapes, still one graph, still equal to eager."""
    torch.manual_seed(0)
    model = GPT(_tiny(n_layers=1), backend="triton").to(DEV)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model.loss, backend="aot_eager", fullgraph=True)
    for B, T in ((2, 19), (3, 13), (4, 7)):  # (B = 1 would specialise: a third graph)
        idx = torch.randint(0, 97, (B, T), device=DEV)
        _assert_equal(_loss_and_grads(compiled, model, idx, idx), _loss_and_grads(model.loss, model, idx, idx))
    assert counters["stats"]["unique_graphs"] == 2  # static, then one dynamic graph for every shape


# ---- GPU: Inductor --------------------------------------------------------------------------------
@pytest.mark.gpu
def test_inductor_gpt2_bf16_autocast_matches_eager():
    """GPT-2-sized layers (C 768, 12 heads, vocab 50257), 2 of them, B 4 x T 256, fp32 weights,
    bf16 autocast: Inductor-compiled loss and grads hold the correctness rule (tests/errcheck.py) against a float64
    reference-backend run, with the eager triton run's error as the bound."""
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("gpt2", n_layers=2, context_length=256)
    model = GPT(cfg, backend="triton").cuda()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    oracle = GPT(cfg, backend="reference").cuda()
    oracle.load_state_dict(model.state_dict())
    oracle.double()
    idx = torch.randint(0, cfg.vocab_size, (4, 256), device="cuda")
    targets = torch.randint(0, cfg.vocab_size, (4, 256), device="cuda")

    def bf16(fn):
        def run(*a):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return fn(*a)
        return run

    torch._dynamo.reset()
    compiled = torch.compile(model.loss, fullgraph=True)
    got = _loss_and_grads(bf16(compiled), model, idx, targets)
    eager = _loss_and_grads(bf16(model.loss), model, idx, targets)
    want = _loss_and_grads(oracle.loss, oracle, idx, targets)
    names = ["loss"] + [n for n, _ in model.named_parameters()]
    assert len(got) == len(eager) == len(want) == len(names)
    for name, g, e, w in zip(names, got, eager, want):
        assert g.dtype == e.dtype, name
        floor = torch.finfo(torch.float32).eps * max(1.0, w.abs().max().item())
        if name == "loss":
            # one number, not a max over many: its bf16 error is luck-sized; allow the spread of a
            # mean of B*T terms each off by a bf16 unit
            floor += torch.finfo(torch.bfloat16).eps * w.abs().item() / idx.numel() ** 0.5
        assert_error_within(g, e, w, atol=floor, name=name)


@pytest.mark.gpu
def test_inductor_attention_dropout_seeding():
    q, k, v = _qkv(2, 12, 256, 256, 64, torch.bfloat16)
    compiled = torch.compile(attention, fullgraph=True)
    # an explicit seed: the kernel's mask, bit for bit
    _assert_equal([compiled(q, k, v, True, 0.1, None, 99)], [attention(q, k, v, True, 0.1, None, 99)])

    def drawn(s):
        torch.manual_seed(s)
        return compiled(q, k, v, True, 0.1)

    assert torch.equal(drawn(0), drawn(0))
    assert not torch.equal(drawn(0), drawn(1))
