"""Checkpoint I/O: round trip, tied weights stored once, atomic writes, corrupt files caught, RNG state.

    python -m pytest -q tests/test_checkpoint.py
"""
import json
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open

from gptcore import io as C
from gptcore import ops
from gptcore.io.train_ckpt import META_FILE, MODEL_FILE, STATE_FILE
from gptcore.config import GPTConfig
from gptcore.model import GPT

CFG = GPTConfig(vocab_size=97, context_length=12, emb_dim=16, n_heads=2, n_layers=2)


def _model(seed=0, cfg=CFG):
    torch.manual_seed(seed)
    return GPT(cfg, backend="torch")


def _save(path, model, state=None):
    meta = {"step": 3, "model_config": model.config.to_dict(), "tokenizer": "gpt2"}
    return C.save_checkpoint(path, model, state, meta)


def test_round_trip_and_tied_weights_once(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.loss(torch.randint(0, 97, (2, 12)), torch.randint(0, 97, (2, 12))).backward()
    opt.step()
    path = _save(tmp_path / "ckpt-0000003", model, {"optimizer": opt.state_dict(), "step": 3})
    with safe_open(str(path / MODEL_FILE), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "transformer.wte.weight" in keys
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in keys)
    loaded = C.load_model(path)
    assert not loaded.training
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    # state.pt holds tensors and plain containers only: the safe loader reads it
    state = torch.load(path / STATE_FILE, weights_only=True)
    assert state["step"] == 3
    meta = json.loads((path / META_FILE).read_text())
    assert meta["format_version"] == C.FORMAT_VERSION
    assert set(meta["files"]) == {MODEL_FILE, STATE_FILE}
    ck = C.load_checkpoint(tmp_path / "ckpt-0000003")
    torch.testing.assert_close(ck.state["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"],
                               rtol=0, atol=0)


def test_compiled_and_ddp_prefixes_are_stripped(tmp_path):
    model = _model()
    compiled = torch.compile(model)  # wrapping only: nothing compiles until it is called
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    sd = C.model_state_dict(compiled)
    assert sd.keys() == C.model_state_dict(model).keys()
    other = _model(seed=1)
    C.load_weights(other, {"module._orig_mod." + k: v for k, v in sd.items()})
    assert torch.equal(other.transformer.h[1].mlp.c_fc.weight, model.transformer.h[1].mlp.c_fc.weight)
    path = _save(tmp_path / "c", compiled)
    assert torch.equal(C.load_model(path).transformer.wpe.weight, model.transformer.wpe.weight)


def test_failed_save_leaves_old_checkpoint_and_no_temp(tmp_path, monkeypatch):
    model = _model()
    path = _save(tmp_path / "ckpt-0000003", model, {"step": 3})
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path / "ckpt-0000003", _model(seed=5), {"step": 4})
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-0000003"]


def test_replacing_a_checkpoint(tmp_path):
    path = _save(tmp_path / "best", _model(0))
    _save(tmp_path / "best", _model(7))
    assert torch.equal(C.load_model(path).transformer.wte.weight, _model(7).transformer.wte.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["best"]


@pytest.mark.parametrize("damage", ["truncate_model", "flip_state", "bad_meta", "missing_state", "no_meta"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, damage):
    path = _save(tmp_path / "ckpt-0000003", _model(), {"step": 3})
    if damage == "truncate_model":
        data = (path / MODEL_FILE).read_bytes()
        (path / MODEL_FILE).write_bytes(data[: len(data) // 2])
        match = "truncated"
    elif damage == "flip_state":
        data = bytearray((path / STATE_FILE).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (path / STATE_FILE).write_bytes(bytes(data))
        match = "SHA-256"
    elif damage == "bad_meta":
        text = (path / META_FILE).read_text()
        (path / META_FILE).write_text(text[: len(text) // 2])
        match = "not valid JSON"
    elif damage == "missing_state":
        (path / STATE_FILE).unlink()
        match = "missing"
    else:
        (path / META_FILE).unlink()
        match = "no meta.json"
    with pytest.raises(C.CheckpointError, match=match):
        C.load_checkpoint(path)


def test_checkpoint_of_another_shape_names_the_tensors(tmp_path):
    path = _save(tmp_path / "x", _model())
    meta = json.loads((path / META_FILE).read_text())
    meta["model_config"]["emb_dim"] = 32
    (path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(C.CheckpointError, match=r"transformer\.wte\.weight: \(97, 16\)"):
        C.load_model(path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(C.CheckpointError, match="does not exist"):
        C.load_model(tmp_path / "nope")
    with pytest.raises(C.CheckpointError, match="not a gptcore checkpoint"):
        C.load_model(tmp_path)


def test_rng_round_trip_through_safe_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = C.capture_rng()
    torch.save({"rng": state}, tmp_path / "s.pt")
    first = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    C.restore_rng(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


def test_latest_prune_and_fallback(tmp_path):
    model = _model()
    for step in (1, 2, 3, 4):
        p = _save(tmp_path / f"ckpt-{step:07d}", model)
        C.update_latest(tmp_path, p)
    _save(tmp_path / "best", model)
    assert (tmp_path / "latest").read_text().strip() == "ckpt-0000004"
    assert C.prune_checkpoints(tmp_path, keep_last=2) == [tmp_path / "ckpt-0000001", tmp_path / "ckpt-0000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "ckpt-0000003", "ckpt-0000004", "latest"]
    assert C.resolve_checkpoint(tmp_path) == tmp_path / "ckpt-0000004"
    (tmp_path / "latest").unlink()  # e.g. a crash between the rename and the pointer update
    assert C.find_latest(tmp_path) == tmp_path / "ckpt-0000004"
    (tmp_path / ".ckpt-0000005.tmp-abc").mkdir()
    assert [p.name for p in C.remove_stale_temps(tmp_path)] == [".ckpt-0000005.tmp-abc"]


def test_cpu_models_get_a_cpu_backend_even_where_a_gpu_exists(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    monkeypatch.setattr(ops, "triton_status", lambda: None)
    assert ops.default_backend("cpu") == "torch" and ops.default_backend("cuda:0") == "triton"
    path = _save(tmp_path / "x", _model())
    assert C.load_model(path, device="cpu").backend == "torch"
