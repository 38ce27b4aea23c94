"""The Trainer: set-up (precision, data, model, optimizer, DDP, compile), the run loop (steps,
evaluations, samples, checkpoints, signals), logging and the end-of-run summary. Resume/save live
in gptcore.train.state, the step in gptcore.train.step."""
from __future__ import annotations

import json
import math
import os
import shlex
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from gptcore.checkpoint import CheckpointError, backend_for, remove_stale_temps
from gptcore.cli import UsageError, refuse_if_too_big
from gptcore.config import GPTConfig
from gptcore.data import prepare
from gptcore.generate import Generator
from gptcore.graph_step import GraphedStep, GraphUnavailable, adamw, resolve, unavailable_reason
from gptcore.rundir import append_run_marker, overwrite
from gptcore.tokenizer import ENDOFTEXT, get_encoding
from gptcore.train.config import (DEFAULT_MAX_STEPS, DTYPES, EVAL_SEED, TOKENIZER, ConfigError, TrainConfig,
                                  TrainingError)
from gptcore.train.distributed import _Dist, _LossModule
from gptcore.train.metrics import _json_num, _peak_rss_gib, estimate_train_bytes, peak_flops, plot_losses
from gptcore.train.signals import _GracefulStop, _StoppedInEval
from gptcore.train.state import StateMixin
from gptcore.train.step import StepMixin


@dataclass
class TrainResult:
    out_dir: Path
    step: int                          # optimizer steps completed (skipped non-finite steps count)
    tokens: int                        # tokens seen
    losses: dict[int, float]           # step -> mean train loss of that step (steps run in this call)
    val_losses: dict[int, float]       # step -> val loss
    best_val: Optional[float]
    last_checkpoint: Optional[Path]
    stopped_by: Optional[int] = None   # SIGINT / SIGTERM when a signal stopped the run




