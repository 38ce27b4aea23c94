"""The Trainer: set-up (precision, data, model, DDP or FSDP, optimizer, compile), evaluation, samples
and the run loop (steps, evaluations, samples, checkpoints, signals). Resume and save live in
gptcore.train.state, the step in gptcore.train.step, logging and the summary in gptcore.train.report."""
from __future__ import annotations

import math
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

from gptcore.io import CheckpointError
from gptcore.ops import default_backend
from gptcore.cli import UsageError, refuse_if_too_big
from gptcore.config import GPTConfig
from gptcore.data import prepare
from gptcore.generate import Generator
from gptcore.graph_step import GraphedStep, GraphUnavailable, adamw, resolve, unavailable_reason
from gptcore.tokenizer import ENDOFTEXT, get_encoding
from gptcore.train.config import DEFAULT_MAX_STEPS, DTYPES, EVAL_SEED, TOKENIZER, ConfigError, TrainConfig
from gptcore.train.distributed import _Dist, _LossModule, choose_parallel, shard_model
from gptcore.train.metrics import estimate_train_bytes, peak_flops
from gptcore.train.signals import _GracefulStop, _StoppedInEval
from gptcore.train.report import ReportMixin
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


class Trainer(StateMixin, StepMixin, ReportMixin):
    """One training run; ``run()`` trains to max_steps (see gptcore.train's module doc)."""

    fsdp_refusal: Optional[str] = None  # why a subclass cannot run under FSDP (None: it can)

    def __init__(self, cfg: TrainConfig, dist_: _Dist, resume_hint: Optional[str] = None):
        self.cfg, self.dist, self.device = cfg, dist_, dist_.device
        self.resume_hint = resume_hint
        self.out_dir = Path(cfg.out_dir)
        self.bar = None
        self._resume_notes: list[str] = []
        self.precision = self._precision()
        self.backend = cfg.backend or default_backend(self.device)
        torch.manual_seed(cfg.seed)
        ck = self._find_resume()
        self.data = self._prepare_data()
        if ck is not None or cfg.init_from == "scratch":  # sizes known before a byte is allocated
            try:
                mc = ck.model_config if ck is not None else GPTConfig.from_preset(cfg.preset, **cfg.model)
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"{ck.path}/meta.json: invalid model_config ({e})") from None
            self._check_fits(mc, shards=1 if cfg.parallel == "ddp" else dist_.world)  # a lower bound: FSDP may come
        self.model = self._build_model(ck)
        self.T = self.model.config.context_length
        if self.model.config.vocab_size < self.data.manifest["n_vocab"]:
            self.data.check_vocab(self.model.config.vocab_size)
        self.data.check_block("train", self.T)
        self.eval_batches = self._eval_batches()
        self.model.to(self.device).train()
        self.model.grad_checkpointing = cfg.grad_checkpointing
        self.parallel, self.parallel_note = choose_parallel(
            cfg.parallel, self.model, world=dist_.world, device=self.device, batch_size=cfg.batch_size,
            seq_len=self.T, precision=self.precision, refusal=self.fsdp_refusal)
        self.fsdp = self.parallel == "fsdp"
        self._check_fits(self.model.config, shards=dist_.world if self.fsdp else 1)
        if self.fsdp:  # before the optimizer: it must hold the sharded parameters
            self.parallel_note += "\n" + shard_model(self.model, self.device, self.precision, cfg.fsdp_cpu_offload)
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
        if dist_.world > 1 and not self.fsdp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(module, device_ids=ids, bucket_cap_mb=cfg.ddp_bucket_mb)
            self.parallel_note += (f"\nddp: gradients all-reduced in buckets of {cfg.ddp_bucket_mb} MiB "
                                   f"(--ddp-bucket-mb) while backward runs"
                                   + (f"; no all-reduce on the first {cfg.grad_accum - 1} micro-batch(es) of a step "
                                      f"(no_sync)" if cfg.grad_accum > 1 else ""))
        self.ddp = dist_.world > 1  # more than one process: the ranks agree on losses and stop flags
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
        fsdp = "FSDP: its all-gather and reduce-scatter hooks are not captured here; each rank runs the eager step"
        reason = (fsdp if self.fsdp else None) or unavailable_reason(
                                    device=self.device, world=self.dist.world, precision=self.precision,
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
        # FSDP with CPU offload: the sharded params and their grads live on the CPU, and so does the step
        where = torch.device("cpu") if self.fsdp and self.cfg.fsdp_cpu_offload else self.device
        return adamw(groups, self.cfg.lr, self.cfg.betas, where)

    def _max_steps(self) -> int:
        cfg = self.cfg
        if cfg.max_steps is not None:
            return cfg.max_steps
        if cfg.max_tokens is not None:
            return math.ceil(cfg.max_tokens / self.tokens_per_step)
        if cfg.epochs is not None:
            return math.ceil(cfg.epochs * self.data.manifest["train_tokens"] / self.tokens_per_step)
        return DEFAULT_MAX_STEPS

    def _check_fits(self, mc: GPTConfig, shards: int = 1) -> None:
        """Refuse, before allocating, a model and batch that cannot fit this device at all (shards: the
        ranks FSDP spreads the weights and optimizer state over)."""
        c = self.cfg
        need = estimate_train_bytes(mc, c.batch_size, self.backend, shards)
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

    def _eval_totals(self) -> Optional[torch.Tensor]:
        """The start of an evaluation: None without val batches, else the model in eval mode and
        the (2,) float64 totals [loss sum, count] the evaluation adds into."""
        if not self.eval_batches:
            return None
        self.model.eval()
        return torch.zeros(2, dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Mean loss over the fixed val windows (shared out over ranks)."""
        tot = self._eval_totals()
        if tot is None:
            return None
        idx = list(range(self.dist.rank, len(self.eval_batches), self.dist.world))
        n_mine = len(idx)
        if self.fsdp:  # every rank must run as many forwards (each all-gathers): short ranks repeat one, uncounted
            per_rank = -(-len(self.eval_batches) // self.dist.world)
            idx += [idx[0] if idx else 0] * (per_rank - n_mine)
        bar = None
        if self.dist.main and len(idx) >= 50:  # long evaluations show progress at once
            from tqdm.auto import tqdm

            bar = tqdm(total=len(idx), desc="eval", leave=False, dynamic_ncols=True, disable=not self.cfg.progress)
            self.log(f"evaluating {len(self.eval_batches)} batches (--eval-steps); Ctrl-C / SIGTERM stops "
                     f"after the current batch")
        for j, i in enumerate(idx):
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
                loss = self.model.loss(x, y).double()
            if j < n_mine:  # not a repeat
                tot[0] += loss
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
        elif self.fsdp and stopped_by is None and cfg.sample_tokens:
            self._sample()  # rank 0 samples inside _summary: the other ranks join its forward passes
        self.dist.barrier()
        return TrainResult(self.out_dir, self.step, self.tokens, self._losses, vals, self.best_val, self.last_ckpt,
                           stopped_by)

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
        """A sample on rank 0; under FSDP every rank runs the same generation (the forward passes all-gather)."""
        if not (self.dist.main or self.fsdp):
            return
        cfg = self.cfg
        if self.fsdp:
            self.model.unshard()  # the root's weights (embeddings, LM head) stay gathered while generating
        try:
            text = sample_text(self.model, cfg.sample_prompt, cfg.sample_tokens, cfg.sample_temperature,
                               seed=cfg.seed + self.step)
        finally:
            if self.fsdp:
                self.model.reshard()
        self.log(f"sample @ step {self.step}: {cfg.sample_prompt + text!r}")

    def _oom_message(self) -> str:
        c = self.cfg
        return (f"out of GPU memory at batch_size {c.batch_size}, context_length {self.T}, grad_accum "
                f"{c.grad_accum}, dtype {self.precision}, grad_checkpointing {c.grad_checkpointing}. To fit: "
                f"lower --batch-size and raise --grad-accum by the same factor (same global batch), add "
                f"--grad-checkpointing, use --dtype bf16, or shorten --context-length")
