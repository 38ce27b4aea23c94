"""Hugging Face GPT-2 weights in and out, as free functions.

    from gptcore.io import from_hf, save_hf, load_pretrained, download
    model = from_hf("path/to/gpt2")              # a local folder: config.json + model.safetensors
    save_hf(model, "out/my-gpt2")                # transformers.GPT2LMHeadModel.from_pretrained loads it
    model = load_pretrained("gpt2")              # a path (any format), or a known name: HF cache, else download
    folder = download("gpt2-medium")             # needs network (huggingface_hub, else urllib)

Folders from gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2 and GPT2LMHeadModel.save_pretrained
load: weights from model.safetensors, pytorch_model.bin or their sharded *.index.json, keys with
or without the "transformer." prefix, lm_head.weight present or not (tied).

Layout: HF's GPT-2 uses Conv1D, which stores its weight as (in, out); gptcore's nn.Linear stores
(out, in). The four Conv1D weights per block (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) are
transposed on the way in and out; every other tensor keeps its name and layout.

HF configs gptcore cannot run exactly are refused with the reason: another model_type or
activation (erf GELU, ReLU, ...), scale_attn_by_inverse_layer_idx, scale_attn_weights=False,
cross-attention, rotary settings. reorder_and_upcast_attn only changes where the attention
softmax rounds (it computes the same function) and loads.
"""
from __future__ import annotations

import json
import os
import re
import urllib.request
from pathlib import Path
from typing import Any, Optional

import torch

from gptcore.config import GPTConfig
from gptcore.io.common import Checkpoint, FormatError, PathLike, load_safetensors, read_json, strip_prefixes, torch_load
from gptcore.io.weights import as_dtype, build_model, finish_state_dict, state_dict_dtype

# Short names -> Hugging Face Hub repositories.
KNOWN_MODELS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}
# What a download fetches: enough to run the model (gptcore's tokenizer is tiktoken's gpt2).
DOWNLOAD_FILES = ("config.json", "model.safetensors")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")

# The four Conv1D weights of a block, stored (in, out) by HF and (out, in) by gptcore.
_CONV1D = re.compile(r"^transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
_HF_BUFFER = re.compile(r"\.attn\.(bias|masked_bias)$")
# tanh-approximation GELUs (all the same formula); "gelu" in HF is the erf GELU.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


# ---- model-level API ------------------------------------------------------------------------
def from_hf(path: PathLike, backend: Optional[str] = None, dtype=None, device="cpu"):
    """GPT from a local Hugging Face GPT-2 folder (dtype None: the file's dtype), in eval mode."""
    ck = read_hf_folder(_hf_folder(path))
    return build_model(ck.config, ck.state_dict, backend=backend, dtype=dtype, device=device, source=str(ck.path))


def save_hf(model, path: PathLike, dtype=None) -> Path:
    """Write PATH/config.json + PATH/model.safetensors that transformers' GPT2LMHeadModel loads."""
    from safetensors.torch import save_file

    cfg: GPTConfig = model.config
    sd = model.state_dict()
    dtype = as_dtype(dtype) if dtype is not None else state_dict_dtype(sd)
    hf_sd = state_dict_to_hf({k: v.detach().to(dtype) for k, v in sd.items()}, cfg)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype), indent=2) + "\n")
    return out


# ---- reading a folder -----------------------------------------------------------------------
def read_hf_folder(folder: PathLike, trust_pickle: bool = False) -> Checkpoint:
    """Convert a local HF GPT-2 folder to a gptcore Checkpoint (config + gptcore-named state_dict)."""
    folder = Path(folder)
    hf_config = read_json(folder / "config.json")
    config, notes = config_from_hf(hf_config, where=str(folder / "config.json"))
    weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if weights is None:
        found = ", ".join(sorted(x.name for x in folder.iterdir()))
        raise FormatError(
            f"{folder}: no PyTorch weights ({' / '.join(WEIGHT_FILES)}); found: {found}. "
            f"TensorFlow/Flax-only folders need converting with transformers first"
        )
    raw = _read_weights(weights, trust_pickle)
    sd = state_dict_from_hf(raw)
    if config.tie_weights:
        sd.pop("lm_head.weight", None)  # HF ties these: the embedding is the one that counts
    notes = notes + ["HF Conv1D weights transposed to (out, in)"]
    meta: dict[str, Any] = {}
    tok = [f for f in ("tokenizer.json", "vocab.json", "merges.txt") if (folder / f).is_file()]
    if tok:
        meta["tokenizer"] = f"{hf_config.get('model_type', 'gpt2')} BPE files: {', '.join(tok)}"
    for key in ("_name_or_path", "transformers_version"):
        if key in hf_config:
            meta[key.lstrip("_")] = hf_config[key]
    return Checkpoint(folder, "hf", f"Hugging Face GPT-2 folder (config.json + {weights.name})",
                      finish_state_dict(sd, config), config, meta, notes)


