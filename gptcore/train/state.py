"""What a run saves and restores: finding the state to resume (--resume), building the model
(scratch, --init-from, a checkpoint), checking a checkpoint against this run, restoring the
optimizer/RNG/step, and saving ckpt-NNNNNNN/ and best/. Mixed into gptcore.train.loop.Trainer."""
from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Optional

from gptcore.io import (CheckpointError, capture_rng, load_checkpoint, load_pretrained, load_weights,
                        prune_checkpoints, resolve_checkpoint, restore_rng, save_checkpoint, update_latest)
from gptcore.config import GPTConfig
from gptcore.graph_step import after_load_state_dict, portable_state_dict
from gptcore.model import GPT
from gptcore.rundir import best_state, resumable_states, run_contents
from gptcore.train.config import TOKENIZER, ConfigError
from gptcore.train.sharded import load_dcp_optimizer, load_full_optimizer, save_sharded


def _is_gptcore_checkpoint(spec: str) -> bool:
    p = Path(spec).expanduser()
    return p.exists() and ((p / "meta.json").is_file() or (p / "latest").is_file())




class StateMixin:
    """Resume and save (the Trainer's; gptcore.finetune.FineTuner overrides some)."""

    def _find_resume(self):
        cfg, out = self.cfg, self.out_dir
        if cfg.resume == "auto" and cfg.overwrite:
            raise ConfigError("--resume auto continues the run in --out-dir and --overwrite starts a new one "
                              "there: give one of them")
        contents = run_contents(out)
        if cfg.resume is None:
            if contents and not cfg.overwrite:
                shown = ", ".join(contents[:6]) + (f" and {len(contents) - 6} more" if len(contents) > 6 else "")
                raise ConfigError(
                    f"{out} is not empty ({shown}); continue the run in it with --resume auto, start a new run "
                    f"there with --overwrite (deletes its ckpt-*, best/, latest, metrics.jsonl and loss.png), or "
                    f"give a fresh --out-dir (nothing was changed)")
            return None
        if cfg.resume == "auto":
            states = resumable_states(out)
            if not states:
                partial = [c for c in contents if c.startswith("ckpt-") or c in ("best", "latest")]
                if partial:
                    raise ConfigError(
                        f"--resume auto: {out} holds {', '.join(partial)} but no complete checkpoint (meta.json, "
                        f"model.safetensors and state.pt) to resume from; resume from a checkpoint elsewhere with "
                        f"--resume PATH, or start a new run with --overwrite (nothing was changed)")
                self.log(f"--resume auto: no checkpoint in {out}; starting a new run"
                         + (" (metrics.jsonl is kept and appended to)" if "metrics.jsonl" in contents else ""))
                return None
            try:
                return load_checkpoint(states[0].path, map_location="cpu")
            except CheckpointError as e:
                nxt = (f"; the next complete state is {states[1].path} (step {states[1].step}): resume it with "
                       f"--resume {shlex.quote(str(states[1].path))}" if len(states) > 1 else "")
                raise CheckpointError(f"{e}{nxt} (nothing was changed)") from None
        ck = load_checkpoint(resolve_checkpoint(cfg.resume), map_location="cpu")
        step = ck.meta.get("step")
        later = [s for s in resumable_states(out)
                 if isinstance(step, int) and s.step > step and s.path.resolve() != ck.path.resolve()]
        if later and not cfg.overwrite:
            raise ConfigError(
                f"{out} holds later states than {ck.path} (step {step}): "
                f"{', '.join(f'{s.path.name} (step {s.step})' for s in later)}; the run would replace them. "
                f"Resume the newest with --resume auto, give another --out-dir, or add --overwrite to replace "
                f"them (nothing was changed)")
        return ck

    def _build_model(self, ck) -> GPT:
        cfg = self.cfg
        if ck is not None:
            self._check_resume(ck)
            model = GPT(ck.model_config, backend=self.backend)
            load_weights(model, ck.weights, source=str(ck.path))
            self.init_note = f"resumed from {ck.path} (step {ck.meta['step']})"
            return model
        if cfg.init_from == "scratch":
            self.init_note = f"preset {cfg.preset}, random init (seed {cfg.seed})"
            return GPT(GPTConfig.from_preset(cfg.preset, **cfg.model), backend=self.backend)
        if _is_gptcore_checkpoint(cfg.init_from):
            src = load_checkpoint(cfg.init_from, load_state=False)
            if src.meta.get("tokenizer", TOKENIZER) != TOKENIZER:
                raise CheckpointError(f"{src.path} was trained with tokenizer {src.meta['tokenizer']!r}, "
                                      f"this data uses {TOKENIZER!r}")
            model = GPT(src.model_config, backend=self.backend)
            load_weights(model, src.weights, source=str(src.path))
            self.init_note = f"weights of {src.path}"
        else:
            model = self._load_pretrained(cfg.init_from)
            self.init_note = f"pretrained {cfg.init_from}"
        fixed = {k: v for k, v in cfg.model.items() if k not in ("drop_rate", "context_length")}
        clash = [f"{k}: {getattr(model.config, k)!r} there, {v!r} here" for k, v in fixed.items()
                 if getattr(model.config, k) != v]
        if clash:
            raise ConfigError(f"the architecture comes from --init-from {cfg.init_from}; only drop_rate and a shorter "
                              f"context_length can change ({'; '.join(clash)})")
        if "drop_rate" in cfg.model:
            model.set_dropout(cfg.model["drop_rate"])
        if "context_length" in cfg.model:
            try:
                model.crop_context(cfg.model["context_length"])
            except ValueError as e:
                raise ConfigError(str(e)) from None
        return model

    def _load_pretrained(self, name: str) -> GPT:
        return load_pretrained(name, trust_pickle=self.cfg.trust_pickle).set_backend(self.backend)

    def _check_resume(self, ck) -> None:
        """Refuse a checkpoint whose model differs; say which settings changed."""
        old, new = ck.meta.get("train_config", {}), self.cfg.to_dict()
        if ck.meta.get("tokenizer") != TOKENIZER:
            raise CheckpointError(f"{ck.path} was trained with tokenizer {ck.meta.get('tokenizer')!r}, "
                                  f"not {TOKENIZER!r}")
        diffs = []
        for key in ("preset", "init_from"):
            if old.get(key) != new[key]:
                diffs.append(f"{key}: checkpoint {old.get(key)!r}, now {new[key]!r}")
        om, nm = old.get("model", {}), new["model"]
        for key in sorted(set(om) | set(nm)):
            if om.get(key) != nm.get(key):
                diffs.append(f"{key}: checkpoint {om.get(key, '(preset)')!r}, now {nm.get(key, '(preset)')!r}")
        if diffs:
            raise CheckpointError(
                f"cannot resume from {ck.path}: its model settings differ from this run's ({'; '.join(diffs)}). "
                f"Resume with the settings the run started with, or start a new run in another --out-dir "
                f"(nothing was overwritten)"
            )
        world = ck.meta.get("world_size")
        repro = {"batch_size": (old.get("batch_size"), new["batch_size"]),
                 "grad_accum": (old.get("grad_accum"), new["grad_accum"]),
                 "seed": (old.get("seed"), new["seed"]), "world_size": (world, self.dist.world)}
        changed = [f"{k} {a} -> {b}" for k, (a, b) in repro.items() if a != b]
        same_batch = (isinstance(world, int) and isinstance(old.get("grad_accum"), int)
                      and world * old["grad_accum"] == self.dist.world * new["grad_accum"])
        if changed and same_batch and all(k in ("grad_accum", "world_size") for k, (a, b) in repro.items() if a != b):
            # micro-batch m = rank * grad_accum + micro: W x A and W' x A' (W A = W' A') draw the same batches
            self._resume_notes.append("note: " + ", ".join(changed) + ": the same global batch, so the same data "
                                      "as the uninterrupted run (sums in another order: the last bits may differ)")
        elif changed:
            self._resume_notes.append("warning: " + ", ".join(changed) + ": the run goes on but will not "
                                      "reproduce the uninterrupted one")
        other = [k for k in new if k not in repro and k not in ("resume", "overwrite", "model", "preset", "init_from")
                 and old.get(k) != new[k]]
        if other:
            self._resume_notes.append("changed since the checkpoint: " +
                                      ", ".join(f"{k} {old.get(k)!r} -> {new[k]!r}" for k in other))

    def _restore(self, ck) -> None:
        st = ck.state
        if st is None:
            raise CheckpointError(f"{ck.path} holds weights only (no state.pt): use --init-from to start from it")
        if not isinstance(st, dict):
            raise CheckpointError(f"{ck.path}/state.pt holds a {type(st).__name__}, not a gptcore state (a dict of "
                                  f"optimizer, step, tokens, rng): use another checkpoint")
        if ck.meta.get("data_hash") != self.data.hash:
            self._resume_notes.append(
                f"warning: the data differs from the checkpoint's (manifest hash {str(ck.meta.get('data_hash'))[:12]} "
                f"-> {self.data.hash[:12]}): the run goes on with the new data")
        try:
            self._load_optimizer(ck.path, st)
            after_load_state_dict(self.optimizer, self.cfg.lr)  # this device's AdamW flags, lr and step tensors
            if self.scaler is not None and st.get("scaler"):
                self.scaler.load_state_dict(st["scaler"])
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError, FileNotFoundError) as e:
            raise CheckpointError(f"{ck.path}/state.pt: optimizer state does not fit this model ({e})") from None
        for g, wd in zip(self.optimizer.param_groups, (self.cfg.weight_decay, 0.0)):
            g["betas"], g["weight_decay"] = self.cfg.betas, wd  # this run's settings win
        try:
            self.step, self.tokens = int(st["step"]), int(st["tokens"])
            self.best_val = st.get("best_val")
            if self.best_val is not None:
                self.best_val = float(self.best_val)
            rng = st["rng"]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{ck.path}/state.pt lacks or garbles the step, tokens, best_val or rng state "
                                  f"({type(e).__name__}: {e}); use another checkpoint") from None
        best = best_state(self.out_dir)
        if best is not None and best.val_loss is not None and (self.best_val is None or best.val_loss < self.best_val):
            # best/ holds a better model than this state knew of (an explicit --resume of an older
            # checkpoint): only a model better than that one replaces it
            self.best_val = best.val_loss
        try:
            restore_rng(rng)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise CheckpointError(f"{ck.path}/state.pt: its RNG state cannot be restored ({type(e).__name__}: "
                                  f"{e}); use another checkpoint") from None
        self.last_ckpt = ck.path
        if self.dist.main:
            newer = [p.name for p in self.out_dir.glob("ckpt-*") if p.name > f"ckpt-{self.step:07d}"]
            if newer:
                self._resume_notes.append(f"note: {self.out_dir} holds later checkpoints ({', '.join(sorted(newer))}); "
                                          f"this run replaces them as it passes their steps")

    def _load_optimizer(self, path: Path, st: dict) -> None:
        """The optimizer state of a checkpoint into this run, whichever parallelism saved it and runs now:
        state.pt's (a single process or DDP) or the DCP folder's (FSDP, any world size)."""
        if st.get("optimizer") is None and st.get("optimizer_dcp"):
            load_dcp_optimizer(self.model, self.optimizer, Path(path) / st["optimizer_dcp"])
            self._resume_notes.append(f"optimizer state: sharded (torch.distributed.checkpoint) in "
                                      f"{Path(path) / st['optimizer_dcp']}, loaded into world {self.dist.world} "
                                      f"({self.parallel})")
        elif self.fsdp:
            load_full_optimizer(self.model, self.optimizer, st["optimizer"])
        else:
            self.optimizer.load_state_dict(st["optimizer"])

    def save(self, name: Optional[str] = None) -> Optional[Path]:
        """Checkpoint (rank 0): out_dir/ckpt-{step}/ + latest + pruning, or out_dir/best/. Under FSDP every
        rank calls it (gptcore.train.sharded: the weights are gathered, the optimizer state saved sharded)."""
        if not (self.dist.main or self.fsdp):
            return None
        cfg_d = self.cfg.to_dict()
        name = name or f"ckpt-{self.step:07d}"
        state = {
            "optimizer": None if self.fsdp else portable_state_dict(self.optimizer),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": self.step, "tokens": self.tokens, "best_val": self.best_val,
            "rng": capture_rng(),
            # batches are drawn from generators seeded by (seed, step, micro-batch): no loader state
            "data": {"sampling": "seeded by (seed, step, rank * grad_accum + micro)", "seed": self.cfg.seed,
                     "next_step": self.step, "manifest_hash": self.data.hash},
            "train_config": cfg_d, "model_config": self.model.config.to_dict(),
            "tokenizer": TOKENIZER, "world_size": self.dist.world,
        }
        meta = {
            "step": self.step, "tokens": self.tokens, "train_config": cfg_d,
            "model_config": self.model.config.to_dict(), "tokenizer": TOKENIZER, "data": self.cfg.data,
            "data_hash": self.data.hash, "world_size": self.dist.world, "best_val": self.best_val,
            "val_loss": self.last_val, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if self.fsdp:
            path = save_sharded(self.out_dir / name, self.model, self.optimizer, state, meta, self.dist.main)
            if not self.dist.main:
                if name != "best":
                    self.last_ckpt = self.out_dir / name
                return None
        else:
            path = save_checkpoint(self.out_dir / name, self.model, state, meta)
        if name != "best":
            update_latest(self.out_dir, path)
            self._written_ckpts.add(path)
            # only what this process wrote: an earlier run's checkpoints (before a resume) stay
            prune_checkpoints(self.out_dir, self.cfg.keep_last, only=self._written_ckpts)
            self.last_ckpt = path
        return path
