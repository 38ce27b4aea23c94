"""Triton bias+GELU (gptcore.kernels.gelu) against its reference twin and F.gelu(approximate="tanh").

Every case draws fresh random inputs and checks the output, dx and dbias by the correctness rule (tests/errcheck.py)
(tests/errcheck.py): error against a float64 run of ``gelu_ref`` at most 2x the error of
torch's own op in the same dtype, plus one unit of the dtype's resolution at the output's
scale (for d bias, a sum over rows, also one fp32 unit at the scale of the summed magnitudes).
Kernel-allocated buffers start as NaN (``poisoned`` fixture). On a CPU the kernels run
under the Triton interpreter on small shapes; on a GPU the same tests run the full list.

    python -m pytest -q tests/test_gelu.py
"""
import pytest
import torch
import torch.nn.functional as F

from errcheck import assert_error_within, assert_rounded_once, dtype_floor
from gptcore.kernels.gelu import gelu
from gptcore.kernels.reference import gelu_ref

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
WIDTHS = [1, 7, 768, 1023, 1600, 3072, 4097] if ON_GPU else [1, 7, 768, 1023, 1600, 4097]
ROWS = [1, 3, 1000] if ON_GPU else [1, 3, 37]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _torch_gelu(x, bias=None):
    return F.gelu(x if bias is None else x + bias, approximate="tanh")


def _run(fn, x, bias, gy):
    xs = x.detach().requires_grad_()  # detach() keeps strides: strided inputs reach the kernel as they are
    bs = None if bias is None else bias.detach().requires_grad_()
    y = fn(xs, bs)
    wrt = (xs,) if bs is None else (xs, bs)
    grads = torch.autograd.grad(y, wrt, gy)
    return dict(zip(("y", "dx", "dbias"), (y, *grads)))


