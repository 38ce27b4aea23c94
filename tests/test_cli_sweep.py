"""Every CLI x a table of bad arguments: exit status 2, one message (no traceback), nothing changed.

    python -m pytest -q tests/test_cli_sweep.py

The sweep calls each CLI's main() in this process (a fresh interpreter per case would cost
seconds of imports each); test_cli_subprocess below runs one case per CLI as the user does,
through python -m. The run directory every case points at is compared byte for byte before and
after; a case whose out dir did not exist must not create it.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from gptcore import eval as E
from gptcore import finetune as FT
from gptcore import generate as G
from gptcore import inspect_ckpt as I
from gptcore import train as T

MICRO = ["--emb-dim", "16", "--n-heads", "2", "--n-layers", "1", "--context-length", "16", "--batch-size", "4",
         "--eval-steps", "2", "--warmup-steps", "2", "--sample-tokens", "0", "--no-progress", "--device", "cpu"]
# the fine-tuner on the built-in puzzles: 64 records, context 64 holds each
FT_MICRO = MICRO[:6] + ["--context-length", "64", "--n-tasks", "64", "--exact-match", "0", "--eval-samples", "0"] + \
    MICRO[8:]
CLIS = {"train": T.main, "eval": E.main, "generate": G.main, "inspect": I.main, "finetune": FT.main}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A finished micro run plus a gallery of bad files, shared by every case."""
    root = tmp_path_factory.mktemp("sweep")
    old = os.environ.get("GPTCORE_DATA_DIR")
    os.environ["GPTCORE_DATA_DIR"] = str(root / "data-cache")
    run = root / "run"
    assert T.main(MICRO + ["--max-steps", "2", "--eval-interval", "1", "--out-dir", str(run)]) == 0
    (root / "random.bin").write_bytes(os.urandom(4096))
    (root / "random.pt").write_bytes(os.urandom(4096))
    (root / "text.txt").write_text("just some words, not a checkpoint\n")
    (root / "empty").mkdir()
    (root / "binary.yaml").write_bytes(b"\x00\xff\xfe" + os.urandom(200))
    (root / "nan.yaml").write_text("lr: .nan\n")
    (root / "latin1.txt").write_bytes(b"caf\xe9 " * 40)
    junk = root / "junk-ckpt"
    junk.mkdir()
    (junk / "meta.json").write_bytes(os.urandom(300))
    (junk / "model.safetensors").write_bytes(os.urandom(300))
    # an edited copy of the run: meta.json with a string step, a latest pointing out of the dir
    edited = root / "edited"
    edited.mkdir()
    for name in ("ckpt-0000002",):
        (edited / name).mkdir()
        for f in (run / name).iterdir():
            (edited / name / f.name).write_bytes(f.read_bytes())
    meta = json.loads((edited / "ckpt-0000002" / "meta.json").read_text())
    meta["step"] = "two"
    (edited / "ckpt-0000002" / "meta.json").write_text(json.dumps(meta))
    escape = root / "escape"
    escape.mkdir()
    (escape / "latest").write_text("../run/ckpt-0000002\n")

    class Evil:  # a pickle that a weights-only load must refuse
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"model": Evil()}, root / "evil.pt")
    yield {"root": root, "run": run}
    if old is None:
        os.environ.pop("GPTCORE_DATA_DIR")
    else:
        os.environ["GPTCORE_DATA_DIR"] = old


def _tree(d):
    if not d.exists():
        return None
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


