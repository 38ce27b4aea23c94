"""PNG plots of a bench run (matplotlib, if installed): attention TFLOP/s against T per
implementation, and train-step tokens/s and peak memory per configuration.

Called by ``python -m bench``; each function returns the written path, or None when there is
nothing to plot or matplotlib is missing.
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _dim(row: dict, *names: str) -> int | None:
    """A named dimension of a row: a top-level key, a key of a dict shape, or 'T=4096' / 'T4096'
    inside a string shape."""
    for n in names:
        if isinstance(row.get(n), int):
            return row[n]
        shape = row.get("shape")
        if isinstance(shape, dict) and isinstance(shape.get(n), int):
            return shape[n]
        if isinstance(shape, str):
            m = re.search(rf"(?<![A-Za-wyz]){n}\s*=?\s*(\d+)", shape)  # 'x' may separate: B4xT1024
            if m:
                return int(m.group(1))
    return None


def plot_attention(rows: list[dict], path: Path) -> Path | None:
    """One panel per (op, head_dim, dtype): TFLOP/s against T, one line per impl."""
    plt = _pyplot()
    pts = [r for r in rows if r.get("area") == "attention" and isinstance(r.get("TFLOPs"), (int, float))
           and _dim(r, "T", "Tq", "seq_len")]
    if plt is None or not pts:
        return None
    panels: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in pts:
        key = (r.get("op", "attention"), _dim(r, "D", "head_dim"), r.get("dtype"))
        panels[key][str(r.get("impl"))].append((_dim(r, "T", "Tq", "seq_len"), r["TFLOPs"]))
    n = len(panels)
    cols = min(n, 2)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(6.5 * cols, 4.2 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, (key, lines) in zip(axes.flat, sorted(panels.items(), key=lambda kv: str(kv[0]))):
        for impl, xy in sorted(lines.items()):
            xy.sort()
            ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=impl)
        op, d, dtype = key
        ax.set_title(" ".join(str(p) for p in (op, f"D={d}" if d else None, dtype) if p))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("TFLOP/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_train(rows: list[dict], path: Path) -> Path | None:
    """Bars: tokens/s and peak GiB of the train step per configuration."""
    plt = _pyplot()
    pts = [r for r in rows if r.get("area") == "train" and r.get("op") == "train_step" and r.get("tokens_per_s")]
    if plt is None or not pts:
        return None
    labels = [r["impl"] for r in pts]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    a.bar(labels, [r["tokens_per_s"] / 1e3 for r in pts], color="tab:blue")
    a.set_ylabel("k tokens/s")
    a.set_title(f"train step, {pts[0].get('preset')} {pts[0].get('shape')}")
    mem = [r.get("peak_GiB") or 0.0 for r in pts]
    b.bar(labels, mem, color="tab:orange")
    if not any(mem):
        b.text(0.5, 0.5, "not measured (CUDA only)", ha="center", va="center", transform=b.transAxes)
    b.set_ylabel("peak GiB")
    b.set_title("peak memory of one step")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
