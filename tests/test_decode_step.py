"""The fused decode step (gptcore.decode_step) against the model's own cached forward.

CPU: the Triton interpreter on a tiny fp32 model (GPTCORE_FUSED_DECODE=1 allows it off CUDA); the
gpu-marked tests run GPT-2 shapes in bf16 inside the Generator's CUDA graph.
"""
import pytest
import torch

from errcheck import assert_error_within
from gptcore import GPT, GPTConfig
from gptcore.decode_step import FusedDecodeStep, fused_decode_step, why_not
from gptcore.generate import Generator
from gptcore.kv_cache import KVCache, PagedKVCache
from tinymodel import spread_tiny

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
PROMPTS = [[5, 17, 300, 2, 99, 41, 7], [9, 8], [100, 200, 300, 400]]


def _model(dtype=torch.float32, **kw):
    return spread_tiny(512, 0, "triton", **kw).to(DEV, dtype).eval()   # a wider-spread head: greedy tokens vary


@pytest.fixture
def fused_on(monkeypatch):
    monkeypatch.setenv("GPTCORE_FUSED_DECODE", "1")


def _prefilled(model, cache_cls, prompts):
    cache = cache_cls.for_model(model, batch_size=len(prompts), max_seq_len=32)
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([p + [0] * (longest - len(p)) for p in prompts], device=DEV)
    logits = model(ids, kv_cache=cache)
    cache.set_lengths([len(p) for p in prompts])
    last = torch.tensor([len(p) - 1 for p in prompts], device=DEV)
    return cache, logits[torch.arange(len(prompts), device=DEV), last].argmax(-1)


def _three_logits(step, model, oracle_model, caches, inp):
    """One decode step's logits (B, V) three ways: the fused step on caches[0], the model's forward
    on caches[1] and the oracle model's on caches[2], each cache reserving the step's position."""
    ca, cb, co = caches
    for c in caches:
        c.reserve(1)
    with ca.external_reservation():
        fused = step.logits(inp)
    with cb.external_reservation():
        ref = model(inp, kv_cache=cb)[:, -1]
    with co.external_reservation():
        oracle = oracle_model(inp, kv_cache=co)[:, -1]
    return fused, ref, oracle


@pytest.mark.parametrize("cache_cls", [KVCache, PagedKVCache])
@torch.no_grad()
def test_fused_step_matches_model_step(cache_cls, fused_on):
    """Step by step from one prefill: the fused step's logits within the rule of the model's
    forward (float64 oracle: the same model in float64), and the same greedy tokens."""
    model = _model()
    oracle_model = _model(torch.float64)
    oracle_model.set_backend("torch")
    ca, tok = _prefilled(model, cache_cls, PROMPTS)
    cb, _ = _prefilled(model, cache_cls, PROMPTS)
    co = cache_cls.for_model(oracle_model, batch_size=len(PROMPTS), max_seq_len=32, attention="torch")
    longest = max(len(p) for p in PROMPTS)
    ids = torch.tensor([p + [0] * (longest - len(p)) for p in PROMPTS], device=DEV)
    oracle_model(ids, kv_cache=co)
    co.set_lengths([len(p) for p in PROMPTS])
    step, why = fused_decode_step(model, ca)
    assert step is not None, why
    for _ in range(2):
        inp = tok[:, None].clone()
        fused_logits, ref_logits, oracle = _three_logits(step, model, oracle_model, (ca, cb, co), inp)
        assert_error_within(fused_logits, ref_logits, oracle, atol=1e-4, name="logits")
        assert torch.equal(ca.lengths, cb.lengths)
        tok = ref_logits.argmax(-1)
    # and the greedy path picks the same token as the model's forward
    inp = tok[:, None].clone()
    ca.reserve(1)
    cb.reserve(1)
    with ca.external_reservation():
        got = step.greedy(inp.clone())
    with cb.external_reservation():
        want = model(inp, kv_cache=cb)[:, -1].argmax(-1)
    assert torch.equal(got, want)


@pytest.mark.parametrize("paged", [False, True])
def test_generator_fused_greedy_equals_unfused(paged, monkeypatch):
    """Generator with the fused step gives today's (triton, unfused) greedy tokens, static and paged."""
    model = _model()
    monkeypatch.setenv("GPTCORE_FUSED_DECODE", "0")
    gen = Generator(model, paged=paged)
    want = gen.generate(PROMPTS, 5, temperature=0)
    assert gen.stats["decode_step"].startswith("model forward")
    monkeypatch.setenv("GPTCORE_FUSED_DECODE", "1")
    gen = Generator(model, paged=paged)
    got = gen.generate(PROMPTS, 5, temperature=0)
    assert gen.stats["decode_step"] == "fused", gen.stats["decode_step"]
    assert got == want


