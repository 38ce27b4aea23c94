"""Launch plans: call a compiled Triton kernel directly once its specialization is known.

    @planned
    @triton.jit(do_not_specialize=["M"])
    def _my_kernel(X, Y, M, N, BLOCK: tl.constexpr): ...

    _my_kernel[grid](x, y, M, N, BLOCK=128, num_warps=4)     # same call syntax as a jit kernel

Why: a plain ``jit_fn[grid](...)`` goes through Triton's generic ``JITFunction.run`` on every call
(binder, specialization of every argument, a cache-key string, global-value checks, launch metadata)
and rebuilds every TMA descriptor's CUtensorMap on the host. On a slow host that is 20-40 us per
launch, several times the kernel itself at GPT-2 sizes.

How: ``planned(fn)[grid](*args, **kw)`` computes a compact key of everything Triton specializes
on -- per tensor argument its dtype and 16-byte alignment, per int its ==1 / %16 / 32-bit-range
class (only the range class for ``do_not_specialize`` ints), bools by value, None, each TMA
descriptor's dtype, block shape, padding and alignments -- plus the keyword constexprs and launch
options and the current device. The key is at least as fine as Triton's own: two calls with one key
are two calls Triton would send to the same compiled kernel. The first call of a key runs the
generic path (compiling if needed) and keeps the ``CompiledKernel`` it returns as the *plan*; later
calls of that key launch the plan's binary directly on the current stream. Grid sizes, strides and
other non-specialized values are arguments of the launch, never part of a plan.

TMA descriptors (``tma_descriptor``) are cached host objects keyed by (address, shape, strides,
block, dtype): a descriptor is a pure function of those, and a training step allocates its
activations at the same addresses every step, so the CUtensorMap built for one (``describe``) is
reused instead of being encoded again at every launch.

Falls back to the generic path (always correct, slower) on Triton versions other than 3.6 (the
launcher signature used here was read from 3.6), with GPTCORE_LAUNCH_PLANS=0, under the Triton
interpreter (CPU tensors),
when a launch hook is installed (profilers such as proton), and for kernels that need global
scratch memory. ``stats()`` counts plan hits and misses; ``clear()`` drops every plan.

Tests: python -m pytest -q tests/test_launch.py
"""
from __future__ import annotations

import collections
import functools
import os

import torch

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _plans_supported() -> bool:
    """Plans call Triton's launcher below its public API: only on versions whose launch signature
    was checked (3.6), and not with GPTCORE_LAUNCH_PLANS=0. Elsewhere every call is generic."""
    if os.environ.get("GPTCORE_LAUNCH_PLANS", "1") == "0":
        return False
    try:
        import triton
    except ImportError:
        return False
    return tuple(int(p) for p in triton.__version__.split(".")[:2]) == (3, 6)


_ENABLED = _plans_supported()
_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1
_STATS = collections.Counter()
_ALL: list["PlannedKernel"] = []


def stats() -> dict:
    """{'hit': n, 'miss': n, 'generic': n} over every planned kernel since the last clear()."""
    return dict(_STATS)


def clear() -> None:
    """Forget every plan and cached descriptor (the compiled kernels stay in Triton's cache)."""
    for k in _ALL:
        k.plans.clear()
    _DESCS.clear()
    _STATS.clear()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host-side grid arithmetic (triton.cdiv is a jit-callable: ~5 us a call)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), like triton.next_power_of_2, in plain Python."""
    return 1 << max(0, (n - 1).bit_length())


def _int_class(v: int) -> int:
    return 0 if _I32_MIN <= v <= _I32_MAX else (1 if v < 2**63 else 2)


def _arg_key(a, dns: bool):
    """The part of a runtime argument Triton's specialization can see."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() & 15 == 0)
    if isinstance(a, bool):
        return ("b", a)
    if isinstance(a, int):
        if dns:
            return ("n", _int_class(a))
        return ("i", a == 1, a & 15 == 0, _int_class(a))
    if isinstance(a, float):
        return "f"
    if a is None:
        return None
    desc_key = getattr(a, "_plan_key", None)
    if desc_key is not None:
        return desc_key
    raise _Unplannable(type(a).__name__)


