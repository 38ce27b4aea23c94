"""CI runs the README's test commands, and the suite's test ids are the same in every collection.

    python -m pytest -q tests/test_ci.py
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_test_commands() -> list[list[str]]:
    section = (ROOT / "README.md").read_text().split("\n## Tests\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line.split("  #")[0]) for line in block.splitlines() if line.strip()]


def ci_test_commands() -> list[list[str]]:
    text = (ROOT / ".ci" / "run").read_text().split("# --- the README's test commands ---\n", 1)[1]
    return [shlex.split(m.group(1)) for m in re.finditer(r"^step (.+?) \|\|", text, re.M)]


def test_ci_runs_the_readme_test_commands_in_order():
    readme = readme_test_commands()
    assert readme and all(c[:3] == ["python", "-m", "pytest"] for c in readme), readme
    assert ci_test_commands() == readme


def test_fast_and_slow_steps_split_the_suite():
    """The two steps together are the whole suite: every test is either slow or not."""
    assert [c[3:] for c in readme_test_commands()] == [["-m", "not slow"], ["-m", "slow"]]


@pytest.mark.slow
def test_a_second_collection_gives_identical_ids(request):
    """pytest-xdist needs every worker to collect the same ids in the same order. A fresh process
    with another hash seed collects what this session collected (before -m deselected anything);
    ids built from set order, random bytes or the clock would differ."""
    from conftest import COLLECTED_IDS

    here = request.config.stash[COLLECTED_IDS]
    seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                        *request.config.args], cwd=request.config.invocation_params.dir, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "PYTHONHASHSEED": seed})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    there = [line for line in r.stdout.splitlines() if "::" in line]
    assert len(there) == len(here) and there == here, sorted(set(here) ^ set(there))[:20]
