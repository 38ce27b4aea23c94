"""What a checkpoint is, and whether it fits a config: python -m gptcore.inspect_ckpt PATH [options]
(installed as the command ``gptcore-inspect`` too; the module is not called ``inspect`` so that it
never stands in for the standard library's).

    python -m gptcore.inspect_ckpt out/run1                            # a training run: its latest
    python -m gptcore.inspect_ckpt ckpt.pt                             # nanoGPT: config, params, step, ...
    python -m gptcore.inspect_ckpt ~/models/gpt2 --config gpt2         # HF folder against the gpt2 preset
    python -m gptcore.inspect_ckpt model.pth --config cfg.json         # LLMs-from-scratch + its config
    python -m gptcore.inspect_ckpt out/run1 --vocab 50257 --json       # machine-readable

Reads every format gptcore.io.read_checkpoint knows (gptcore-train, gptcore, gptcore-pt, hf, nanogpt,
llms-from-scratch, bare state_dict), the one reader every CLI loads through, and reports format, config, parameter count, dtype, vocab size, and the
training step, tokens and tokenizer where the file records them. With --config and/or --vocab
it lists what keeps the checkpoint from loading into that model: config fields that differ,
missing and unexpected keys, shape mismatches, a vocabulary smaller than the tokenizer's.
(drop_rate is a training setting and is not compared.)

Exit status: 0 read (and fits, when asked); 1 does not fit, or the checkpoint's own config does
not match its weights; 2 cannot be read or bad arguments (one line; --debug for the traceback).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any, Optional

from gptcore.cli import add_debug_flag, debug_enabled, describe_os_error, run_cli
from gptcore.config import GPTConfig
from gptcore.io import CheckpointError, count_params, diff_state_dict, infer_config_fields, read_checkpoint, resolve_config

# Fields compared between a checkpoint's config and the target (drop_rate is a training knob).
_COMPARED = tuple(f for f in GPTConfig.__dataclass_fields__ if f != "drop_rate")


def inspect_checkpoint(path: str, config: Any = None, vocab: Optional[int] = None,
                       trust_pickle: bool = False) -> dict[str, Any]:
    """The report as a dict (what --json prints). Raises on unreadable files or bad config."""
    target = resolve_config(config) if config is not None else None
    ck = read_checkpoint(path, trust_pickle=trust_pickle)
    sd = ck.state_dict
    notes = list(ck.notes)
    inferred = infer_config_fields(sd)
    src = ck.config
    if src is None and target is not None:
        # No config in or beside the file: the weights give the shapes, --config the rest (n_heads).
        try:
            src = target.replace(**inferred)
            notes.append("config: shapes read off the weights; n_heads, ln_eps, rope_theta taken from --config")
        except ValueError as e:
            notes.append(f"config: the weights' shapes and --config's n_heads do not combine: {e}")
    dtypes = Counter(str(v.dtype).removeprefix("torch.") for v in sd.values() if v.is_floating_point())
    report: dict[str, Any] = {
        "path": str(ck.path),
        "format": ck.format,
        "description": ck.description,
        "config": src.to_dict() if src is not None else None,
        "config_error": ck.config_error if src is None else None,
        "shapes_say": inferred,
        "parameters": count_params(src, sd),
        "dtype": next(iter(dtypes)) if len(dtypes) == 1 else dict(dtypes),
        "vocab_size": inferred.get("vocab_size"),
        "step": ck.meta.get("step"),
        "tokens": ck.meta.get("tokens"),
        "tokenizer": ck.meta.get("tokenizer"),
        "meta": {k: v for k, v in ck.summary().items() if k not in ("step", "tokens", "tokenizer")},
        "notes": notes,
        "target": None,
        "fits": None,
        "differences": {},
        "consistent": None,
        "inconsistencies": {},
    }
    if ck.config is not None:
        # the checkpoint's own config must describe its own weights (an edited meta.json or a
        # config.json from another model does not)
        own = {k: v for k, v in diff_state_dict(ck.config, sd).items() if v}
        if "shape_mismatch" in own:
            own["shape_mismatch"] = [{"key": k, "checkpoint": list(a), "config": list(b)}
                                     for k, a, b in own["shape_mismatch"]]
        report["consistent"] = not own
        report["inconsistencies"] = own
    if target is None and vocab is None:
        return report

    diffs: dict[str, Any] = {}
    if target is not None:
        have = src.to_dict() if src is not None else inferred  # without a config: what shapes say
        cfg_diff = [{"field": f, "checkpoint": have[f], "target": getattr(target, f)}
                    for f in _COMPARED if f in have and have[f] != getattr(target, f)]
        if cfg_diff:
            diffs["config"] = cfg_diff
        keys = diff_state_dict(target, sd)
        diffs.update({k: v for k, v in keys.items() if v})
        if "shape_mismatch" in diffs:
            diffs["shape_mismatch"] = [{"key": k, "checkpoint": list(a), "target": list(b)}
                                       for k, a, b in diffs["shape_mismatch"]]
    if vocab is not None:
        have = inferred.get("vocab_size")
        if have is None or have < vocab:
            diffs["vocab"] = f"checkpoint has {have} token rows, the tokenizer needs {vocab}"
        elif have > vocab:
            notes.append(f"vocab: {have} rows for a {vocab}-token tokenizer ({have - vocab} padding rows unused)")
    report["target"] = {"config": target.to_dict() if target is not None else None, "vocab": vocab}
    report["fits"] = not diffs
    report["differences"] = diffs
    return report


def format_report(r: dict[str, Any], config_name: Optional[str] = None, max_keys: int = 10) -> str:
    """The human-readable report."""
    out = [f"path:        {r['path']}", f"format:      {r['format']}: {r['description']}"]
    if r["config"] is not None:
        c = r["config"]
        out.append("config:      " + " ".join(f"{k}={c[k]}" for k in c))
    else:
        out.append(f"config:      unknown ({r['config_error']})")
        if r["shapes_say"]:
            out.append("shapes say:  " + " ".join(f"{k}={v}" for k, v in r["shapes_say"].items()))
    out.append(f"parameters:  {r['parameters']:,} ({r['parameters'] / 1e6:.1f}M)")
    out.append(f"dtype:       {r['dtype']}")
    out.append(f"vocab size:  {r['vocab_size']}")
    for key in ("step", "tokens", "tokenizer"):
        if r[key] is not None:
            val = f"{r[key]:,}" if isinstance(r[key], int) else r[key]
            out.append(f"{key + ':':<12} {val}")
    for k, v in r["meta"].items():
        out.append(f"{k + ':':<12} {v}")
    for n in r["notes"]:
        out.append(f"note:        {n}")
    if r.get("consistent") is False:
        out.append("CONFIG DOES NOT MATCH THE WEIGHTS: the checkpoint's own config describes other tensors "
                   "(edited or foreign config); it will not load")
        inc = r["inconsistencies"]
        for key, label in (("missing", "tensors the config expects but the file lacks"),
                           ("unexpected", "tensors in the file the config does not know")):
            if key in inc:
                names = inc[key]
                more = f" ... and {len(names) - max_keys} more" if len(names) > max_keys else ""
                out.append(f"  {label} ({len(names)}): {', '.join(names[:max_keys])}{more}")
        for item in inc.get("shape_mismatch", [])[:max_keys]:
            out.append(f"  {item['key']}: file {tuple(item['checkpoint'])}, config {tuple(item['config'])}")
    if r["fits"] is None:
        return "\n".join(out)
    what = " and ".join(x for x in (f"--config {config_name}" if config_name else None,
                                     f"--vocab {r['target']['vocab']}" if r["target"]["vocab"] else None) if x)
    out.append(f"fits {what}: {'yes' if r['fits'] else 'NO'}")
    d = r["differences"]
    for item in d.get("config", []):
        out.append(f"  config {item['field']}: checkpoint {item['checkpoint']!r}, target {item['target']!r}")
    for key, label in (("missing", "missing keys"), ("unexpected", "unexpected keys")):
        if key in d:
            names = d[key]
            more = f" ... and {len(names) - max_keys} more" if len(names) > max_keys else ""
            out.append(f"  {label} ({len(names)}): {', '.join(names[:max_keys])}{more}")
    if "shape_mismatch" in d:
        sm = d["shape_mismatch"]
        out.append(f"  shape mismatches ({len(sm)}):")
        for item in sm[:max_keys]:
            out.append(f"    {item['key']}: checkpoint {tuple(item['checkpoint'])}, target {tuple(item['target'])}")
        if len(sm) > max_keys:
            out.append(f"    ... and {len(sm) - max_keys} more")
    if "vocab" in d:
        out.append(f"  vocab: {d['vocab']}")
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    return run_cli("gptcore.inspect_ckpt", _main, argv)


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m gptcore.inspect_ckpt", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="checkpoint file or folder: gptcore folder or .safetensors+.json, Hugging "
                                 "Face GPT-2 folder, nanoGPT ckpt.pt, LLMs-from-scratch .pth, bare state_dict")
    ap.add_argument("--config", metavar="PRESET|JSON",
                    help="model to check the checkpoint against: a preset name (gpt2, tiny, ...), a JSON "
                         "file or inline JSON with gptcore, nanoGPT, LLMs-from-scratch or HF keys. For "
                         "files that carry no config and have no JSON beside them it also supplies n_heads")
    ap.add_argument("--vocab", type=int, metavar="N",
                    help="tokenizer vocabulary size; the checkpoint fits if it has at least N token rows")
    ap.add_argument("--json", action="store_true", help="print the report as JSON (for scripts)")
    ap.add_argument("--trust-pickle", action="store_true",
                    help="allow full unpickling of .pt/.pth/.bin files that a weights-only load refuses; "
                         "this can run code stored in the file: use only for files you trust")
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    if args.vocab is not None and args.vocab <= 0:
        ap.error(f"--vocab must be positive, got {args.vocab}")
    try:
        report = inspect_checkpoint(args.path, args.config, args.vocab, args.trust_pickle)
    except (CheckpointError, OSError, ValueError, TypeError) as e:
        if args.debug or debug_enabled(argv):
            raise
        if isinstance(e, OSError) and type(e).__module__ == "builtins" and not isinstance(e, FileNotFoundError):
            e = describe_os_error(e)
        if args.json:
            print(json.dumps({"path": args.path, "error": str(e)}, indent=2))
        else:
            print(f"gptcore.inspect_ckpt: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report, args.config))
    return 1 if report["fits"] is False or report["consistent"] is False else 0


if __name__ == "__main__":
    sys.exit(main())