class _Unplannable(Exception):
    """An argument whose specialization this module does not model: use the generic path."""


class _Plan:
    __slots__ = ("run", "function", "packed", "tail", "raw_launch", "coop", "pdl", "desc_meta", "desc_pos")

    def __init__(self, compiled, tail: tuple, desc_pos: tuple[int, ...]):
        self.run = compiled.run  # the CudaLauncher (loads the binary on first access)
        self.function = compiled.function
        self.packed = compiled.packed_metadata
        self.tail = tail
        self.desc_pos = desc_pos
        self.raw_launch = self.desc_meta = None
        self.coop = self.pdl = False
        if desc_pos:
            self._bind_raw(compiled)

    def _bind_raw(self, compiled) -> None:
        """For kernels with TMA descriptors: the launcher's C entry point beneath Triton's wrapper
        that encodes each descriptor per launch, so cached encodings can be passed instead."""
        launcher = self.run
        meta = getattr(compiled.metadata, "tensordesc_meta", None)
        closure = getattr(getattr(launcher, "launch", None), "__closure__", None) or ()
        cells = {}
        for name, cell in zip(launcher.launch.__code__.co_freevars if closure else (), closure):
            cells[name] = cell.cell_contents
        raw = cells.get("launcher")
        if raw is None or not meta or launcher.global_scratch_size or launcher.profile_scratch_size:
            return  # descriptors stay objects; Triton encodes them per launch (correct, slower)
        self.raw_launch, self.desc_meta = raw, tuple(meta)
        self.coop, self.pdl = launcher.launch_cooperative_grid, launcher.launch_pdl


class PlannedKernel:
    """A @triton.jit kernel whose launches go through per-specialization plans (module header)."""

    def __init__(self, fn):
        self.fn = fn
        self.plans: dict = {}
        params = getattr(fn, "params", None)
        if params is None:  # the interpreter's function: no plans
            self.runtime_dns = self.constexpr_names = ()
            _ALL.append(self)
            return
        runtime = [p for p in params if not p.is_constexpr]
        constexprs = [p for p in params if p.is_constexpr]
        if any(p.num > c.num for p in runtime for c in constexprs):
            raise TypeError(f"{getattr(fn, '__name__', fn)}: planned kernels take every tl.constexpr parameter after the "
                            f"runtime ones (they are passed by keyword)")
        self.runtime_dns = tuple(p.do_not_specialize for p in runtime)
        self.constexpr_names = tuple(p.name for p in constexprs)
        self.constexpr_defaults = {p.name: p.default for p in constexprs if p.has_default}
        _ALL.append(self)

    def __getitem__(self, grid):
        return functools.partial(self.launch, grid)

    def launch(self, grid, *args, **kw):
        if _INTERPRET or not _ENABLED or not self.runtime_dns or len(args) != len(self.runtime_dns):
            _STATS["generic"] += 1
            return self.fn[grid](*args, **kw)
        dev = _current_device()
        # _arg_key inlined for the two common cases (a function call per argument is most of the
        # key's cost on a slow host); the rest goes through _arg_key
        spec = []
        try:
            for a, dns in zip(args, self.runtime_dns):
                t = type(a)
                if t is float:
                    spec.append("f")
                elif t is int and not dns:
                    spec.append(("i", a == 1, a & 15 == 0,
                                 0 if _I32_MIN <= a <= _I32_MAX else (1 if a < 2**63 else 2)))
                elif isinstance(a, torch.Tensor):
                    spec.append((a.dtype, a.data_ptr() & 15 == 0))
                else:
                    spec.append(_arg_key(a, dns))
        except _Unplannable:
            _STATS["generic"] += 1
            return self.fn[grid](*args, **kw)
        key = (dev, tuple(kw.items()), tuple(spec))
        plan = self.plans.get(key)
        if plan is None:
            return self._miss(key, grid, args, kw)
        _STATS["hit"] += 1
        g = (tuple(grid) + (1, 1))[:3]
        stream = _raw_stream(dev)
        if plan.desc_pos:
            args = list(args)
            if plan.raw_launch is not None:
                flat = []
                di = 0
                for i, a in enumerate(args):
                    if di < len(plan.desc_pos) and plan.desc_pos[di] == i:
                        flat.extend(_encoded(a, plan.desc_meta[di]))
                        di += 1
                    else:
                        flat.append(a)
                plan.raw_launch(g[0], g[1], g[2], stream, plan.function, plan.coop, plan.pdl, None, None,
                                plan.packed, None, None, None, *flat, *plan.tail)
                return None
        plan.run(g[0], g[1], g[2], stream, plan.function, plan.packed, None, None, None, *args, *plan.tail)
        return None

    def _miss(self, key, grid, args, kw):
        _STATS["miss"] += 1
        compiled = self.fn[grid](*args, **kw)
        if _hooked() or compiled is None:
            return compiled
        tail = tuple(kw[n] if n in kw else self.constexpr_defaults[n] for n in self.constexpr_names)
        desc_pos = tuple(i for i, a in enumerate(args) if getattr(a, "_plan_key", None) is not None)
        self.plans[key] = _Plan(compiled, tail, desc_pos)
        return compiled


