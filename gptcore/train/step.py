"""One optimizer step: the micro-batches of this rank (seeded by step), the eager step (DDP no_sync
on all but the last micro-batch, clipping, AdamW, the non-finite skip on the device), the captured
step (gptcore.graph_step) and the batched read-back of the step records. Mixed into Trainer."""
from __future__ import annotations

import os
import time
from contextlib import nullcontext
from typing import Callable

import torch
import torch.distributed as dist

from gptcore.graph_step import GraphedStep, clip_and_check, set_lr, skip_if
from gptcore.ops import device_time_first
from gptcore.train.config import TrainingError
from gptcore.train.metrics import lr_at, micro_seed


class StepMixin:
    """The optimizer step of the Trainer (see the module doc)."""

    # -- one step ---------------------------------------------------------------------------------
    # A step leaves its record on the device: [sum of its micro-batch losses, grad norm, ok(, stop)].
    # _read_back turns the queued records into metrics rows with one host sync every
    # _readback_interval() steps (and before evaluations, samples, checkpoints and the end).
    def train_step(self, stop_requested: Callable[[], bool] = lambda: False) -> bool:
        """Forward/backward over grad_accum micro-batches, then one optimizer update unless the loss
        or gradient is non-finite (decided on the device). Queues the step's record for _read_back and
        returns whether this process was asked to stop (under DDP the ranks agree at the read-back)."""
        lr = lr_at(self.step, self.cfg, self.max_steps)
        rec = self._graph_step(lr) if self.graph is not None else self._eager_step(lr, stop_requested)
        self.step += 1
        self.tokens += self.tokens_per_step
        self._pending.append((self.step, lr, self.tokens, rec))
        # one process: a signal that came during the update counts for this step already
        return not self.ddp and stop_requested()

    def _micro_batch(self, micro: int):
        """Micro-batch ``micro`` of this rank at the current step, on the device; seeds dropout too."""
        cfg = self.cfg
        seed = micro_seed(cfg.seed, self.step, self.dist.rank * cfg.grad_accum + micro)
        torch.manual_seed(seed)  # dropout masks, too, are a function of (seed, step, m)
        return self.data.get_batch("train", cfg.batch_size, self.T, torch.Generator().manual_seed(seed),
                                   self.device)  # (B, T), (B, T)

    def _graph_step(self, lr: float) -> torch.Tensor:
        for micro in range(self.cfg.grad_accum):
            self.graph.load(micro, *self._micro_batch(micro))
        # one seed per step for the graph's dropout (its micro-batches draw successive philox offsets)
        torch.manual_seed(micro_seed(self.cfg.seed, self.step, 0))
        return self.graph.replay(lr)

    def _eager_step(self, lr: float, stop_requested: Callable[[], bool]) -> torch.Tensor:
        cfg, accum = self.cfg, self.cfg.grad_accum
        set_lr(self.optimizer, lr)
        loss_sum = torch.zeros((), device=self.device)
        # the graph's device-time op variants, eagerly (for comparisons: more host time per op)
        device_first = os.environ.get("GPTCORE_DEVICE_TIME_FIRST") == "1"
        for micro in range(accum):
            x, y = self._micro_batch(micro)
            sync_later = self.ddp and not self.fsdp and micro < accum - 1  # DDP: all-reduce on the last only
            with (self.ddp_module.no_sync() if sync_later else nullcontext()), \
                    (device_time_first() if device_first else nullcontext()):
                with self.autocast():
                    loss = self.train_module(x, y)
                loss_sum += loss.detach().float()
                scaled = loss / accum
                # inside the mode: grad checkpointing's recompute runs in backward
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        stop = torch.zeros((), device=self.device)
        if self.ddp:
            packed = torch.stack([loss_sum, torch.full((), float(stop_requested()), device=self.device)])
            dist.all_reduce(packed)
            loss_sum, stop = packed[0], packed[1]
        params = list(self.model.parameters())
        if self.scaler is not None:
            # fp16: an overflowing gradient is routine; the scaler skips that update and lowers the scale.
            # A non-finite loss poisons the grads so that the scaler skips its update too.
            grads = [p.grad for p in params if p.grad is not None]
            torch._foreach_mul_(grads, torch.where(torch.isfinite(loss_sum), 1.0, float("nan")))
            self.scaler.unscale_(self.optimizer)
        # a fused AdamW (CUDA, no fp16 scaler, unsharded) takes the clipping factor as its grad_scale
        fold = (self.scaler is None and not self.fsdp
                and getattr(self.optimizer, "_step_supports_amp_scaling", False))
        gnorm, finite, clip_scale = clip_and_check(params, loss_sum, cfg.grad_clip, fold=fold)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # fused AdamW: the scaler's skip is decided on the device
            self.scaler.update()
            ok = torch.isfinite(loss_sum)
        elif getattr(self.optimizer, "_step_supports_amp_scaling", False):  # CUDA: fused AdamW
            skip_if(self.optimizer, (~finite).float(), clip_scale)
            ok = finite
        else:  # CPU: reading the flag costs no device sync
            ok = finite
            if bool(finite):
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return torch.stack([loss_sum, gnorm, ok.float(), stop])

    def _capture_graph(self) -> None:
        """Capture the step (--cuda-graph): after the optimizer state is restored, before the first step.
        With auto, a failed capture falls back to the eager step with a warning."""
        cfg = self.cfg
        gs = GraphedStep(self.train_module, list(self.model.parameters()), self.optimizer, accum=cfg.grad_accum,
                         batch_size=cfg.batch_size, seq_len=self.T, device=self.device, autocast=self.autocast,
                         grad_clip=cfg.grad_clip)
        for micro in range(cfg.grad_accum):  # the warm-up runs on the first step's batch (its updates skipped)
            gs.load(micro, *self._micro_batch(micro))
        t0 = time.perf_counter()
        try:
            gs.capture()
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - auto falls back, on reports it
            what = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            if cfg.cuda_graph == "on":
                raise TrainingError(f"--cuda-graph on: capturing the step failed ({what}); train with "
                                    f"--cuda-graph off (or auto, which falls back to the eager step)") from e
            self.optimizer.zero_grad(set_to_none=True)
            self.log(f"warning: cuda graph: capturing the step failed ({what}); falling back to the eager step")
            return
        self.graph = gs
        self.log(f"cuda graph: captured one optimizer step ({cfg.grad_accum} micro-batch"
                 f"{'es' if cfg.grad_accum > 1 else ''}) in {time.perf_counter() - t0:.1f} s")

    def _readback_interval(self) -> int:
        """Steps between host reads of the queued records: log_interval on a GPU; every step on the CPU,
        where reading costs no device sync."""
        return 1 if self.device.type == "cpu" else self.cfg.log_interval

    def _read_back(self) -> bool:
        """Read the queued step records (one sync), write their metrics rows, count non-finite steps.
        Returns whether any rank asked to stop during those steps."""
        if not self._pending:
            return False
        pending, self._pending = self._pending, []
        vals = torch.cat([rec.reshape(-1) for *_, rec in pending]).tolist()
        now = time.perf_counter()
        elapsed = now - self._mark
        self._train_time.append((len(pending), elapsed))
        dt = elapsed / len(pending)  # the steps ran back to back: each gets the mean
        self._mark = now
        div, i, stop = self.cfg.grad_accum * self.dist.world, 0, False
        for step, lr, tokens, rec in pending:
            row = vals[i:i + rec.numel()]
            i += rec.numel()
            stop = stop or (len(row) > 3 and row[3] > 0)
            loss = row[0] / div
            self._losses[step] = loss
            self._after_step(step, loss, row[1], row[2] > 0.5, lr, tokens, dt)
        return stop
