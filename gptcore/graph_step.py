"""One whole optimizer step captured in a CUDA graph, and the on-device pieces both step paths share.

    step = GraphedStep(loss_fn, params, optimizer, accum=2, batch_size=16, seq_len=1024, device=dev,
                       autocast=lambda: torch.autocast("cuda", torch.bfloat16), grad_clip=1.0)
    step.load(m, x, y)             # for m in range(accum): the micro-batches of the next step, (B, T) each
    step.capture()                 # once: warm-up on a side stream (no update), then the capture
    rec = step.replay(lr)          # (3,) fp32 on the device: [sum of micro-batch losses, grad norm, ok]

What one replay runs, with no Python and no host sync: for every micro-batch forward + loss under
autocast and backward of loss / accum (the grads set to None first, so the first backward writes them
into the graph's pool rather than adding into zeros; the ops in their device-time variants,
gptcore.ops.device_time_first); the gradient norm, with the clipping factor folded into the fused
AdamW's grad_scale (clip_and_check(fold=True): no pass over the grads); the skip decision (ok = loss sum and grad norm finite); AdamW (fused,
capturable, lr a device tensor filled before each replay) told to skip through ``found_inf``, the
attribute GradScaler sets on optimizers that support AMP scaling: torch's fused AdamW then leaves
params and moments untouched and takes back its step-count increment (torch/optim/adam.py,
_fused_adamw). The record is copied out of the graph's buffers, so the host reads many steps at once.

Dropout inside the graph draws from torch's CUDA generator, which a replay advances (philox offsets):
seeding the generator before each replay (torch.manual_seed) makes the masks a function of the seed
alone. Which micro-batch gets which mask differs from the eager step's (one seed per step, not per
micro-batch), so with dropout the two paths train on equally valid but different masks.

``unavailable_reason`` says why a configuration cannot use the graph (CPU, DDP, fp16 loss scaling,
torch.compile modes that capture graphs themselves, the triton attention's host-drawn dropout seed);
the trainer (gptcore.train, --cuda-graph) and the train bench (bench/train_step.py) both use this.

Tests: python -m pytest -q tests/test_graph_step.py  (the capture itself: -m gpu on a CUDA machine)
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Optional, Sequence

import torch
from torch import Tensor

from gptcore.captured_step import record
from gptcore.ops import device_time_first

MODES = ("auto", "on", "off")


class GraphUnavailable(ValueError):
    """--cuda-graph on where the step cannot be captured; the message says why and what to change."""


def unavailable_reason(*, device: torch.device, world: int = 1, precision: str = "bf16", compile: bool = False,
                       compile_mode: str = "default", backend: str = "triton", drop_rate: float = 0.0,
                       grad_checkpointing: bool = False, dynamic_shapes: bool = False) -> Optional[str]:
    """Why one optimizer step of this configuration cannot be captured in a CUDA graph (None: it can)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the device is {device.type}: CUDA graphs need a CUDA GPU"
    if world > 1:
        return (f"DDP (world {world}): its gradient all-reduce hooks and bucket rebuilds are not captured here; "
                f"each rank runs the eager step")
    if precision == "fp16":
        return "fp16 loss scaling (GradScaler) is not captured; --dtype bf16 or fp32 can use the graph"
    if compile and compile_mode in ("reduce-overhead", "max-autotune"):
        return f"torch.compile mode {compile_mode!r} captures CUDA graphs of its own"
    if backend == "triton" and drop_rate > 0:
        return ("the triton attention draws its dropout seed on the host, so a graph would replay one mask "
                "every step; use --drop-rate 0, --backend torch, or --cuda-graph off")
    if grad_checkpointing and drop_rate > 0:
        return ("grad checkpointing with dropout: the recompute restores the RNG state with host calls that a "
                "replay would not repeat (its masks would differ from the forward's); use --drop-rate 0 or "
                "--cuda-graph off")
    if dynamic_shapes:
        return "the batch shapes change from step to step; a graph replays one shape"
    return None


def resolve(mode: str, reason: Optional[str]) -> tuple[bool, str]:
    """(use the graph, the start-up line saying so) for --cuda-graph ``mode``; ``on`` with a reason raises."""
    if mode not in MODES:
        raise ValueError(f"cuda_graph must be one of {MODES}, got {mode!r}")
    if mode == "off":
        return False, "cuda graph: off (--cuda-graph off): eager step"
    if reason is None:
        how = "default" if mode == "auto" else "--cuda-graph on"
        return True, f"cuda graph: on ({how}): one replay per optimizer step, losses read back every log interval"
    if mode == "on":
        raise GraphUnavailable(f"--cuda-graph on: cannot capture the step: {reason} (or use --cuda-graph auto, "
                               f"which falls back to the eager step)")
    return False, f"cuda graph: off (auto: {reason}): eager step"