def _check_all(x, bias, tag, lowprec="torch"):
    """lowprec="torch": torch's op in x's dtype; "rounded": the oracle rounded to that dtype (the
    best answer the dtype can hold) where torch's own op is not finite."""
    out_dtype = x.dtype if bias is None else torch.promote_types(x.dtype, bias.dtype)
    gy = torch.randn(x.shape, device=x.device, dtype=out_dtype)
    fast = _run(gelu, x, bias, gy)
    oracle = _run(gelu_ref, x.double(), None if bias is None else bias.double(), gy.double())
    if lowprec == "torch":
        low = _run(_torch_gelu, x, bias, gy)
    else:
        low = {name: t.to(fast[name].dtype) for name, t in oracle.items()}
    assert fast.keys() == oracle.keys()
    for name in oracle:
        assert fast[name].dtype == low[name].dtype, f"{tag} {name}: dtype {fast[name].dtype} != torch's {low[name].dtype}"
        terms = oracle["dx"] if name == "dbias" else None  # d bias = sum over rows of dz = dx
        assert_error_within(fast[name], low[name], oracle[name], atol=dtype_floor(oracle[name], low[name].dtype, terms),
                            name=f"{tag} {name}")


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("rows", ROWS)
def test_matches_reference(poisoned, rows, width, dtype, with_bias):
    x = 2.0 * torch.randn(rows, width, device=DEV, dtype=dtype)
    b = torch.randn(width, device=DEV, dtype=dtype) if with_bias else None
    _check_all(x, b, f"{rows}x{width} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_inputs(poisoned, dtype):
    """Saturated tails and values whose cube overflows fp32 (torch's own op gives NaN gradients
    there): finite, and within 2x the rounding error of the dtype."""
    big = torch.finfo(dtype).max / 2
    tail = [1e-3, 1.0, 5.0, 9.5, 10.0, 10.5, 50.0, 1e4, big]
    for sign in (-1.0, 1.0):  # apart, so the floor's scale of one side does not hide the other
        x = (sign * torch.tensor(tail)).repeat(3, 1).to(DEV, dtype)
        _check_all(x, None, f"extreme {sign:+.0f} {dtype}", lowprec="rounded")


def test_mixed_dtypes(poisoned):
    """bf16 activations with an fp32 bias (autocast-style): output in the promoted dtype, as torch."""
    x = torch.randn(37, 768, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(768, device=DEV, dtype=torch.float32)
    _check_all(x, b, "bf16 x + fp32 bias")



@pytest.mark.parametrize("out", [torch.bfloat16, torch.float16], ids=str)
def test_out_dtype(poisoned, out):
    """out_dtype (the MLP asks for its Linear's dtype under autocast): bf16 x + fp32 bias gives
    the fp32 result rounded once to out_dtype; the gradients equal those for dy given in fp32,
    d bias stays fp32."""
    x = torch.randn(37, 768, device=DEV, dtype=torch.bfloat16)
    bias = torch.randn(768, device=DEV)
    gy = torch.randn(37, 768, device=DEV).to(out)
    fast = _run(lambda x, b: gelu(x, b, out_dtype=out), x, bias, gy)
    full = _run(gelu, x, bias, gy.float())
    twin = gelu_ref(x, bias, out_dtype=out)
    assert fast["y"].dtype == twin.dtype == out and full["y"].dtype == torch.float32
    assert_rounded_once(fast["y"], full["y"], out)
    assert fast["dx"].dtype == torch.bfloat16 and fast["dbias"].dtype == torch.float32
    # same math on the same values (the GPU compiler may contract multiply-adds differently per dtype)
    torch.testing.assert_close(fast["dx"], full["dx"], rtol=1e-2, atol=1e-2)  # bf16 dx: within an ulp
    torch.testing.assert_close(fast["dbias"], full["dbias"], rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="out_dtype must be float32, float16 or bfloat16"):
        gelu(x, bias, out_dtype=torch.int32)


def test_leading_dims_and_strides_match_contiguous(poisoned):
    """(B, T, C) inputs laid out as a row-strided slice (read in place) or transposed (copied once),
    with a strided bias, give bit-identical results to the same data laid out contiguously."""
    base = torch.randn(2, 5, 1100, device=DEV)
    b = torch.randn(2 * 768, device=DEV)[::2]
    gy = torch.randn(2, 5, 768, device=DEV)
    sliced = base[..., :768]  # rows at stride 1100
    transposed = torch.randn(768, 5, 2, device=DEV).permute(2, 1, 0)  # last dim at stride 10
    for x in (sliced, transposed):
        got, want = _run(gelu, x, b, gy), _run(gelu, x.contiguous(), b.contiguous(), gy)
        for name in want:
            assert torch.equal(got[name], want[name]), f"{name} differs from the contiguous run"


def test_bias_grad_is_deterministic():
    rows = 16384 if ON_GPU else 37
    x = torch.randn(rows, 3072 if ON_GPU else 1023, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(x.shape[-1], device=DEV, dtype=torch.bfloat16)
    gy = torch.randn_like(x)
    first, second = _run(gelu, x, b, gy), _run(gelu, x, b, gy)
    for name in ("dx", "dbias"):
        assert torch.equal(first[name], second[name]), f"{name} differs between two identical backward runs"


def test_empty():
    x = torch.randn(0, 16, device=DEV, requires_grad=True)
    b = torch.randn(16, device=DEV, requires_grad=True)
    y = gelu(x, b)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert torch.equal(b.grad, torch.zeros_like(b))


def test_bad_inputs():
    x = torch.randn(3, 8, device=DEV)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        gelu(x.to(torch.int64))
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        gelu(x.double())
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        gelu(x, torch.randn(3, 8, device=DEV))
    with pytest.raises(ValueError, match="scalar"):
        gelu(torch.tensor(1.0, device=DEV))


def test_cpu_tensor_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        gelu(torch.randn(3, 8))


@pytest.mark.gpu
def test_bias_on_another_device():
    with pytest.raises(ValueError, match="same device"):
        gelu(torch.randn(3, 8, device="cuda"), torch.randn(8))
