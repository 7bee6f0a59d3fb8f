"""The annotation tools' own importers, run from the venv `make test` builds for them (.venv-tools):
they pin libraries (opencv<5, pillow 12) that the project's venv does not use."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tool_python(module: str, *, venv: str = ".venv-tools", env: str = "CXR_TOOLS_PYTHON",
                install: str = "make test") -> str:
    """The interpreter of ``$env`` or ``venv`` that imports ``module``; skips the test with the fix
    when there is none."""
    python = os.environ.get(env) or str(ROOT / venv / "bin" / "python")
    if not Path(python).is_file():
        pytest.skip(f"{module} is not installed: `{install}` builds {venv} with it "
                    f"(or set {env} to a Python that has it)")
    probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"{python} cannot import {module}: {probe.stderr.strip().splitlines()[-1:]}")
    return python
