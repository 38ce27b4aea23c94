"""Triton LayerNorm (gptcore.kernels.layer_norm) against its reference twin and F.layer_norm.

Every case draws fresh random inputs and checks the output and every gradient (dx, dweight,
dbias, and with a residual d residual and the returned h) by the correctness rule (tests/errcheck.py)
(tests/errcheck.py): the error against a float64 run of ``layer_norm_ref`` may be at most 2x the
error of torch's own op in the same dtype, plus one unit of the dtype's resolution at the
output's scale (for dweight and dbias, sums over rows, also one fp32 unit at the scale of the
summed magnitudes). Every buffer the kernels allocate starts as NaN (``poisoned`` fixture), so an
element a kernel forgets to write fails the check. On a CPU the kernels run under the Triton
interpreter on small shapes; on a GPU the same tests run the full list.

    python -m pytest -q tests/test_layer_norm.py
"""
import functools

import pytest
import torch
import torch.nn.functional as F

from errcheck import assert_error_within, assert_rounded_once, dtype_floor
from gptcore.kernels.layer_norm import MAX_WIDTH, layer_norm
from gptcore.kernels.reference import layer_norm_ref

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
WIDTHS = [1, 7, 768, 1023, 1600, 4097, MAX_WIDTH] if ON_GPU else [1, 7, 768, 1023, 1600]
ROWS = [1, 3, 1000] if ON_GPU else [1, 3, 37]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5


def _floor(oracle, dtype, terms=None) -> float:
    # 4 units: dx = rstd * (wdy - xhat*c1 - c2) rounds a few times even when each step is exact-ish
    return dtype_floor(oracle, dtype, terms, units=4)


def _run(fn, x, weight, bias, residual, gy, gh):
    """fn's outputs and the grads of sum(y * gy) (+ sum(h * gh)) w.r.t. every given input."""
    # detach() keeps each input's strides, so strided inputs reach the kernel as they are
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, weight, bias, residual)]
    xs, ws, bs, rs = leaves
    out = fn(xs, ws, bs, EPS) if rs is None else fn(xs, ws, bs, EPS, residual=rs)
    outs = (out,) if rs is None else out
    grads_out = (gy,) if rs is None else (gy, gh)
    wrt = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(outs, wrt, grads_out)
    names = [n for n, t in zip(("dx", "dweight", "dbias", "dresidual"), leaves) if t is not None]
    result = {"y": outs[0]}
    if rs is not None:
        result["h"] = outs[1]
    result.update(zip(names, grads))
    return result


def _torch_ln(x, w, b, eps, residual=None):
    if residual is None:
        return _f_layer_norm(x, w, b, eps)
    return _torch_add_ln(x, w, b, eps, residual)


def _torch_add_ln(x, w, b, eps, residual):
    h = x + residual
    return _f_layer_norm(h, w, b, eps), h


def _f_layer_norm(h, w, b, eps):
    # CUDA's F.layer_norm wants the parameters in the input's dtype (CPU's accepts a mix); cast
    # inside autograd, as the block would, so dweight/dbias still come back in the parameter's dtype
    w = w if w is None else w.to(h.dtype)
    b = b if b is None else b.to(h.dtype)
    return F.layer_norm(h, (h.shape[-1],), w, b, eps)


def _check_all(x, weight, bias, residual, out_dtype, tag):
    """Run kernel, torch (low precision) and the float64 twin; apply the error rule to everything."""
    shape = x.shape
    gy = torch.randn(shape, device=x.device, dtype=out_dtype)
    gh = torch.randn(shape, device=x.device, dtype=out_dtype) if residual is not None else None
    fast = _run(layer_norm, x, weight, bias, residual, gy, gh)
    low = _run(_torch_ln, x, weight, bias, residual, gy, gh)
    d = lambda t: None if t is None else t.double()
    oracle = _run(layer_norm_ref, d(x), d(weight), d(bias), d(residual), d(gy), d(gh))
    assert fast.keys() == oracle.keys()
    h = d(x) if residual is None else d(x) + d(residual)
    xhat = layer_norm_ref(h, None, None, EPS)
    terms = {"dweight": d(gy) * xhat, "dbias": d(gy)}  # the summands of the reduced grads
    for name in oracle:
        assert fast[name].dtype == low[name].dtype, f"{tag} {name}: dtype {fast[name].dtype} != torch's {low[name].dtype}"
        floor = _floor(oracle[name], low[name].dtype, terms.get(name))
        assert_error_within(fast[name], low[name], oracle[name], atol=floor, name=f"{tag} {name}")


