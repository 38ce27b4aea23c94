"""The trainer: resumable, robust to bad steps and signals, observable, data-parallel.

    python -m gptcore.train                                  # tiny model on the embedded corpus (~1-2 min, CPU)
    python -m gptcore.train --config run.yaml --lr 1e-3      # a YAML/JSON file, flags on top
    python -m gptcore.train --out-dir out --resume auto      # continue the run saved in out/
    torchrun --nproc_per_node=8 -m gptcore.train --preset gpt2 --data tinystories --dtype bf16
    torchrun --nproc_per_node=4 -m gptcore.train --preset gpt2-xl --dtype bf16 --fsdp   # sharded (FSDP2)

Batches. One optimizer step sees  batch_size x grad_accum x world_size  sequences of
context_length tokens (the global batch). Micro-batch ``micro`` of rank ``r`` is drawn with a
generator seeded by (seed, step, m), m = r * grad_accum + micro, and dropout is seeded the same
way, so the data is a function of the step alone: resuming needs no loader state, and
(world W, grad_accum A) trains on the same global batch as (world 1, grad_accum W*A).
Each micro-batch loss is divided by grad_accum; DDP averages gradients over ranks (no
division by world size anywhere else), and gradients are all-reduced on the last micro-step only.

Steps. On a CUDA GPU the whole optimizer step (every micro-batch's forward and backward, gradient
clipping, AdamW, the non-finite skip) is captured once in a CUDA graph and replayed (--cuda-graph
auto; gptcore.graph_step); the start-up log says when it is not and why (DDP, fp16, ...). Neither path
waits for the GPU per step: loss and grad norm stay on the device and are read back every
--log-interval steps (every step on the CPU) and before evaluations, samples and checkpoints; the
metrics rows are still one per step, and a run of non-finite steps stops the run at that read-back.

Out dir: ckpt-NNNNNNN/ (the last --keep-last; a resumed run prunes only its own), best/ (lowest val
loss), latest (names the newest ckpt), metrics.jsonl (one row per step and per evaluation), loss.png
(with matplotlib).

Exit status: 0 done; 1 the run failed while training (non-finite loss --max-bad-steps times in
a row, out of memory); 2 it could not start: bad config or flag, bad data, a bad checkpoint, an
out dir that is in use (another run holds its lock), not empty (without --resume / --overwrite),
or unwritable, a size that cannot fit (one line, the traceback with --debug or GPTCORE_DEBUG=1);
130 / 143 stopped by SIGINT (Ctrl-C) / SIGTERM after saving a checkpoint at the end of the
current step or evaluation (the message prints the resume command). A second Ctrl-C stops at
once (no checkpoint).

Out dir ownership: one process at a time (out_dir/.gptcore.lock: pid and host; a lock left by a
dead process is taken over with a note). A new run into a non-empty out dir is refused: continue
it with --resume auto (the newest complete state, ckpt-* or best/) or start over with --overwrite.
"""
# The package (this docstring is the CLI's --help text): config (settings, flags, YAML), metrics
# (LR schedule, seeds, MFU, memory bound, loss plot), signals (graceful stops), distributed
# (torchrun set-up, the DDP/FSDP choice, sharding), sharded (FSDP checkpoints through DCP), state
# (resume and checkpoints), step (one optimizer step), report (log lines, metrics rows, summary),
# loop (the Trainer), cli (train(), exit statuses). Every name other modules use is re-exported here.
from __future__ import annotations

import torch.distributed as dist  # noqa: F401  (gptcore.finetune uses train.dist)

from gptcore.train.config import (DEFAULT_MAX_STEPS, DTYPES, EVAL_SEED, MODEL_KEYS, TOKENIZER, TRAIN_KEYS, _GROUPS,
                                  ConfigError, TrainConfig, TrainingError, _check_numbers, _opt, build_parser,
                                  load_config_file, make_config, parse_args)
from gptcore.train.metrics import (PEAK_BF16_FLOPS, estimate_train_bytes, lr_at, micro_seed, peak_flops,
                                   plot_losses)
from gptcore.train.signals import _GracefulStop, _StoppedInEval
from gptcore.train.distributed import _Dist, _LossModule, _setup_dist
from gptcore.train.state import StateMixin, _is_gptcore_checkpoint
from gptcore.train.step import StepMixin
from gptcore.train.loop import Trainer, TrainResult, sample_text
from gptcore.train.cli import _main, main, resume_command, run_main, train

__all__ = ["ConfigError", "TrainingError", "TrainConfig", "make_config", "build_parser", "parse_args",
           "load_config_file", "lr_at", "micro_seed", "peak_flops", "plot_losses", "estimate_train_bytes",
           "sample_text", "Trainer", "TrainResult", "train", "resume_command", "run_main", "main"]
