"""The README's training example works when pasted (run as a script, default JAX config)."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_neural_ode_example_trains(tmp_path):
    text = README.read_text()
    section = text.split("## Train a neural ODE", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"loss ([0-9.e+-]+)", proc.stdout)]
    assert len(losses) >= 2 and losses[0] / losses[-1] > 100, proc.stdout
