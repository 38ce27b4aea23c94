"""Instruction fine-tuning (SFT): masked loss on the responses, LoRA or full weights, PEFT export.

    python -m gptcore.finetune                       # offline demo: generated word puzzles, mini model, CPU, minutes
    python -m gptcore.finetune --init-from gpt2 --data instruction-data.json --lora-rank 16 --lora-alpha 32 \\
        --dtype bf16 --base-dtype bf16 --merge --out-dir runs/sft
    python -m gptcore.finetune --out-dir runs/sft --resume auto      # exact resume, also after Ctrl-C
    python -m gptcore.generate --ckpt BASE --adapter runs/sft/adapter --prompt "..."

It is gptcore.train's trainer (same config system: YAML/JSON --config with flags on top; same
checkpoints, exact resume, SIGINT/SIGTERM handling, metrics.jsonl, DDP, --compile) with an
instruction data set in place of raw text (gptcore.sft_data: Alpaca layout or chat `messages`,
JSON or JSONL, tokenized once and cached), the loss on response tokens only (prompt and padding
targets are -100, which the fused LM-head + cross-entropy skips), and LoRA adapters:

  --lora-rank R (> 0)  the base is frozen (--base-dtype bf16 holds its Linear weights in bf16)
                       and only the adapters' lora_A / lora_B are in the optimizer; every backend
                       keeps its kernels. 0 = full-weight SFT. Default: 8 with --init-from (a
                       pretrained base), 0 when training from scratch (an adapter on random
                       weights has nothing to adapt). On CUDA a LoRA run checkpoints each block
                       (--grad-checkpointing auto: its activations are most of its memory);
                       --no-grad-checkpointing keeps them. Either way a LoRA layer behind a
                       LayerNorm or the GELU recomputes its input in backward (exact) instead of
                       storing it (gptcore.lora).

The offline default (no arguments): --data tasks (20,000 generated puzzles), the mini preset from
scratch, 2000 steps of 16 records at lr 3e-3, held-out exact match of 200 records before and after.

Batches are padded per batch (to the longest record, rounded up to --pad-multiple), not packed;
--pad-to context gives every batch the full context (one static shape: the choice for --compile
with --compile-mode reduce-overhead). Records longer than the context: see --overlong.
Each micro-batch's loss is the mean over its response tokens.

Outputs in --out-dir, besides the trainer's ckpt-*/ best/ latest metrics.jsonl loss.png:
  adapter/        PEFT layout (adapter_config.json + adapter_model.safetensors) of the last step;
                  HF PEFT loads it onto the GPT2LMHeadModel that `gptcore.io.save_hf` writes
  best-adapter/   the same for the best held-out loss
  base-hf/        (with --merge and LoRA) the base in Hugging Face format, for PeftModel
  merged/         (--merge) full weights, gptcore checkpoint (python -m gptcore.generate --ckpt)
  merged-hf/      (--merge) full weights, Hugging Face GPT-2 folder
The ckpt-*/ and best/ directories of a LoRA run hold base + adapter tensors (for resume); run
them with the adapter folders above, or --merge.

Each evaluation prints the held-out loss (response tokens) and --eval-samples greedy responses
beside the references (also in metrics.jsonl, kind "sample"); --exact-match N scores N held-out
records by exact match of the greedy response before and after training (default: 200 for the
built-in "tasks" set, else 0).

Exit status as gptcore.train: 0 done, 1 the run started and failed (non-finite steps), 2 bad input
(a bad flag or config, bad data, a bad checkpoint or adapter, a run directory in use or not empty:
one message, the traceback only with --debug or GPTCORE_DEBUG=1), 130 / 143 stopped by SIGINT /
SIGTERM after saving a checkpoint.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Optional

import torch

from gptcore import train as T
from gptcore.io import CheckpointError, atomic_write_text, load_weights, save_checkpoint, save_hf
from gptcore.cli import run_cli
from gptcore.lora import (LoRAError, VALID_TARGETS, apply_lora, base_fingerprint, cast_base, check_rank,
                          merge_lora, parse_targets, save_adapter)
from gptcore.config import PRESETS
from gptcore.model import GPT
from gptcore.sft_data import BUILTIN, DATASETS, TASKS, TEMPLATES, exact_match, generate_responses, prepare_sft, answer_of
from gptcore.train import ConfigError, TrainConfig, TrainingError, _opt

DEFAULT_LORA_RANK = 8
DEMO_STEPS = 2000  # the offline default (built-in tasks, from scratch): steps to learn them on a CPU
BASE_INFO_FILE = "lora_base.json"


@dataclass
class FinetuneConfig(TrainConfig):
    # defaults that differ from pretraining
    preset: str = _opt("mini", "model preset (from scratch; --init-from brings its own architecture)", "model",
                       choices=sorted(PRESETS))
    grad_checkpointing: Optional[bool] = _opt(None, "recompute each block in backward (less memory, ~1/3 more "
                                              "compute); --no-grad-checkpointing: off", "model",
                                              shown="auto: on for LoRA (--lora-rank > 0) on CUDA, else off")
    data: str = _opt(BUILTIN, f"instruction data: a .json / .jsonl file (Alpaca layout or chat 'messages'), "
                     f"'{BUILTIN}' (generated word puzzles, offline) or a known set ({', '.join(DATASETS)}: "
                     f"downloaded when online)", "data")
    val_fraction: float = _opt(0.1, "share of the records held out for evaluation", "data")
    max_steps: Optional[int] = _opt(None, "optimizer steps", "batch",
                                    shown=f"when neither --max-tokens nor --epochs is given: {DEMO_STEPS} for --data "
                                          f"{BUILTIN} from scratch, else {T.DEFAULT_MAX_STEPS}")
    epochs: Optional[float] = _opt(None, "train for this many passes over the train records", "batch")
    batch_size: int = _opt(16, "records per micro-batch per process", "batch")
    lr: Optional[float] = _opt(None, "peak learning rate (AdamW)", "optimizer",
                               shown="3e-3 from scratch; with --init-from 3e-4 for LoRA, 5e-5 for full SFT")
    warmup_steps: int = _opt(10, "linear warmup steps", "optimizer")
    weight_decay: float = _opt(0.0, "AdamW weight decay (matrices and embeddings; LoRA factors are matrices)",
                               "optimizer")
    out_dir: str = _opt("out-sft", "directory for checkpoints, adapters, metrics.jsonl and loss.png", "eval")
    eval_interval: int = _opt(100, "evaluate on the held-out records every N steps (0: only at the end)", "eval")
    eval_steps: int = _opt(8, "held-out batches per evaluation (the first eval_steps x batch_size val records)",
                           "eval")
    sample_tokens: int = _opt(24, "max new tokens of each generated response (0: none)", "eval")
    # instruction data
    template: str = _opt("auto", "record layout: 'auto' (per record: 'messages' -> chat, else alpaca), 'alpaca' "
                         "or 'chat' (see gptcore.sft_data)", "sft", choices=list(TEMPLATES))
    pad_to: str = _opt("batch", "pad each batch to its longest record ('batch', rounded up to --pad-multiple) or "
                       "to the full context ('context': one static shape, for CUDA graphs)", "sft",
                       choices=["batch", "context"])
    pad_multiple: int = _opt(16, "with --pad-to batch, round the padded length up to a multiple of this", "sft")
    overlong: str = _opt("truncate", "records longer than context_length + 1 tokens: 'truncate' drops tokens "
                         "from the start of the prompt (a response longer than the context keeps its start) and "
                         "reports how many; 'error' refuses, naming the record", "sft",
                         choices=["truncate", "error"])
    skip_invalid: bool = _opt(False, "drop malformed records (missing fields, empty outputs) and report how many, "
                              "instead of stopping with an error naming the first", "sft")
    n_tasks: int = _opt(20000, f"records of the built-in '{BUILTIN}' set", "sft")
    tasks: str = _opt(",".join(TASKS), f"comma-separated puzzles of the built-in '{BUILTIN}' set: "
                      f"{', '.join(TASKS)}", "sft")
    eval_samples: int = _opt(3, "held-out records whose greedy responses are printed and logged at each "
                             "evaluation", "sft")
    exact_match: Optional[int] = _opt(None, "held-out records scored by exact match of the greedy response, "
                                      "before and after training (0: off)", "sft",
                                      shown=f"200 for --data {BUILTIN}, else 0")
    loss_rows: str = _opt("auto", "rows the LM head + loss run on: 'targets' (only the response tokens: the same "
                          "loss, far less work when prompts are long; one host read of the count per step) or "
                          "'all' (static shapes)", "sft", choices=["auto", "targets", "all"],
                          shown="targets, or all with --compile")
    merge: bool = _opt(False, "at the end also write the full merged weights: OUT_DIR/merged (gptcore) and "
                       "OUT_DIR/merged-hf (Hugging Face GPT-2)", "sft")
    # LoRA
    lora_rank: Optional[int] = _opt(None, "LoRA rank R in 1..emb_dim; 0 = full-weight fine-tuning", "lora",
                                    shown=f"{DEFAULT_LORA_RANK} with --init-from, 0 from scratch")
    lora_alpha: Optional[float] = _opt(None, "LoRA alpha: the update is scaled by alpha / rank", "lora",
                                       shown="2 x rank")
    lora_dropout: float = _opt(0.0, "dropout on the LoRA branch's input", "lora")
    lora_targets: str = _opt("c_attn,c_proj,c_fc", f"comma-separated layers to adapt: {', '.join(VALID_TARGETS)} "
                             f"(c_proj: the attention's and the MLP's)", "lora")
    base_dtype: str = _opt("fp32", "dtype of the frozen base's Linear weights under LoRA (bf16 halves their "
                           "memory; needs --dtype bf16)", "lora", choices=["fp32", "bf16"])

    def validate(self) -> None:
        if self.lr is None:  # resolved here, so checkpoints and the printed config hold the number
            self.lr = 3e-3 if self.init_from == "scratch" else (3e-4 if self.rank > 0 else 5e-5)
        if self.grad_checkpointing is None:
            # LoRA's activations are most of its memory (the frozen base has no gradients or optimizer
            # state): on a GPU, recomputing them is the better trade
            cuda = self.device.startswith("cuda") or (self.device == "auto" and torch.cuda.is_available())
            self.grad_checkpointing = self.rank > 0 and cuda
        super().validate()
        if self.pad_multiple < 1:
            raise ConfigError(f"pad_multiple must be >= 1, got {self.pad_multiple}")
        if self.n_tasks < 2:
            raise ConfigError(f"n_tasks must be >= 2, got {self.n_tasks}")
        for k in ("eval_samples",):
            if getattr(self, k) < 0:
                raise ConfigError(f"{k} must be >= 0, got {getattr(self, k)}")
        if self.exact_match is not None and self.exact_match < 0:
            raise ConfigError(f"exact_match must be >= 0, got {self.exact_match}")
        if self.lora_rank is not None and self.lora_rank < 0:
            raise ConfigError(f"lora_rank must be > 0 for LoRA or 0 for full fine-tuning, got {self.lora_rank}")
        if self.lora_alpha is not None and not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ConfigError(f"lora_alpha must be a positive number, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        try:
            parse_targets(self.lora_targets)
        except LoRAError as e:
            raise ConfigError(str(e)) from None
        if self.base_dtype == "bf16":
            if self.rank == 0:
                raise ConfigError("--base-dtype bf16 holds a frozen base in bf16: it needs LoRA (--lora-rank > 0); "
                                  "full fine-tuning keeps fp32 master weights")
            if self.dtype not in ("bf16", "auto"):
                raise ConfigError(f"--base-dtype bf16 needs --dtype bf16 (bf16 autocast), not {self.dtype}")

    @property
    def rank(self) -> int:
        if self.lora_rank is not None:
            return self.lora_rank
        return 0 if self.init_from == "scratch" else DEFAULT_LORA_RANK

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * max(1, self.rank)

    @property
    def n_exact(self) -> int:
        if self.exact_match is not None:
            return self.exact_match
        return 200 if self.data == BUILTIN else 0


_GROUPS = {**T._GROUPS, "sft": "instruction data and outputs", "lora": "LoRA"}
# pretraining settings that mean nothing here (the responses come with each evaluation instead of
# free samples of --sample-prompt; JSON records are UTF-8 or an error)
NOT_HERE = ("data_errors", "sample_every", "sample_prompt", "sample_temperature")
FT_KEYS = [f.name for f in fields(FinetuneConfig) if f.name != "model" and f.name not in NOT_HERE]
LORA_KEYS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "base_dtype")


# ---- config and CLI (the trainer's system, over FinetuneConfig's fields) ------------------------------
def make_config(*sources: tuple[str, dict]) -> FinetuneConfig:
    """FinetuneConfig from (where, settings) pairs, later ones winning; every value type-checked."""
    return T.make_config(*sources, cls=FinetuneConfig, keys=FT_KEYS)


def build_parser() -> argparse.ArgumentParser:
    return T.build_parser(FinetuneConfig, prog="python -m gptcore.finetune", description=__doc__, groups=_GROUPS,
                          skip=NOT_HERE)


def parse_args(argv: list[str]) -> FinetuneConfig:
    return T.parse_args(argv, build_parser(), make_config, FT_KEYS)


# ---- the fine-tuner ---------------------------------------------------------------------------------
class FineTuner(T.Trainer):
    """gptcore.train.Trainer on an SFTData set, with LoRA; the step and the run loop are the trainer's."""

    cfg: FinetuneConfig
    fsdp_refusal = ("gptcore.finetune does not shard with FSDP (LoRA's frozen bf16 base and the held-out "
                    "responses, generated on rank 0 alone, are not wired for it); use --parallel ddp")

    def __init__(self, cfg: FinetuneConfig, dist_, resume_hint: Optional[str] = None):
        self.base_info: Optional[dict] = None
        super().__init__(cfg, dist_, resume_hint)
        if self.dist.main and self.data.cut:
            print(f"data: {self.data.cut} records longer than context_length + 1 = {self.T + 1} tokens: their prompts "
                  f"were cut from the start (--overlong truncate)", flush=True)

    # -- setup hooks ---------------------------------------------------------------------------------
    def _prepare_data(self):
        cfg = self.cfg
        if not self.dist.main:
            self.dist.barrier()
        data = prepare_sft(cfg.data, template=cfg.template, val_fraction=cfg.val_fraction,
                           pad_multiple=cfg.pad_multiple, pad_to=cfg.pad_to, skip_invalid=cfg.skip_invalid,
                           n_tasks=cfg.n_tasks, tasks=[t.strip() for t in cfg.tasks.split(",") if t.strip()])
        if self.dist.main:
            self.dist.barrier()
            if data.skipped:
                print(f"data: skipped {len(data.skipped)} invalid records (--skip-invalid); first: {data.skipped[0]}")
        return data

    def _build_model(self, ck) -> GPT:
        cfg = self.cfg
        if ck is None:
            model = super()._build_model(None)
            self.base_info = {"model_config": model.config.to_dict(), "base_fingerprint": base_fingerprint(model),
                              "base": cfg.init_from}
        else:
            self._check_resume(ck)
            model = GPT(ck.model_config, backend=self.backend)
            self.init_note = f"resumed from {ck.path} (step {ck.meta['step']})"
            info = Path(ck.path) / BASE_INFO_FILE
            self.base_info = json.loads(info.read_text()) if info.is_file() else None
        if cfg.rank > 0:
            try:
                check_rank(cfg.rank, model.config.emb_dim)
                apply_lora(model, cfg.rank, cfg.alpha, cfg.lora_dropout, cfg.lora_targets)
            except LoRAError as e:
                raise ConfigError(str(e)) from None
            if cfg.base_dtype == "bf16":
                cast_base(model, torch.bfloat16)
            if cfg.init_from == "scratch" and self.dist.main:
                print("warning: LoRA on a randomly initialised model (--init-from scratch): the frozen base is noise; "
                      "give --init-from a pretrained model, or --lora-rank 0 for full fine-tuning", flush=True)
        if ck is not None:
            load_weights(model, ck.weights, source=str(ck.path))
        model.loss_rows = cfg.loss_rows if cfg.loss_rows != "auto" else ("all" if cfg.compile else "targets")
        self.data.set_context(model.config.context_length, cfg.overlong)
        return model

    def _check_resume(self, ck) -> None:
        super()._check_resume(ck)
        old = ck.meta.get("train_config", {})
        new = self.cfg.to_dict()
        diffs = [f"{k}: checkpoint {old.get(k)!r}, now {new[k]!r}" for k in LORA_KEYS if old.get(k) != new[k]]
        if diffs:
            raise CheckpointError(f"cannot resume from {ck.path}: its LoRA settings differ from this run's "
                                  f"({'; '.join(diffs)}); resume with the settings the run started with")

    def _eval_batches(self) -> list:
        return self.data.eval_batches(self.cfg.batch_size, self.T, self.cfg.eval_steps)

    def _max_steps(self) -> int:
        cfg = self.cfg
        if cfg.epochs is not None:
            per_step = cfg.batch_size * cfg.grad_accum * self.dist.world
            return math.ceil(cfg.epochs * self.data.manifest["train_records"] / per_step)
        if cfg.max_steps is None and cfg.max_tokens is None and cfg.data == BUILTIN and cfg.init_from == "scratch":
            return DEMO_STEPS
        return super()._max_steps()

    def _announce(self) -> None:
        super()._announce()
        if not self.dist.main:
            return
        m, d = self.data.manifest, self.data
        print(f"sft data: {m['train_records']:,} train / {m['val_records']:,} held-out records, "
              f"{m['response_tokens']:,} response tokens of {m['train_tokens'] + m['val_tokens']:,}; padded per "
              f"{'batch (multiple of ' + str(d.pad_multiple) + ')' if d.pad_to == 'batch' else 'context'}", flush=True)
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        if self.cfg.rank > 0:
            print(f"lora: rank {self.cfg.rank}, alpha {self.cfg.alpha:g}, dropout {self.cfg.lora_dropout}, targets "
                  f"{self.cfg.lora_targets}; {n_train:,} trainable parameters "
                  f"({100 * n_train / self.model.num_params():.2f}% of {self.model.num_params():,}); base "
                  f"{self.cfg.base_dtype}", flush=True)
        else:
            print(f"full fine-tuning: {n_train:,} trainable parameters", flush=True)

    # -- the step: the trainer's, with the tokens actually processed counted -------------------------
    def train_step(self, stop_requested: Callable[[], bool] = lambda: False):
        self.data.tokens_drawn = 0
        out = super().train_step(stop_requested)
        # padded per batch, a step holds B x (padded length) positions, not B x context_length:
        # count what was processed, so tokens/s and the tokens total are true
        done = self.data.tokens_drawn * self.dist.world
        if done:
            self.tokens += done - self.tokens_per_step
            self.tokens_per_step = done
        return out

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Mean loss per response token over the held-out batches (shared out over ranks)."""
        tot = self._eval_totals()
        if tot is None:
            return None
        for i in range(self.dist.rank, len(self.eval_batches), self.dist.world):
            x, y = (t.to(self.device) for t in self.eval_batches[i])
            n = (y != -100).sum()
            if int(n) == 0:
                continue
            with self.autocast():
                tot[0] += self.model.loss(x, y).double() * n
            tot[1] += n
        if self.ddp:
            T.dist.all_reduce(tot)
        self.model.train()
        return (tot[0] / tot[1].clamp_min(1)).item()

    def _eval_and_best(self) -> float:
        val = super()._eval_and_best()
        self._responses()
        return val

    def _sample(self) -> None:
        pass  # the responses come with each evaluation (_responses)

    def _responses(self) -> None:
        cfg = self.cfg
        if not (self.dist.main and cfg.eval_samples and cfg.sample_tokens):
            return
        recs = self.data.val_records(cfg.eval_samples)
        with self.autocast():
            got = generate_responses(self.model, recs, self._new_tokens(), cfg.template)
        for i, (r, g) in enumerate(zip(recs, got)):
            ref = answer_of(r, cfg.template)
            self._metric({"kind": "sample", "step": self.step, "record": i, "response": g, "reference": ref})
            self.log(f"  response {i} @ step {self.step}: {g.strip()[:200]!r} (reference {ref.strip()[:200]!r})")

    def _new_tokens(self) -> int:
        return max(1, min(self.cfg.sample_tokens, self.T // 2))

    def exact_match(self, n: int) -> float:
        with self.autocast():
            return exact_match(self.model, self.data.val_records(n), self._new_tokens(), self.cfg.template)

    # -- checkpoints and exports -------------------------------------------------------------------
    def save(self, name: Optional[str] = None) -> Optional[Path]:
        path = super().save(name)
        if path is not None and self.base_info is not None:
            # beside the trainer's files: the base's identity, so a resumed run's adapter still names it
            atomic_write_text(path / BASE_INFO_FILE, json.dumps(self.base_info, indent=1) + "\n")
        if path is not None and name == "best" and self.cfg.rank > 0:
            self.export_adapter(self.out_dir / "best-adapter")
        return path

    def export_adapter(self, path: Path) -> Path:
        info = self.base_info or {}
        return save_adapter(self.model, path, base_name=info.get("base"), base_info=info or None)

    def export(self) -> list[str]:
        """Final outputs (rank 0): adapter/ for LoRA; merged/, merged-hf/ (and base-hf/) with --merge."""
        if not self.dist.main:
            return []
        notes = []
        cfg = self.cfg
        if cfg.rank > 0:
            notes.append(f"adapter (PEFT layout): {self.export_adapter(self.out_dir / 'adapter')}")
        if cfg.merge:
            import copy

            model = copy.deepcopy(self.model).cpu()
            if cfg.rank > 0:
                from gptcore.lora import base_state_dict

                base = GPT(model.config, backend="torch")
                base.load_state_dict({k: v.float() for k, v in base_state_dict(model).items()}, strict=False)
                if model.config.pos_emb == "learned":
                    save_hf(base, self.out_dir / "base-hf")
                    notes.append(f"base (Hugging Face, for PeftModel.from_pretrained): {self.out_dir / 'base-hf'}")
                merge_lora(model)
            model = model.float()
            meta = {"step": self.step, "tokens": self.tokens, "model_config": model.config.to_dict(),
                    "tokenizer": T.TOKENIZER, "train_config": cfg.to_dict(), "merged_from": str(self.out_dir),
                    "lora_base": self.base_info, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            notes.append(f"merged weights (gptcore): {save_checkpoint(self.out_dir / 'merged', model, None, meta)}")
            if model.config.pos_emb == "learned":
                save_hf(model, self.out_dir / "merged-hf")
                notes.append(f"merged weights (Hugging Face): {self.out_dir / 'merged-hf'}")
        return notes


@dataclass
class FinetuneResult:
    train: T.TrainResult
    exact_match_before: Optional[float]
    exact_match_after: Optional[float]
    exports: list


def finetune(cfg: FinetuneConfig, resume_hint: Optional[str] = None) -> FinetuneResult:
    """Run (or continue) a fine-tuning run as configured; see the module docstring."""
    d = T._setup_dist(cfg.device)
    try:
        ft = FineTuner(cfg, d, resume_hint)
        n = cfg.n_exact
        before = after = None
        if n and d.main and ft.step == 0:
            before = ft.exact_match(n)
            ft._metric({"kind": "exact_match", "step": ft.step, "exact_match": before, "records": n})
            print(f"held-out exact match before fine-tuning: {100 * before:.1f}% of {min(n, ft.data.manifest['val_records'])} "
                  f"records", flush=True)
        try:
            res = ft.run()
        except torch.cuda.OutOfMemoryError:
            raise TrainingError(ft._oom_message()) from None
        exports = []
        if res.stopped_by is None:
            if n and d.main:
                after = ft.exact_match(n)
                ft._metric({"kind": "exact_match", "step": ft.step, "exact_match": after, "records": n})
                was = f"{100 * before:.1f}% -> " if before is not None else ""
                print(f"held-out exact match: {was}{100 * after:.1f}% of "
                      f"{min(n, ft.data.manifest['val_records'])} records", flush=True)
            exports = ft.export()
            for line in exports:
                print(line, flush=True)
        return FinetuneResult(res, before, after, exports)
    finally:
        if d.world > 1 and T.dist.is_initialized():
            T.dist.destroy_process_group()


def resume_command(argv: list[str]) -> str:
    return T.resume_command(argv).replace("-m gptcore.train", "-m gptcore.finetune", 1)


def _main(argv: list[str]) -> int:
    return T.run_main(argv, "gptcore.finetune", parse_args, lambda cfg: finetune(cfg, resume_command(argv)),
                      lambda cfg: ("; lower --batch-size (raise --grad-accum), use LoRA (--lora-rank 16) with "
                                   "--base-dtype bf16, --grad-checkpointing, or a shorter --context-length"),
                      "interrupted twice: stopped at once, no checkpoint of this step", lambda r: r.train.stopped_by)


def main(argv: Optional[list[str]] = None) -> int:
    """Exit status: see the module docstring. Bad data, checkpoints, adapters, paths and run dirs
    are one message and status 2 (gptcore.cli.run_cli); --debug / GPTCORE_DEBUG=1 show the traceback."""
    return run_cli("gptcore.finetune", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
