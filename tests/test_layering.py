"""The package layering of README "Layout", enforced by import-linter's contract in setup.cfg."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    proc = subprocess.run([exe, str(ROOT / "setup.cfg")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def test_cli_only_parses_and_prints():
    """Every command goes through pipeline.api: the CLI imports nothing else of the project (besides
    the error base it catches, the console set-up and the version)."""
    import ast

    tree = ast.parse((ROOT / "pipeline" / "cli.py").read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported |= {f"{node.module}.{a.name}" if node.module == "pipeline" else node.module for a in node.names}
        elif isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
    ours = {m for m in imported if m.split(".")[0] in ("data", "ensemble", "segmenter", "gradcam", "pipeline")}
    assert ours == {"pipeline.api", "pipeline.__version__", "pipeline.console", "data.errors"}, ours
