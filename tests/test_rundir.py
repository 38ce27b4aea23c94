"""Nothing lost: run-directory ownership, resume from the newest state, append-only metrics,
the data cache under concurrency and failed writes, safe paths, typed configs.

    python -m pytest -q tests/test_rundir.py

The kill-between-eval-and-checkpoint, two-runs-one-dir and signal-during-eval cases start real
training processes (python -m gptcore.train) and SIGKILL / SIGTERM them.
"""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptcore import data as D
from gptcore import rundir
from gptcore import train as T
from gptcore.io import CheckpointError, find_latest
from gptcore.config import GPTConfig

MICRO = ["--emb-dim", "16", "--n-heads", "2", "--n-layers", "1", "--context-length", "16", "--batch-size", "4",
         "--eval-steps", "2", "--warmup-steps", "2", "--sample-tokens", "0", "--no-progress", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("private_data_cache")  # tokenized corpora in a temp dir


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


class Run:
    """python -m gptcore.train in the background, its stdout and stderr in files."""

    def __init__(self, tmp: Path, args: list[str], name: str = "run"):
        self.out, self.err = tmp / f"{name}.stdout", tmp / f"{name}.stderr"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        with open(self.out, "w") as o, open(self.err, "w") as e:
            self.proc = subprocess.Popen([sys.executable, "-m", "gptcore.train", *args], stdout=o, stderr=e,
                                         env=env, cwd=tmp)

    def wait_for(self, ready, what: str, timeout: float = 240):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended ({self.proc.returncode}) before {what}: {self.err.read_text()[-2000:]}")
            if ready():
                return
            time.sleep(0.05)
        self.proc.kill()
        pytest.fail(f"timed out waiting for {what}")

    def finish(self, timeout: float = 240) -> int:
        return self.proc.wait(timeout=timeout)


def train_rows(out: Path) -> list[dict]:
    return [r for r in rundir.read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]


# ---- kill between an evaluation and the first checkpoint --------------------------------------------
@pytest.mark.slow
def test_resume_auto_after_a_kill_between_eval_and_checkpoint_keeps_everything(tmp_path):
    out = tmp_path / "out"
    args = MICRO + ["--eval-interval", "3", "--ckpt-interval", "100000", "--out-dir", str(out)]
    a = Run(tmp_path, args + ["--max-steps", "100000"], "a")
    a.wait_for(lambda: (out / "best" / "meta.json").is_file() and len(train_rows(out)) >= 5, "best/ and 5 steps")
    a.proc.send_signal(signal.SIGKILL)
    a.finish()
    assert not list(out.glob("ckpt-*")) and (out / ".gptcore.lock").exists()  # the state the issue describes
    metrics_before = (out / "metrics.jsonl").read_bytes()
    best = json.loads((out / "best" / "meta.json").read_text())

    # a plain rerun is refused and changes nothing but the dead run's lock, which it takes over
    before = snapshot(out)
    before.pop(".gptcore.lock")
    r = subprocess.run([sys.executable, "-m", "gptcore.train", *args, "--max-steps", "3"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "--resume auto" in r.stderr and "--overwrite" in r.stderr, r.stderr
    assert "took over the stale lock" in r.stdout and f"pid {a.proc.pid}" in r.stdout, r.stdout
    assert "Traceback" not in r.stderr and snapshot(out) == before

    b = Run(tmp_path, args + ["--max-steps", str(best["step"] + 2), "--resume", "auto"], "b")
    assert b.finish() == 0, b.err.read_text()[-3000:]
    text = b.out.read_text()
    assert f"resumed from {out / 'best'} (step {best['step']})" in text
    after = (out / "metrics.jsonl").read_bytes()
    assert after.startswith(metrics_before)  # nothing of the killed run's history was truncated
    history = rundir.read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in history if r["kind"] == "train"] == list(range(1, best["step"] + 3))
    new_best = json.loads((out / "best" / "meta.json").read_text())
    assert new_best["val_loss"] <= best["val_loss"]  # best/ only ever replaced by a better model
    assert (out / "latest").read_text().strip() == f"ckpt-{best['step'] + 2:07d}"
    assert not (out / ".gptcore.lock").exists()


# ---- two runs, one out dir --------------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_run_into_an_owned_out_dir_is_refused(tmp_path):
    out = tmp_path / "out"
    args = MICRO + ["--eval-interval", "0", "--ckpt-interval", "0", "--out-dir", str(out)]
    a = Run(tmp_path, args + ["--max-steps", "100000"], "a")
    a.wait_for(lambda: (out / ".gptcore.lock").exists() and len(train_rows(out)) >= 2, "the first steps")
    owner = json.loads((out / ".gptcore.lock").read_text())
    assert owner["pid"] == a.proc.pid and owner["host"]
    for extra in ([], ["--resume", "auto"], ["--overwrite"]):
        r = subprocess.run([sys.executable, "-m", "gptcore.train", *args, "--max-steps", "3", *extra],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, r.stderr
        assert "in use by another training run" in r.stderr and f"pid {a.proc.pid}" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    a.proc.send_signal(signal.SIGTERM)
    assert a.finish() == 128 + signal.SIGTERM
    assert not (out / ".gptcore.lock").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["pid"] for r in rows if r["kind"] == "run"] == [a.proc.pid]  # no second run wrote here
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert steps == list(range(1, len(steps) + 1))


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    with rundir.RunLock(tmp_path / "o", "first"):
        with pytest.raises(rundir.RunDirError, match="in use by another training run.*first"):
            rundir.RunLock(tmp_path / "o", "second").acquire()
    assert not (tmp_path / "o").exists()  # made for the lock, removed again when left empty
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / rundir.LOCK_FILE).write_text(json.dumps({"pid": 2**22 + 12345, "host": "elsewhere"}))
    with rundir.RunLock(tmp_path / "p") as lock:  # nobody holds the flock: stale
        assert "stale lock" in lock.note and "elsewhere" in lock.note


# ---- a signal during a long evaluation --------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_during_a_long_evaluation_saves_and_resumes(tmp_path, monkeypatch, capsys):
    """The signal is sent by the process to itself at the 10th batch of the evaluation after step 2
    (deterministic: no race with a timer); the run stops after that batch, saves step 2, exits 143."""
    from gptcore.model import GPT

    orig, calls = GPT.loss, {"eval": 0}

    def loss(self, idx, targets, ignore_index=-100):
        if not self.training:
            calls["eval"] += 1
            if calls["eval"] == 60 + 10:  # 60 batches at step 0, then 10 into the one at step 2
                os.kill(os.getpid(), signal.SIGTERM)
        return orig(self, idx, targets, ignore_index)

    monkeypatch.setattr(GPT, "loss", loss)
    out = tmp_path / "out"
    args = MICRO + ["--eval-steps", "60", "--eval-interval", "2", "--ckpt-interval", "0", "--out-dir", str(out)]
    assert T.main(args + ["--max-steps", "6"]) == 128 + signal.SIGTERM
    text = capsys.readouterr().out
    assert "evaluating 60 batches" in text and "SIGTERM during the evaluation at step 2" in text
    assert "resume with:" in text and calls["eval"] <= 60 + 11  # stopped within a batch
    assert (out / "latest").read_text().strip() == "ckpt-0000002" and not (out / ".gptcore.lock").exists()
    monkeypatch.setattr(GPT, "loss", orig)
    assert T.main(args + ["--max-steps", "3", "--resume", "auto"]) == 0
    assert [r["step"] for r in train_rows(out)] == [1, 2, 3]


# ---- resume and overwrite rules (in process) --------------------------------------------------------
def test_explicit_resume_of_an_older_state_does_not_replace_later_ones(tmp_path, capsys):
    out = tmp_path / "run"
    base = MICRO + ["--eval-interval", "0", "--ckpt-interval", "2", "--keep-last", "5", "--out-dir", str(out)]
    assert T.main(base + ["--max-steps", "4"]) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert T.main(base + ["--max-steps", "4", "--resume", str(out / "ckpt-0000002")]) == 2
    err = capsys.readouterr().err
    assert "holds later states" in err and "ckpt-0000004 (step 4)" in err and "--overwrite" in err
    assert snapshot(out) == before
    assert T.main(base + ["--max-steps", "4", "--resume", str(out / "ckpt-0000002"), "--overwrite"]) == 0


@pytest.mark.slow
def test_keep_last_after_a_resume_prunes_only_this_runs_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    base = MICRO + ["--eval-interval", "0", "--ckpt-interval", "1", "--out-dir", str(out)]
    assert T.main(base + ["--max-steps", "3", "--keep-last", "5"]) == 0
    earlier = snapshot(out / "ckpt-0000001")
    assert T.main(base + ["--max-steps", "7", "--keep-last", "2", "--resume", "auto"]) == 0
    # the earlier run's 1..3 stay (they still count among the newest 2); of this run's 4..7 the
    # newest two are kept
    assert sorted(p.name for p in out.glob("ckpt-*")) == [f"ckpt-000000{i}" for i in (1, 2, 3, 6, 7)]
    assert snapshot(out / "ckpt-0000001") == earlier
    assert find_latest(out) == out / "ckpt-0000007"


def test_overwrite_removes_the_old_run_and_only_it(tmp_path, capsys):
    out = tmp_path / "run"
    base = MICRO + ["--eval-interval", "0", "--out-dir", str(out)]
    assert T.main(base + ["--max-steps", "3"]) == 0
    (out / "notes.txt").write_text("mine")
    assert T.main(base + ["--max-steps", "1", "--overwrite"]) == 0
    assert "--overwrite: removed" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-0000001"]
    assert (out / "notes.txt").read_text() == "mine"
    assert [r["step"] for r in train_rows(out)] == [1]


def test_resume_auto_with_only_broken_states_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "ckpt-0000005").mkdir(parents=True)
    (out / "ckpt-0000005" / "meta.json").write_text("{")
    assert T.main(MICRO + ["--max-steps", "1", "--resume", "auto", "--out-dir", str(out)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["ckpt-0000005"]


def test_read_metrics_applies_run_markers(tmp_path):
    p = tmp_path / "metrics.jsonl"
    rows = [{"kind": "run", "step": 0}] + [{"kind": "train", "step": s, "loss": s} for s in (1, 2, 3, 4)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "train", "st')  # torn last line
    rundir.append_run_marker(p, {"event": "resume", "step": 2})
    with open(p, "a") as f:
        f.write(json.dumps({"kind": "train", "step": 3, "loss": 30}) + "\n")
    assert [(r["step"], r["loss"]) for r in rundir.read_metrics(p)] == [(1, 1), (2, 2), (3, 30)]


# ---- the data cache ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_concurrent_prepares_of_one_new_corpus_all_succeed(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 3000)
    code = ("import sys; from gptcore.data import prepare; d = prepare(sys.argv[1], progress=False); "
            "print(d.hash, len(d))")
    env = {**os.environ, "GPTCORE_DATA_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(corpus)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    assert len({o[0] for o in outs}) == 1
    leftovers = [p.name for p in (tmp_path / "cache").rglob("*.tmp")]
    assert leftovers == []


def test_a_failed_cache_write_cleans_up_and_the_next_prepare_works(tmp_path, monkeypatch):
    corpus = tmp_path / "c.txt"
    corpus.write_text("words and more words. " * 500)
    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(D.os, "fsync", full_disk)
    with pytest.raises(D.DataError, match="No space left on device.*GPTCORE_DATA_DIR"):
        D.prepare(str(corpus), cache_dir=tmp_path / "cache", progress=False)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == []  # no temp file, no manifest
    monkeypatch.setattr(D.os, "fsync", real_fsync)
    (tmp_path / "cache" / "train.bin.tmp").write_bytes(b"left by an older gptcore")
    data = D.prepare(str(corpus), cache_dir=tmp_path / "cache", progress=False)
    assert len(data) > 0 and not list((tmp_path / "cache").glob("*.tmp"))


def test_an_unusable_cache_dir_is_a_data_error(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("GPTCORE_DATA_DIR", str(tmp_path / "afile"))
    corpus = tmp_path / "c.txt"
    corpus.write_text("words and more words. " * 50)
    with pytest.raises(D.DataError, match="is a file, not a directory.*GPTCORE_DATA_DIR"):
        D.prepare(str(corpus), progress=False)


# ---- paths ----------------------------------------------------------------------------------------
def test_no_file_is_read_twice_and_symlink_loops_end(tmp_path, capsys):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("alpha " * 50)
    (d / "sub" / "b.txt").write_text("beta " * 50)
    os.symlink(d / "a.txt", d / "sub" / "a-again.txt")
    os.symlink(d, d / "sub" / "loop")
    names = [Path(s.name).name for s in D.resolve_sources(str(d))]
    assert sorted(names) == ["a.txt", "b.txt"]
    assert "read once" in capsys.readouterr().err
    # a ** glob walks the loop once (glob itself would follow it until the path is too long)
    names = [Path(s.name).name for s in D.resolve_sources(str(d / "**" / "*.txt"))]
    assert sorted(names) == ["a.txt", "b.txt"]
    names = [Path(s.name).name for s in D.resolve_sources(str(d / "sub" / "**"))]
    assert sorted(names) == ["a-again.txt", "b.txt"]  # sub/loop/a.txt is a-again.txt's file: read once
    os.unlink(d / "sub" / "loop")
    names = [Path(s.name).name for s in D.resolve_sources([str(d / "a.txt"), str(d / "**" / "*.txt")])]
    assert sorted(names) == ["a.txt", "b.txt"]


@pytest.mark.parametrize("pattern", ["**/*.txt", "**", "x/**/b*.txt", "x/**", "*/**/*.md", "x/y/**/*", ".h/**",
                                     "**/.h/*.txt", "x/**/**/*.txt"])
def test_a_recursive_glob_matches_what_glob_matches_without_loops(tmp_path, monkeypatch, pattern):
    import glob

    for f in ("a.txt", "x/b.txt", "x/b2.txt", "x/y/c.txt", "x/y/z/b.md", "x/.hidden.txt", ".h/d.txt",
              "x/.h/e.txt", "q/r.md"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text(f)
    monkeypatch.chdir(tmp_path)
    for spec in (pattern, str(tmp_path / pattern)):  # relative and absolute
        want = sorted({f for f in glob.glob(spec, recursive=True) if os.path.isfile(f)})  # glob repeats for **/**
        assert D._glob_files(spec) == want, spec


def test_a_latest_pointer_stays_inside_its_run_dir(tmp_path):
    (tmp_path / "run").mkdir()
    for text in ("../elsewhere/ckpt-0000001", "/etc/passwd", "ckpt-12", "\xff\xfe"):
        (tmp_path / "run" / "latest").write_bytes(text.encode("latin-1"))
        with pytest.raises(CheckpointError, match="latest"):
            find_latest(tmp_path / "run")
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", tmp_path / "run" / "ckpt-0000001")
    (tmp_path / "run" / "latest").write_text("ckpt-0000001\n")
    with pytest.raises(CheckpointError, match="leads outside"):
        find_latest(tmp_path / "run")


def test_an_hf_index_may_only_name_shards_beside_it(tmp_path):
    from gptcore.io import FormatError
    from gptcore.io.hf import _index_shards

    idx = tmp_path / "model.safetensors.index.json"
    for wm, msg in ([{"a": "../x.safetensors"}, "outside"], [{"a": "model.safetensors.index.json"}, "not a weight"],
                    [{"a": "missing.safetensors"}, "missing"], ["nope", "weight_map"]):
        idx.write_text(json.dumps({"weight_map": wm}))
        with pytest.raises(FormatError, match=msg):
            _index_shards(idx)
    (tmp_path / "s1.safetensors").write_bytes(b"")
    idx.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}}))
    assert _index_shards(idx) == [tmp_path / "s1.safetensors"]  # each shard once


# ---- configs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d, msg", [
    ({"qkv_bias": "false"}, "qkv_bias must be bool"),
    ({"tie_weights": 1}, "tie_weights must be bool"),
    ({"drop_rate": "0.1"}, "drop_rate must be float"),
    ({"ln_eps": float("nan")}, "ln_eps must be a finite number"),
    ({"rope_theta": float("inf")}, "rope_theta must be a finite number"),
    ({"n_layers": "12"}, "n_layers must be a positive integer"),
    ({"pos_emb": 1}, "pos_emb must be str"),
])
def test_from_dict_rejects_wrong_types(d, msg):
    with pytest.raises(ValueError, match=msg):
        GPTConfig.from_dict(d)


