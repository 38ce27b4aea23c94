"""Interop: Hugging Face GPT-2 in and out, nanoGPT and LLMs-from-scratch in, gptcore's own format,
pickle safety, and the inspect CLI.

    python -m pytest -q tests/test_interop.py          # CPU, small models (transformers needed)

Every golden test compares gptcore against an independent computation of the same function:
transformers' GPT2LMHeadModel for HF folders, a from-the-book forward pass written here for
LLMs-from-scratch weights, and a directly built gptcore model for nanoGPT/gptcore checkpoints.
Tests marked ``gpu`` repeat the HF comparison at GPT-2 124M size on CUDA.
"""
import argparse
import contextlib
import copy
import io
import json
import math
import random
import shutil
import sys

import pytest
import torch

from errcheck import assert_error_within
from gptcore import GPT, GPTConfig
from gptcore import io as hf
from gptcore.io import (FormatError, UntrustedPickleError, from_hf, load_any, load_model, save_gptcore,
                        save_hf)
from gptcore.inspect_ckpt import main as inspect_main

transformers = pytest.importorskip("transformers")

ON_GPU = torch.cuda.is_available()
BACKENDS = ["reference", "torch", "triton"]
SMALL = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64)


# ---- helpers -----------------------------------------------------------------------------------
def _randomize_(module: torch.nn.Module, std: float = 0.1) -> None:
    """Random values in every parameter (biases and LayerNorm too, so no mapping hides behind 0/1)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1 and ".ln" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)


def _hf_model(**overrides):
    cfg = transformers.GPT2Config(**{**SMALL, "bos_token_id": None, "eos_token_id": None, **overrides})
    model = transformers.GPT2LMHeadModel(cfg)
    _randomize_(model)
    return model.eval()


def _hf_logits(model, idx, dtype=torch.float32):
    """transformers' logits with the model's weights in dtype (a copy: the model is left as is)."""
    m = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        return m(idx.to(next(m.parameters()).device)).logits


def _gpt(cfg: GPTConfig, backend="torch") -> GPT:
    model = GPT(cfg, backend=backend)
    _randomize_(model)
    return model.eval()


def _logits(model, idx):
    with torch.no_grad():
        return model(idx)


def _greedy(model, idx, n):
    """Greedy decoding without a cache: argmax of the last position, n times."""
    for _ in range(n):
        nxt = _logits(model, idx)[:, -1].argmax(-1, keepdim=True)
        idx = torch.cat([idx, nxt], dim=1)
    return idx


def _tokens(vocab, B=2, T=13):
    return torch.randint(0, vocab, (B, T))


# ---- Hugging Face: in --------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_hf_folder_logits_match_transformers(tmp_path, backend, device):
    h = _hf_model()
    h.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    model = from_hf(tmp_path, backend=backend)
    assert model.config == GPTConfig(vocab_size=1000, context_length=64, emb_dim=64, n_heads=4, n_layers=2,
                                     drop_rate=0.1)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    model, h, idx = model.to(device), h.to(device), _tokens(1000).to(device)  # triton needs CUDA on a GPU box
    oracle = _hf_logits(h, idx, torch.float64)
    assert_error_within(_logits(model, idx), _hf_logits(h, idx), oracle, name=f"from_hf logits ({backend})")


def test_hf_float64_load_is_exact(tmp_path):
    """In float64 the only difference left is summation order: a mapping error cannot hide."""
    h = _hf_model()
    h.save_pretrained(tmp_path)
    model = from_hf(tmp_path, backend="reference", dtype=torch.float64)
    assert next(model.parameters()).dtype == torch.float64
    idx = _tokens(1000)
    oracle = _hf_logits(h, idx, torch.float64)
    assert_error_within(_logits(model, idx), oracle, oracle, atol=1e-9, name="float64 logits")


def test_hf_pytorch_bin_without_prefix(tmp_path):
    """pytorch_model.bin with GPT2Model names (no "transformer."), old attn.bias buffers, no lm_head."""
    h = _hf_model()
    h.save_pretrained(tmp_path / "st")
    raw = {k.removeprefix("transformer."): v for k, v in h.state_dict().items() if k != "lm_head.weight"}
    T = SMALL["n_positions"]
    for i in range(SMALL["n_layer"]):
        raw[f"h.{i}.attn.bias"] = torch.tril(torch.ones(T, T, dtype=torch.bool)).view(1, 1, T, T)
        raw[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    (tmp_path / "bin").mkdir()
    torch.save(raw, tmp_path / "bin" / "pytorch_model.bin")
    shutil.copy(tmp_path / "st" / "config.json", tmp_path / "bin" / "config.json")
    a = from_hf(tmp_path / "st").state_dict()
    b = from_hf(tmp_path / "bin").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg, _, meta = load_any(tmp_path / "bin" / "pytorch_model.bin")  # the file inside the folder works too
    assert meta["format"] == "hf" and cfg.n_layers == SMALL["n_layer"]


def test_hf_reorder_and_upcast_attn_is_the_same_function(tmp_path):
    h = _hf_model(reorder_and_upcast_attn=True)
    h.save_pretrained(tmp_path)
    model = from_hf(tmp_path, backend="torch")
    idx = _tokens(1000)
    assert_error_within(_logits(model, idx), _hf_logits(h, idx), _hf_logits(h, idx, torch.float64))


@pytest.mark.parametrize("change, word", [
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"activation_function": "gelu"}, "activation_function"),
    ({"activation_function": "relu"}, "activation_function"),
    ({"model_type": "llama"}, "model_type"),
    ({"scale_attn_weights": False}, "scale_attn_weights"),
    ({"add_cross_attention": True}, "add_cross_attention"),
    ({"rope_theta": 10000.0}, "rotary"),
    ({"n_inner": 100}, "n_inner"),
])
def test_hf_unsupported_config_is_refused(tmp_path, change, word):
    d = {"model_type": "gpt2", **SMALL, **change}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(FormatError, match=word):
        from_hf(tmp_path)


def test_hf_folder_without_pytorch_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", **SMALL}))
    (tmp_path / "tf_model.h5").write_bytes(b"")
    with pytest.raises(FormatError, match="no PyTorch weights.*tf_model.h5"):
        from_hf(tmp_path)


def test_hf_sharded_safetensors(tmp_path):
    from safetensors.torch import save_file
    h = _hf_model()
    sd = {k: v.contiguous() for k, v in h.state_dict().items() if k != "lm_head.weight"}
    names = sorted(sd)
    half = {n: ("a.safetensors" if i % 2 else "b.safetensors") for i, n in enumerate(names)}
    for shard in ("a.safetensors", "b.safetensors"):
        save_file({n: sd[n] for n in names if half[n] == shard}, str(tmp_path / shard), metadata={"format": "pt"})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": half}))
    h.config.to_json_file(tmp_path / "config.json")
    model = from_hf(tmp_path, backend="torch")
    idx = _tokens(1000)
    assert_error_within(_logits(model, idx), _hf_logits(h, idx), _hf_logits(h, idx, torch.float64))


# ---- Hugging Face: out -------------------------------------------------------------------------
@pytest.mark.parametrize("tie, qkv_bias, ff_mult", [(True, True, 4), (False, False, 4), (True, True, 2)])
def test_save_hf_loads_in_transformers(tmp_path, tie, qkv_bias, ff_mult):
    cfg = GPTConfig.from_preset("tiny", vocab_size=997, tie_weights=tie, qkv_bias=qkv_bias, ff_mult=ff_mult)
    model = _gpt(cfg)
    save_hf(model, tmp_path)
    h, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    h.eval()
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert (h.lm_head.weight is h.transformer.wte.weight) == tie
    idx = _tokens(997)
    oracle = _logits(_gpt_copy(model, "reference", torch.float64), idx)
    assert_error_within(_hf_logits(h, idx), _logits(model, idx), oracle, name="HF logits of save_hf output")
    # And back: every tensor returns bit for bit (qkv_bias=False comes back as zero c_attn biases).
    back = from_hf(tmp_path).state_dict()
    want = model.state_dict()
    assert all(torch.equal(back[k], want[k]) for k in want)
    extra = set(back) - set(want)
    assert extra == (set() if qkv_bias else {f"transformer.h.{i}.attn.c_attn.bias" for i in range(cfg.n_layers)})
    assert all(not back[k].any() for k in extra)


def _gpt_copy(model: GPT, backend, dtype) -> GPT:
    m = GPT(model.config, backend=backend).to(dtype)
    m.load_state_dict(model.state_dict())
    return m.eval()


def test_save_hf_refuses_rope(tmp_path):
    with pytest.raises(ValueError, match="rope.*no Hugging Face GPT-2 equivalent"):
        save_hf(_gpt(GPTConfig.from_preset("tiny", pos_emb="rope")), tmp_path)


def test_greedy_generation_matches_transformers(tmp_path):
    """Same greedy continuation as transformers.generate (float64 on both sides: no near-ties)."""
    h = _hf_model().double()
    h.save_pretrained(tmp_path)
    model = from_hf(tmp_path, backend="reference")
    assert next(model.parameters()).dtype == torch.float64
    prompt = _tokens(1000, B=2, T=5)
    n = 12
    with torch.no_grad():
        want = h.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
                          pad_token_id=0, attention_mask=torch.ones_like(prompt))
    got = _greedy(model, prompt, n)
    assert torch.equal(got, want), f"gptcore {got.tolist()} vs transformers {want.tolist()}"
    # The exported model generates the same text again.
    save_hf(model, tmp_path / "out")
    h2 = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        again = h2.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
                            pad_token_id=0, attention_mask=torch.ones_like(prompt))
    assert torch.equal(again, want)


# ---- the Hub: cache, download, offline ---------------------------------------------------------
def test_load_pretrained_from_cache_and_path(tmp_path):
    h = _hf_model()
    folder = tmp_path / "cache" / "openai-community--gpt2"  # gptcore's own download-cache layout
    h.save_pretrained(folder)
    by_name = hf.load_pretrained("gpt2", backend="torch", cache_dir=tmp_path / "cache")
    by_path = hf.load_pretrained(str(folder), backend="torch")
    idx = _tokens(1000)
    assert torch.equal(_logits(by_name, idx), _logits(by_path, idx))


def test_download_offline_error_names_url_and_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # take the urllib path
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")     # nothing listens there
    with pytest.raises(ConnectionError) as e:
        hf.download("gpt2", cache_dir=tmp_path)
    msg = str(e.value)
    assert "http://127.0.0.1:9/openai-community/gpt2/resolve/main/model.safetensors" in msg
    assert "folder" in msg and "--init-from" in msg


def test_load_pretrained_unknown_name():
    with pytest.raises(ValueError, match="neither an existing file/folder nor a known model name"):
        hf.load_pretrained("surely-not-a-model")


# ---- nanoGPT -----------------------------------------------------------------------------------
def _nanogpt_ckpt(model: GPT, bias: bool, compiled: bool, flash: bool) -> dict:
    """The dict nanoGPT's train.py saves, with its key layout (ours: nanoGPT's names, (out, in))."""
    cfg = model.config
    sd = dict(model.state_dict())
    if not bias:
        sd = {k: v for k, v in sd.items() if not k.endswith(".bias")}
    if not flash:  # nanoGPT without flash attention keeps its causal mask as a buffer
        T = cfg.context_length
        for i in range(cfg.n_layers):
            sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
    if compiled:
        sd = {"_orig_mod." + k: v for k, v in sd.items()}
    shadow = copy.deepcopy(model)  # optimizer state of one step, without touching the saved weights
    opt = torch.optim.AdamW(shadow.parameters(), lr=1e-3)
    shadow(_tokens(cfg.vocab_size, 1, 4)).sum().backward()
    opt.step()
    return {
        "model": sd, "optimizer": opt.state_dict(),
        "model_args": dict(n_layer=cfg.n_layers, n_head=cfg.n_heads, n_embd=cfg.emb_dim,
                           block_size=cfg.context_length, bias=bias, vocab_size=cfg.vocab_size, dropout=0.0),
        "iter_num": 7, "best_val_loss": torch.tensor(2.5),
        "config": {"dataset": "shakespeare", "batch_size": 4, "block_size": cfg.context_length,
                   "gradient_accumulation_steps": 2},
    }


@pytest.mark.parametrize("bias, compiled, flash", [(True, False, True), (True, True, False), (False, True, True)])
def test_nanogpt_checkpoint(tmp_path, bias, compiled, flash):
    cfg = GPTConfig.from_preset("tiny", vocab_size=301, qkv_bias=bias)
    model = _gpt(cfg)
    if not bias:  # nanoGPT bias=False: no biases anywhere, the same as zero biases
        with torch.no_grad():
            for k, p in model.named_parameters():
                if k.endswith(".bias"):
                    p.zero_()
    idx = _tokens(301)
    want = _logits(model, idx)
    torch.save(_nanogpt_ckpt(model, bias, compiled, flash), tmp_path / "ckpt.pt")
    cfg2, sd, meta = load_any(tmp_path / "ckpt.pt")
    assert cfg2 == cfg.replace(drop_rate=0.0) and meta["format"] == "nanogpt"
    assert meta["step"] == 7 and meta["tokens"] == 7 * 2 * 4 * cfg.context_length
    assert meta["best_val_loss"] == 2.5 and meta["dataset"] == "shakespeare"
    loaded = load_model(tmp_path / "ckpt.pt", backend="torch")
    assert torch.equal(_logits(loaded, idx), want)


def test_nanogpt_unknown_model_args(tmp_path):
    model = _gpt(GPTConfig.from_preset("tiny"))
    ck = _nanogpt_ckpt(model, True, False, True)
    ck["model_args"]["n_kv_head"] = 2
    torch.save(ck, tmp_path / "ckpt.pt")
    with pytest.raises(FormatError, match="n_kv_head"):
        load_any(tmp_path / "ckpt.pt")


# ---- LLMs-from-scratch ---------------------------------------------------------------------------
def _llms_state_dict(cfg: dict, tied: bool = False) -> dict:
    """Random weights with the keys and shapes of LLMs-from-scratch's GPTModel (ch04/ch05)."""
    V, T, C, L = cfg["vocab_size"], cfg["context_length"], cfg["emb_dim"], cfg["n_layers"]
    r = lambda *s: 0.1 * torch.randn(*s)  # noqa: E731
    sd = {"tok_emb.weight": r(V, C), "pos_emb.weight": r(T, C)}
    for i in range(L):
        b = f"trf_blocks.{i}."
        for w in ("W_query", "W_key", "W_value"):
            sd[b + f"att.{w}.weight"] = r(C, C)
            if cfg["qkv_bias"]:
                sd[b + f"att.{w}.bias"] = r(C)
        sd[b + "att.out_proj.weight"], sd[b + "att.out_proj.bias"] = r(C, C), r(C)
        sd[b + "att.mask"] = torch.triu(torch.ones(T, T), diagonal=1)
        sd[b + "ff.layers.0.weight"], sd[b + "ff.layers.0.bias"] = r(4 * C, C), r(4 * C)
        sd[b + "ff.layers.2.weight"], sd[b + "ff.layers.2.bias"] = r(C, 4 * C), r(C)
        for n in ("norm1", "norm2"):
            sd[b + f"{n}.scale"], sd[b + f"{n}.shift"] = 1 + r(C), r(C)
    sd["final_norm.scale"], sd["final_norm.shift"] = 1 + r(C), r(C)
    sd["out_head.weight"] = sd["tok_emb.weight"].clone() if tied else r(V, C)
    return sd


