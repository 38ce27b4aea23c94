"""The bench suite's command line (python -m bench): runs what can run here, reports what cannot,
writes its JSON and plots, and reports a failing (or missing) module as failed and goes on."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _bench(*args, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def _only_json(out: Path) -> dict:
    files = list(out.glob("bench-*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


@pytest.mark.slow
def test_train_quick_writes_json(tmp_path):
    # On a CPU this is the tiny preset; the subset keeps a GPU run short too.
    p = _bench("train", "--quick", "--preset", "tiny", "--configs", "torch,torch+fusedCE,triton", out=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    res = _only_json(tmp_path)
    assert res["env"]["torch"] == torch.__version__ and "git_commit" in res["env"]
    assert res["command"].startswith("python -m bench train --quick")
    rows = {r["impl"]: r for r in res["rows"] if r["op"] == "train_step"}
    assert set(rows) == {"torch", "torch+fusedCE", "triton"}
    for impl in ("torch", "torch+fusedCE"):
        r = rows[impl]
        assert r["area"] == "train" and r["tokens_per_s"] > 0 and r["ms"] > 0 and "error" not in r
    if not torch.cuda.is_available():
        assert "needs a CUDA GPU" in rows["triton"]["skipped"]
        assert "no CUDA GPU" in p.stdout
    if importlib.util.find_spec("matplotlib") is not None:  # the plot is written whenever it can be
        assert list(tmp_path.glob("bench-train-*-train.png"))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this times the real kernels (python -m bench kernels)")
def test_kernels_quick_on_cpu_says_it_needs_a_gpu(tmp_path):
    p = _bench("kernels", "--quick", out=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "need a CUDA GPU" in p.stdout
    res = _only_json(tmp_path)
    assert res["rows"] == []
    assert all(s["status"] == "skipped" for s in res["modules"].values())


def test_missing_and_failing_modules_are_reported_as_failed(tmp_path, monkeypatch, capsys):
    import bench.__main__ as cli

    mod = tmp_path / "gptcore_bench_test_failing.py"
    mod.write_text("def run(quick=False):\n    raise RuntimeError('boom')\n")
    ok = tmp_path / "gptcore_bench_test_ok.py"
    ok.write_text("def run(quick=False):\n    return [{'impl': 'x', 'ms': 1.5, 'mode': 'fwd', 'T': 128,"
                  " 'TFLOPs': 3.0}]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.AREAS, "generate", ("gptcore_bench_test_missing", "gptcore_bench_test_failing",
                                                "gptcore_bench_test_ok"))
    monkeypatch.setitem(cli.DEFAULT_AREA, "gptcore_bench_test_ok", "attention")
    rc = cli.main(["generate", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 1
    assert "No module named 'gptcore_bench_test_missing'" in out and "RuntimeError: boom" in out
    res = _only_json(tmp_path / "out")
    assert res["modules"]["gptcore_bench_test_failing"]["status"] == "failed"
    assert res["modules"]["gptcore_bench_test_missing"]["status"] == "failed"
    (row,) = res["rows"]
    # schema keys filled in for a module that left them out
    assert row["area"] == "attention" and row["op"] == "fwd" and row["shape"] == {"T": 128}


def test_attention_plot_from_rows(tmp_path):
    pytest.importorskip("matplotlib")
    from bench.plots import plot_attention

    rows = [{"area": "attention", "op": "fwd", "impl": impl, "D": 64, "T": T, "TFLOPs": T / 100 * k}
            for k, impl in ((1, "sdpa_flash"), (2, "triton")) for T in (1024, 2048, 4096)]
    rows.append({"area": "attention", "op": "fwd", "impl": "triton", "shape": "B4xH16xT8192xD128", "TFLOPs": 9.0})
    path = plot_attention(rows, tmp_path / "att.png")
    assert path is not None and path.stat().st_size > 1000
    assert plot_attention([{"area": "train", "TFLOPs": 1.0}], tmp_path / "none.png") is None


@pytest.mark.parametrize("limit,cap,want", [(20000, 65536, 19968), (70000, 65536, 65536), (1500, 65536, 1024)])
def test_longest_context_search(monkeypatch, limit, cap, want):
    """Doubling then bisection to 512 tokens, against a fake step that fits up to `limit` tokens."""
    import bench.train_step as ts

    calls = []

    def fake_fits(c, preset, T, device):
        calls.append(T)
        return (T <= limit), (T / 1000 if T <= limit else None), None

    monkeypatch.setattr(ts, "_fits", fake_fits)
    monkeypatch.setattr(ts, "_free", lambda: None)
    row = ts._longest_context(ts.CONFIGS[0], "gpt2", "cuda", cap=cap, box_s=60)
    assert row["max_T"] == want and row["peak_GiB"] == want / 1000
    assert len(calls) == len(set(calls)) <= 16
    if want == cap:
        assert row["note"] == "reached the cap"
    else:
        assert row["first_oom_T"] - row["max_T"] <= 512 and row["note"] is None


@pytest.mark.slow
def test_profile_step_categories_and_cpu_message():
    from bench.profile_step import category

    assert category("_ln_bwd_kernel") == "layernorm"
    assert category("_ce_rows_kernel") == "cross-entropy"
    assert category("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "matmul"
    assert category("_bwd_dkdv_kernel") == "attention"
    assert category("void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_kernel_cuda") == "copy/cast"
    p = subprocess.run([sys.executable, "-m", "bench.profile_step", "train", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "--config" in p.stdout
    if not torch.cuda.is_available():
        p = subprocess.run([sys.executable, "-m", "bench.profile_step", "decode"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode != 0 and "needs a CUDA GPU" in p.stderr
