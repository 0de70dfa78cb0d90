"""Running a check script under Triton's CPU interpreter, for the GPU kernels' tests.

``TRITON_INTERPRET`` must be set before triton is imported, so the check runs in a fresh process."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton not installed (CUDA builds of torch ship it)")


def run_interpreted(code: str, done_marker: str, timeout: int = 600) -> str:
    """Run ``code`` under the interpreter; assert it exits cleanly and prints ``done_marker``; its stdout."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done_marker in done.stdout
    return done.stdout