def _llms_forward(sd: dict, cfg: dict, idx: torch.Tensor, dtype) -> torch.Tensor:
    """LLMs-from-scratch's GPTModel forward (eval mode), written out from the book's equations."""
    w = {k: v.to(dtype) for k, v in sd.items()}
    H, C = cfg["n_heads"], cfg["emb_dim"]
    D = C // H
    B, T = idx.shape

    def norm(x, p):  # their LayerNorm: biased variance, eps 1e-5, scale/shift
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True, unbiased=False)
        return w[p + ".scale"] * (x - mean) / torch.sqrt(var + 1e-5) + w[p + ".shift"]

    def lin(x, p):
        return x @ w[p + ".weight"].T + (w[p + ".bias"] if p + ".bias" in w else 0)

    def gelu(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))

    x = w["tok_emb.weight"][idx] + w["pos_emb.weight"][:T]
    for i in range(cfg["n_layers"]):
        b = f"trf_blocks.{i}."
        h = norm(x, b + "norm1")
        q, k, v = (lin(h, b + f"att.{n}").view(B, T, H, D).transpose(1, 2) for n in ("W_query", "W_key", "W_value"))
        s = (q @ k.transpose(2, 3)).masked_fill(w[b + "att.mask"][:T, :T].bool(), -torch.inf)
        a = torch.softmax(s / D ** 0.5, dim=-1)
        x = x + lin((a @ v).transpose(1, 2).reshape(B, T, C), b + "att.out_proj")
        x = x + lin(gelu(lin(norm(x, b + "norm2"), b + "ff.layers.0")), b + "ff.layers.2")
    return norm(x, "final_norm") @ w["out_head.weight"].T


