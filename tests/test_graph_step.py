"""The graph-captured train step (gptcore.graph_step) and the trainer's --cuda-graph / deferred read-back.

    python -m pytest -q tests/test_graph_step.py            # CPU: the decision, fallbacks, read-back rows
    python -m pytest -q tests/test_graph_step.py -m gpu     # CUDA: graph == eager, NaN skip, exact resume

CPU runs use the micro model of tests/test_train.py (1 layer, width 16, 16 tokens) in fp32.
"""
import json
import math
from pathlib import Path

import pytest
import torch

from gptcore import graph_step as G
from gptcore import train as T
from gptcore.config import GPTConfig
from gptcore.model import GPT

MICRO = ["--emb-dim", "16", "--n-heads", "2", "--n-layers", "1", "--context-length", "16", "--batch-size", "4",
         "--eval-steps", "2", "--warmup-steps", "2", "--sample-tokens", "0", "--no-progress"]
TIMING = ("tokens_per_s", "step_s", "mfu", "mem_gib")  # differ from run to run


pytestmark = pytest.mark.usefixtures("private_data_cache")  # tokenized corpora in a temp dir


def rows(out: Path, kind=None) -> list:
    got = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in got if kind is None or r["kind"] == kind]


def metrics(out: Path, key="loss") -> dict:
    return {r["step"]: r[key] for r in rows(out, "train")}


def untimed(out: Path) -> list:
    # run markers ({"kind": "run"}: pid, wall time) differ between any two runs by design
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows(out) if r.get("kind") != "run"]


# ---- the decision (CPU) ---------------------------------------------------------------------------------
CUDA = torch.device("cuda")


@pytest.mark.parametrize("kw, words", [
    ({"device": torch.device("cpu")}, "CUDA graphs need a CUDA GPU"),
    ({"device": CUDA, "world": 2}, "DDP (world 2)"),
    ({"device": CUDA, "precision": "fp16"}, "GradScaler"),
    ({"device": CUDA, "compile": True, "compile_mode": "reduce-overhead"}, "captures CUDA graphs of its own"),
    ({"device": CUDA, "compile": True, "compile_mode": "max-autotune"}, "captures CUDA graphs of its own"),
    ({"device": CUDA, "backend": "triton", "drop_rate": 0.1}, "dropout seed on the host"),
    ({"device": CUDA, "backend": "torch", "drop_rate": 0.1, "grad_checkpointing": True}, "grad checkpointing"),
    ({"device": CUDA, "dynamic_shapes": True}, "a graph replays one shape"),
])
def test_unavailable_reasons(kw, words):
    reason = G.unavailable_reason(**kw)
    assert reason is not None and words in reason
    use, note = G.resolve("auto", reason)
    assert not use and "cuda graph: off (auto:" in note and words in note
    with pytest.raises(G.GraphUnavailable, match="--cuda-graph on: cannot capture the step"):
        G.resolve("on", reason)
    assert G.resolve("off", reason)[0] is False


@pytest.mark.parametrize("kw", [
    {},
    {"compile": True},
    {"compile": True, "compile_mode": "max-autotune-no-cudagraphs"},
    {"backend": "torch", "drop_rate": 0.1},  # torch's dropout draws philox offsets a replay advances
    {"backend": "triton", "drop_rate": 0.0},
    {"precision": "fp32"},
    {"grad_checkpointing": True},  # without dropout the recompute draws no random numbers
])
def test_capturable_configurations(kw):
    assert G.unavailable_reason(device=CUDA, **kw) is None
    assert G.resolve("auto", None)[0] and G.resolve("on", None)[0]
    assert G.resolve("off", None) == (False, "cuda graph: off (--cuda-graph off): eager step")


def test_resolve_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="cuda_graph must be one of"):
        G.resolve("yes", None)


