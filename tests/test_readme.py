"""README.md cannot rot: each of its Python snippets runs as written, as a user runs it on a CPU (a
fresh process, without the tests' TRITON_INTERPRET=1: under the interpreter the optimizers step
each table row in an interpreted kernel, minutes instead of seconds), and its test command is the
one CI runs."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
SNIPPETS = [(README[:match.start()].count("\n") + 2, match.group(1))
            for match in re.finditer(r"^```python\n(.*?)^```$", README, re.DOTALL | re.MULTILINE)]


@pytest.mark.parametrize("line,code", SNIPPETS, ids=[f"README.md:{line}" for line, _ in SNIPPETS])
def test_snippet_runs_as_written(line, code, tmp_path):
    script = tmp_path / "snippet.py"
    script.write_text(code)
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    # in a folder of its own: snippets may save files (save_pretrained)
    done = subprocess.run([sys.executable, script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"README.md, the snippet at line {line}:\n{done.stderr}"


def test_ci_runs_the_test_command_of_the_readme():
    commands = set(re.findall(r"^    (pip install .* python -m pytest .*)$", README, re.MULTILINE))
    assert len(commands) == 1, commands
    assert commands.pop() in (REPO / ".ci" / "run").read_text().splitlines()
