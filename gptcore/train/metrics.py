"""Numbers of a training run that need no trainer: the learning-rate schedule, the per-micro-batch
seed, peak FLOP/s for MFU, the memory lower bound checked at start-up, and the loss plot."""
from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Optional

from gptcore.config import GPTConfig
from gptcore.rundir import read_metrics
from gptcore.train.config import TrainConfig

# ---- runtime pieces ---------------------------------------------------------------------------------
# Dense bf16 tensor-core peak FLOP/s by GPU name (first match wins), for MFU.
PEAK_BF16_FLOPS = [
    (r"B200", 2250e12), (r"H200|GH200", 989e12), (r"H100.*PCIe", 756e12), (r"H100.*NVL", 835e12),
    (r"H100|H800", 989e12), (r"A100|A800", 312e12), (r"L40S", 362e12), (r"\bL4\b", 121e12),
    (r"RTX 4090", 165e12), (r"RTX 3090", 71e12), (r"V100", 125e12),
]


def peak_flops(device_name: str) -> Optional[float]:
    """Peak dense bf16 FLOP/s of the GPU called ``device_name`` (None if unknown)."""
    return next((f for pat, f in PEAK_BF16_FLOPS if re.search(pat, device_name)), None)


def micro_seed(seed: int, step: int, m: int) -> int:
    """The seed of micro-batch m (= rank * grad_accum + micro) of optimizer step ``step``."""
    digest = hashlib.blake2b(f"{seed}/{step}/{m}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def lr_at(step: int, cfg: TrainConfig, max_steps: int) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (cfg.lr - min_lr)



def plot_losses(metrics: Path, png: Path) -> str:
    """Train and val loss against step from metrics.jsonl into png; returns a one-line note."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed: skipped the loss curve (pip install matplotlib)"
    rows = read_metrics(metrics)
    train = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train" and r["loss"] is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if r["kind"] == "eval"]
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return f"loss curve: {png}"


def _peak_rss_gib() -> Optional[float]:
    try:
        import resource  # Unix only
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB (Linux) -> GiB


def _json_num(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None



def estimate_train_bytes(mc: GPTConfig, batch_size: int, backend: str, shards: int = 1) -> int:
    """A lower bound of the memory one training step of ``mc`` needs: fp32 weights, gradients and
    the two AdamW moments (16 bytes a parameter), plus a few fp32 activations per layer and token,
    plus the full logits where the backend materializes them and the T x T scores of reference attention.
    shards: ranks that FSDP spreads the weights, gradients and moments over (1: none)."""
    B, T, C, L, V = batch_size, mc.context_length, mc.emb_dim, mc.n_layers, mc.vocab_size
    params = V * C + (T * C if mc.pos_emb == "learned" else 0) + L * (4 + 2 * mc.ff_mult) * C * C
    acts = 4 * B * T * C * L * 4
    if backend != "triton":
        acts += 4 * B * T * V
    if backend == "reference":
        acts += 4 * B * mc.n_heads * T * T
    return 16 * params // max(1, shards) + acts  # FSDP: each rank holds 1/shards of the 16 bytes
