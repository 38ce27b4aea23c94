"""Every checkpoint format inspect reads also runs through generate, eval's reader and load_model.

    python -m pytest -q tests/test_load_formats.py

One small model is written in each format (gptcore training checkpoint and its run directory, the
gptcore weights sidecar, a gptcore torch file, a Hugging Face folder, nanoGPT's ckpt.pt, an
LLMs-from-scratch state_dict with its config beside it or given by --config, a bare state_dict);
``python -m gptcore.generate --ckpt PATH`` (called in-process) must produce the same greedy tokens
as the model it was written from, and ``inspect_ckpt`` must accept the same path.
"""
import json

import pytest
import torch

from gptcore import generate as G
from gptcore import inspect_ckpt as I
from gptcore import io
from gptcore.config import GPTConfig
from gptcore.generate import generate
from gptcore.model import GPT

CFG = GPTConfig(vocab_size=97, context_length=16, emb_dim=16, n_heads=2, n_layers=2, qkv_bias=True)
CFG_JSON = json.dumps({k: v for k, v in CFG.to_dict().items()})
PROMPT, NEW = [5, 17, 3], 6


def _llms(sd: dict) -> dict:
    """gptcore names -> LLMs-from-scratch GPTModel names (W_query/W_key/W_value split out of c_attn)."""
    C = CFG.emb_dim
    out = {"tok_emb.weight": sd["transformer.wte.weight"], "pos_emb.weight": sd["transformer.wpe.weight"],
           "final_norm.scale": sd["transformer.ln_f.weight"], "final_norm.shift": sd["transformer.ln_f.bias"],
           "out_head.weight": sd["lm_head.weight"].clone()}
    for i in range(CFG.n_layers):
        g, b = f"transformer.h.{i}.", f"trf_blocks.{i}."
        for n, ours in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[b + f"{n}.scale"], out[b + f"{n}.shift"] = sd[g + f"{ours}.weight"], sd[g + f"{ours}.bias"]
        for kind in ("weight", "bias"):
            q, k, v = sd[g + f"attn.c_attn.{kind}"].split(C, dim=0)
            out[b + f"att.W_query.{kind}"], out[b + f"att.W_key.{kind}"], out[b + f"att.W_value.{kind}"] = q, k, v
            out[b + f"att.out_proj.{kind}"] = sd[g + f"attn.c_proj.{kind}"]
            out[b + f"ff.layers.0.{kind}"] = sd[g + f"mlp.c_fc.{kind}"]
            out[b + f"ff.layers.2.{kind}"] = sd[g + f"mlp.c_proj.{kind}"]
    return out


def _write(fmt: str, model: GPT, root) -> tuple[str, list[str]]:
    """Write ``model`` in format ``fmt`` under ``root``; returns (path, extra CLI flags)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if fmt in ("train-ckpt", "train-run"):
        ck = io.save_checkpoint(root / "run" / "ckpt-0000004", model, {"step": 4},
                                {"model_config": CFG.to_dict(), "step": 4, "tokens": 64, "tokenizer": "gpt2"})
        io.update_latest(root / "run", ck)
        return str(ck if fmt == "train-ckpt" else root / "run"), []
    if fmt == "gptcore":
        return str(io.save_gptcore(root / "w", model, step=4)), []
    if fmt == "gptcore-pt":
        torch.save({"model": sd, "config": CFG.to_dict(), "step": 4}, root / "c.pt")
        return str(root / "c.pt"), []
    if fmt == "hf":
        return str(io.save_hf(model, root / "hf")), []
    if fmt == "nanogpt":
        args = dict(n_layer=CFG.n_layers, n_head=CFG.n_heads, n_embd=CFG.emb_dim, block_size=CFG.context_length,
                    bias=True, vocab_size=CFG.vocab_size, dropout=0.0)
        torch.save({"model": {"_orig_mod." + k: v for k, v in sd.items()}, "model_args": args, "iter_num": 4},
                   root / "ckpt.pt")
        return str(root / "ckpt.pt"), []
    if fmt == "llms-json-beside":
        torch.save(_llms(sd), root / "model.pth")
        (root / "model.json").write_text(CFG_JSON)
        return str(root / "model.pth"), []
    if fmt == "llms-config-flag":
        torch.save({"model_state_dict": _llms(sd)}, root / "model.pth")
        return str(root / "model.pth"), ["--config", CFG_JSON]
    if fmt == "state-dict":
        torch.save(sd, root / "sd.pt")
        return str(root / "sd.pt"), ["--config", CFG_JSON]
    raise AssertionError(fmt)


FORMATS = ["train-ckpt", "train-run", "gptcore", "gptcore-pt", "hf", "nanogpt", "llms-json-beside",
           "llms-config-flag", "state-dict"]


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMATS)
def test_generate_reads_every_format_inspect_reads(tmp_path, fmt, capsys):
    model = GPT(CFG, backend="torch").eval()
    want = generate(model, [PROMPT], NEW, temperature=0)[0]
    path, extra = _write(fmt, model, tmp_path)

    assert I.main([path, *extra]) == 0, capsys.readouterr().err
    capsys.readouterr()
    argv = ["--ckpt", path, *extra, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW),
            "--temperature", "0", "--device", "cpu", "--dtype", "float32", "--backend", "torch"]
    assert G.main(argv) == 0, capsys.readouterr().err
    line = [ln for ln in capsys.readouterr().out.splitlines() if " | " in ln][0]
    got = [int(t) for t in line.split(" | ")[1].split()]
    assert got == want, (fmt, got, want)

    config = extra[1] if extra else None
    loaded = io.load_model(path, config=config)
    assert not loaded.training and loaded.config.n_heads == CFG.n_heads
    idx = torch.tensor([PROMPT])
    torch.testing.assert_close(loaded(idx), model(idx), rtol=1e-5, atol=1e-5)


def test_one_reader_behind_every_loader(tmp_path):
    """read_checkpoint is what load_model, load_any and load_pretrained read (a training run here)."""
    model = GPT(CFG, backend="torch")
    path, _ = _write("train-run", model, tmp_path)
    ck = io.read_checkpoint(path)
    assert ck.format == "gptcore-train" and ck.config == CFG and ck.summary()["step"] == 4
    assert ck.state_dict["lm_head.weight"] is ck.state_dict["transformer.wte.weight"]
    for loaded in (io.load_model(path), io.load_pretrained(path)):
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
    cfg, _, meta = io.load_any(path)
    assert cfg == CFG and meta["format"] == "gptcore-train" and meta["step"] == 4


def test_generate_config_flag_needs_ckpt(capsys):
    with pytest.raises(SystemExit):
        G.main(["--preset", "tiny", "--config", "tiny", "--prompt-ids", "1"])
    assert "--config and --trust-pickle apply to --ckpt" in capsys.readouterr().err