# ---- the optimizer on the device --------------------------------------------------------------------
def adamw(groups, lr: float, betas, device: torch.device) -> torch.optim.AdamW:
    """AdamW as both step paths use it: on CUDA fused and capturable with lr a device tensor (so a graph
    can replay it and the skip is decided on the device); elsewhere torch's default implementation."""
    if torch.device(device).type == "cuda":
        lr_t = torch.tensor(float(lr), dtype=torch.float32, device=device)
        return torch.optim.AdamW(groups, lr=lr_t, betas=betas, fused=True, capturable=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's lr := lr, in place where it is a device tensor (no sync, and a graph sees it)."""
    for g in optimizer.param_groups:
        if isinstance(g["lr"], Tensor):
            g["lr"].fill_(lr)
        else:
            g["lr"] = lr


def after_load_state_dict(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Undo what Optimizer.load_state_dict takes from the checkpoint but belongs to this run's device:
    the implementation flags and the lr object (load_state_dict copies them from the saved groups, so a
    CPU run's checkpoint would make a GPU run's AdamW unfused), and the device and dtype of each ``step``
    (on the params' device in fp32 for fused/capturable, as torch's own state init makes it)."""
    d = optimizer.defaults
    device_lr = d["lr"] if isinstance(d["lr"], Tensor) else None
    for g in optimizer.param_groups:
        for k in ("fused", "capturable", "foreach", "differentiable"):
            if k in d:
                g[k] = d[k]
        g["lr"] = device_lr if device_lr is not None else float(g["lr"])
        on_device = bool(g.get("fused") or g.get("capturable"))
        for p in g["params"]:
            st = optimizer.state.get(p)
            if st and isinstance(st.get("step"), Tensor):
                step = st["step"]
                st["step"] = (step.to(device=p.device, dtype=torch.float32) if on_device
                              else step.to(device="cpu", dtype=torch.float32))
    if device_lr is not None:
        device_lr.fill_(lr)


def portable_state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with a device-tensor lr written as a float (the checkpoint stays loadable
    anywhere; the value is reset before every step anyway)."""
    sd = optimizer.state_dict()
    for g in sd["param_groups"]:
        if isinstance(g.get("lr"), Tensor):
            g["lr"] = float(g["lr"])
    return sd


def skip_if(optimizer: torch.optim.Optimizer, found_inf: Tensor, grad_scale: Optional[Tensor] = None) -> None:
    """optimizer.step(), skipped on the device where found_inf (fp32 scalar) is 1: the fused AdamW reads
    it the way GradScaler hands it over, and undoes its step-count increment. grad_scale (fp32 scalar on
    the device, or None): the fused kernel divides every gradient by it before the update (clip_and_check
    folds the clipping factor into it)."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        raise TypeError(f"{type(optimizer).__name__} cannot skip a step on the device (use a fused AdamW)")
    optimizer.found_inf = found_inf
    optimizer.grad_scale = grad_scale
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf, optimizer.grad_scale


def clip_and_check(params: Sequence[Tensor], loss_sum: Tensor, grad_clip: float,
                   fold: bool = False) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(grad norm fp32, finite bool, grad_scale) for clipping the grads to grad_clip (0: no clipping),
    on the device. fold False: the grads are scaled in place (clip_grad_norm_) and grad_scale is None.
    fold True (for a fused AdamW, see skip_if): the grads are left as they are and grad_scale =
    max((norm + 1e-6) / grad_clip, 1), the inverse of clip_grad_norm_'s factor, which the optimizer
    divides by: the same update without a read-modify-write pass over every gradient."""
    foreach = True if loss_sum.is_cuda else None  # None: torch's per-tensor loop on the CPU, as before
    if not fold:
        gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"), foreach=foreach)
    else:
        gnorm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=foreach)
    if hasattr(gnorm, "full_tensor"):  # FSDP's sharded grads give a DTensor norm (already reduced)
        gnorm = gnorm.full_tensor()
    gnorm = gnorm.float().to(loss_sum.device)  # CPU-offloaded grads: the norm comes back beside the loss
    scale = torch.clamp((gnorm + 1e-6) / grad_clip, min=1.0) if fold and grad_clip else None
    return gnorm, torch.isfinite(loss_sum) & torch.isfinite(gnorm), scale


# ---- the captured step ------------------------------------------------------------------------------
class GraphedStep:
    """One optimizer step (all micro-batches, clipping, on-device skip, AdamW) as one CUDA graph.

    loss_fn(x, y) -> scalar loss; x, y are (B, T) int64 views of the static buffers ``x``/``y``
    (accum, B, T). The optimizer must be a fused, capturable AdamW whose groups' lr is one device
    tensor (gptcore.graph_step.adamw); its state (restored from a checkpoint or not) must be in place
    before capture(): the graph holds the addresses of params, grads and moments.
    """

    def __init__(self, loss_fn: Callable[[Tensor, Tensor], Tensor], params: Sequence[Tensor],
                 optimizer: torch.optim.Optimizer, *, accum: int, batch_size: int, seq_len: int,
                 device: torch.device, autocast: Callable[[], ContextManager] = nullcontext,
                 grad_clip: float = 0.0, warmup: int = 3):
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"GraphedStep needs a CUDA device, got {device}")
        lrs = {id(g["lr"]) for g in optimizer.param_groups}
        if not all(isinstance(g["lr"], Tensor) and g["lr"].is_cuda for g in optimizer.param_groups) or len(lrs) != 1:
            raise ValueError("GraphedStep needs every param group's lr to be one CUDA tensor "
                             "(build the optimizer with gptcore.graph_step.adamw)")
        if not all(g.get("fused") and g.get("capturable") for g in optimizer.param_groups):
            raise ValueError("GraphedStep needs a fused AdamW with capturable=True (gptcore.graph_step.adamw)")
        self.loss_fn, self.optimizer = loss_fn, optimizer
        self.params = [p for p in params if p.requires_grad]
        self.accum, self.device, self.autocast, self.grad_clip = accum, device, autocast, grad_clip
        self.warmup = warmup
        self.lr = optimizer.param_groups[0]["lr"]
        self.x = torch.zeros((accum, batch_size, seq_len), dtype=torch.int64, device=device)  # (A, B, T)
        self.y = torch.zeros_like(self.x)
        self.record = torch.zeros(3, dtype=torch.float32, device=device)  # loss sum, grad norm, ok
        self._found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self._force_skip = torch.zeros((), dtype=torch.float32, device=device)
        self.graph: Optional[torch.cuda.CUDAGraph] = None

    def load(self, micro: int, x: Tensor, y: Tensor) -> None:
        """Copy micro-batch ``micro`` of the next step into the static buffers (no sync)."""
        if tuple(x.shape) != tuple(self.x.shape[1:]) or tuple(y.shape) != tuple(self.y.shape[1:]):
            raise ValueError(f"GraphedStep replays batches of shape {tuple(self.x.shape[1:])}, got x "
                             f"{tuple(x.shape)}, y {tuple(y.shape)}: a graph replays one shape")
        self.x[micro].copy_(x, non_blocking=True)
        self.y[micro].copy_(y, non_blocking=True)

    def _body(self) -> None:
        """The step itself: what capture() records and what run_eager() runs without a graph."""
        for p in self.params:
            # made afresh by the first backward (in the graph's pool when capturing): no zeroing pass,
            # and no accumulate-add of the first micro-batch's gradient into zeros
            p.grad = None
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        with device_time_first():  # host work here is paid once, at capture
            for m in range(self.accum):
                with self.autocast():
                    loss = self.loss_fn(self.x[m], self.y[m])
                loss_sum += loss.detach().float()
                (loss / self.accum).backward()
        gnorm, finite, scale = clip_and_check(self.params, loss_sum, self.grad_clip, fold=True)
        torch.maximum((~finite).float(), self._force_skip, out=self._found_inf)
        skip_if(self.optimizer, self._found_inf, scale)
        torch.stack([loss_sum, gnorm, finite.float()], out=self.record)

    def capture(self) -> None:
        """Warm up on a side stream (Triton JIT, autotuning, torch.compile, optimizer state, grads), every
        update skipped so params and moments stay as they are, then capture one step."""
        if self.graph is not None:
            return
        cur = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(cur)
        self._force_skip.fill_(1.0)
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._body()
        cur.wait_stream(side)
        self._force_skip.fill_(0.0)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # the warm-up's cached blocks: the graph gets its own pool
        missing = [i for i, p in enumerate(self.params) if p.grad is None]
        if missing:
            raise RuntimeError(f"GraphedStep: {len(missing)} parameter(s) got no gradient in the warm-up "
                               f"(first: #{missing[0]}); a graph needs every grad to exist before capture")
        graph = torch.cuda.CUDAGraph()
        record(graph, self._body)
        self.graph = graph

    def replay(self, lr: float) -> Tensor:
        """One optimizer step at learning rate lr; returns a copy of its record (no sync)."""
        if self.graph is None:
            raise RuntimeError("GraphedStep.replay before capture()")
        self.lr.fill_(lr)
        self.graph.replay()
        return self.record.clone()

    def run_eager(self, lr: float) -> Tensor:
        """The same step without the graph (for comparisons); returns a copy of its record."""
        self.lr.fill_(lr)
        self._body()
        return self.record.clone()