LLMS_CFG = {"vocab_size": 503, "context_length": 48, "emb_dim": 64, "n_heads": 4, "n_layers": 2,
            "drop_rate": 0.1, "qkv_bias": False}


@pytest.mark.parametrize("qkv_bias, tied, container", [
    (False, False, "sibling-json"), (True, False, "model_state_dict"), (True, True, "sibling-json")])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_llms_from_scratch_state_dict(tmp_path, qkv_bias, tied, container, backend):
    cfg = {**LLMS_CFG, "qkv_bias": qkv_bias}
    sd = _llms_state_dict(cfg, tied)
    path = tmp_path / "model.pth"
    if container == "sibling-json":
        torch.save(sd, path)
        (tmp_path / "model.json").write_text(json.dumps(cfg))
        kwargs = {}
    else:  # ch05's torch.save({"model_state_dict": ..., "optimizer_state_dict": ...}) and an explicit config
        torch.save({"model_state_dict": sd, "optimizer_state_dict": {"state": {}, "param_groups": []}}, path)
        kwargs = {"config": cfg}
    gcfg, _, meta = load_any(path, **kwargs)
    assert meta["format"] == "llms-from-scratch"
    assert gcfg.tie_weights == tied and gcfg.qkv_bias == qkv_bias and gcfg.n_heads == 4
    model = load_model(path, backend=backend, **kwargs)
    idx = _tokens(cfg["vocab_size"])
    with torch.no_grad():
        oracle = _llms_forward(sd, cfg, idx, torch.float64)
        low = _llms_forward(sd, cfg, idx, torch.float32)
    assert_error_within(_logits(model, idx), low, oracle, name=f"LLMs-from-scratch logits ({backend})")