def test_generator_fused_sampling_equals_unfused(monkeypatch):
    """Sampling runs the fused body + LM head, then the ordinary sampler: same seed, same tokens."""
    model = _model()
    monkeypatch.setenv("GPTCORE_FUSED_DECODE", "1")
    got = Generator(model).generate(PROMPTS, 3, temperature=0.8, top_k=20, seed=3)
    monkeypatch.setenv("GPTCORE_FUSED_DECODE", "0")
    want = Generator(model).generate(PROMPTS, 3, temperature=0.8, top_k=20, seed=3)
    assert got == want


def test_why_not_names_each_fallback(monkeypatch):
    monkeypatch.setenv("GPTCORE_FUSED_DECODE", "1")
    model = _model()
    cache = KVCache.for_model(model, batch_size=2, max_seq_len=16)
    assert why_not(model, cache) is None
    model.set_backend("torch")
    assert "backend" in why_not(model, cache)
    model.set_backend("triton")
    assert "RoPE" in why_not(_model(pos_emb="rope"), cache)
    assert "> 64" in why_not(model, KVCache.for_model(model, batch_size=65, max_seq_len=4))
    monkeypatch.setenv("GPTCORE_FUSED_DECODE", "0")
    assert why_not(model, cache) == "GPTCORE_FUSED_DECODE=0"
    monkeypatch.setenv("GPTCORE_FUSED_DECODE", "auto")
    if not ON_GPU:
        assert "CUDA" in why_not(model, cache)


# ---- GPU: GPT-2 shapes in bf16, inside the Generator's CUDA graph ---------------------------------
def _gpt2(preset, dtype):
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset(preset), backend="triton").to(DEV, dtype).eval()


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 3, 17, 64])
@pytest.mark.parametrize("paged", [False, True])
def test_gpu_fused_graph_equals_unfused_fp32(B, paged, monkeypatch):
    model = _gpt2("gpt2", torch.float32)
    prompts = [[(7 * b + 3 * i) % 50257 for i in range(5 + b % 7)] for b in range(B)]
    monkeypatch.setenv("GPTCORE_FUSED_DECODE", "0")
    want = Generator(model, paged=paged).generate(prompts, 12, temperature=0)
    monkeypatch.setenv("GPTCORE_FUSED_DECODE", "auto")
    gen = Generator(model, paged=paged)
    got = gen.generate(prompts, 12, temperature=0)
    assert gen.stats["decode_step"] == "fused" and gen.stats["decode_mode"] == "cuda-graph"
    assert got == want
    assert gen.generate(prompts, 12, temperature=0) == want  # replayed graph


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["gpt2", "gpt2-xl"])
@pytest.mark.parametrize("B", [1, 17])
@torch.no_grad()
def test_gpu_fused_bf16_logits_within_rule(preset, B):
    model = _gpt2(preset, torch.bfloat16)
    oracle_model = _gpt2(preset, torch.float64)
    oracle_model.set_backend("torch")
    prompts = [[(11 * b + 5 * i) % 50257 for i in range(6 + b % 5)] for b in range(B)]
    ca, tok = _prefilled(model, KVCache, prompts)
    cb, _ = _prefilled(model, KVCache, prompts)
    co, _ = _prefilled(oracle_model, KVCache, prompts)
    step = FusedDecodeStep(model, ca)
    fused, ref, oracle = _three_logits(step, model, oracle_model, (ca, cb, co), tok[:, None].clone())
    assert_error_within(fused, ref, oracle, atol=1e-2, name=f"{preset} bf16 logits")


@pytest.mark.gpu
@pytest.mark.parametrize("paged", [False, True])
@torch.no_grad()
def test_gpu_fused_step_launch_count(paged):
    """At most 5 launches per layer + 3 per step (issue 17), counted with the profiler."""
    from torch.profiler import ProfilerActivity, profile

    model = _gpt2("gpt2", torch.bfloat16)
    cache_cls = PagedKVCache if paged else KVCache
    cache, tok = _prefilled(model, cache_cls, [[1, 2, 3], [4, 5, 6, 7]])
    step = FusedDecodeStep(model, cache)
    inp = tok[:, None].clone()
    for _ in range(2):  # the first call compiles
        cache.reserve(1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof, cache.external_reservation():
            step.greedy(inp, out=inp.view(-1))
            torch.cuda.synchronize()
    n = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    assert 0 < n <= 5 * model.config.n_layers + 3, n
