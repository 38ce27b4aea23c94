"""The README's commands run on the model the quickstart trains.

    python -m pytest -q tests/test_readme.py

Trains the quickstart's model (``python -m gptcore.train``: the tiny preset into out/) for two
steps instead of 200, then runs every command of the README block "On the model the quickstart
trained" as written (the resume's --max-steps 300 becomes 3, to stay short).
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # trains and runs every command in subprocesses

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_commands() -> list[str]:
    text = README.read_text()
    block = text.split("On the model the quickstart trained", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.startswith("python -m gptcore.")]


def test_readme_commands_work_on_the_quickstart_model(tmp_path):
    cmds = quickstart_commands()
    assert {c.split()[2] for c in cmds} == {"gptcore.train", "gptcore.eval", "gptcore.generate", "gptcore.inspect_ckpt"}
    env = {**os.environ, "GPTCORE_DATA_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}

    def run(cmd: str):
        r = subprocess.run([sys.executable, *shlex.split(cmd)[1:]], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (cmd, r.stderr[-3000:])
        return r

    run("python -m gptcore.train --max-steps 2 --no-progress --sample-tokens 0 --device cpu")
    for cmd in cmds:
        cmd = re.sub(r"--max-steps \d+", "--max-steps 3", cmd)
        if "gptcore.train" in cmd and "--help" not in cmd:
            cmd += " --no-progress --sample-tokens 0 --device cpu"
        run(cmd)