# (cli, id, argv with {run}/{root} placeholders, text the message must hold, needs no GPU)
CASES = [
    ("train", "rerun-into-used-dir", ["--out-dir", "{run}"], "--overwrite"),
    ("train", "epochs-inf", ["--epochs", "inf", "--out-dir", "{root}/new"], "epochs must be a finite number"),
    ("train", "lr-nan", ["--lr", "nan", "--out-dir", "{root}/new"], "lr must be a finite number"),
    ("train", "seed-23-digits", ["--seed", "12345678901234567890123", "--out-dir", "{root}/new"], "seed must be"),
    ("train", "max-steps-0", ["--max-steps", "0", "--out-dir", "{root}/new"], "max_steps must be"),
    ("train", "lr-times-wd", ["--lr", "20", "--out-dir", "{root}/new"], "lr * weight_decay must be < 1"),
    ("train", "sample-tokens-huge", ["--sample-tokens", "1000000000", "--out-dir", "{root}/new"], "sample_tokens"),
    ("train", "batch-cannot-fit", MICRO + ["--batch-size", "1000000000", "--out-dir", "{root}/new"],
     "lower --batch-size"),
    ("train", "eval-steps-cannot-fit", MICRO + ["--eval-steps", "1000000000000", "--out-dir", "{root}/new"],
     "lower --eval-steps"),
    ("train", "context-cannot-fit", MICRO + ["--context-length", "100000000", "--out-dir", "{root}/new"],
     "shorten --context-length"),
    ("train", "resume-and-overwrite", ["--resume", "auto", "--overwrite", "--out-dir", "{run}"], "give one of them"),
    ("train", "resume-missing", MICRO + ["--resume", "{root}/nope", "--out-dir", "{root}/new"], "does not exist"),
    ("train", "resume-text-file", MICRO + ["--resume", "{root}/text.txt", "--out-dir", "{root}/new"],
     "not a gptcore checkpoint"),
    ("train", "resume-junk", MICRO + ["--resume", "{root}/junk-ckpt", "--out-dir", "{root}/new"], "not valid JSON"),
    ("train", "resume-edited-meta", MICRO + ["--resume", "{root}/edited/ckpt-0000002", "--out-dir", "{root}/new"],
     "step must be a non-negative integer"),
    ("train", "resume-latest-escapes", MICRO + ["--resume", "{root}/escape", "--out-dir", "{root}/new"],
     "inside its run directory"),
    ("train", "init-from-random-bytes", MICRO + ["--init-from", "{root}/random.pt", "--out-dir", "{root}/new"],
     "random.pt"),
    ("train", "init-from-empty-dir", MICRO + ["--init-from", "{root}/empty", "--out-dir", "{root}/new"], "empty"),
    ("train", "init-from-pickle", MICRO + ["--init-from", "{root}/evil.pt", "--out-dir", "{root}/new"],
     "--trust-pickle"),
    ("train", "config-not-text", ["--config", "{root}/binary.yaml", "--out-dir", "{root}/new"], "not a UTF-8 text"),
    ("train", "config-nan", ["--config", "{root}/nan.yaml", "--out-dir", "{root}/new"], "lr must be a finite"),
    ("train", "out-dir-is-a-file", MICRO + ["--out-dir", "{root}/text.txt/sub"], "not a directory"),
    ("train", "data-missing", MICRO + ["--data", "{root}/nope.txt", "--out-dir", "{root}/new"], "not found"),
    ("train", "data-not-utf8", MICRO + ["--data", "{root}/latin1.txt", "--out-dir", "{root}/new"], "not valid UTF-8"),
    ("train", "backend-triton", MICRO + ["--backend", "triton", "--out-dir", "{root}/new"], "triton cannot run here"),
    ("train", "device-cuda", MICRO[:-2] + ["--device", "cuda", "--out-dir", "{root}/new"], "no CUDA GPU"),
    ("train", "compile-mode-without-compile", ["--compile-mode", "reduce-overhead", "--out-dir", "{root}/new"],
     "add --compile"),
    ("train", "bad-choice", ["--dtype", "fp8", "--out-dir", "{root}/new"], "invalid choice"),
    ("eval", "ckpt-missing", ["--ckpt", "{root}/nope", "--device", "cpu"], "does not exist"),
    ("eval", "ckpt-junk", ["--ckpt", "{root}/junk-ckpt", "--device", "cpu"], "not valid JSON"),
    ("eval", "ckpt-text", ["--ckpt", "{root}/text.txt", "--device", "cpu"], "not a gptcore checkpoint"),
    ("eval", "ckpt-empty-dir", ["--ckpt", "{root}/empty", "--device", "cpu"], "not a gptcore checkpoint"),
    ("eval", "ckpt-edited-meta", ["--ckpt", "{root}/edited/ckpt-0000002", "--device", "cpu"], "step must be"),
    ("eval", "latest-escapes", ["--ckpt", "{root}/escape", "--device", "cpu"], "inside its run directory"),
    ("eval", "batch-size-0", ["--ckpt", "{run}", "--batch-size", "0", "--device", "cpu"], "--batch-size must be"),
    ("eval", "batch-size-huge", ["--ckpt", "{run}", "--batch-size", "100000000000", "--device", "cpu"],
     "--batch-size must be"),
    ("eval", "context-too-long", ["--ckpt", "{run}", "--context-length", "4096", "--device", "cpu"],
     "exceeds the model's 16"),
    ("eval", "stride-0", ["--ckpt", "{run}", "--file", "{root}/text.txt", "--stride", "0", "--device", "cpu"],
     "--stride must be"),
    ("eval", "file-not-utf8", ["--ckpt", "{run}", "--file", "{root}/latin1.txt", "--device", "cpu"], "UTF-8"),
    ("eval", "fp16-on-cpu", ["--ckpt", "{run}", "--dtype", "fp16", "--device", "cpu"], "fp16 needs a CUDA GPU"),
    ("eval", "backend-triton", ["--ckpt", "{run}", "--backend", "triton", "--device", "cpu"], "cannot run here"),
    ("eval", "device-cuda", ["--ckpt", "{run}", "--device", "cuda:7"], "cuda:7"),
    ("eval", "stride-without-file", ["--ckpt", "{run}", "--stride", "4", "--device", "cpu"], "--stride applies"),
    ("generate", "block-size-without-paged", ["--preset", "tiny", "--prompt-ids", "1", "--block-size", "8"],
     "add --paged"),
    ("generate", "max-new-tokens-0", ["--ckpt", "{run}", "--prompt-ids", "1", "--max-new-tokens", "0"],
     "--max-new-tokens must be"),
    ("generate", "temperature-inf", ["--preset", "tiny", "--prompt-ids", "1", "--temperature", "inf"],
     "--temperature must be a finite"),
    ("generate", "temperature-nan", ["--preset", "tiny", "--prompt-ids", "1", "--temperature", "nan"],
     "--temperature must be a finite"),
    ("generate", "top-p-0", ["--preset", "tiny", "--prompt-ids", "1", "--top-p", "0"], "--top-p must be in"),
    ("generate", "seed-23-digits", ["--preset", "tiny", "--prompt-ids", "1", "--seed", "12345678901234567890123"],
     "--seed must be"),
    ("generate", "num-samples-huge", ["--preset", "tiny", "--prompt-ids", "1", "--num-samples", "1000000000"],
     "--num-samples must be"),
    ("generate", "beyond-context", ["--ckpt", "{run}", "--prompt-ids", "1,2", "--max-new-tokens", "64"],
     "context_length 16"),
    ("generate", "ckpt-missing", ["--ckpt", "{root}/nope", "--prompt-ids", "1"], "does not exist"),
    ("generate", "ckpt-junk", ["--ckpt", "{root}/junk-ckpt", "--prompt-ids", "1"], "not valid JSON"),
    ("generate", "ckpt-edited-meta", ["--ckpt", "{root}/edited/ckpt-0000002", "--prompt-ids", "1"], "step must be"),
    ("generate", "prompt-file-binary", ["--preset", "tiny", "--prompt-file", "{root}/random.bin"], "not UTF-8"),
    ("generate", "prompt-ids-not-ints", ["--preset", "tiny", "--prompt-ids", "a,b"], "comma-separated integers"),
    ("generate", "stream-two-prompts", ["--preset", "tiny", "--prompt-ids", "1", "--prompt-ids", "2", "--stream"],
     "--stream prints one sequence"),
    ("generate", "backend-triton", ["--preset", "tiny", "--prompt-ids", "1", "--backend", "triton", "--device", "cpu"],
     "cannot run here"),
    ("generate", "device-cuda", ["--preset", "tiny", "--prompt-ids", "1", "--device", "cuda"], "no CUDA GPU"),
    ("inspect", "missing", ["{root}/nope"], "no such file"),
    ("inspect", "random-bytes", ["{root}/random.pt"], "random.pt"),
    ("inspect", "empty-dir", ["{root}/empty"], "empty"),
    ("inspect", "pickle-refused", ["{root}/evil.pt"], "--trust-pickle"),
    ("inspect", "bad-config", ["{run}", "--config", "no-such-preset"], "no-such-preset"),
    ("inspect", "vocab-0", ["{run}", "--vocab", "0"], "--vocab must be positive"),
    ("inspect", "latest-escapes", ["{root}/escape"], "inside its run directory"),
    ("inspect", "edited-meta", ["{root}/edited/ckpt-0000002"], "step"),
    ("finetune", "lr-nan", FT_MICRO + ["--lr", "nan", "--out-dir", "{root}/new"], "lr must be a finite number"),
    ("finetune", "lora-alpha-inf", FT_MICRO + ["--lora-rank", "2", "--lora-alpha", "inf", "--out-dir", "{root}/new"],
     "lora_alpha must be a finite number"),
    ("finetune", "lora-rank-negative", FT_MICRO + ["--lora-rank", "-1", "--out-dir", "{root}/new"],
     "lora_rank must be > 0"),
    ("finetune", "lora-rank-above-emb-dim", FT_MICRO + ["--lora-rank", "17", "--out-dir", "{root}/new"],
     "exceeds the model's emb_dim 16"),
    ("finetune", "data-missing", FT_MICRO + ["--data", "{root}/nope.json", "--out-dir", "{root}/new"], "not found"),
    ("finetune", "data-not-json", FT_MICRO + ["--data", "{root}/random.bin", "--out-dir", "{root}/new"], "random.bin"),
    ("finetune", "into-used-dir", FT_MICRO + ["--out-dir", "{run}"], "--overwrite"),
    ("finetune", "resume-and-overwrite", FT_MICRO + ["--resume", "auto", "--overwrite", "--out-dir", "{run}"],
     "give one of them"),
    ("finetune", "init-from-pickle", FT_MICRO + ["--init-from", "{root}/evil.pt", "--out-dir", "{root}/new"],
     "--trust-pickle"),
    ("finetune", "unknown-flag", FT_MICRO + ["--lora-rnak", "2", "--out-dir", "{root}/new"], "lora_rank"),
]