def _inputs(rows, width, dtype, with_residual, wdtype=None):
    x = 2.0 * torch.randn(rows, width, device=DEV, dtype=dtype) + 1.0  # offset: stresses mean removal
    w = torch.randn(width, device=DEV, dtype=wdtype or dtype)
    b = torch.randn(width, device=DEV, dtype=wdtype or dtype)
    r = torch.randn(rows, width, device=DEV, dtype=dtype) if with_residual else None
    return x, w, b, r


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("rows", ROWS)
def test_matches_reference(poisoned, rows, width, dtype, with_residual):
    x, w, b, r = _inputs(rows, width, dtype, with_residual)
    _check_all(x, w, b, r, dtype, f"{rows}x{width} {dtype}")


@pytest.mark.parametrize("which", ["no_weight_no_bias", "weight_only", "bias_only"])
def test_optional_weight_and_bias(poisoned, which):
    x, w, b, r = _inputs(37, 1023, torch.float32, True)
    w = None if which == "bias_only" or which == "no_weight_no_bias" else w
    b = None if which == "weight_only" or which == "no_weight_no_bias" else b
    _check_all(x, w, b, r, torch.float32, which)
    _check_all(x, w, b, None, torch.float32, which)


def test_mixed_dtypes(poisoned):
    """Autocast-style inputs: bf16 branch, fp32 residual stream, fp32 parameters."""
    x, w, b, _ = _inputs(37, 768, torch.bfloat16, False, wdtype=torch.float32)
    r = torch.randn(37, 768, device=DEV, dtype=torch.float32)
    _check_all(x, w, b, r, torch.float32, "bf16 x + fp32 residual")
    _check_all(x, w, b, None, torch.bfloat16, "bf16 x, fp32 weight")



