"""Run one benchmark measurement in a fresh Python process and read back its JSON record.

A fresh process per measurement gives it its own peak-memory mark, its own thread settings and no
allocator state left over from the previous one. A worker module calls `serve(measure)` in its
`__main__` block; the parent calls `call(module, payload)`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "BENCH_RESULT "  # the result line on stdout (libraries may print other lines)


def call(module: str, payload: dict, timeout_s: float = 1800) -> dict:
    """`python -m module '<payload JSON>'` in the repository root; a failure becomes {"error": ...}."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", module, json.dumps(payload)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"{module} timed out after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-4:]
    return {"error": f"{module} exited with {proc.returncode}: " + " | ".join(tail)}


def serve(measure: Callable[[dict], dict], argv: list[str] | None = None) -> None:
    """Worker side: one JSON payload in argv, one result line out."""
    logging.basicConfig(level=logging.WARNING)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit(f"usage: python -m {sys.modules['__main__'].__spec__.name} '<JSON payload>'")
    print(RESULT_PREFIX + json.dumps(measure(json.loads(argv[0]))), flush=True)
