"""The correctness rule as one helper (README: Tests).

The fast path's error against a high-precision oracle may be at most ``factor`` times the error
of a low-precision reference computed the ordinary way, plus a small absolute floor:

    max|fast - oracle| <= factor * max|lowprec_ref - oracle| + atol

NaN anywhere in ``fast`` fails (outputs are poisoned with NaN before kernels run, so an
unwritten element shows up here).
"""
import torch


def assert_error_within(fast, lowprec, oracle, factor: float = 2.0, atol: float = 1e-5, name: str = "output"):
    fast, lowprec, oracle = (t.detach().double() for t in (fast, lowprec, oracle))
    assert fast.shape == oracle.shape, f"{name}: shape {tuple(fast.shape)} != {tuple(oracle.shape)}"
    assert not torch.isnan(fast).any(), f"{name}: NaN in output (unwritten element or overflow)"
    err = (fast - oracle).abs().max().item()
    ref_err = (lowprec - oracle).abs().max().item()
    bound = factor * ref_err + atol
    assert err <= bound, f"{name}: max error {err:.3e} > {factor} x reference error {ref_err:.3e} + {atol:.1e}"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a float tensor with NaN (for outputs a kernel must overwrite)."""
    return t.fill_(float("nan"))


def dtype_floor(oracle, dtype, terms=None, units: float = 1.0) -> float:
    """An absolute floor for the rule: ``units`` units of the dtype at the result's scale and, for a
    sum over rows (terms: the float64 summands, (M, N)), one fp32 unit at the scale of sum |terms|:
    an fp32 sum in any fixed order may be that far off, however lucky torch's own order is."""
    floor = units * torch.finfo(dtype).eps * max(1.0, oracle.detach().abs().max().item())
    if terms is not None:
        floor += torch.finfo(torch.float32).eps * terms.detach().abs().reshape(-1, terms.shape[-1]).sum(0).max().item()
    return floor


def assert_rounded_once(y, y32, dtype):
    """y is y32 rounded to dtype, to within one ulp of dtype: a kernel asked for a low-precision
    output can differ from its fp32-output twin in the last bits of the fp32 value (the compiler
    contracts multiply-adds differently for the two stores; 1e-5 absolute covers that where a sum
    cancels to near 0), and the interpreter's float32 -> bfloat16 conversion truncates."""
    ulp = torch.finfo(dtype).eps * y32.abs() + 1e-5
    assert ((y.float() - y32).abs() <= ulp).all()