def _read_weights(path: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    if path.name.endswith(".index.json"):
        out: dict[str, torch.Tensor] = {}
        for shard in _index_shards(path):
            out.update(_read_weights(shard, trust_pickle))
        return out
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    obj = torch_load(path, trust_pickle=trust_pickle)
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: expected a state_dict, found {type(obj).__name__}")
    return obj


def _index_shards(index: Path) -> list[Path]:
    """The shard files a sharded-checkpoint index names, each once; every shard must be a weight
    file inside the index's folder (no paths out of it, no index naming an index)."""
    try:
        wm = json.loads(index.read_text())["weight_map"]
        names = sorted(set(wm.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise FormatError(f"{index}: not a readable sharded-checkpoint index (needs a 'weight_map' object of "
                          f"tensor name -> shard file; {type(e).__name__}: {e})") from None
    root = index.parent.resolve()
    shards = []
    for name in names:
        if not isinstance(name, str) or not name or name.endswith(".index.json"):
            raise FormatError(f"{index}: shard {name!r} is not a weight file")
        p = index.parent / name
        try:
            inside = p.resolve().parent == root
        except (OSError, RuntimeError):  # a symlink loop
            inside = False
        if Path(name).name != name or not inside:
            raise FormatError(f"{index}: shard {name!r} lies outside {index.parent}; an index may only name "
                              f"files beside it")
        if not p.is_file():
            raise FormatError(f"{index}: shard {name} is missing from {index.parent}")
        if p.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
            raise FormatError(f"{index}: shard {name!r} is not a .safetensors or .bin weight file")
        shards.append(p)
    return shards


def _hf_folder(path: PathLike) -> Path:
    p = Path(path)
    if p.is_file():
        p = p.parent
    if not (p / "config.json").is_file():
        raise FormatError(
            f"{path} is not a Hugging Face GPT-2 folder (no config.json). For a name such as 'gpt2' "
            f"use gptcore.io.load_pretrained; for other checkpoints gptcore.io.load_model"
        )
    return p


# ---- config conversion ----------------------------------------------------------------------
def config_from_hf(d: dict[str, Any], where: str = "config.json") -> tuple[GPTConfig, list[str]]:
    """GPTConfig of an HF GPT-2 config dict, plus notes; unsupported settings raise FormatError."""
    def refuse(what: str) -> FormatError:
        return FormatError(f"{where}: {what}; gptcore runs GPT-2's architecture only")

    if "model_type" not in d and "n_embd" not in d:
        raise FormatError(f"{where} is not a Hugging Face GPT-2 config (no model_type or n_embd)")
    mt = d.get("model_type", "gpt2")
    if mt != "gpt2":
        raise refuse(f"model_type is {mt!r}, not 'gpt2'")
    act = d.get("activation_function", "gelu_new")
    if act not in _TANH_GELUS:
        raise refuse(f"activation_function {act!r} is not the tanh GELU ({', '.join(_TANH_GELUS)})")
    if d.get("scale_attn_by_inverse_layer_idx"):
        raise refuse("scale_attn_by_inverse_layer_idx=true (attention scaled by 1/(layer+1)) is not supported")
    if d.get("scale_attn_weights", True) is False:
        raise refuse("scale_attn_weights=false (unscaled attention scores) is not supported")
    if d.get("add_cross_attention"):
        raise refuse("add_cross_attention=true (encoder-decoder cross-attention) is not supported")
    rotary = sorted(k for k, v in d.items()
                    if re.search(r"(^|_)(rope|rotary)(_|$)", k) and v not in (None, False, {}))
    if rotary:
        raise refuse(f"rotary settings {rotary} are not part of HF GPT-2 (learned positions)")
    if d.get("position_embedding_type", "absolute") != "absolute":
        raise refuse(f"position_embedding_type {d['position_embedding_type']!r}: GPT-2 learns absolute positions")
    C = d.get("n_embd", 768)
    inner = d.get("n_inner")
    if inner is not None and inner % C:
        raise refuse(f"n_inner={inner} is not a multiple of n_embd={C}")
    notes = []
    drops = {d.get(k, 0.1) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    drop = d.get("resid_pdrop", 0.1)
    if len(drops) > 1:
        notes.append(f"HF dropouts differ ({sorted(drops)}); gptcore has one drop_rate, set to resid_pdrop={drop}")
    if d.get("reorder_and_upcast_attn"):
        notes.append("reorder_and_upcast_attn only changes rounding in HF; gptcore computes the same function")
    config = GPTConfig(
        vocab_size=d.get("vocab_size", 50257),
        context_length=d.get("n_positions", d.get("n_ctx", 1024)),
        emb_dim=C,
        n_heads=d.get("n_head", 12),
        n_layers=d.get("n_layer", 12),
        drop_rate=float(drop),
        qkv_bias=True,
        ff_mult=4 if inner is None else inner // C,
        ln_eps=d.get("layer_norm_epsilon", 1e-5),
        tie_weights=bool(d.get("tie_word_embeddings", True)),
    )
    return config, notes


def config_to_hf(cfg: GPTConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A GPT2Config dict (config.json) for cfg; rotary position embeddings have no HF GPT-2 form."""
    if cfg.pos_emb != "learned":
        raise ValueError(
            f"save_hf: pos_emb={cfg.pos_emb!r} has no Hugging Face GPT-2 equivalent (GPT-2 learns a "
            f"position table); save with gptcore.io.save_gptcore instead"
        )
    gpt2_tokens = cfg.vocab_size > 50256  # the GPT-2 tokenizer's <|endoftext|> is id 50256
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": None if cfg.ff_mult == 4 else cfg.ff_dim,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate,
        "layer_norm_epsilon": cfg.ln_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "use_cache": True,
        "tie_word_embeddings": cfg.tie_weights,
        "bos_token_id": 50256 if gpt2_tokens else None,
        "eos_token_id": 50256 if gpt2_tokens else None,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


# ---- state_dict conversion --------------------------------------------------------------------
def state_dict_from_hf(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF GPT-2 names and Conv1D layout -> gptcore names and (out, in) Linear weights."""
    sd = {}
    for k, v in strip_prefixes(raw).items():
        if _HF_BUFFER.search(k):
            continue  # causal-mask buffers of older transformers versions
        if k != "lm_head.weight" and not k.startswith("transformer."):
            k = "transformer." + k  # GPT2Model files (e.g. the Hub's gpt2) have no prefix
        sd[k] = v.t() if _CONV1D.match(k) else v
    return sd


def state_dict_to_hf(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """gptcore state_dict -> HF GPT2LMHeadModel names and layout (contiguous, no shared tensors)."""
    out = {}
    for k, v in sd.items():
        if k == "lm_head.weight" and cfg.tie_weights:
            continue  # HF re-ties it to transformer.wte.weight on load
        out[k] = (v.t() if _CONV1D.match(k) else v).contiguous()
    if not cfg.qkv_bias:
        # HF GPT-2 always has a c_attn bias; zeros compute the same function as none.
        w = sd["transformer.wte.weight"]
        for i in range(cfg.n_layers):
            out[f"transformer.h.{i}.attn.c_attn.bias"] = torch.zeros(3 * cfg.emb_dim, dtype=w.dtype)
    return out


# ---- the Hub -----------------------------------------------------------------------------------
def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _repo(name: str) -> str:
    return KNOWN_MODELS.get(name, name)


def _gptcore_cache(repo: str, cache_dir: Optional[PathLike]) -> Path:
    root = Path(cache_dir) if cache_dir else Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gptcore" / "hf"
    return root / repo.replace("/", "--")


def find_cached(name: str, cache_dir: Optional[PathLike] = None) -> Optional[Path]:
    """A local folder already holding name's files (HF cache or gptcore's download cache), or None."""
    repo = _repo(name)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        snapshot_download = None
    if snapshot_download is not None:
        try:
            p = Path(snapshot_download(repo, allow_patterns=list(DOWNLOAD_FILES), cache_dir=cache_dir,
                                       local_files_only=True))
            if all((p / f).is_file() for f in DOWNLOAD_FILES):
                return p
        except Exception:  # not in the cache: huggingface_hub raises one of several error types
            pass
    own = _gptcore_cache(repo, cache_dir)
    return own if all((own / f).is_file() for f in DOWNLOAD_FILES) else None


def download(name: str, cache_dir: Optional[PathLike] = None) -> Path:
    """Fetch config.json + model.safetensors of a known name or Hub id; returns the local folder.

    Uses huggingface_hub when installed (its cache, its auth), else plain urllib into
    ~/.cache/gptcore/hf (or cache_dir). Offline, it raises ConnectionError naming the URL and how
    to use a folder copied from elsewhere instead.
    """
    repo = _repo(name)
    url = f"{_endpoint()}/{repo}/resolve/main/"
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        snapshot_download = None
    try:
        if snapshot_download is not None:
            return Path(snapshot_download(repo, allow_patterns=list(DOWNLOAD_FILES), cache_dir=cache_dir))
        dest = _gptcore_cache(repo, cache_dir)
        dest.mkdir(parents=True, exist_ok=True)
        for f in DOWNLOAD_FILES:
            if not (dest / f).is_file():
                tmp = dest / (f + ".part")
                with urllib.request.urlopen(url + f, timeout=30) as r, open(tmp, "wb") as out:
                    while chunk := r.read(1 << 20):
                        out.write(chunk)
                tmp.replace(dest / f)
        return dest
    except Exception as e:  # urllib's and huggingface_hub's many error types (offline, HTTP, auth)
        raise ConnectionError(_offline_message(name, url, e)) from None


def _offline_message(name: str, url: str, err: Exception) -> str:
    files = " and ".join(url + f for f in DOWNLOAD_FILES)
    return (
        f"could not download {name!r}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}\n"
        f"It needs {files}. On a machine without network, fetch those two files elsewhere, put them "
        f"in one folder, and pass the folder's path instead of the name (e.g. --init-from /path/to/{name})."
    )