def planned(fn) -> PlannedKernel:
    """Wrap a @triton.jit kernel so its launches use launch plans (see the module header)."""
    return PlannedKernel(fn)


def _hooked() -> bool:
    """A launch hook (a profiler) is installed: plans would bypass it, so none are made. Checked
    when a plan is made; a hook installed later takes effect after clear()."""
    try:
        from triton import knobs

        rt = knobs.runtime
        # a hook is None, or (newer Triton) a HookChain that may be empty
        return any(h is not None and getattr(h, "calls", True) for h in (rt.launch_enter_hook, rt.launch_exit_hook))
    except (ImportError, AttributeError):
        return False


def _current_device() -> int:
    return torch._C._cuda_getDevice()


def _raw_stream(dev: int) -> int:
    return torch._C._cuda_getCurrentRawStream(dev)


# ---- TMA descriptors -----------------------------------------------------------------------------
_DESC_CAP = 4096
_ENCODINGS: "collections.OrderedDict[tuple, list]" = collections.OrderedDict()
_DESCS = _ENCODINGS  # cleared by clear()


def tma_descriptor(t: torch.Tensor, block_shape: list[int]):
    """A TensorDescriptor over all of t with this block. The plan layer caches its CUtensorMap
    encoding by (address, shape, strides, block, dtype, device) -- a pure function of those -- so a
    tensor allocated at the same address with the same layout (every training step's activations)
    is not encoded again. The cache holds the encodings only, never the tensors."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    d = TensorDescriptor(t, list(t.shape), list(t.stride()), list(block_shape))
    layout = (t.data_ptr(), tuple(t.shape), t.stride(), tuple(block_shape), t.dtype, t.device.index)
    # what Triton's specialization can see of a descriptor, conservatively (finer is safe)
    d._plan_key = ("desc", t.dtype, layout[3], d.padding, layout[0] & 15 == 0,
                   tuple(s & 15 == 0 for s in layout[1]), tuple(s & 15 == 0 for s in layout[2]))
    d._layout = layout
    return d


def _encoded(d, meta) -> list:
    """The launcher's arguments for descriptor d under one kernel's descriptor metadata (a
    CUtensorMap and the shape and strides), encoded once per layout and reused."""
    key = (d._layout, id(meta))
    got = _ENCODINGS.get(key)
    if got is None:
        from triton.backends.nvidia.driver import make_tensordesc_arg

        got = _ENCODINGS[key] = (make_tensordesc_arg(d, meta), meta)  # meta kept alive: its id stays unique
        if len(_ENCODINGS) > _DESC_CAP:
            _ENCODINGS.popitem(last=False)
    else:
        _ENCODINGS.move_to_end(key)
    return got[0]