def test_trainer_logs_the_decision_and_on_is_an_error_on_the_cpu(tmp_path, capsys):
    assert T.main(MICRO + ["--device", "cpu", "--max-steps", "1", "--eval-interval", "0",
                           "--out-dir", str(tmp_path / "a")]) == 0
    assert "cuda graph: off (auto: the device is cpu: CUDA graphs need a CUDA GPU)" in capsys.readouterr().out
    assert T.main(MICRO + ["--device", "cpu", "--max-steps", "1", "--cuda-graph", "on",
                           "--out-dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "--cuda-graph on: cannot capture the step: the device is cpu" in err
    assert not (tmp_path / "b" / "latest").exists()


def test_help_documents_the_flag(capsys):
    with pytest.raises(SystemExit):
        T.main(["--help"])
    out = capsys.readouterr().out
    assert "--cuda-graph {auto,on,off}" in out and "(default: auto)" in out


# ---- deferred read-back (CPU) ------------------------------------------------------------------------------
def _run(tmp_path, name, monkeypatch, every, extra=()):
    monkeypatch.setattr(T.Trainer, "_readback_interval", lambda self: every)
    out = tmp_path / name
    rc = T.main(MICRO + ["--device", "cpu", "--out-dir", str(out), *extra])
    return rc, out


def test_reading_back_every_few_steps_writes_the_same_rows(tmp_path, monkeypatch, capsys):
    extra = ["--max-steps", "9", "--eval-interval", "4", "--ckpt-interval", "3", "--grad-accum", "2",
             "--drop-rate", "0.1", "--log-interval", "2"]
    rc1, one = _run(tmp_path, "one", monkeypatch, 1, extra)
    log1 = capsys.readouterr().out
    rc4, four = _run(tmp_path, "four", monkeypatch, 4, extra)
    log4 = capsys.readouterr().out
    assert rc1 == rc4 == 0
    assert untimed(one) == untimed(four)  # every step, in order, bit for bit; evals between the same steps
    assert sorted(metrics(four)) == list(range(1, 10))
    lines = lambda log: [ln.split(" | ")[:4] for ln in log.splitlines() if ln.startswith("step ") and " | " in ln]
    assert lines(log1) == lines(log4) and len(lines(log4)) == 5  # steps 2, 4, 6, 8, 9
    assert sorted(p.name for p in four.glob("ckpt-*")) == sorted(p.name for p in one.glob("ckpt-*"))
    assert all(r["tokens_per_s"] > 0 and r["step_s"] > 0 for r in rows(four, "train"))
    assert "tokens/s over the train steps (evaluations and checkpoints excluded)" in log4


def _poison_from(monkeypatch, first_bad: int):
    orig = GPT.loss
    calls = {"n": 0}

    def loss(self, idx, targets, ignore_index=-100):
        out = orig(self, idx, targets, ignore_index)
        if self.training:
            calls["n"] += 1
            if calls["n"] >= first_bad:
                return out * float("nan")
        return out

    monkeypatch.setattr(GPT, "loss", loss)


def test_non_finite_stop_with_deferred_read_back(tmp_path, monkeypatch, capsys):
    """Steps 4.. are NaN, read back every 5 steps and at each checkpoint step (3, 6, 9): the fourth bad
    step in a row (7) is found at the read-back of step 9; the error names step 7, rows stop there, and
    the last good checkpoint (3) is kept: step 6's periodic save was refused, as it had bad steps."""
    _poison_from(monkeypatch, 4)
    rc, out = _run(tmp_path, "run", monkeypatch, 5, ["--max-steps", "20", "--ckpt-interval", "3",
                                                     "--eval-interval", "0", "--max-bad-steps", "4"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "4 steps in a row had a non-finite loss or gradient; stopped at step 7" in err and "ckpt-0000003" in err
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-0000003"]
    skipped = metrics(out, "skipped")
    assert sorted(skipped) == list(range(1, 8)) and [s for s, v in skipped.items() if v] == [4, 5, 6, 7]


# ---- optimizer state across devices (CPU) -----------------------------------------------------------------
def test_after_load_state_dict_keeps_this_runs_flags_and_the_portable_state_is_plain():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    saved_opt = torch.optim.AdamW([w], lr=torch.tensor(0.01), foreach=False)  # a tensor lr, like a GPU run's
    w.grad = torch.randn_like(w)
    saved_opt.step()
    sd = G.portable_state_dict(saved_opt)
    assert isinstance(sd["param_groups"][0]["lr"], float) and sd["param_groups"][0]["lr"] == pytest.approx(0.01)
    assert isinstance(saved_opt.param_groups[0]["lr"], torch.Tensor)  # the live optimizer keeps its tensor
    sd["param_groups"][0]["foreach"] = True  # as if written by a run with another implementation
    new_opt = G.adamw([w], 0.02, (0.9, 0.95), torch.device("cpu"))
    new_opt.load_state_dict(sd)
    assert new_opt.param_groups[0]["foreach"] is True  # what load_state_dict does on its own
    G.after_load_state_dict(new_opt, 0.02)
    g = new_opt.param_groups[0]
    assert g["foreach"] is None and not g["fused"] and not g["capturable"] and g["lr"] == pytest.approx(0.01)
    st = new_opt.state[w]["step"]
    assert st.device.type == "cpu" and st.dtype == torch.float32 and float(st) == 1.0


def test_set_lr_fills_a_tensor_in_place():
    lr = torch.tensor(1.0)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr, foreach=False)
    G.set_lr(opt, 0.25)
    assert opt.param_groups[0]["lr"] is lr and float(lr) == 0.25
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    G.set_lr(opt2, 0.5)
    assert opt2.param_groups[0]["lr"] == 0.5


def test_graphed_step_refuses_what_it_cannot_capture():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1e-3)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        G.GraphedStep(lambda x, y: p.sum(), [p], opt, accum=1, batch_size=1, seq_len=2, device="cpu")
    if torch.cuda.is_available():
        q = torch.nn.Parameter(torch.zeros(2, device="cuda"))
        with pytest.raises(ValueError, match="lr to be one CUDA tensor"):
            G.GraphedStep(lambda x, y: q.sum(), [q], torch.optim.AdamW([q], lr=1e-3, fused=True), accum=1,
                          batch_size=1, seq_len=2, device="cuda")


# ---- GPU ------------------------------------------------------------------------------------------------
GPU = ["--preset", "tiny", "--batch-size", "8", "--warmup-steps", "2", "--eval-steps", "2",
       "--device", "cuda", "--no-progress", "--sample-tokens", "0", "--log-interval", "3"]


def _gpu_run(out: Path, *extra, env: dict | None = None) -> tuple[int, str]:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.MonkeyPatch.context() as mp:
        for k, v in (env or {}).items():
            mp.setenv(k, v)
        rc = T.main(GPU + ["--out-dir", str(out), *extra])
    return rc, buf.getvalue()


@pytest.mark.gpu
@pytest.mark.parametrize("backend, dtype, extra", [("triton", "bf16", []), ("torch", "bf16", []), ("triton", "fp32", []),
                                                   ("triton", "bf16", ["--grad-checkpointing"])],
                         ids=["triton-bf16", "torch-bf16", "triton-fp32", "triton-bf16-grad-checkpointing"])
def test_gpu_graph_step_matches_the_eager_step_bit_for_bit(tmp_path, backend, dtype, extra):
    """Same kernels in the same order (the eager run told to use the graph's device-time variants), grads
    made afresh by the first backward in both, the same capturable
    fused AdamW with the same fp32 lr tensor and on-device skip in both paths: the losses and grad norms
    of the captured step equal the eager step's exactly (no dropout here: the paths seed it differently)."""
    common = ["--max-steps", "7", "--grad-accum", "2", "--eval-interval", "0", "--ckpt-interval", "0",
              "--backend", backend, "--dtype", dtype, *extra]
    # the eager step with the graph's device-time op variants (gptcore.ops.device_time_first)
    rc_e, log_e = _gpu_run(tmp_path / "eager", "--cuda-graph", "off", *common, env={"GPTCORE_DEVICE_TIME_FIRST": "1"})
    rc_g, log_g = _gpu_run(tmp_path / "graph", "--cuda-graph", "on", *common)
    assert rc_e == rc_g == 0
    assert "cuda graph: off (--cuda-graph off)" in log_e and "cuda graph: captured one optimizer step" in log_g
    for key in ("loss", "grad_norm", "skipped"):
        assert metrics(tmp_path / "eager", key) == metrics(tmp_path / "graph", key), key
    assert sorted(metrics(tmp_path / "graph")) == list(range(1, 8))


@pytest.mark.gpu
def test_gpu_graph_with_compile_matches_the_compiled_eager_step(tmp_path):
    common = ["--max-steps", "5", "--eval-interval", "0", "--ckpt-interval", "0", "--backend", "triton",
              "--dtype", "bf16", "--compile"]
    rc_e, _ = _gpu_run(tmp_path / "eager", "--cuda-graph", "off", *common)
    rc_g, log_g = _gpu_run(tmp_path / "graph", "--cuda-graph", "on", *common)
    assert rc_e == rc_g == 0 and "cuda graph: captured" in log_g
    le, lg = metrics(tmp_path / "eager"), metrics(tmp_path / "graph")
    # not bit for bit: Inductor compiles the captured step's graphs afresh (grads made by the first
    # backward, the fused clip), and its bf16 reductions may be ordered differently: 1e-4 relative is
    # ~80x tighter than one bf16 rounding, and far below what a wrong step changes
    assert all(math.isclose(le[s], lg[s], rel_tol=1e-4) for s in le), (le, lg)


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [["--backend", "triton"], ["--backend", "torch", "--drop-rate", "0.1"]],
                         ids=["triton", "torch-dropout"])
def test_gpu_resumed_graph_run_reproduces_the_uninterrupted_one(tmp_path, extra):
    common = ["--max-steps", "8", "--grad-accum", "2", "--eval-interval", "4", "--ckpt-interval", "4",
              "--dtype", "bf16", "--cuda-graph", "on", *extra]
    a, b = tmp_path / "a", tmp_path / "b"
    rc_a, log_a = _gpu_run(a, *common)
    rc_b, log_b = _gpu_run(b, *common, "--resume", str(a / "ckpt-0000004"))
    assert rc_a == rc_b == 0 and "cuda graph: captured" in log_a and "cuda graph: captured" in log_b
    la, lb = metrics(a), metrics(b)
    assert sorted(lb) == [5, 6, 7, 8]
    assert [la[s] for s in range(5, 9)] == [lb[s] for s in range(5, 9)]  # bit for bit
    va = {r["step"]: r["val_loss"] for r in rows(a, "eval")}
    vb = {r["step"]: r["val_loss"] for r in rows(b, "eval")}
    assert va[8] == vb[8]
    from safetensors.torch import load_file

    wa, wb = (load_file(str(d / "ckpt-0000008" / "model.safetensors")) for d in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.gpu
def test_gpu_resume_across_graph_and_eager(tmp_path):
    """A checkpoint of an eager run resumes under the graph (same optimizer, state on the device)."""
    common = ["--max-steps", "6", "--eval-interval", "0", "--ckpt-interval", "3", "--dtype", "bf16",
              "--backend", "triton"]
    a, b = tmp_path / "a", tmp_path / "b"
    # the eager run with the graph's device-time op variants, so that both apply the same arithmetic
    assert _gpu_run(a, "--cuda-graph", "off", *common, env={"GPTCORE_DEVICE_TIME_FIRST": "1"})[0] == 0
    rc, log = _gpu_run(b, "--cuda-graph", "on", *common, "--resume", str(a / "ckpt-0000003"))
    assert rc == 0 and "cuda graph: captured" in log
    la, lb = metrics(a), metrics(b)
    assert [la[s] for s in range(4, 7)] == [lb[s] for s in range(4, 7)]


@pytest.mark.gpu
def test_gpu_fp16_falls_back_and_on_is_an_error(tmp_path):
    rc, log = _gpu_run(tmp_path / "a", "--max-steps", "3", "--dtype", "fp16", "--eval-interval", "0")
    assert rc == 0 and "cuda graph: off (auto: fp16 loss scaling" in log
    assert all(math.isfinite(v) for v in metrics(tmp_path / "a").values())
    rc, _ = _gpu_run(tmp_path / "b", "--max-steps", "3", "--dtype", "fp16", "--cuda-graph", "on")
    assert rc == 2


def _tiny_graph(accum=1, poison=None):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=128, context_length=32, emb_dim=64, n_heads=4, n_layers=2)
    model = GPT(cfg, backend="triton").cuda().train()
    opt = G.adamw([{"params": list(model.parameters()), "weight_decay": 0.1}], 1e-3, (0.9, 0.95), CUDA)

    def loss_fn(x, y):
        loss = model.loss(x, y)
        return loss * poison if poison is not None else loss

    gs = G.GraphedStep(loss_fn, list(model.parameters()), opt, accum=accum, batch_size=4, seq_len=32, device=CUDA,
                       autocast=lambda: torch.autocast("cuda", dtype=torch.bfloat16), grad_clip=1.0)
    g = torch.Generator(device="cuda").manual_seed(1)
    for m in range(accum):
        gs.load(m, torch.randint(0, 128, (4, 32), device="cuda", generator=g),
                torch.randint(0, 128, (4, 32), device="cuda", generator=g))
    return model, opt, gs


@pytest.mark.gpu
def test_gpu_nan_step_is_skipped_on_the_device_and_params_stay(tmp_path):
    poison = torch.ones((), device="cuda")
    model, opt, gs = _tiny_graph(accum=2, poison=poison)
    before = [p.detach().clone() for p in model.parameters()]
    gs.capture()  # the warm-up's updates are skipped as well
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    rec = gs.replay(1e-3)
    assert rec[2].item() == 1.0 and math.isfinite(rec[0].item())
    after_good = [p.detach().clone() for p in model.parameters()]
    moments = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    steps = [opt.state[p]["step"].item() for p in model.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(before, after_good)) and set(steps) == {1.0}
    poison.fill_(float("nan"))
    rec = gs.replay(1e-3)
    assert rec[2].item() == 0.0 and math.isnan(rec[0].item())
    assert all(torch.equal(a, p) for a, p in zip(after_good, model.parameters()))
    assert all(torch.equal(m, opt.state[p]["exp_avg"]) for m, p in zip(moments, model.parameters()))
    assert {opt.state[p]["step"].item() for p in model.parameters()} == {1.0}  # the increment was taken back
    poison.fill_(1.0)
    rec = gs.replay(1e-3)
    assert rec[2].item() == 1.0 and {opt.state[p]["step"].item() for p in model.parameters()} == {2.0}


@pytest.mark.gpu
def test_gpu_replay_equals_the_uncaptured_body():
    """run_eager (the same body, no graph) from the same state gives the same record and params."""
    model, opt, gs = _tiny_graph(accum=2)
    gs.capture()
    state = ({k: v.clone() for k, v in model.state_dict().items()},
             {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()})
    rec_g = gs.replay(1e-3)
    params_g = [p.detach().clone() for p in model.parameters()]
    model.load_state_dict(state[0])
    for p in model.parameters():
        for k, v in state[1][id(p)].items():
            opt.state[p][k].copy_(v)
    rec_e = gs.run_eager(1e-3)
    assert torch.equal(rec_g, rec_e)
    assert all(torch.equal(a, p) for a, p in zip(params_g, model.parameters()))