@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("out", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_out_dtype(poisoned, out, with_residual):
    """out_dtype (what the model asks for under autocast): y is the same fp32 result rounded once
    to out_dtype, h keeps its own dtype, and the gradients equal those for dy given in fp32."""
    x, w, b, r = _inputs(37, 768, torch.float32, with_residual)
    gy = torch.randn(37, 768, device=DEV).to(out)
    gh = torch.randn(37, 768, device=DEV) if with_residual else None
    fast = _run(functools.partial(layer_norm, out_dtype=out), x, w, b, r, gy, gh)
    full = _run(layer_norm, x, w, b, r, gy.float(), gh)
    twin = _run(functools.partial(layer_norm_ref, out_dtype=out), x, w, b, r, gy, gh)
    assert fast["y"].dtype == twin["y"].dtype == out
    assert_rounded_once(fast["y"], full["y"], out)
    for name in full:
        if name != "y":
            assert fast[name].dtype == full[name].dtype, name
            # same math on the same values; the GPU compiler may contract multiply-adds differently
            # for a bf16 and an fp32 dy load, so allow a few fp32 ulps
            torch.testing.assert_close(fast[name], full[name], rtol=1e-5, atol=1e-5, msg=name)
    with pytest.raises(TypeError, match="out_dtype must be float32, float16 or bfloat16"):
        layer_norm(x, w, b, out_dtype=torch.int8)


def test_leading_dims_and_strides_match_contiguous(poisoned):
    """(B, T, C) inputs laid out as a row-strided slice (read in place) or transposed (copied once),
    with a strided weight, give bit-identical results to the same data laid out contiguously."""
    base = torch.randn(2, 5, 1100, device=DEV)
    w, b = torch.randn(2 * 768, device=DEV)[::2], torch.randn(768, device=DEV)
    r = torch.randn(2, 5, 768, device=DEV)
    gy, gh = torch.randn(2, 5, 768, device=DEV), torch.randn(2, 5, 768, device=DEV)
    sliced = base[..., :768]  # rows at stride 1100
    transposed = torch.randn(768, 5, 2, device=DEV).permute(2, 1, 0)  # last dim at stride 10
    for x in (sliced, transposed):
        got = _run(layer_norm, x, w, b, r, gy, gh)
        want = _run(layer_norm, x.contiguous(), w.contiguous(), b, r, gy, gh)
        for name in want:
            assert got[name].shape == want[name].shape
            assert torch.equal(got[name], want[name]), f"{name} differs from the contiguous run"


def test_one_output_unused(poisoned):
    """Only y used (the final LayerNorm drops h) or only h used: the missing grad counts as 0."""
    x, w, b, r = _inputs(37, 768, torch.float32, True)
    for used in (0, 1):  # 0: y only, 1: h only
        g = torch.randn_like(x)
        grads = {}
        for tag, fn, dt in (("fast", layer_norm, torch.float32), ("torch", _torch_add_ln, torch.float32),
                            ("oracle", layer_norm_ref, torch.float64)):
            leaves = [t.detach().to(dt).requires_grad_() for t in (x, w, b, r)]
            out = fn(leaves[0], leaves[1], leaves[2], EPS, residual=leaves[3])[used]
            grads[tag] = torch.autograd.grad(out, leaves, g.to(dt), allow_unused=True)
        g64 = g.double()
        terms = {"dweight": g64 * layer_norm_ref(x.double() + r.double(), None, None, EPS), "dbias": g64}
        for name, a, low, want in zip(("dx", "dweight", "dbias", "dresidual"), *grads.values()):
            if want is None:  # h does not depend on weight and bias
                assert a is None or not a.any(), f"{name} must be zero when only h is used"
            else:
                assert_error_within(a, low, want, atol=_floor(want, torch.float32, terms.get(name)),
                                    name=f"{name} ({'h' if used else 'y'} only)")


def test_backward_is_deterministic():
    """Two backward runs give bit-identical dweight and dbias (no atomics in the reduction)."""
    rows = 16384 if ON_GPU else 37
    x, w, b, r = _inputs(rows, 768, torch.bfloat16, True)
    gy, gh = torch.randn_like(x), torch.randn_like(x)
    first = _run(layer_norm, x, w, b, r, gy, gh)
    second = _run(layer_norm, x, w, b, r, gy, gh)
    for name in ("dweight", "dbias", "dx", "dresidual"):
        assert torch.equal(first[name], second[name]), f"{name} differs between two identical backward runs"


def test_empty_rows():
    x = torch.randn(0, 64, device=DEV, requires_grad=True)
    w = torch.randn(64, device=DEV, requires_grad=True)
    b = torch.randn(64, device=DEV, requires_grad=True)
    y = layer_norm(x, w, b)
    assert y.shape == (0, 64)
    y.sum().backward()
    assert x.grad.shape == (0, 64) and torch.equal(w.grad, torch.zeros_like(w))


def test_bad_inputs():
    x = torch.randn(3, 8, device=DEV)
    w = torch.randn(8, device=DEV)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        layer_norm(x.to(torch.int32), None, None)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        layer_norm(x.double(), None, None)
    with pytest.raises(ValueError, match=f"1..{MAX_WIDTH}"):
        layer_norm(torch.empty(1, MAX_WIDTH + 1, device=DEV), None, None)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        layer_norm(x, torch.randn(7, device=DEV), None)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        layer_norm(x, w, torch.randn(2, 8, device=DEV))
    with pytest.raises(ValueError, match="residual shape"):
        layer_norm(x, w, None, residual=torch.randn(3, 9, device=DEV))
    with pytest.raises(ValueError, match="scalar"):
        layer_norm(torch.tensor(1.0, device=DEV), None, None)


def test_cpu_tensor_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        layer_norm(torch.randn(3, 8), torch.randn(8), None)


@pytest.mark.gpu
def test_parameters_on_another_device():
    x = torch.randn(3, 8, device="cuda")
    with pytest.raises(ValueError, match="same device"):
        layer_norm(x, torch.randn(8, device="cpu"), None)
