"""`cxr data ...` on generated inputs, the bad corpus and the real folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from fakes import BAD_CORPUS_EXPECT
from pipeline.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True)


def test_version_and_help():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("cxr ")
    assert run_cli("--help").returncode == 0
    none = run_cli()
    assert none.returncode == 2 and "COMMAND" in none.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["data", "check", "/no/such/dir"], "no such folder"),
        (["data", "split", "/no/such/dir", "--out", "x.csv"], "no such folder"),
        (["data", "split", ".", "--out", "x.csv", "--val", "1.5"], "must be in [0, 1)"),
        (["data", "frobnicate"], "invalid choice"),
    ],
)
def test_bad_usage_exits_2_without_traceback(args, message):
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_folder_without_class_dirs_is_usage_error(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert main(["data", "check", str(tmp_path)]) == 2
    assert "no class folders" in capsys.readouterr().err


def test_check_lists_every_bad_file_and_exits_1(bad_corpus, tmp_path, capsys):
    d = tmp_path / "d" / "covid"
    d.mkdir(parents=True)
    for name in BAD_CORPUS_EXPECT:
        shutil.copy(bad_corpus / name, d / name)
    report = tmp_path / "r.json"
    code = main(["data", "check", str(tmp_path / "d"), "--json", str(report)])
    out = capsys.readouterr().out
    bad = {n: e for n, e in BAD_CORPUS_EXPECT.items() if e != "ok"}
    assert code == 1
    assert f"unreadable: {len(bad)}" in out
    for name, reason in bad.items():
        assert any(name in line and reason in line for line in out.splitlines()), name
    data = json.loads(report.read_text())
    assert data["n_readable"] == len(BAD_CORPUS_EXPECT) - len(bad)


def test_split_then_check_has_no_leaks(shared_cxr, tmp_path, capsys):
    out = tmp_path / "splits.csv"
    assert main(["data", "split", str(shared_cxr), "--out", str(out), "--seed", "0"]) == 0
    assert "test" in capsys.readouterr().out
    assert main(["data", "check", str(shared_cxr), "--splits", str(out)]) == 0
    assert "leaks across splits: 0" in capsys.readouterr().out


def test_real_folder_counts(shared_cxr, shared_masks):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "data", "check", str(shared_cxr), "--masks", str(shared_masks)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "270 images, 270 readable" in proc.stdout
    assert "per class: covid 90, normal 90, pneumonia 90" in proc.stdout
    assert "infection 50" in proc.stdout and "lung 233" in proc.stdout and "opacity 32" in proc.stdout
