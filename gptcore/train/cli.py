"""The training CLI: train() (lock the out dir, set up, run), the resume command printed on a
stop, and the exit statuses shared with gptcore.finetune (run_main)."""
from __future__ import annotations

import os
import shlex
import sys
from typing import Callable, Optional

import torch
import torch.distributed as dist

from gptcore.cli import check_backend, debug_enabled, run_cli
from gptcore.rundir import RunLock
from gptcore.train.config import ConfigError, TrainConfig, TrainingError, parse_args
from gptcore.train.distributed import _setup_dist
from gptcore.train.loop import Trainer, TrainResult
from gptcore.train.signals import _StoppedInEval


def train(cfg: TrainConfig, resume_hint: Optional[str] = None) -> TrainResult:
    """Run (or continue) training as configured; see the module docstring. The process owns
    cfg.out_dir (gptcore.rundir.RunLock) from before it looks inside until it returns."""
    check_backend(cfg.backend)
    d = _setup_dist(cfg.device, group=cfg.parallel == "fsdp")
    lock = RunLock(cfg.out_dir, resume_hint) if d.main else None
    try:
        if lock is not None:
            lock.acquire()
            if lock.note:
                print(lock.note, flush=True)
        trainer = Trainer(cfg, d, resume_hint)
        try:
            return trainer.run()
        except torch.cuda.OutOfMemoryError:
            raise TrainingError(trainer._oom_message()) from None
        except _StoppedInEval as e:
            return trainer.stop_after_eval(e.signum)
    finally:
        if lock is not None:
            lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()


def resume_command(argv: list[str]) -> str:
    """The command that continues this run: the same flags with --resume auto."""
    args, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--resume":
            if i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                i += 1
        elif not a.startswith("--resume=") and a not in ("--overwrite", "--no-overwrite"):
            args.append(a)  # --overwrite started the run; the resume must not start it over
        i += 1
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        nodes = world // max(1, local)
        head = ["torchrun", f"--nproc_per_node={local}"] + ([f"--nnodes={nodes}"] if nodes > 1 else [])
        head += ["-m", "gptcore.train"]
    else:
        head = ["python", "-m", "gptcore.train"]
    return shlex.join(head + args + ["--resume", "auto"])


def run_main(argv: list[str], prog: str, parse: Callable, run: Callable, oom_hint: Callable,
             interrupted: str, stopped_by: Callable) -> int:
    """The exit statuses of a training CLI (train, finetune): 2 for a config error or an OOM while
    setting up, 1 for a run that started and failed, 130 for a second Ctrl-C, 128 + signal for a
    graceful stop, else 0; with --debug each failure raises instead."""
    cfg = None
    try:
        cfg = parse(argv)
        result = run(cfg)
    except ConfigError as e:
        if debug_enabled(argv):
            raise
        print(f"{prog}: config error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:  # the run started and failed: status 1, the checkpoint named
        if debug_enabled(argv):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except torch.cuda.OutOfMemoryError:
        if debug_enabled(argv) or cfg is None:
            raise
        print(f"{prog}: error: out of GPU memory while setting up{oom_hint(cfg)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug_enabled(argv):
            raise
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    stop = stopped_by(result)
    return 0 if stop is None else 128 + int(stop)


def _main(argv: list[str]) -> int:
    return run_main(argv, "gptcore.train", parse_args, lambda cfg: train(cfg, resume_command(argv)),
                    lambda cfg: (f" (batch_size {cfg.batch_size}, grad_accum {cfg.grad_accum}). To fit: lower "
                                 f"--batch-size (raise --grad-accum to keep the global batch), add "
                                 f"--grad-checkpointing, use --dtype bf16, shorten --context-length, or train "
                                 f"with FSDP"),
                    "interrupted: stopped at once, no checkpoint of this step", lambda r: r.stopped_by)


def main(argv: Optional[list[str]] = None) -> int:
    """Exit status: see the module docstring; bad data, checkpoints, paths and run dirs are 2."""
    return run_cli("gptcore.train", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