def test_llms_from_scratch_needs_a_config(tmp_path):
    torch.save(_llms_state_dict(LLMS_CFG), tmp_path / "weights.pth")
    with pytest.raises(FormatError, match="n_heads cannot be read off the weights"):
        load_any(tmp_path / "weights.pth")


def test_llms_from_scratch_wrong_config_lists_mismatch(tmp_path):
    torch.save(_llms_state_dict(LLMS_CFG), tmp_path / "weights.pth")
    with pytest.raises(FormatError, match=r"transformer.wte.weight: \(503, 64\) in .*, \(600, 64\) in the model"):
        load_any(tmp_path / "weights.pth", config={**LLMS_CFG, "vocab_size": 600})


# ---- gptcore's own format ----------------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False])
def test_gptcore_format_roundtrip(tmp_path, tie):
    model = _gpt(GPTConfig.from_preset("tiny", vocab_size=211, tie_weights=tie, pos_emb="rope"))
    save_gptcore(tmp_path / "run", model, step=10, tokens=1234, tokenizer="gpt2")
    cfg, sd, meta = load_any(tmp_path / "run")
    assert cfg == model.config and meta["format"] == "gptcore"
    assert (meta["step"], meta["tokens"], meta["tokenizer"]) == (10, 1234, "gpt2")
    want = model.state_dict()
    assert sd.keys() == want.keys() and all(torch.equal(sd[k], want[k]) for k in want)
    # The same pair as X.safetensors + X.json.
    shutil.copy(tmp_path / "run" / "model.safetensors", tmp_path / "x.safetensors")
    shutil.copy(tmp_path / "run" / "gptcore.json", tmp_path / "x.json")
    idx = _tokens(211)
    assert torch.equal(_logits(load_model(tmp_path / "x.safetensors", backend="torch"), idx), _logits(model, idx))


