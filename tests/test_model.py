"""The model: reference path vs torch path (the error rule of tests/errcheck.py), shapes, errors, accounting."""
import math

import pytest
import torch

from gptcore import GPT, GPTConfig
from errcheck import assert_error_within


def _tiny(**kw):
    return GPTConfig.from_preset("tiny", vocab_size=512, **kw)


def _logits_and_grads(model, idx, tgt):
    model.zero_grad(set_to_none=True)
    logits = model(idx)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), tgt.flatten())
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
@pytest.mark.parametrize("T", [1, 17, 64])
def test_torch_backend_matches_reference(pos_emb, T):
    cfg = _tiny(pos_emb=pos_emb)
    model = GPT(cfg, backend="reference")
    idx = torch.randint(0, cfg.vocab_size, (3, T))
    tgt = torch.randint(0, cfg.vocab_size, (3, T))
    oracle = _logits_and_grads(model.double(), idx, tgt)
    model.float()
    low = _logits_and_grads(model, idx, tgt)
    fast = _logits_and_grads(model.set_backend("torch"), idx, tgt)
    assert_error_within(fast[0], low[0], oracle[0], atol=1e-5, name="logits")
    assert_error_within(fast[1], low[1], oracle[1], atol=1e-6, name="loss")
    for n in oracle[2]:
        assert_error_within(fast[2][n], low[2][n], oracle[2][n], atol=1e-6, name=f"grad {n}")


def test_same_state_dict_for_every_backend():
    cfg = _tiny()
    keys = {b: list(GPT(cfg, backend=b).state_dict()) for b in ("reference", "torch")}
    assert keys["reference"] == keys["torch"]
    a = GPT(cfg, backend="reference")
    b = GPT(cfg, backend="torch")
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (2, 9))
    torch.testing.assert_close(a(idx), b(idx), rtol=1e-4, atol=1e-5)


def test_weight_tying_and_init():
    cfg = _tiny(n_layers=4)
    m = GPT(cfg, backend="torch")
    assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()
    assert m.num_params() == sum(p.numel() for p in m.parameters())
    big = GPT(GPTConfig.from_preset("tiny", emb_dim=256, n_heads=4, n_layers=8), backend="torch")
    std_proj = big.transformer.h[0].mlp.c_proj.weight.std().item()
    std_fc = big.transformer.h[0].mlp.c_fc.weight.std().item()
    assert abs(std_fc - 0.02) < 0.002
    assert abs(std_proj - 0.02 / math.sqrt(2 * 8)) < 0.001
    assert torch.all(big.transformer.h[0].attn.c_attn.bias == 0)


def test_untied_head():
    m = GPT(_tiny(tie_weights=False), backend="torch")
    assert m.lm_head.weight.data_ptr() != m.transformer.wte.weight.data_ptr()


def test_sequence_longer_than_context_is_a_clear_error():
    cfg = _tiny(context_length=16)
    m = GPT(cfg, backend="torch")
    with pytest.raises(ValueError, match="exceeds the model's context_length 16"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_bad_token_ids_and_shapes():
    m = GPT(_tiny(), backend="torch")
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\).*max 512"):
        m(torch.tensor([[1, 512]]))
    with pytest.raises(ValueError, match=r"shape \(B, T\)"):
        m(torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids"):
        m(torch.zeros(1, 3))


def test_loss_api_matches_manual_cross_entropy():
    cfg = _tiny()
    m = GPT(cfg, backend="torch")
    idx = torch.randint(0, cfg.vocab_size, (2, 11))
    tgt = torch.randint(0, cfg.vocab_size, (2, 11))
    manual = torch.nn.functional.cross_entropy(m(idx).flatten(0, 1), tgt.flatten())
    torch.testing.assert_close(m.loss(idx, tgt), manual)
    # untrained model: loss near ln(vocab)
    assert abs(m.loss(idx, tgt).item() - math.log(cfg.vocab_size)) < 0.5


def test_triton_backend_refuses_without_gpu_or_interpreter(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: triton backend can run")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run here: no CUDA GPU"):
        GPT(_tiny(), backend="triton")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        GPT(_tiny(), backend="cuda")


def test_flops_and_memory_estimates():
    m = GPT(GPTConfig.from_preset("gpt2"), backend="torch")
    n = m.num_params(non_embedding=True)
    assert n == 124_439_808 - 50257 * 768 - 1024 * 768
    f = m.flops_per_token(1024)
    # nanoGPT's estimate: 6 N + 12 L C T, with N counting the (tied) LM head matmul.
    assert f == 6 * (n + 50257 * 768) + 12 * 12 * 768 * 1024
    mem = m.estimate_memory(16, 1024)
    assert mem["total"] > mem["params"] > 0
