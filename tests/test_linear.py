"""gptcore.kernels.linear (the device-time Linear used inside captured graphs) against F.linear, and its
bias-gradient column sum against torch's sum, by DESIGN.md's rule (tests/errcheck.py): error against a
float64 oracle at most 2x the error of torch's own op in the same dtype, plus a floor of one unit of
the dtype (and, for sums over rows, one fp32 unit at the scale of the summed magnitudes).

    python -m pytest -q tests/test_linear.py
"""
import pytest
import torch
import torch.nn.functional as F

from errcheck import assert_error_within, dtype_floor
from gptcore.kernels.linear import colsum, linear
from gptcore.ops import device_time_first, get_ops

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
ROWS = [1, 3, 37, 300, 4099] if ON_GPU else [1, 3, 37, 300]
WIDTHS = [1, 7, 130, 768, 2304] if ON_GPU else [1, 7, 130]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("rows", ROWS)
def test_colsum_matches_torch_sum(rows, width, dtype):
    y = torch.randn(rows, width, device=DEV, dtype=dtype)
    got = colsum(y)
    assert got.dtype == torch.float32 and got.shape == (width,)
    oracle = y.double().sum(0)
    low = y.sum(0, dtype=torch.float32)
    assert_error_within(got, low, oracle, atol=dtype_floor(oracle, torch.float32, y.double()), name="colsum")
    assert torch.equal(colsum(y), got), "colsum is not deterministic"


def test_colsum_layouts_dtypes_and_empty():
    """Leading dims are flattened, a row-strided slice is read in place with the same result, the
    output dtype is honoured, and zero rows give zeros."""
    base = torch.randn(4, 9, 150, device=DEV)
    y = base[..., :130]
    assert torch.equal(colsum(y), colsum(y.contiguous()))
    assert colsum(y, torch.float16).dtype == torch.float16
    assert torch.equal(colsum(torch.empty(0, 5, device=DEV)), torch.zeros(5, device=DEV))
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        colsum(torch.ones(3, 4, dtype=torch.int32, device=DEV))


def _grads(fn, x, w, b, gy):
    xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()
    bs = None if b is None else b.detach().requires_grad_()
    y = fn(xs, ws, bs)
    wrt = [t for t in (xs, ws, bs) if t is not None]
    return [y, *torch.autograd.grad(y, wrt, gy.to(y.dtype))]


CASES = [((1, 3), 7), ((2, 5, 24), 1), ((37, 64), 130), ((3, 11, 64), 96)]


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape, n", CASES, ids=[f"{'x'.join(map(str, s))}-n{n}" for s, n in CASES])
def test_linear_fp32_matches_f_linear(shape, n, with_bias):
    x = torch.randn(*shape, device=DEV)
    w = torch.randn(n, shape[-1], device=DEV) / shape[-1] ** 0.5
    b = torch.randn(n, device=DEV) if with_bias else None
    gy = torch.randn(*shape[:-1], n, device=DEV)
    fast = _grads(linear, x, w, b, gy)
    low = _grads(F.linear, x, w, b, gy)
    oracle = _grads(F.linear, x.double(), w.double(), None if b is None else b.double(), gy.double())
    for name, f, lo, o in zip(("y", "dx", "dw", "db"), fast, low, oracle):
        assert f.dtype == lo.dtype, f"{name}: dtype {f.dtype} != F.linear's {lo.dtype}"
        terms = gy.double() if name == "db" else None
        assert_error_within(f, lo, o, atol=dtype_floor(o, torch.float32, terms), name=name)


AUTOCAST = [torch.bfloat16, torch.float16] if ON_GPU else [torch.bfloat16]


@pytest.mark.parametrize("dtype", AUTOCAST, ids=str)
@pytest.mark.parametrize("shape, n", CASES, ids=[f"{'x'.join(map(str, s))}-n{n}" for s, n in CASES])
def test_linear_under_autocast_matches_autocast_f_linear(shape, n, dtype):
    """fp32 master weight and bias, autocast on: the output in the autocast dtype (as autocast's
    F.linear), the weight and bias gradients in fp32 (from the fp32 accumulator here, rounded to
    the autocast dtype first in torch's path: the error must be no worse than torch's)."""
    x = torch.randn(*shape, device=DEV)
    w = torch.randn(n, shape[-1], device=DEV) / shape[-1] ** 0.5
    b = torch.randn(n, device=DEV)
    gy = torch.randn(*shape[:-1], n, device=DEV).to(dtype)

    def autocast(fn):
        def run(x, w, b):
            with torch.autocast(DEV, dtype=dtype):
                return fn(x, w, b)
        return run

    fast = _grads(autocast(linear), x, w, b, gy)
    low = _grads(autocast(F.linear), x, w, b, gy)
    # the oracle: the same math in float64 on the values autocast hands the matmul
    oracle = _grads(F.linear, x.to(dtype).double(), w.to(dtype).double(), b.to(dtype).double(), gy.double())
    for name, f, lo, o in zip(("y", "dx", "dw", "db"), fast, low, oracle):
        assert f.dtype == lo.dtype, f"{name}: dtype {f.dtype} != autocast F.linear's {lo.dtype}"
        terms = gy.double() if name == "db" else None
        assert_error_within(f, lo, o, atol=dtype_floor(o, dtype, terms), name=name)


def test_ops_linear_switches_only_inside_device_time_first():
    """The triton backend's linear is F.linear outside device_time_first(); inside, on CUDA with grad,
    it is the device-time Function; without grad, on a CPU tensor or in the torch backend, F.linear."""
    x, w = torch.randn(3, 4, device=DEV), torch.randn(5, 4, device=DEV, requires_grad=True)
    kind = lambda y: type(y.grad_fn).__name__ if y.grad_fn is not None else None  # noqa: E731
    plain = kind(F.linear(x, w))
    t, tc = get_ops("triton"), get_ops("torch")
    assert kind(t.linear(x, w)) == kind(tc.linear(x, w)) == plain
    with device_time_first():
        assert kind(tc.linear(x, w)) == plain
        assert kind(t.linear(x, w)) == ("_LinearBackward" if ON_GPU else plain)
        with torch.no_grad():
            assert t.linear(x, w).grad_fn is None
    assert kind(t.linear(x, w)) == plain  # the mode ends with the block


def test_device_time_first_holds_on_other_threads():
    """Autograd runs CUDA backwards, and with them grad checkpointing's recompute of the forward, on a
    device thread: the mode must reach it, or the recompute takes F.linear where the forward took the
    device-time Function (torch.utils.checkpoint: "different metadata than during the forward")."""
    import threading

    from gptcore.ops import device_time_first_on

    seen = []
    with device_time_first():
        t = threading.Thread(target=lambda: seen.append(device_time_first_on()))
        t.start()
        t.join()
    t = threading.Thread(target=lambda: seen.append(device_time_first_on()))
    t.start()
    t.join()
    assert seen == [True, False]