def test_gptcore_torch_checkpoint(tmp_path):
    model = _gpt(GPTConfig.from_preset("tiny", vocab_size=211))
    torch.save({"model": model.state_dict(), "config": model.config.to_dict(), "step": 3}, tmp_path / "c.pt")
    cfg, sd, meta = load_any(tmp_path / "c.pt")
    assert meta["format"] == "gptcore-pt" and meta["step"] == 3 and cfg == model.config


# ---- pickle safety -----------------------------------------------------------------------------
def test_untrusted_pickle_is_refused_unless_trusted(tmp_path):
    model = _gpt(GPTConfig.from_preset("tiny", vocab_size=211))
    ck = _nanogpt_ckpt(model, True, False, True)
    ck["args"] = argparse.Namespace(lr=1e-3)  # an arbitrary pickled object, as some old checkpoints hold
    torch.save(ck, tmp_path / "ckpt.pt")
    with pytest.raises(UntrustedPickleError, match="argparse.Namespace.*trust_pickle=True.*--trust-pickle"):
        load_any(tmp_path / "ckpt.pt")
    cfg, _, _ = load_any(tmp_path / "ckpt.pt", trust_pickle=True)
    assert cfg.vocab_size == 211


# ---- inspect CLI -------------------------------------------------------------------------------
def _cli(*args):
    """inspect_ckpt's main in this process (python -m gptcore.inspect_ckpt is test_cli_sweep's
    subprocess case): (returncode, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = inspect_main([str(a) for a in args])
        except SystemExit as e:  # --help, argparse errors
            rc = e.code
    return argparse.Namespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


def test_inspect_cli_help_documents_every_flag():
    r = _cli("--help")
    assert r.returncode == 0
    for flag in ("--config", "--vocab", "--json", "--trust-pickle", "Exit status"):
        assert flag in r.stdout


def test_inspect_cli_hf_fits_and_mismatch(tmp_path):
    h = _hf_model()
    h.save_pretrained(tmp_path / "hf")
    same = json.dumps({"vocab_size": 1000, "context_length": 64, "emb_dim": 64, "n_heads": 4, "n_layers": 2})
    ok = _cli(tmp_path / "hf", "--config", same, "--vocab", 1000)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "format:      hf" in ok.stdout and "fits" in ok.stdout and "yes" in ok.stdout

    bad = _cli(tmp_path / "hf", "--config", "tiny", "--json")  # tiny has the 50257-token vocab
    assert bad.returncode == 1, bad.stdout + bad.stderr
    rep = json.loads(bad.stdout)
    assert rep["format"] == "hf" and rep["fits"] is False and rep["parameters"] == h.num_parameters()
    assert {"key": "transformer.wte.weight", "checkpoint": [1000, 64], "target": [50257, 64]} in \
        rep["differences"]["shape_mismatch"]
    assert {"field": "vocab_size", "checkpoint": 1000, "target": 50257} in rep["differences"]["config"]


def test_inspect_cli_refuses_untrusted_pickle(tmp_path):
    torch.save({"model": {}, "args": argparse.Namespace(x=1)}, tmp_path / "evil.pt")
    r = _cli(tmp_path / "evil.pt")
    assert r.returncode == 2 and "--trust-pickle" in r.stderr


def test_inspect_nanogpt_reports_training_state(tmp_path, capsys):
    model = _gpt(GPTConfig.from_preset("tiny", vocab_size=50304, qkv_bias=False))
    torch.save(_nanogpt_ckpt(model, False, True, True), tmp_path / "ckpt.pt")
    assert inspect_main([str(tmp_path / "ckpt.pt"), "--vocab", "50257", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["format"] == "nanogpt" and rep["step"] == 7 and rep["tokens"] == 7 * 2 * 4 * 64
    assert rep["parameters"] == model.num_params() and rep["dtype"] == "float32"
    assert any("47 padding rows" in n for n in rep["notes"])
    # Fits a config that is the same but for dropout; not one with more layers.
    assert inspect_main([str(tmp_path / "ckpt.pt"), "--config", '{"vocab_size": 50304, "emb_dim": 64, '
                         '"n_heads": 4, "n_layers": 2, "context_length": 64, "qkv_bias": false, '
                         '"drop_rate": 0.3}']) == 0
    assert inspect_main([str(tmp_path / "ckpt.pt"), "--config", "tiny"]) == 1
    out = capsys.readouterr().out
    assert "config qkv_bias: checkpoint False, target True" in out
    assert "missing keys (2): transformer.h.0.attn.c_attn.bias, transformer.h.1.attn.c_attn.bias" in out


def test_inspect_llms_from_scratch_without_and_with_config(tmp_path, capsys):
    sd = _llms_state_dict(LLMS_CFG)
    torch.save(sd, tmp_path / "model.pth")
    assert inspect_main([str(tmp_path / "model.pth")]) == 0
    out = capsys.readouterr().out
    assert "config:      unknown" in out and "n_heads cannot be read off the weights" in out
    assert "shapes say:  vocab_size=503 emb_dim=64 n_layers=2" in out
    # --config supplies n_heads; a matching one fits, a wrong vocab does not.
    good = json.dumps({**LLMS_CFG, "tie_weights": False})
    assert inspect_main([str(tmp_path / "model.pth"), "--config", good, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["config"]["n_heads"] == 4 and rep["fits"] is True
    assert rep["parameters"] == sum(v.numel() for k, v in sd.items() if not k.endswith("att.mask"))
    bad = json.dumps({**LLMS_CFG, "tie_weights": False, "n_layers": 3})
    assert inspect_main([str(tmp_path / "model.pth"), "--config", bad]) == 1
    out = capsys.readouterr().out
    assert "missing keys (11): transformer.h.2.attn.c_attn.weight," in out and "config n_layers: checkpoint 2, target 3" in out


def test_inspect_gptcore_format_and_errors(tmp_path, capsys):
    model = _gpt(GPTConfig.from_preset("tiny"))
    save_gptcore(tmp_path / "run", model, step=5, tokens=640, tokenizer="gpt2")
    assert inspect_main([str(tmp_path / "run"), "--config", "tiny", "--vocab", "50257"]) == 0
    out = capsys.readouterr().out
    assert "step:        5" in out and "tokenizer:   gpt2" in out and "yes" in out
    assert inspect_main([str(tmp_path / "nothing-here")]) == 2
    assert inspect_main([str(tmp_path / "run"), "--config", "no-such-preset"]) == 2
    assert "not a preset" in capsys.readouterr().err


# ---- GPU: GPT-2 124M size ----------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hf_gpt2_size_on_gpu(tmp_path, backend, dtype):
    h = transformers.GPT2LMHeadModel(transformers.GPT2Config())  # 124M, random weights (no network)
    _randomize_(h, std=0.02)
    h.eval().save_pretrained(tmp_path)
    model = from_hf(tmp_path, backend=backend, dtype=dtype).cuda()
    h = h.cuda()
    idx = torch.randint(0, 50257, (2, 1024), device="cuda")
    oracle = _hf_logits(h, idx, torch.float64)
    low = _hf_logits(h, idx, dtype)
    assert_error_within(_logits(model, idx), low, oracle, atol=1e-3, name=f"GPT-2 124M logits ({backend}, {dtype})")


# ---- overrides and bad files ------------------------------------------------------------------
def test_load_pretrained_overrides_crop_context(tmp_path):
    h = _hf_model()
    h.save_pretrained(tmp_path)
    full = hf.load_pretrained(str(tmp_path), backend="torch")
    short = hf.load_pretrained(str(tmp_path), backend="torch", context_length=32, drop_rate=0.0)
    assert short.config == full.config.replace(context_length=32, drop_rate=0.0)
    idx = _tokens(1000, T=32)
    assert torch.equal(_logits(short, idx), _logits(full, idx))  # causal: a prefix sees only itself
    with pytest.raises(ValueError, match="can only be shortened"):
        hf.load_pretrained(str(tmp_path), context_length=128)


@pytest.mark.parametrize("name, content", [("junk.pt", random.Random(1).randbytes(4096)), ("text.pth", b"hello world"),
                                           ("junk.safetensors", random.Random(2).randbytes(4096))],
                         ids=["junk.pt", "text.pth", "junk.safetensors"])
def test_unreadable_files_are_format_errors(tmp_path, capsys, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(FormatError, match="not a (checkpoint torch.load|readable safetensors)"):
        load_any(tmp_path / name)
    assert inspect_main([str(tmp_path / name)]) == 2
    assert "not a" in capsys.readouterr().err


def test_training_checkpoint_is_read_by_load_any_and_inspect(tmp_path):
    """A checkpoint written by the trainer (and its run folder, through `latest`) loads anywhere."""
    from gptcore import io as checkpoint

    cfg = GPTConfig.from_preset("tiny", vocab_size=300, context_length=16)
    model = GPT(cfg, backend="torch")
    ck = checkpoint.save_checkpoint(tmp_path / "run" / "ckpt-0000007", model, None,
                                    {"model_config": cfg.to_dict(), "step": 7, "tokens": 112, "tokenizer": "gpt2"})
    checkpoint.update_latest(tmp_path / "run", ck)
    for path in (ck, tmp_path / "run"):
        got_cfg, sd, meta = load_any(path)
        assert got_cfg == cfg and meta["format"] == "gptcore-train" and meta["step"] == 7
        for k, v in model.state_dict().items():
            assert torch.equal(sd[k], v), k
    out = _cli(tmp_path / "run", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["format"] == "gptcore-train"