def test_yaml_exponent_numbers_are_numbers(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 1e-3\nmin_lr: 5E-5\nweight_decay: 1.0e-1\nmodel:\n  ln_eps: 1e-6\nsample_prompt: 1e3x\n")
    cfg = T.parse_args(["--config", str(f)])
    assert (cfg.lr, cfg.min_lr, cfg.weight_decay, cfg.model["ln_eps"]) == (1e-3, 5e-5, 0.1, 1e-6)
    assert cfg.sample_prompt == "1e3x"


def test_debug_shows_the_traceback(tmp_path, capsys):
    with pytest.raises(T.ConfigError):
        T.main(["--epochs", "inf", "--debug"])
    assert T.main(["--epochs", "inf"]) == 2


def test_nan_and_inf_flags_are_refused_at_start_up(capsys):
    for flag in ("--lr", "--min-lr", "--weight-decay", "--grad-clip", "--val-fraction", "--sample-temperature",
                 "--drop-rate", "--rope-theta", "--ln-eps"):
        for bad in ("nan", "inf", "-inf"):
            assert T.main([f"{flag}={bad}"]) == 2, (flag, bad)
            err = capsys.readouterr().err
            assert flag[2:].replace("-", "_") in err and "Traceback" not in err, err
    assert T.main(["--betas", "0.9", "nan"]) == 2
