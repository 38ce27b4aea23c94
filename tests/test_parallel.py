"""Scale-out on CPU with gloo: FSDP2 against one process, sharded checkpoints across world sizes,
the auto choice between DDP and FSDP, DDP's report, and a two-"node" torchrun on one host.

    python -m pytest -q tests/test_parallel.py              # the in-process ones (a one-process FSDP group)
    python -m pytest -q tests/test_parallel.py -m slow      # the torchrun ones (2 processes each)

Runs use tests/test_train.py's micro model (1 layer, width 16, 16 tokens) in fp32 for a few steps.
Tolerance: none, the losses must be bitwise equal. Each rank computes its micro-batch with the same
shapes and kernels as the one process does, and the two ways of combining two gradients agree
exactly in fp32: one process accumulates g0/2 + g1/2 (each backward of loss / grad_accum), FSDP's
reduce-scatter averages (g0 + g1) / 2, and halving is exact, so both are round(g0 + g1) / 2 (the
sum of two numbers has one rounding whatever the order). With more than two ranks the order of the
additions would differ and a tolerance of ~1e-6 relative would be needed; two ranks need none.
"""
import json
import math
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from gptcore import train as T
from gptcore.config import GPTConfig
from gptcore.model import GPT
from gptcore.train.distributed import choose_parallel
from test_train import MICRO, child_env, metrics, torchrun_cpu

pytestmark = pytest.mark.usefixtures("private_data_cache")
ROOT = Path(__file__).resolve().parent.parent
COMMON = MICRO + ["--max-steps", "6", "--ckpt-interval", "3", "--eval-interval", "3"]


def close(a: dict, b: dict, steps) -> bool:
    """The losses of ``steps`` are the same numbers (see the module doc for why no tolerance)."""
    return all(a[s] == b[s] for s in steps)


# ---- the choice ---------------------------------------------------------------------------------------
def _fake_gpu(monkeypatch, gib: float):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=gib * 2**30))


def test_auto_picks_fsdp_only_when_the_estimate_does_not_fit_one_gpu(monkeypatch):
    model = GPT(GPTConfig.from_preset("tiny"))
    kw = dict(batch_size=8, seq_len=64, precision="bf16")
    cuda = torch.device("cuda", 0)
    need = model.estimate_memory(8, 64, dtype=torch.bfloat16)["total"] / 2**30
    _fake_gpu(monkeypatch, need * 10)
    kind, note = choose_parallel("auto", model, world=2, device=cuda, **kw)
    assert kind == "ddp" and "fit one GPU" in note and "model.estimate_memory" in note
    _fake_gpu(monkeypatch, need / 2)
    kind, note = choose_parallel("auto", model, world=2, device=cuda, **kw)
    assert kind == "fsdp" and "exceed one GPU" in note and "2 ranks" in note
    kind, note = choose_parallel("auto", model, world=1, device=cuda, **kw)  # nothing to shard over
    assert kind == "ddp" and "FSDP needs more ranks" in note
    kind, note = choose_parallel("auto", model, world=2, device=cuda, refusal="no LoRA under FSDP", **kw)
    assert kind == "ddp" and "no LoRA under FSDP" in note
    assert choose_parallel("auto", model, world=2, device=torch.device("cpu"), **kw)[0] == "ddp"
    assert choose_parallel("ddp", model, world=2, device=cuda, **kw)[0] == "ddp"
    assert choose_parallel("fsdp", model, world=1, device=torch.device("cpu"), **kw)[0] == "fsdp"
    with pytest.raises(T.ConfigError, match="fp16"):
        choose_parallel("fsdp", model, world=2, device=cuda, batch_size=8, seq_len=64, precision="fp16")
    with pytest.raises(T.ConfigError, match="no LoRA"):
        choose_parallel("fsdp", model, world=2, device=cuda, refusal="no LoRA", **kw)


def test_fsdp_flags(capsys):
    assert T.parse_args(["--fsdp"]).parallel == "fsdp"
    assert T.parse_args(["--parallel", "ddp", "--ddp-bucket-mb", "50"]).ddp_bucket_mb == 50
    assert T.parse_args([]).parallel == "auto"
    with pytest.raises(T.ConfigError, match="--fsdp-cpu-offload applies under FSDP"):
        T.parse_args(["--fsdp-cpu-offload"])
    with pytest.raises(T.ConfigError, match="ddp_bucket_mb must be >= 1"):
        T.parse_args(["--ddp-bucket-mb", "0"])
    with pytest.raises(SystemExit):
        T.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--parallel {auto,ddp,fsdp}", "--fsdp ", "--fsdp-cpu-offload", "--ddp-bucket-mb"):
        assert flag in text, flag


