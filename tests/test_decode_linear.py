"""The decode step's skinny-GEMM kernels (gptcore.kernels.decode_linear) against their twins.

Each fused op is compared with its reference twin (today's torch ops composed) under DESIGN.md's
rule: error against a float64 oracle <= 2 x the twin's own error + a small floor. CPU: the Triton
interpreter, fp32/fp16, small shapes; the gpu-marked cases run the model's sizes (emb 768, 1600)
and bf16.
"""
import pytest
import torch
import torch.nn.functional as F

from errcheck import assert_error_within
from gptcore.kernels import decode_linear as dl

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
BATCHES = [1, 3, 17, 64]
# (K, N): emb-64-like and odd shapes on the CPU; the model's shapes on the GPU
SHAPES = [(64, 48), (80, 200)]
GPU_SHAPES = [(768, 2304), (3072, 768), (1600, 6400)]
DTYPES = [torch.float32, torch.float16]
GPU_DTYPES = [torch.bfloat16]
VARIANTS = ["linear", "residual", "ln", "ln_gelu"]


def _floor(oracle, dtype, K):
    # one unit of the output's dtype at its scale, plus fp32 summation noise over K terms
    return 2 * torch.finfo(dtype).eps * max(1.0, oracle.abs().max().item()) + 1e-6 * K ** 0.5


def _inputs(M, K, N, dtype):
    x = torch.randn(M, K, device=DEV, dtype=torch.float32)
    w = (torch.randn(N, K, device=DEV) / K ** 0.5).to(dtype)
    b = torch.randn(N, device=DEV).to(dtype)
    g = (1 + 0.3 * torch.randn(K, device=DEV)).to(dtype)
    beta = (0.2 * torch.randn(K, device=DEV)).to(dtype)
    r = torch.randn(M, N, device=DEV)
    return x, w, b, g, beta, r


def _run(variant, x, w, b, g, beta, r, **kw):
    eps = 1e-5
    if variant == "linear":
        return dl.linear(x, w, b, **kw), dl.linear_ref(x, w, b)
    if variant == "residual":
        out = dl.linear_residual(x, w, b, r.clone(), **kw)
        return out, dl.linear_residual_ref(x, w, b, r)
    if variant == "ln":
        return dl.ln_linear(x, g, beta, eps, w, b, **kw), dl.ln_linear_ref(x, g, beta, eps, w, b)
    return dl.ln_linear_gelu(x, g, beta, eps, w, b, **kw), dl.ln_linear_gelu_ref(x, g, beta, eps, w, b)


def _check_variant(variant, M, K, N, dtype, **kw):
    x, w, b, g, beta, r = _inputs(M, K, N, dtype)
    fast, twin = _run(variant, x, w, b, g, beta, r, **kw)
    d = torch.float64
    oracle, _ = _run(variant, x.to(d), w.to(d), b.to(d), g.to(d), beta.to(d), r.to(d)) if False else (None, None)
    # oracle: the twin's math in float64
    xo, wo, bo, go, betao, ro = (t.to(d) for t in (x, w, b, g, beta, r))
    if variant == "linear":
        oracle = dl.linear_ref(xo, wo, bo)
    elif variant == "residual":
        oracle = dl.linear_residual_ref(xo, wo, bo, ro)
    elif variant == "ln":
        oracle = dl.ln_linear_ref(xo, go, betao, 1e-5, wo, bo)
    else:
        oracle = dl.ln_linear_gelu_ref(xo, go, betao, 1e-5, wo, bo)
    assert_error_within(fast, twin, oracle, atol=_floor(oracle, dtype, K), name=f"{variant} {M}x{K}x{N} {dtype}")


@pytest.mark.parametrize("M", BATCHES)
@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_linear_variants_match_twin(variant, M, K, N, dtype, poisoned):
    _check_variant(variant, M, K, N, dtype)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("split_k,block_n", [(1, 16), (3, 32), (5, 16)])
