"""What a run reports: the start-up lines, metrics.jsonl rows, the per-step log line and the
end-of-run summary. Mixed into gptcore.train.loop.Trainer."""
from __future__ import annotations

import json
import math
import os
import shlex
import signal
import time

import torch

from gptcore.io import remove_stale_temps
from gptcore.rundir import append_run_marker, overwrite
from gptcore.train.config import TrainingError
from gptcore.train.metrics import _json_num, _peak_rss_gib, plot_losses


class ReportMixin:
    """Logging and metrics of the Trainer."""

    def _open_metrics(self) -> None:
        """metrics.jsonl is appended to, never truncated: a row {"kind": "run"} marks where this run
        starts (step 0) or resumes (its step); rundir.read_metrics applies it."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.cfg.overwrite and self.cfg.resume is None:
            removed = overwrite(self.out_dir)
            if removed:
                self.log(f"--overwrite: removed {', '.join(removed)} from {self.out_dir}")
        for p in remove_stale_temps(self.out_dir):
            self.log(f"removed {p.name}, left by an interrupted save")
        append_run_marker(self.metrics_path, {"event": "resume" if self.step else "start", "step": self.step,
                                              "from": str(self.last_ckpt) if self.step else None,
                                              "pid": os.getpid(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def _metric(self, row: dict) -> None:
        if self.dist.main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def _announce(self) -> None:
        if not self.dist.main:
            return
        cfg, m = self.cfg, self.model
        print("gptcore.train: config\n" + json.dumps(cfg.to_dict(), indent=1), flush=True)
        print(f"model: {json.dumps(m.config.to_dict())}", flush=True)
        report = ", ".join(f"{k}={v}" for k, v in m.backend_report().items())
        print(f"model: {m.num_params() / 1e6:.2f}M parameters, {self.init_note}; backend {m.backend} ({report})")
        print(f"device {self.device}, world {self.dist.world}, dtype {self.precision}"
              f"{', compiled' if cfg.compile else ''}{', grad checkpointing' if cfg.grad_checkpointing else ''}")
        print(self.parallel_note, flush=True)
        print(self.graph_note, flush=True)
        epochs = self.max_steps * self.tokens_per_step / max(1, self.data.manifest["train_tokens"])
        print(f"data: {cfg.data} ({self.data.manifest['train_tokens']:,} train / {self.data.manifest['val_tokens']:,} "
              f"val tokens, manifest {self.data.hash[:12]})")
        print(f"global batch: {cfg.batch_size} x grad_accum {cfg.grad_accum} x world {self.dist.world} = "
              f"{cfg.batch_size * cfg.grad_accum * self.dist.world} sequences of {self.T} = "
              f"{self.tokens_per_step:,} tokens/step; steps {self.step} -> {self.max_steps} (~{epochs:.2f} epochs)",
              flush=True)
        for note in self._resume_notes:
            print(note, flush=True)

    def _after_step(self, step: int, loss: float, gnorm: float, ok: bool, lr: float, tokens: int,
                    dt: float) -> None:
        """The metrics row, non-finite count and log line of one step, read back from the device."""
        cfg = self.cfg
        tok_s = self.tokens_per_step / dt
        mfu = (self.flops_per_token * tok_s / self.dist.world / self.peak) if self.peak else None
        if self.device.type == "cuda":
            mem = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            mem = _peak_rss_gib()
        self._metric({"kind": "train", "step": step, "loss": _json_num(loss), "lr": lr,
                      "grad_norm": _json_num(gnorm), "tokens": tokens, "tokens_per_s": tok_s,
                      "mfu": mfu, "mem_gib": mem, "skipped": not ok, "step_s": dt})
        if not ok:
            self.bad_run += 1
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            self.log(f"warning: step {step}: non-finite {what} (loss {loss}, grad norm {gnorm}); skipped the "
                     f"update ({self.bad_run}/{cfg.max_bad_steps} in a row)")
            if self.bad_run >= cfg.max_bad_steps:
                last = self.last_ckpt or "none (no checkpoint was saved)"
                raise TrainingError(
                    f"{self.bad_run} steps in a row had a non-finite loss or gradient; stopped at step {step}. "
                    f"Last good checkpoint: {last}. Try a lower --lr (now {cfg.lr}), --grad-clip 1.0, a longer "
                    f"--warmup-steps, or --dtype bf16/fp32 instead of fp16"
                )
        else:
            self.bad_run = 0
        mfu_s = f"{100 * mfu:.1f}%" if mfu is not None else "-"
        mem_s = f"{mem:.2f} GiB" if mem is not None else "-"
        if self.bar is not None:
            self.bar.update(1)
            if step % cfg.log_interval == 0 or step == self.max_steps:  # --log-interval: the bar's numbers
                self.bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {tok_s:,.0f} tok/s mfu {mfu_s} "
                                         f"mem {mem_s}", refresh=False)
        elif step % cfg.log_interval == 0 or step == self.max_steps:
            self.log(f"step {step}/{self.max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
                     f"grad norm {gnorm:.3f} | {tok_s:,.0f} tok/s | mfu {mfu_s} | mem {mem_s}")

    def _throughput(self) -> str:
        """Train tokens/s over the steps alone (evaluations, samples, checkpoints and the capture excluded),
        and without the first read-back interval (Triton JIT, autotuning, torch.compile warm-up)."""
        def rate(parts):
            n, sec = sum(p[0] for p in parts), sum(p[1] for p in parts)
            return n * self.tokens_per_step / sec if sec > 0 else float("nan")

        parts = self._train_time
        msg = f"throughput: {rate(parts):,.0f} tokens/s over the train steps (evaluations and checkpoints excluded)"
        if len(parts) > 1:
            msg += f"; {rate(parts[1:]):,.0f} tokens/s after the first {parts[0][0]} step(s)"
        return msg

    def _summary(self, losses, vals, elapsed, stopped_by) -> None:
        cfg = self.cfg
        good = [v for v in losses.values() if math.isfinite(v)]
        if good:
            tail = good[-min(10, len(good)):]
            msg = f"train loss {good[0]:.4f} -> {sum(tail) / len(tail):.4f} (mean of the last {len(tail)} steps)"
            if len(vals) > 1:
                last_step = max(vals)
                msg += f"; val loss {vals[min(vals)]:.4f} -> {vals[last_step]:.4f}"
            if self.best_val is not None:
                msg += f" (best {self.best_val:.4f})"
            print(f"{'stopped' if stopped_by else 'done'}: {len(losses)} steps, "
                  f"{len(losses) * self.tokens_per_step:,} tokens in {elapsed:.1f} s; {msg}", flush=True)
            print(self._throughput(), flush=True)
        if stopped_by is None:
            if cfg.sample_tokens:
                self._sample()
            print(plot_losses(self.metrics_path, self.out_dir / "loss.png"), flush=True)
            best = self.out_dir / "best"
            target = best if best.exists() else self.last_ckpt
            print(f"checkpoint: {self.last_ckpt}" + (f" (best: {best})" if best.exists() else ""))
            print(f"evaluate: python -m gptcore.eval --ckpt {shlex.quote(str(target))} --data {shlex.quote(cfg.data)}",
                  flush=True)
        else:
            name = signal.Signals(stopped_by).name
            hint = self.resume_hint or f"python -m gptcore.train --out-dir {shlex.quote(cfg.out_dir)} --resume auto"
            print(f"gptcore.train: stopped by {name} at step {self.step}; checkpoint saved to {self.last_ckpt}.\n"
                  f"resume with:\n  {hint}", flush=True)
