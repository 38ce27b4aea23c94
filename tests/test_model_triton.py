"""The model on the `triton` backend against the `reference` backend (small, fp32).

Same weights everywhere; logits, loss and every parameter gradient of the triton model are held
to the correctness rule (tests/errcheck.py): error against a float64 reference-backend run at most 2x the error of the
established fp32 paths (the larger of the fp32 reference backend's and the fp32 torch backend's,
since ops without a Triton kernel yet run torch's implementation in the triton backend), plus
one fp32 unit at the tensor's scale. On a CPU the Triton kernels run under the interpreter.

    python -m pytest -q tests/test_model_triton.py
"""
import pytest
import torch

from errcheck import assert_error_within
from gptcore.config import GPTConfig
from gptcore.model import GPT

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _cfg(pos_emb: str) -> GPTConfig:
    return GPTConfig.from_preset("tiny", vocab_size=97, context_length=32, pos_emb=pos_emb)


def test_backend_report_names_triton_kernels():
    report = GPT(_cfg("learned"), backend="triton").backend_report()
    assert report["layer_norm"] == "triton", report
    assert report["gelu"] == "triton", report
    assert "triton gelu(bias)" in report["fc_gelu"], report


def _loss_and_grads(model, idx, targets):
    model.zero_grad(set_to_none=True)
    logits = model(idx)
    loss = model.loss(idx, targets)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_triton_matches_reference(pos_emb):
    torch.manual_seed(0)
    cfg = _cfg(pos_emb)
    ref32 = GPT(cfg, backend="reference").to(DEV)
    # LayerNorm weights start at 1/0 and linear biases at 0: perturb them so the kernels'
    # weight/bias paths (and their gradients) are exercised with generic values.
    with torch.no_grad():
        for name, p in ref32.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    fast = GPT(cfg, backend="triton").to(DEV)
    fast.load_state_dict(ref32.state_dict())
    torch32 = GPT(cfg, backend="torch").to(DEV)
    torch32.load_state_dict(ref32.state_dict())
    oracle = GPT(cfg, backend="reference").to(DEV)
    oracle.load_state_dict(ref32.state_dict())
    oracle.double()

    idx = torch.randint(0, cfg.vocab_size, (2, 19), device=DEV)
    targets = torch.randint(0, cfg.vocab_size, (2, 19), device=DEV)
    got = _loss_and_grads(fast, idx, targets)
    low_ref = _loss_and_grads(ref32, idx, targets)
    low_torch = _loss_and_grads(torch32, idx, targets)
    want = _loss_and_grads(oracle, idx, targets)

    def check(a, lows, c, name):
        err = lambda t: (t.double() - c).abs().max().item()
        low = max(lows, key=err)  # the less accurate of the two fp32 paths sets the bound
        floor = torch.finfo(torch.float32).eps * max(1.0, c.abs().max().item())
        assert_error_within(a, low, c, atol=floor, name=name)

    check(got[0], (low_ref[0], low_torch[0]), want[0], "logits")
    check(got[1], (low_ref[1], low_torch[1]), want[1], "loss")
    for name in want[2]:
        check(got[2][name], (low_ref[2][name], low_torch[2][name]), want[2][name], f"grad {name}")