def test_split_k_matches_twin_and_is_deterministic(variant, split_k, block_n, poisoned):
    _check_variant(variant, 17, 80, 70, torch.float32, split_k=split_k, block_n=block_n)
    x, w, b, g, beta, r = _inputs(5, 80, 70, torch.float32)
    a, _ = _run(variant, x, w, b, g, beta, r, split_k=split_k, block_n=block_n)
    c, _ = _run(variant, x, w, b, g, beta, r, split_k=split_k, block_n=block_n)
    assert torch.equal(a, c)


@pytest.mark.parametrize("offset", [0.0, 50.0], ids=["centred", "offset50"])
@pytest.mark.parametrize("variant", ["ln", "ln_gelu"])
def test_layernorm_statistics_over_several_chunks(variant, offset, poisoned):
    """64 rows: the statistics pass reads K = 300 in chunks of 128, 128 and 44 (dl._stats_chunk), merged
    one after the other; rows with a large common offset check that the merge keeps the variance exact."""
    M, K, N = 64, 300, 24
    assert dl._stats_chunk(K, dl.plan(M, N, K, torch.device(DEV))) < K
    x, w, b, g, beta, r = _inputs(M, K, N, torch.float32)
    x += offset * (1 + torch.rand(M, 1, device=DEV))
    fast, twin = _run(variant, x, w, b, g, beta, r)
    d = torch.float64
    ref = dl.ln_linear_ref if variant == "ln" else dl.ln_linear_gelu_ref
    oracle = ref(x.to(d), g.to(d), beta.to(d), 1e-5, w.to(d), b.to(d))
    assert_error_within(fast, twin, oracle, atol=_floor(oracle, torch.float32, K), name=f"{variant} offset {offset}")


