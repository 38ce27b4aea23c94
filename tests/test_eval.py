"""gptcore.eval: window coverage, agreement with model.loss, and the CLI.

    python -m pytest -q tests/test_eval.py
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from gptcore import eval as E
from gptcore.io import save_checkpoint
from gptcore.config import GPTConfig
from gptcore.model import GPT
from gptcore.tokenizer import encode

CFG = GPTConfig(context_length=16, emb_dim=16, n_heads=2, n_layers=1)
TEXT = "The quick brown fox jumps over the lazy dog, and then it naps in the sun. " * 12


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(CFG, backend="torch").eval()


@pytest.mark.parametrize("n, T, stride", [(2, 16, 16), (17, 16, 16), (18, 16, 16), (100, 16, 16), (100, 16, 5),
                                          (101, 16, 1), (97, 8, 3), (33, 16, 16), (10, 16, 4)])
def test_every_target_is_scored_exactly_once(n, T, stride):
    import numpy as np

    ds_n = E.GPTDataset(np.zeros(n), T, stride).n if n > T else 0
    scored = []
    for start, length, first in E._windows(n, T, stride, ds_n):
        assert 0 <= first < length <= T and start + length <= n - 1
        scored += list(range(start + 1 + first, start + 1 + length))  # absolute target indices
    assert scored == list(range(1, n))


def test_non_overlapping_windows_equal_model_loss(model):
    ids = torch.randint(0, CFG.vocab_size, (4 * 16 + 1,))
    res = E.evaluate_tokens(model, ids, batch_size=3)
    windows = [(ids[i:i + 16], ids[i + 1:i + 17]) for i in range(0, 64, 16)]
    with torch.no_grad():
        ref = sum(model.loss(x[None], y[None]).item() for x, y in windows) / 4
        acc = sum((model(x[None]).argmax(-1) == y[None]).sum().item() for x, y in windows) / 64
    assert res["tokens"] == 64
    assert res["loss"] == pytest.approx(ref, rel=1e-6)
    assert res["perplexity"] == pytest.approx(math.exp(ref), rel=1e-6)
    assert res["accuracy"] == pytest.approx(acc)


def test_sliding_windows_score_with_the_stated_context(model):
    ids = torch.randint(0, CFG.vocab_size, (40,))
    res = E.evaluate_tokens(model, ids, context_length=8, stride=3, batch_size=4)
    # reference: target t (1..39) predicted from the window the rule assigns it
    total = 0.0
    with torch.no_grad():
        for start, length, first in E._windows(40, 8, 3, E.GPTDataset(ids, 8, 3).n):
            logp = F.log_softmax(model(ids[None, start:start + length]).float(), -1)[0]
            tgt = ids[start + 1:start + length + 1]
            total -= logp[torch.arange(first, length), tgt[first:]].sum().item()
    assert res["tokens"] == 39
    assert res["loss"] == pytest.approx(total / 39, rel=1e-6)


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="stride must be in"):
        E.evaluate_tokens(model, torch.arange(50), stride=17)
    with pytest.raises(ValueError, match="exceeds the model's"):
        E.evaluate_tokens(model, torch.arange(50), context_length=32)
    with pytest.raises(E.DataError, match="need at least 2"):
        E.evaluate_tokens(model, torch.arange(1))


@pytest.fixture
def ckpt(tmp_path, model, monkeypatch):
    monkeypatch.setenv("GPTCORE_DATA_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    meta = {"step": 7, "model_config": CFG.to_dict(), "tokenizer": "gpt2", "data": str(corpus),
            "train_config": {"val_fraction": 0.5}}
    return save_checkpoint(tmp_path / "ckpt-0000007", model, None, meta), corpus


def test_cli_val_split_json(ckpt, capsys, model):
    path, corpus = ckpt
    assert E.main(["--ckpt", str(path), "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    ids = encode(TEXT + "<|endoftext|>")
    n_val = int(len(ids) * 0.5)
    val = torch.tensor(ids[len(ids) - n_val:])
    assert out["source"] == str(corpus) and out["split"] == "val" and out["step"] == 7
    assert out["tokens"] == n_val - 1
    assert out["loss"] == pytest.approx(E.evaluate_tokens(model, val)["loss"], rel=1e-6)
    assert out["perplexity"] == pytest.approx(math.exp(out["loss"]))
    assert 0 <= out["accuracy"] <= 1


def test_cli_whole_file_text(ckpt, capsys, tmp_path):
    path, _ = ckpt
    f = tmp_path / "other.txt"
    f.write_text("Another small text to score, with some words in it. " * 5)
    assert E.main(["--ckpt", str(path.parent), "--file", str(f), "--stride", "4", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    n = len(encode(f.read_text()))
    assert f"{n - 1:,} tokens scored, context 16, stride 4" in text and "perplexity" in text


@pytest.mark.parametrize("what, message", [("ckpt", "does not exist"), ("file", "not found"),
                                           ("bytes", "not valid UTF-8")])
def test_cli_errors(ckpt, capsys, tmp_path, what, message):
    path, _ = ckpt
    args = ["--ckpt", str(path), "--device", "cpu"]
    if what == "ckpt":
        args[1] = str(tmp_path / "missing")
    elif what == "file":
        args += ["--file", str(tmp_path / "missing.txt")]
    else:
        (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 " * 20)
        args += ["--file", str(tmp_path / "latin1.txt")]
    assert E.main(args) == 2
    assert message in capsys.readouterr().err