@torch.no_grad()
def sample_text(model, prompt: str, max_new_tokens: int, temperature: float, seed: int) -> str:
    """A continuation of ``prompt`` drawn by gptcore.generate (KV cache, seeded sampling; eager, no graph
    capture for a few dozen tokens). Past the model's context each round restarts from the newest half
    context of tokens, as a sliding window would."""
    enc = get_encoding(TOKENIZER)
    ids = enc.encode(prompt, allowed_special={ENDOFTEXT}) or [enc.eot_token]
    ctx = model.config.context_length
    gen = Generator(model, cuda_graph=False)
    seq, left, rnd = list(ids), max_new_tokens, 0
    while left > 0:
        keep = min(len(seq), ctx - min(left, max(1, ctx // 2)))  # >= 1 token of context, room for the new ones
        new = gen.generate([seq[-keep:]], min(left, ctx - keep), temperature=temperature, seed=seed + rnd)[0]
        seq += new
        left -= len(new)
        rnd += 1
    return enc.decode(seq[len(ids):])


class Trainer(StateMixin, StepMixin):
    """One training run; ``run()`` trains to max_steps (see gptcore.train's module doc)."""

    def __init__(self, cfg: TrainConfig, dist_: _Dist, resume_hint: Optional[str] = None):
        self.cfg, self.dist, self.device = cfg, dist_, dist_.device
        self.resume_hint = resume_hint
        self.out_dir = Path(cfg.out_dir)
        self.bar = None
        self._resume_notes: list[str] = []
        self.precision = self._precision()
        self.backend = cfg.backend or backend_for(self.device)
        torch.manual_seed(cfg.seed)
        ck = self._find_resume()
        self.data = self._prepare_data()
        if ck is not None or cfg.init_from == "scratch":  # sizes known before a byte is allocated
            try:
                mc = ck.model_config if ck is not None else GPTConfig.from_preset(cfg.preset, **cfg.model)
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"{ck.path}/meta.json: invalid model_config ({e})") from None
            self._check_fits(mc)
        self.model = self._build_model(ck)
        self._check_fits(self.model.config)
        self.T = self.model.config.context_length
        if self.model.config.vocab_size < self.data.manifest["n_vocab"]:
            self.data.check_vocab(self.model.config.vocab_size)
        self.data.check_block("train", self.T)
        self.eval_batches = self._eval_batches()
        self.model.to(self.device).train()
        self.model.grad_checkpointing = cfg.grad_checkpointing
        self.use_graph, self.graph_note = self._graph_decision()
        self.graph: Optional[GraphedStep] = None  # captured in run(), after the optimizer state is restored
        self._pending: list = []  # (step, lr, tokens, device record) of the steps not read back yet
        self._losses: dict[int, float] = {}  # step -> mean train loss, as read back
        self._train_time: list[tuple[int, float]] = []  # (steps, seconds) of each read-back interval
        self._mark = time.perf_counter()  # start of the current read-back interval
        self.optimizer = self._optimizer()
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.step, self.tokens, self.best_val, self.bad_run = 0, 0, None, 0
        self.last_ckpt: Optional[Path] = None
        self._written_ckpts: set[Path] = set()  # ckpt-* this process saved: the only ones --keep-last prunes
        self.last_val: Optional[float] = None
        if ck is not None:
            self._restore(ck)
        self.tokens_per_step = cfg.batch_size * cfg.grad_accum * dist_.world * self.T
        self.max_steps = self._max_steps()
        module: nn.Module = _LossModule(self.model)
        if dist_.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        self.ddp = dist_.world > 1
        self.ddp_module = module  # no_sync() lives here; the compiled wrapper calls into it
        mode = None if cfg.compile_mode == "default" else cfg.compile_mode
        self.train_module = torch.compile(module, mode=mode) if cfg.compile else module
        self.flops_per_token = self.model.flops_per_token(self.T)
        self.peak = peak_flops(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None
        self.metrics_path = self.out_dir / "metrics.jsonl"
        if dist_.main:
            self._open_metrics()
        self._announce()

    # -- setup ------------------------------------------------------------------------------------
    def _precision(self) -> str:
        want, cuda = self.cfg.dtype, self.device.type == "cuda"
        if want == "auto":
            return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
        if want == "fp16" and not cuda:
            raise ConfigError("--dtype fp16 needs a CUDA GPU (its loss scaling is CUDA-only); "
                              "on a CPU use fp32 or bf16")
        if want == "bf16" and cuda and not torch.cuda.is_bf16_supported():
            raise ConfigError("this GPU has no bf16: use --dtype fp16 (with loss scaling) or fp32")
        return want

    def autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=DTYPES[self.precision])

    def log(self, msg: str) -> None:
        if not self.dist.main:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stdout)
        else:
            print(msg, flush=True)

    def _prepare_data(self):
        cfg = self.cfg
        # rank 0 tokenizes and fills the cache; the others then read it
        if not self.dist.main:
            self.dist.barrier()
        data = prepare(cfg.data, tokenizer=TOKENIZER, val_fraction=cfg.val_fraction, errors=cfg.data_errors,
                       progress=self.dist.main and cfg.progress)
        if self.dist.main:
            self.dist.barrier()
        return data

    def _graph_decision(self) -> tuple[bool, str]:
        """--cuda-graph: whether run() captures the step, and the start-up line that says so (and why not)."""
        cfg = self.cfg
        reason = unavailable_reason(device=self.device, world=self.dist.world, precision=self.precision,
                                    compile=cfg.compile, compile_mode=cfg.compile_mode, backend=self.backend,
                                    drop_rate=self.model.config.drop_rate,
                                    grad_checkpointing=cfg.grad_checkpointing)
        try:
            return resolve(cfg.cuda_graph, reason)
        except GraphUnavailable as e:
            raise ConfigError(str(e)) from None

    def _optimizer(self) -> torch.optim.Optimizer:
        """AdamW; on CUDA fused and capturable with a device lr, for the graph and the eager step alike
        (so both skip a non-finite step on the device and a checkpoint resumes on either)."""
        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        other = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
        return adamw(groups, self.cfg.lr, self.cfg.betas, self.device)

    def _max_steps(self) -> int:
        cfg = self.cfg
        if cfg.max_steps is not None:
            return cfg.max_steps
        if cfg.max_tokens is not None:
            return math.ceil(cfg.max_tokens / self.tokens_per_step)
        if cfg.epochs is not None:
            return math.ceil(cfg.epochs * self.data.manifest["train_tokens"] / self.tokens_per_step)
        return DEFAULT_MAX_STEPS

    def _check_fits(self, mc: GPTConfig) -> None:
        """Refuse, before allocating, a model and batch that cannot fit this device at all."""
        c = self.cfg
        need = estimate_train_bytes(mc, c.batch_size, self.backend)
        try:
            refuse_if_too_big(f"training {mc.n_layers} layers x width {mc.emb_dim} (vocab {mc.vocab_size}) at "
                              f"batch_size {c.batch_size} x context_length {mc.context_length}", need, self.device,
                              "lower --batch-size (raise --grad-accum to keep the global batch), shorten "
                              "--context-length, or pick a smaller model")
        except UsageError as e:
            raise ConfigError(str(e)) from None

    def _eval_batches(self) -> list:
        n_val = len(self.data.splits["val"])
        if n_val < self.T + 1:
            self.log(f"warning: the val split has {n_val} tokens, fewer than one window of {self.T + 1}: "
                     f"no evaluation and no best/ checkpoint (raise --val-fraction or add data)")
            return []
        c = self.cfg
        need = c.eval_steps * c.batch_size * self.T * 16  # x and y, int64
        try:
            refuse_if_too_big(f"--eval-steps {c.eval_steps} (held-out batches of {c.batch_size} x {self.T} tokens, "
                              f"kept in memory)", need, "cpu", "lower --eval-steps")
        except UsageError as e:
            raise ConfigError(str(e)) from None
        gen = torch.Generator().manual_seed(EVAL_SEED)
        steps = range(c.eval_steps)
        if self.dist.main and c.progress and c.eval_steps >= 200:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="eval batches", leave=False, dynamic_ncols=True)
        out = []
        for _ in steps:
            out.append(self.data.get_batch("val", c.batch_size, self.T, gen))
        return out

    def stop_after_eval(self, signum: int) -> TrainResult:
        """A signal stopped an evaluation: save the state of the last finished step, say how to resume."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.last_ckpt is None or self.last_ckpt.name != f"ckpt-{self.step:07d}":
            self.save()
        if self.dist.main:
            self.log(f"gptcore.train: {signal.Signals(signum).name} during the evaluation at step {self.step}: "
                     f"stopped without its val loss")
            self._summary({}, {}, 0.0, signum)
        return TrainResult(self.out_dir, self.step, self.tokens, {}, {}, self.best_val, self.last_ckpt, signum)

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

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Mean loss over the fixed val windows (shared out over ranks)."""
        if not self.eval_batches:
            return None
        self.model.eval()
        tot = torch.zeros(2, dtype=torch.float64, device=self.device)
        idx = range(self.dist.rank, len(self.eval_batches), self.dist.world)
        bar = None
        if self.dist.main and len(idx) >= 50:  # long evaluations show progress at once
            from tqdm.auto import tqdm

            bar = tqdm(total=len(idx), desc="eval", leave=False, dynamic_ncols=True, disable=not self.cfg.progress)
            self.log(f"evaluating {len(self.eval_batches)} batches (--eval-steps); Ctrl-C / SIGTERM stops "
                     f"after the current batch")
        for i in idx:
            stopper = _GracefulStop.active
            if stopper is not None and stopper.signum is not None and not self.ddp:
                if bar is not None:
                    bar.close()
                self.model.train()
                raise _StoppedInEval(stopper.signum)
            if bar is not None:
                bar.update(1)
            x, y = (t.to(self.device) for t in self.eval_batches[i])
            with self.autocast():
                tot[0] += self.model.loss(x, y).double()
            tot[1] += 1
        if bar is not None:
            bar.close()
        if self.ddp:
            dist.all_reduce(tot)
        self.model.train()
        return (tot[0] / tot[1]).item()

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.cfg
        vals = {}
        self._losses, self._train_time = {}, []
        if self.step == 0 and self.eval_batches:
            val = vals[0] = self.last_val = self.evaluate()
            self._metric({"kind": "eval", "step": 0, "val_loss": val, "val_ppl": math.exp(min(val, 50))})
            self.log(f"step 0: val loss {val:.4f}")
        if self.use_graph and self.graph is None and self.step < self.max_steps:
            self._capture_graph()
        stopped_by = None
        saved_at = -1
        t_start = time.perf_counter()
        with _GracefulStop(self.dist.main) as stopper:
            if self.dist.main and cfg.progress:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=self.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
            try:
                self._mark = time.perf_counter()
                every = self._readback_interval()
                while self.step < self.max_steps:
                    stop = self.train_step(lambda: stopper.signum is not None)
                    s = self.step
                    evaluate = bool(self.eval_batches and cfg.eval_interval and s % cfg.eval_interval == 0
                                    and s < self.max_steps)
                    sample = bool(cfg.sample_every and cfg.sample_tokens and s % cfg.sample_every == 0)
                    periodic = bool(cfg.ckpt_interval and s % cfg.ckpt_interval == 0)
                    if stop or evaluate or sample or periodic or s % every == 0 or s == self.max_steps:
                        stop = self._read_back() or stop  # rows, non-finite count and the ranks' stop flags
                    if evaluate:
                        vals[s] = self._eval_and_best()
                    if sample:
                        self._sample()
                    if stop or (periodic and self.bad_run == 0 and s < self.max_steps):
                        self.save()
                        saved_at = s
                    if stop:
                        stopped_by = stopper.signum or signal.SIGTERM  # a peer rank got the signal
                        break
                    if not self._pending:  # evaluations, samples and checkpoints are not train time
                        self._mark = time.perf_counter()
            finally:
                if self.bar is not None:
                    self.bar.close()
                    self.bar = None
            if stopped_by is None:  # still inside: a signal now does not cut the final save short
                if self.eval_batches and self.step not in vals:
                    vals[self.step] = self._eval_and_best()
                if saved_at != self.step:
                    self.save()
        elapsed = time.perf_counter() - t_start
        if self.dist.main:
            self._summary(self._losses, vals, elapsed, stopped_by)
        self.dist.barrier()
        return TrainResult(self.out_dir, self.step, self.tokens, self._losses, vals, self.best_val, self.last_ckpt,
                           stopped_by)

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

    def _eval_and_best(self) -> float:
        val = self.last_val = self.evaluate()
        self._metric({"kind": "eval", "step": self.step, "val_loss": val, "val_ppl": math.exp(min(val, 50))})
        better = self.best_val is None or val < self.best_val
        if better:
            self.best_val = val
            self.save("best")
        self.log(f"step {self.step}: val loss {val:.4f}{' (best)' if better else ''}")
        return val

    def _sample(self) -> None:
        if self.dist.main:
            cfg = self.cfg
            text = sample_text(self.model, cfg.sample_prompt, cfg.sample_tokens, cfg.sample_temperature,
                               seed=cfg.seed + self.step)
            self.log(f"sample @ step {self.step}: {cfg.sample_prompt + text!r}")

    def _oom_message(self) -> str:
        c = self.cfg
        return (f"out of GPU memory at batch_size {c.batch_size}, context_length {self.T}, grad_accum "
                f"{c.grad_accum}, dtype {self.precision}, grad_checkpointing {c.grad_checkpointing}. To fit: "
                f"lower --batch-size and raise --grad-accum by the same factor (same global batch), add "
                f"--grad-checkpointing, use --dtype bf16, or shorten --context-length")

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
