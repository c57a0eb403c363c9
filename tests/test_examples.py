"""Every example runs end to end (a few steps each)."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.thread_independent  # smoke runs of the examples, in processes of their own (tests/conftest.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {
    "quickstart.py": ["--steps", "3"],
    "inspect_graph.py": ["--out", "{tmp}/graph.dot"],
    "cnn.py": ["--steps", "3"],
    "scheduler_checkpoint.py": ["--steps", "6"],
    "policies.py": [],
    "demo.py": ["--steps", "2"],
    "diagnose.py": [],
    "custom_preconditioner.py": ["--steps", "10"],
    "custom_layer_kind.py": ["--steps", "10"],
}


@pytest.mark.parametrize("example", sorted(RUNS))
def test_example_runs(example, tmp_path):
    args = [a.format(tmp=tmp_path) for a in RUNS[example]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", example), *args], capture_output=True,
                          text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


def test_readme_quick_start_runs(tmp_path):
    """The README's first Python block, as a new user pastes it, runs and steps without an lr."""
    import re
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    quick_start = readme[readme.index("## Quick start"):]
    code = re.search(r"```python\n(.*?)```", quick_start, flags=re.S).group(1)
    code += "\nassert model.optimizer.last_step['solved'] and model.optimizer.last_step['alpha'] > 0\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "parameters in curvature blocks: 9,610 of 9,610 (100.0%)" in done.stdout