@pytest.mark.parametrize("M", [1, 3, 17, 64])
@pytest.mark.parametrize("split_k", [1, 3], ids=["nosplit", "split3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_residual_with_post_layernorm_matches_twin(M, split_k, dtype, poisoned):
    """linear_residual(post_ln=...): the residual sum and, from the grid's last program, its LayerNorm."""
    K, N = 80, 200
    x, w, b, g, beta, r = _inputs(M, K, N, dtype)
    g2, b2 = (1 + 0.3 * torch.randn(N, device=DEV)).to(dtype), (0.2 * torch.randn(N, device=DEV)).to(dtype)
    xn = torch.full((M, N), float("nan"), device=DEV, dtype=dtype)
    out = dl.linear_residual(x.to(dtype), w, b, r.clone(), post_ln=(g2, b2, 1e-5, xn), split_k=split_k, block_n=32)
    twin_out, twin_xn = dl.linear_residual_ln_ref(x.to(dtype), w, b, r, g2, b2, 1e-5, dtype)
    d = torch.float64
    o_out, o_xn = dl.linear_residual_ln_ref(x.to(dtype).to(d), w.to(d), b.to(d), r.to(d), g2.to(d), b2.to(d), 1e-5, d)
    assert_error_within(out, twin_out, o_out, atol=_floor(o_out, dtype, K), name="residual")
    assert_error_within(xn, twin_xn, o_xn, atol=_floor(o_xn, dtype, K), name="post LayerNorm")


@pytest.mark.parametrize("M", [1, 5])
def test_embed_with_post_layernorm_matches_twin(M, poisoned):
    C, V = 96, 50
    wte, wpe = torch.randn(V, C, device=DEV), torch.randn(40, C, device=DEV)
    g, b = 1 + 0.3 * torch.randn(C, device=DEV), 0.2 * torch.randn(C, device=DEV)
    tok = torch.randint(0, V, (M,), device=DEV)
    lengths = torch.randint(0, 30, (M,), device=DEV)
    want = dl.embed_ref(tok, wte, wpe, lengths)
    xn = torch.full((M, C), float("nan"), device=DEV)
    lens = lengths.clone()
    out = dl.embed(tok, wte, wpe, lens, post_ln=(g, b, 1e-5, xn))
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(xn, F.layer_norm(want, (C,), g, b, 1e-5), rtol=1e-5, atol=1e-5)
    assert torch.equal(lens, lengths + 1)


def test_prenormalised_input_equals_the_layernorm_prologue(poisoned):
    """ln_w=None (x already normalised, as a post_ln output) gives what the LayerNorm prologue gives on
    the raw rows, up to the rounding of the normalised rows (both round them to the weight's dtype)."""
    M, K, N = 5, 80, 70
    x, w, b, g, beta, r = _inputs(M, K, N, torch.float32)
    xn = F.layer_norm(x, (K,), g, beta, 1e-5)
    torch.testing.assert_close(dl.ln_linear_gelu(xn, None, None, 0.0, w, b),
                               dl.ln_linear_gelu(x, g, beta, 1e-5, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dl.ln_linear(xn, None, None, 0.0, w, b), dl.ln_linear(x, g, beta, 1e-5, w, b),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("M", BATCHES)
@pytest.mark.parametrize("K,N", GPU_SHAPES)
@pytest.mark.parametrize("dtype", GPU_DTYPES + [torch.float32], ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_linear_variants_full_size(variant, M, K, N, dtype, poisoned):
    _check_variant(variant, M, K, N, dtype)


def test_workspace_counters_stay_zero():
    x, w, b, g, beta, r = _inputs(3, 80, 70, torch.float32)
    ws = dl.workspace_for(DEV, 3, [(70, 80, True)], block_n=16, split_k=4)
    dl.linear(x, w, b, ws=ws, block_n=16, split_k=4)
    dl.ln_lm_head_argmax(x, g, beta, 1e-5, w, ws=dl.workspace_for(DEV, 3, [(70, 80, False)]))
    assert int(ws.counters.abs().sum()) == 0


def test_bad_input_is_a_clear_error():
    x = torch.randn(65, 64, device=DEV)
    w = torch.randn(32, 64, device=DEV)
    with pytest.raises(ValueError, match="rows"):
        dl.linear(x, w)
    with pytest.raises(ValueError, match="same K"):
        dl.linear(x[:4], w[:, :32])
    with pytest.raises(ValueError, match="unit column stride"):
        dl.linear(x[:4, ::2].t().t(), w[:, ::2])


# ---- QKV + cache append ---------------------------------------------------------------------------
def _qkv_case(M, C, H, T, dtype, paged, page=4):
    x = torch.randn(M, C, device=DEV)
    w = (torch.randn(3 * C, C, device=DEV) / C ** 0.5).to(dtype)
    b = torch.randn(3 * C, device=DEV).to(dtype)
    g = (1 + 0.3 * torch.randn(C, device=DEV)).to(dtype)
    beta = (0.2 * torch.randn(C, device=DEV)).to(dtype)
    lengths = torch.randint(1, T + 1, (M,), device=DEV)
    D = C // H
    if paged:
        mb = -(-T // page)
        nb = M * mb + 3
        table = torch.randperm(nb, device=DEV)[: M * mb].view(M, mb).to(torch.int32)
        kc = torch.randn(nb, H, page, D, device=DEV).to(dtype)
    else:
        table = None
        kc = torch.randn(M + 2, H, T, D, device=DEV).to(dtype)
    return x, w, b, g, beta, lengths, table, kc, torch.randn_like(kc)


def _check_qkv_append(x, w, b, g, beta, lengths, table, kc, vc, H, dtype):
    """The fused LN + QKV + cache append against its twin, both judged against the float64 twin:
    q within the rule, and the keys / values written where the twin writes, untouched elsewhere."""
    kc2, vc2 = kc.clone(), vc.clone()
    q = dl.ln_qkv_append(x, g, beta, 1e-5, w, b, kc, vc, lengths, H, block_table=table)
    q_twin = dl.ln_qkv_append_ref(x, g, beta, 1e-5, w, b, kc2, vc2, lengths, H, block_table=table)
    d = torch.float64
    ko, vo = kc2.to(d).clone(), vc2.to(d).clone()
    q_o = dl.ln_qkv_append_ref(x.to(d), g.to(d), beta.to(d), 1e-5, w.to(d), None if b is None else b.to(d),
                               ko, vo, lengths, H, block_table=table)
    fl = _floor(q_o, dtype, x.shape[1])
    assert_error_within(q, q_twin, q_o, atol=fl, name="q")
    assert_error_within(kc, kc2, ko, atol=fl, name="k cache")
    assert_error_within(vc, vc2, vo, atol=fl, name="v cache")


@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ln_qkv_append_matches_twin(M, paged, dtype, poisoned):
    C, H, T = 64, 4, 11
    x, w, b, g, beta, lengths, table, kc, vc = _qkv_case(M, C, H, T, dtype, paged)
    _check_qkv_append(x, w, b, g, beta, lengths, table, kc, vc, H, dtype)


def test_ln_qkv_append_without_bias(poisoned):
    """qkv_bias=False models (small-384, small-480): no bias pointer."""
    C, H, T = 48, 3, 9
    x, w, _b, g, beta, lengths, table, kc, vc = _qkv_case(3, C, H, T, torch.float32, False)
    _check_qkv_append(x, w, None, g, beta, lengths, table, kc, vc, H, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("M", BATCHES)
@pytest.mark.parametrize("C,H", [(768, 12), (1600, 25)])
@pytest.mark.parametrize("paged", [False, True])
def test_ln_qkv_append_full_size(M, C, H, paged, poisoned):
    dtype = torch.bfloat16
    x, w, b, g, beta, lengths, table, kc, vc = _qkv_case(M, C, H, 40, dtype, paged, page=16)
    _check_qkv_append(x, w, b, g, beta, lengths, table, kc, vc, H, dtype)


# ---- LM head + greedy pick ------------------------------------------------------------------------
@pytest.mark.parametrize("M", BATCHES)
@pytest.mark.parametrize("V", [517, 64])
def test_lm_head_argmax_picks_the_largest_logit(M, V):
    K = 64
    x = torch.randn(M, K, device=DEV)
    w = torch.randn(V, K, device=DEV) / K ** 0.5
    g, beta = 1 + 0.3 * torch.randn(K, device=DEV), 0.2 * torch.randn(K, device=DEV)
    logits = torch.empty(M, V, device=DEV)
    tok = dl.ln_lm_head_argmax(x, g, beta, 1e-5, w, logits_out=logits)
    d = torch.float64
    oracle = dl.ln_linear_ref(x.to(d), g.to(d), beta.to(d), 1e-5, w.to(d))
    twin = dl.ln_linear_ref(x, g, beta, 1e-5, w)
    assert_error_within(logits, twin, oracle, atol=_floor(oracle, torch.float32, K), name="logits")
    assert tok.dtype == torch.int64 and tok.shape == (M,)
    assert torch.equal(tok, logits.argmax(-1))  # the pick over the logits it stored, ties included
    picked = oracle.gather(1, tok[:, None])[:, 0]
    assert (picked >= oracle.max(-1).values - 1e-4).all()


@pytest.mark.parametrize("block_n", [16, 64])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_lm_head_argmax_ties_go_to_the_lowest_column(block_n, sign):
    """Exact ties (small integers: every summation order gives the same logits): two equal best
    columns in different tiles -> the first; all-zero columns tying for the best -> column 0."""
    M, K, V = 9, 32, 300
    x = torch.randn(M, K, device=DEV)
    g = torch.zeros(K, device=DEV)                                  # LN(x) = beta for every row
    beta = torch.randint(-3, 4, (K,), device=DEV).float()
    w = torch.zeros(V, K, device=DEV)
    v = torch.randint(-3, 4, (K,), device=DEV).float()
    beta[0] = 2.0                                                  # beta != 0
    if (beta @ v) == 0:
        v = beta.clone()
    v *= sign * torch.sign(beta @ v)                               # s = beta . v has the sign asked
    w[40] = w[130] = v
    tok = dl.ln_lm_head_argmax(x, g, beta, 1e-5, w, block_n=block_n)
    assert torch.equal(tok, torch.full((M,), 40 if sign > 0 else 0, device=DEV))
    assert torch.equal(tok, dl.ln_lm_head_argmax_ref(x, g, beta, 1e-5, w))


@pytest.mark.gpu
@pytest.mark.parametrize("M", BATCHES)
@pytest.mark.parametrize("C", [768, 1600])
def test_lm_head_argmax_full_size(M, C):
    V = 50257
    x = torch.randn(M, C, device=DEV)
    w = (torch.randn(V, C, device=DEV) / C ** 0.5).to(torch.bfloat16)
    g, beta = torch.ones(C, device=DEV, dtype=w.dtype), torch.zeros(C, device=DEV, dtype=w.dtype)
    logits = torch.empty(M, V, device=DEV, dtype=w.dtype)
    tok = dl.ln_lm_head_argmax(x, g, beta, 1e-5, w, logits_out=logits)
    assert torch.equal(tok, logits.argmax(-1))
    oracle = dl.ln_linear_ref(x.double(), g.double(), beta.double(), 1e-5, w.double())
    twin = dl.ln_linear_ref(x, g, beta, 1e-5, w)
    assert_error_within(logits, twin, oracle, atol=_floor(oracle, w.dtype, C), name="logits")


# ---- embedding + advance --------------------------------------------------------------------------
@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_embed_adds_positions_and_advances(M, dtype, poisoned):
    V, C, T = 50, 48, 20
    wte, wpe = torch.randn(V, C, device=DEV).to(dtype), torch.randn(T, C, device=DEV).to(dtype)
    tok = torch.randint(0, V, (M, 1), device=DEV)
    lengths = torch.randint(0, T - 1, (M,), device=DEV)
    before = lengths.clone()
    write = torch.empty_like(lengths)
    x = dl.embed(tok, wte, wpe, lengths, write)
    assert torch.equal(x, dl.embed_ref(tok, wte, wpe, before).float())
    assert torch.equal(lengths, before + 1) and torch.equal(write, before)


# ---- decode attention: partials combined inside the split kernel ------------------------------------
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("B,H,T,D,splits", [(1, 2, 70, 16, 3), (3, 2, 130, 32, 2), (2, 3, 40, 16, 1)])
def test_decode_attention_fused_combine_equals_combine_kernel(B, H, T, D, splits, paged):
    from gptcore.kernels.decode_attention import decode_attention

    q = torch.randn(B, H, 1, D, device=DEV)
    k = torch.randn(B, H, T, D, device=DEV)
    v = torch.randn_like(k)
    lengths = torch.randint(1, T + 1, (B,), device=DEV)
    table = None
    if paged:
        bs = 16
        mb = -(-T // bs)
        pad = mb * bs - T
        kp = F.pad(k, (0, 0, 0, pad)).view(B, H, mb, bs, D).permute(0, 2, 1, 3, 4).reshape(B * mb, H, bs, D)
        vp = F.pad(v, (0, 0, 0, pad)).view(B, H, mb, bs, D).permute(0, 2, 1, 3, 4).reshape(B * mb, H, bs, D)
        perm = torch.randperm(B * mb, device=DEV)
        k, v = torch.empty_like(kp), torch.empty_like(vp)
        k[perm], v[perm] = kp, vp
        table = perm.view(B, mb).to(torch.int32)
    cnt = torch.zeros(B * H, dtype=torch.int32, device=DEV)
    a = decode_attention(q, k, v, lengths, block_table=table, num_splits=splits)
    out = torch.full((B, H, D), float("nan"), device=DEV)
    b = decode_attention(q, k, v, lengths, block_table=table, num_splits=splits, counters=cnt, out=out)
    assert torch.equal(a, b) and int(cnt.abs().sum()) == 0