@pytest.mark.parametrize("cli, argv, needle", [pytest.param(c, a, n, id=f"{c}-{i}") for c, i, a, n in CASES])
def test_bad_arguments_exit_2_with_one_message_and_change_nothing(env, cli, argv, needle, capsys, monkeypatch):
    if ("cuda" in " ".join(argv) or "triton" in argv) and torch.cuda.is_available():
        pytest.skip("a GPU is visible: --device cuda and --backend triton can run here")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # so that --backend triton cannot run on a CPU
    monkeypatch.delenv("GPTCORE_DEBUG", raising=False)
    root, run = env["root"], env["run"]
    argv = [a.format(root=root, run=run) for a in argv]
    before_run, before_new = _tree(run), _tree(root / "new")
    try:
        rc = CLIS[cli](argv)
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    assert needle in err, err
    assert len([line for line in err.splitlines() if "error: " in line]) == 1, err  # one message
    assert _tree(run) == before_run
    assert _tree(root / "new") == before_new  # a refused run leaves no out dir behind
    assert not (run / ".gptcore.lock").exists()


def _python_m(module, *args, env=None):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("module, args, needle", [
    ("gptcore.train", ["--epochs", "inf"], "epochs must be a finite number"),
    ("gptcore.eval", ["--ckpt", "{root}/junk-ckpt", "--device", "cpu"], "not valid JSON"),
    ("gptcore.generate", ["--preset", "tiny", "--prompt-ids", "1", "--max-new-tokens", "0"], "--max-new-tokens"),
    ("gptcore.inspect_ckpt", ["{root}/random.pt"], "random.pt"),
    ("gptcore.finetune", ["--lora-rank", "-1", "--device", "cpu"], "lora_rank must be > 0"),
], ids=["train", "eval", "generate", "inspect", "finetune"])
@pytest.mark.slow
def test_cli_subprocess(env, module, args, needle):
    """As the user runs them: one line, status 2; --debug / GPTCORE_DEBUG=1 show the traceback."""
    args = [a.format(root=env["root"]) for a in args]
    r = _python_m(module, *args, env={"GPTCORE_DEBUG": "0"})
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and needle in r.stderr, r.stderr
    if module in ("gptcore.inspect_ckpt", "gptcore.finetune"):
        r = _python_m(module, *args, "--debug")
        assert r.returncode != 0 and "Traceback" in r.stderr


def test_inspect_fails_when_a_checkpoint_config_does_not_match_its_weights(env, tmp_path, capsys):
    src = env["run"] / "ckpt-0000002"
    bad = tmp_path / "ckpt-0000002"
    bad.mkdir()
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    meta = json.loads((bad / "meta.json").read_text())
    meta["model_config"]["n_layers"] = 3  # a valid config, but not the one of these weights
    (bad / "meta.json").write_text(json.dumps(meta))
    assert I.main([str(src)]) == 0
    capsys.readouterr()
    assert I.main([str(bad)]) == 1
    assert "CONFIG DOES NOT MATCH THE WEIGHTS" in capsys.readouterr().out
    assert I.main([str(bad), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["consistent"] is False and "transformer.h.1.attn.c_attn.weight" in report["inconsistencies"]["missing"]
    for main, args in ((E.main, ["--ckpt", str(bad), "--device", "cpu"]),
                       (G.main, ["--ckpt", str(bad), "--prompt-ids", "1", "--max-new-tokens", "2", "--device", "cpu"])):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "does not fit the model config" in err and "Traceback" not in err
