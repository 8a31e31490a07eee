"""The benchmarks' child processes: each measurement part runs in its own Python (its own
float64 setting, a clean compilation cache) and reports one `RESULT {json}` line."""

import json
import subprocess
import sys


def report(result):
    """In the child: hand `result` (JSON-serialisable) to the parent."""
    print("RESULT " + json.dumps(result), flush=True)


def run(cmd, *, cwd=None, env=None, indent=""):
    """In the parent: run `cmd`, echo its other output as it comes (indented by
    `indent`), and return `(result, returncode)`; `result` is None without a RESULT line."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=sys.stderr, text=True,
                            cwd=cwd, env=env)
    result = None
    for line in proc.stdout:
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
        else:
            print(indent + line, end="", flush=True)
    proc.wait()
    return result, proc.returncode
