"""Launch plans (gptcore.kernels._launch): a plan is reused only for calls Triton would send to the
same compiled kernel, never for other dtypes, alignments, specialized ints, constexprs or devices.

CPU: the plan cache is driven through a stand-in jit function (the real launcher needs CUDA), so
the keying rules are checked everywhere. GPU (marked gpu): real kernels launched through plans with
other dtypes, strides and misaligned views in between, each result against torch.
"""
import types

import pytest
import torch
import torch.nn.functional as F

from gptcore.kernels import _launch

ON_GPU = torch.cuda.is_available()


class _Param:
    def __init__(self, num, name, constexpr=False, dns=False):
        self.num, self.name, self.is_constexpr, self.do_not_specialize = num, name, constexpr, dns
        self.has_default, self.default = False, None


class _FakeJit:
    """Stands in for a JITFunction: records generic calls, returns a compiled kernel that records
    direct launches."""

    def __init__(self):
        self.params = [_Param(0, "X"), _Param(1, "Y"), _Param(2, "M", dns=True), _Param(3, "N"),
                       _Param(4, "eps"), _Param(5, "BLOCK", constexpr=True)]
        self.generic, self.direct = [], []

    def __getitem__(self, grid):
        def call(*args, **kw):
            self.generic.append((grid, args, kw))
            fake = self

            class _Launcher:
                def __call__(self, *a):
                    fake.direct.append(a)

            return types.SimpleNamespace(run=_Launcher(), function=7, packed_metadata=(4, 1, 0),
                                         metadata=types.SimpleNamespace())

        return call


@pytest.fixture
def planner(monkeypatch):
    monkeypatch.setattr(_launch, "_INTERPRET", False)
    monkeypatch.setattr(_launch, "_ENABLED", True)
    monkeypatch.setattr(_launch, "_hooked", lambda: False)
    monkeypatch.setattr(_launch, "_current_device", lambda: 0)
    monkeypatch.setattr(_launch, "_raw_stream", lambda dev: 1000 + dev)
    fake = _FakeJit()
    return fake, _launch.planned(fake)


def test_same_specialization_reuses_the_plan(planner):
    fake, k = planner
    x, y = torch.randn(8, 16), torch.randn(8, 16)
    k[(4,)](x, y, 8, 16, 1e-5, BLOCK=32, num_warps=4)
    k[(5, 2)](x, y, 100, 32, 1e-3, BLOCK=32, num_warps=4)  # dns M and another N % 16 == 0, other eps
    assert len(fake.generic) == 1 and len(fake.direct) == 1
    grid_and_stream, rest = fake.direct[0][:4], fake.direct[0][4:]
    assert grid_and_stream == (5, 2, 1, 1000)
    assert rest[0] == 7 and rest[1] == (4, 1, 0)  # function, packed metadata
    assert rest[5:] == (x, y, 100, 32, 1e-3, 32)  # runtime args then the constexpr tail


@pytest.mark.parametrize("change", ["dtype", "misaligned", "int_one", "int_mod16", "int_wide", "dns_wide",
                                    "constexpr", "num_warps", "device", "none_arg", "bool_arg"])
def test_other_specialization_never_reuses_a_plan(planner, monkeypatch, change):
    fake, k = planner
    x, y = torch.randn(8, 16), torch.randn(8, 16)
    base = dict(args=[x, y, 8, 16, 1e-5], kw=dict(BLOCK=32, num_warps=4))
    k[(1,)](*base["args"], **base["kw"])
    args, kw = list(base["args"]), dict(base["kw"])
    if change == "dtype":
        args[0] = x.half()
    elif change == "misaligned":
        args[0] = torch.randn(200)[1:129].view(8, 16)  # data_ptr % 16 == 4
        assert args[0].data_ptr() % 16
    elif change == "int_one":
        args[3] = 1
    elif change == "int_mod16":
        args[3] = 17
    elif change == "int_wide":
        args[3] = 2**33  # i64 instead of i32
    elif change == "dns_wide":
        args[2] = 2**40
    elif change == "constexpr":
        kw["BLOCK"] = 64
    elif change == "num_warps":
        kw["num_warps"] = 8
    elif change == "device":
        monkeypatch.setattr(_launch, "_current_device", lambda: 1)
    elif change == "none_arg":
        args[1] = None
    elif change == "bool_arg":
        args[1] = True
    k[(1,)](*args, **kw)
    assert len(fake.generic) == 2 and not fake.direct, change


def test_constexpr_passed_positionally_takes_the_generic_path(planner):
    fake, k = planner
    x = torch.randn(4)
    for _ in range(2):
        k[(1,)](x, x, 4, 4, 0.5, 32)
    assert len(fake.generic) == 2 and not fake.direct


def test_kernels_reject_constexpr_before_runtime_params():
    fake = _FakeJit()
    fake.params = [_Param(0, "BLOCK", constexpr=True), _Param(1, "X")]
    with pytest.raises(TypeError, match="after the runtime ones"):
        _launch.planned(fake)


def test_descriptor_plan_key_and_layout_follow_the_tensor():
    pytest.importorskip("triton.tools.tensor_descriptor")
    import weakref

    t = torch.randn(2, 3, 64, 16)
    a, b = _launch.tma_descriptor(t, [1, 1, 16, 16]), _launch.tma_descriptor(t, [1, 1, 16, 16])
    assert a._layout == b._layout and a._plan_key == b._plan_key
    assert _launch.tma_descriptor(t, [1, 1, 32, 16])._layout != a._layout
    assert _launch.tma_descriptor(t.clone(), [1, 1, 16, 16])._layout != a._layout  # another address
    assert _launch.tma_descriptor(t[:, :, 1:], [1, 1, 16, 16])._plan_key != a._plan_key  # shape % 16 differs
    # nothing in the module keeps the tensor alive (a cache of descriptors once held every activation)
    ref = weakref.ref(t)
    del a, b, t
    assert ref() is None


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_gpu_plans_follow_dtype_stride_and_alignment():
    """The same LayerNorm kernel launched through plans on interleaved layouts: every result must
    match torch's (a plan reused for the wrong specialization gives garbage or a fault)."""
    from gptcore.kernels.layer_norm import layer_norm

    torch.manual_seed(0)
    base = torch.randn(4099, 768, device="cuda")
    w, b = torch.randn(768, device="cuda"), torch.randn(768, device="cuda")
    layouts = [base, base.bfloat16(), base[1:], base.half()[3:], base[:, :767], base.view(-1)[5:5 + 97 * 761].view(97, 761),
               torch.randn(768, 4099, device="cuda").t()]
    for rnd in range(3):
        for i, x in enumerate(layouts):
            n = x.shape[-1]
            got = layer_norm(x, w[:n], b[:n])
            want = F.layer_norm(x.float(), (n,), w[:n], b[:n]).to(x.dtype)
            torch.testing.assert_close(got, want, atol=2e-2 if x.dtype != torch.float32 else 1e-4, rtol=1e-2,
                                       msg=f"round {rnd} layout {i}")
    assert _launch.stats().get("hit", 0) > 0