# ---- FSDP in one process (a one-process group): the sharded code paths, fast ------------------------------
def test_one_process_fsdp_matches_the_plain_run_and_its_checkpoint_resumes_either_way(tmp_path, capsys):
    plain, fsdp, back, again = (tmp_path / n for n in ("plain", "fsdp", "back", "again"))
    assert T.main(COMMON + ["--grad-accum", "2", "--out-dir", str(plain)]) == 0
    assert T.main(COMMON + ["--grad-accum", "2", "--fsdp", "--out-dir", str(fsdp), "--sample-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "parallel: fsdp (--parallel fsdp)" in out and "fsdp: 1 block units + root" in out
    assert "cuda graph: off" in out and "sample @ step 6" in out
    lp, lf = metrics(plain), metrics(fsdp)
    assert sorted(lf) == list(range(1, 7)) and close(lp, lf, lp), (lp, lf)
    ck = fsdp / "ckpt-0000003"
    assert (ck / "optim" / ".metadata").is_file() and (ck / "model.safetensors").is_file()
    assert json.loads((ck / "meta.json").read_text())["optimizer_state"]["format"] == "torch.distributed.checkpoint"
    assert not list(fsdp.glob(".*tmp*"))  # the staging directory is gone
    state = torch.load(ck / "state.pt", weights_only=True)
    assert state["optimizer"] is None and state["optimizer_dcp"] == "optim"
    # the sharded checkpoint resumes a plain run, and a plain checkpoint resumes an FSDP run
    assert T.main(COMMON + ["--grad-accum", "2", "--out-dir", str(back), "--resume", str(ck)]) == 0
    assert "optimizer state: sharded" in capsys.readouterr().out
    assert T.main(COMMON + ["--grad-accum", "2", "--fsdp", "--out-dir", str(again), "--resume",
                            str(plain / "ckpt-0000003")]) == 0
    lb, la = metrics(back), metrics(again)
    assert close(lp, lb, (4, 5, 6)) and close(lp, la, (4, 5, 6)), (lp, lb, la)
    v = metrics(plain, "eval", "val_loss")
    assert metrics(back, "eval", "val_loss")[6] == v[6]


# ---- two processes (torchrun, gloo) ------------------------------------------------------------------------
@pytest.mark.slow
def test_fsdp_two_processes_match_one_process_and_resume_across_world_sizes(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert T.main(COMMON + ["--grad-accum", "2", "--out-dir", str(one)]) == 0
    # --eval-steps 3: the ranks get 2 and 1 held-out batches (FSDP needs as many forwards on each);
    # --sample-tokens: every rank joins the generation of rank 0's sample
    r = torchrun_cpu(COMMON + ["--fsdp", "--out-dir", str(two), "--eval-steps", "3", "--sample-tokens", "4"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "parallel: fsdp" in r.stdout and "world 2" in r.stdout and "sample @ step 6" in r.stdout, r.stdout[-3000:]
    l1, l2 = metrics(one), metrics(two)
    assert sorted(l2) == list(range(1, 7)) and close(l1, l2, l1), (l1, l2)
    assert len(list((two / "ckpt-0000003" / "optim").glob("*.distcp"))) == 2  # one shard file per rank
    # 2 -> 2: the sharded checkpoint resumes the same run exactly
    r = torchrun_cpu(COMMON + ["--fsdp", "--out-dir", str(tmp_path / "same"), "--resume", str(two / "ckpt-0000003")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert [metrics(tmp_path / "same")[s] for s in (4, 5, 6)] == [l2[s] for s in (4, 5, 6)]
    # 2 -> 1: into one process with grad_accum 2 (the same global batch)
    assert T.main(COMMON + ["--grad-accum", "2", "--out-dir", str(tmp_path / "down"), "--resume",
                            str(two / "ckpt-0000003")]) == 0
    assert close(l1, metrics(tmp_path / "down"), (4, 5, 6))
    # 1 -> 2: a one-process checkpoint into a 2-process FSDP run
    r = torchrun_cpu(COMMON + ["--fsdp", "--out-dir", str(tmp_path / "up"), "--resume", str(one / "ckpt-0000003")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "same global batch" in r.stdout
    assert close(l1, metrics(tmp_path / "up"), (4, 5, 6))


@pytest.mark.slow
def test_ddp_reports_its_buckets_and_no_sync(tmp_path):
    r = torchrun_cpu(MICRO + ["--max-steps", "2", "--grad-accum", "2", "--ddp-bucket-mb", "8",
                              "--out-dir", str(tmp_path / "d")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "parallel: ddp (auto:" in r.stdout and "buckets of 8 MiB" in r.stdout and "(no_sync)" in r.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_one_host_match_one_process(tmp_path):
    """Two torchrun launches (--nnodes 2, --node-rank 0 and 1, one process each, rendezvous on
    127.0.0.1): the multi-node path of the README, with gloo."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = MICRO + ["--max-steps", "4", "--eval-interval", "0", "--ckpt-interval", "0"]
    assert T.main(common + ["--grad-accum", "2", "--out-dir", str(one)]) == 0
    for attempt in range(2):
        port = _free_port()
        procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
                                   str(rank), "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port",
                                   str(port), "-m", "gptcore.train", *common, "--out-dir", str(two)],
                                  env=child_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
        outs = [p.communicate(timeout=300) for p in procs]
        if all(p.returncode == 0 for p in procs) or not any("Address already in use" in e for _, e in outs):
            break
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    assert "world 2" in outs[0][0] and "gptcore.train: config" not in outs[1][0]  # node 1's rank is quiet
    l1, l2 = metrics(one), metrics(two)
    assert sorted(l2) == [1, 2, 3, 4] and close(l1, l2, l1), (l1, l2)


@pytest.mark.slow
def test_scale_bench_runs_on_one_device(tmp_path):
    """bench.scale at world size 1 (what a 1-GPU machine can run): one row with the schema, written to JSON."""
    r = subprocess.run([sys.executable, "-m", "bench.scale", "--quick", "--world-sizes", "1", "--steps", "3",
                        "--no-loss-check", "--out", str(tmp_path)], env=child_env(OMP_NUM_THREADS="1"), cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(next(tmp_path.glob("bench-scale-*.json")).read_text())["rows"]
    assert len(rows) == 1 and rows[0]["world_size"] == 1 and rows[0]["scaling"] == 1.0
    assert all(k in rows[0] for k in ("preset", "parallel", "tokens_per_s", "mfu", "peak_GiB")), rows[0]


# ---- GPU (run by the lead: python -m pytest -q tests/test_parallel.py -m gpu) ------------------------------
GPU = ["--preset", "tiny", "--batch-size", "16", "--warmup-steps", "3", "--eval-steps", "4", "--device", "cuda",
       "--no-progress", "--sample-tokens", "8", "--max-steps", "20", "--eval-interval", "10", "--ckpt-interval", "10"]


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [[], ["--fsdp-cpu-offload"]], ids=["fsdp", "fsdp-cpu-offload"])
def test_gpu_one_process_fsdp_bf16_trains_like_the_plain_run_and_resumes_into_it(tmp_path, extra, capsys):
    plain, fsdp, back = tmp_path / "plain", tmp_path / "fsdp", tmp_path / "back"
    assert T.main(GPU + ["--dtype", "bf16", "--out-dir", str(plain)]) == 0
    assert T.main(GPU + ["--dtype", "bf16", "--fsdp", *extra, "--out-dir", str(fsdp)]) == 0
    out = capsys.readouterr().out
    assert "bf16 params / fp32 reduce" in out and "cuda graph: off (auto: FSDP" in out
    lp, lf = metrics(plain), metrics(fsdp)
    # bf16: FSDP all-gathers bf16 weights (LayerNorm's too), the plain run keeps them fp32 under autocast
    assert all(math.isclose(lp[s], lf[s], rel_tol=2e-2) for s in lp), (lp, lf)
    assert T.main(GPU + ["--dtype", "bf16", "--out-dir", str(back), "--resume", str(fsdp / "ckpt-0000010")]) == 0
    lb = metrics(back)
    assert all(math.isclose(lb[s], lf[s], rel_tol=2e-2) for s in range(11, 21)), (lb, lf)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_fsdp_match_one_gpu_with_grad_accum(tmp_path):
    common = GPU + ["--dtype", "fp32", "--sample-tokens", "0"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert T.main(common + ["--grad-accum", "2", "--out-dir", str(one)]) == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "gptcore.train", *common, "--fsdp", "--out-dir", str(two)],
                       env=child_env(NCCL_NVLS_ENABLE="0"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    l1, l2 = metrics(one), metrics(two)
    assert all(math.isclose(l1[s], l2[s], rel_tol=1e-3) for s in l1), (l1, l2)  # TF32 matmuls, NCCL's order
    r = subprocess.run([sys.executable, "-m", "gptcore.train", *common, "--grad-accum", "2", "--out-dir",
                        str(tmp_path / "down"), "--resume", str(two / "ckpt-0000010")], env=child_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(math.isclose(metrics(tmp_path / "down")[s], l1[s], rel_tol=1e-3) for s in range(11, 21))
