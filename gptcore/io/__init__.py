"""gptcore's checkpoint I/O: one reader for every format, one ``Checkpoint``, one ``load_model``.

    from gptcore.io import read_checkpoint, load_model, save_checkpoint, from_hf, save_hf
    ck = read_checkpoint("out")               # any format; here a run directory (follows out/latest)
    ck.format, ck.config, ck.state_dict, ck.summary()
    model = load_model("gpt2-folder", device="cuda")   # any format -> GPT, eval mode
    save_hf(model, "out/hf")                  # transformers' GPT2LMHeadModel.from_pretrained loads it

Formats (``read_checkpoint`` tells them apart by the path and the file's contents):
  gptcore-train      what ``python -m gptcore.train`` writes: ckpt-NNNNNNN/ (model.safetensors,
                     state.pt, meta.json with SHA-256s) or the run directory (train_ckpt.py)
  gptcore            model.safetensors + gptcore.json (weights-only; ``save_gptcore``)
  gptcore-pt, nanogpt, llms-from-scratch, state_dict: torch.save'd files (formats.py)
  hf                 Hugging Face GPT-2 folders; conversion both ways as free functions (hf.py)

Every reader returns gptcore's names and layout (Linear weights (out, in)), lm_head.weight
included (the same tensor as transformer.wte.weight when tied). Nothing is unpickled beyond
tensors and plain containers unless the caller passes trust_pickle=True (--trust-pickle).

Modules, each importing only those before it: common (errors, Checkpoint, safe readers),
durable (atomic writes), weights (fit checks, build_model), train_ckpt, hf, formats
(read_checkpoint), load (load_model, load_pretrained).
"""
from gptcore.io.common import (FORMAT_VERSION, Checkpoint, CheckpointError, FormatError, UntrustedPickleError,
                               strip_prefixes)
from gptcore.io.durable import atomic_write_text, remove_stale_temps
from gptcore.io.formats import read_checkpoint, resolve_config, save_gptcore
from gptcore.io.hf import config_from_hf, config_to_hf, download, from_hf, save_hf, state_dict_from_hf, state_dict_to_hf
from gptcore.io.load import load_any, load_model, load_pretrained
from gptcore.io.train_ckpt import (capture_rng, find_latest, list_checkpoints, load_checkpoint, prune_checkpoints,
                                   read_meta, resolve_checkpoint, restore_rng, save_checkpoint, update_latest)
from gptcore.io.weights import (build_model, check_state_dict, count_params, diff_state_dict, infer_config_fields,
                                load_weights, model_state_dict, unwrap)

__all__ = [
    "FORMAT_VERSION", "Checkpoint", "CheckpointError", "FormatError", "UntrustedPickleError", "strip_prefixes",
    "atomic_write_text", "remove_stale_temps", "read_checkpoint", "resolve_config", "save_gptcore",
    "config_from_hf", "config_to_hf", "download", "from_hf", "save_hf", "state_dict_from_hf", "state_dict_to_hf",
    "load_any", "load_model", "load_pretrained", "capture_rng", "find_latest", "list_checkpoints",
    "load_checkpoint", "prune_checkpoints", "read_meta", "resolve_checkpoint", "restore_rng", "save_checkpoint",
    "update_latest", "build_model", "check_state_dict", "count_params", "diff_state_dict", "infer_config_fields",
    "load_weights", "model_state_dict", "unwrap",
]
