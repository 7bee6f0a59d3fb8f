"""`cxr run` under hostile but fair use: a corpus of awkward inputs (made here, never stored), output
collisions, two runs on one OUT, OUT inside the input, write failures, and resuming.

What every case must give: the documented exit code, no traceback, exactly one results row per good
file and one failure row per bad one, a resumed run equal to an uninterrupted one, and nothing left
half-written.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fakes import BAD_CORPUS_EXPECT, png_bytes, xray_like
from pipeline.cli import main

LONG_NAME = "n" * 246 + ".png"  # 250 bytes: the old `<stem>.gradcam.png` was over the 255-byte limit

#: file-system cases on top of fakes.BAD_CORPUS_EXPECT (decoder cases): name → "ok", "skip" (no row at
#: all, by design) or a substring of the failure reason
FS_CASES = {
    "fs/dangling.png": "no such file",
    "fs/loop_a.png": "cannot read file",
    "fs/loop_b.png": "cannot read file",
    "fs/folder.png/inner.png": "ok",  # a folder named like an image is walked, not read
    "fs/same.png": "ok",  # same stem, two extensions, different pictures
    "fs/same.jpg": "ok",
    f"fs/{LONG_NAME}": "ok",
    "fs/ä b #1 (copy).png": "ok",
    "fs/UPPER.PNG": "ok",
    "fs/.hidden.png": "skip",
    "fs/notes.txt": "skip",
}


def _make_fs_cases(d: Path) -> None:
    fs = d / "fs"
    (fs / "folder.png").mkdir(parents=True)
    (fs / "dangling.png").symlink_to(fs / "nowhere.png")
    (fs / "loop_a.png").symlink_to(fs / "loop_b.png")
    (fs / "loop_b.png").symlink_to(fs / "loop_a.png")
    (fs / "folder.png" / "inner.png").write_bytes(png_bytes(xray_like(90, 80, seed=41)))
    (fs / "same.png").write_bytes(png_bytes(xray_like(90, 80, seed=42)))
    Image.fromarray(xray_like(120, 100, seed=43)).save(fs / "same.jpg", quality=95)  # other size, other picture
    (fs / LONG_NAME).write_bytes(png_bytes(xray_like(90, 80, seed=44)))
    (fs / "ä b #1 (copy).png").write_bytes(png_bytes(xray_like(90, 80, seed=45)))
    (fs / "UPPER.PNG").write_bytes(png_bytes(xray_like(90, 80, seed=46)))
    (fs / ".hidden.png").write_bytes(png_bytes(xray_like(90, 80, seed=47)))
    (fs / "notes.txt").write_text("not an image\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, bad_corpus):
    d = tmp_path_factory.mktemp("corpus")
    shutil.copytree(bad_corpus, d / "bad")
    _make_fs_cases(d)
    expect = {f"bad/{k}": v for k, v in BAD_CORPUS_EXPECT.items()} | FS_CASES
    assert len([v for v in expect.values() if v != "skip"]) >= 30  # the floor on covered kinds
    return d, expect


@pytest.fixture(autouse=True)
def _models_loaded_once(models_loaded_once):
    """Every test here calls the CLI with the bundles loaded once (conftest.models_loaded_once)."""


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _run(folder, out, clf, seg, *extra) -> int:
    return main(["run", str(folder), "--classifier", str(clf), "--segmenter", str(seg), "--out", str(out),
                 "--batch-size", "4", "--segment-all", *extra])


def _leftovers(out: Path) -> list[str]:
    return [p.relative_to(out).as_posix() for p in out.rglob("*") if ".tmp" in p.name]


@pytest.fixture(scope="module")
def full_run(corpus, light_bundle, seg_model, tmp_path_factory):
    folder, _ = corpus
    out = tmp_path_factory.mktemp("full") / "out"
    rc = _run(folder, out, light_bundle, seg_model)
    return rc, out


def test_every_file_gets_exactly_one_row(corpus, full_run, capfd):
    _, expect = corpus
    rc, out = full_run
    assert rc == 1  # some inputs failed
    results = {r["file"]: r for r in _rows(out / "results.csv")}
    failures = _rows(out / "failures.csv")
    assert len(results) == len(_rows(out / "results.csv")) and len({f["file"] for f in failures}) == len(failures)
    for name, outcome in expect.items():
        fails = [f for f in failures if f["file"] == name]
        if outcome == "ok":
            assert name in results and not fails, name
        elif outcome == "skip":
            assert name not in results and not fails, name
        else:
            assert name not in results and len(fails) == 1, name
            assert outcome in fails[0]["reason"], (name, fails[0]["reason"])
            assert "\n" not in fails[0]["reason"] and " at 0x" not in fails[0]["reason"]
    assert not _leftovers(out)


def test_pictures_never_collide(full_run):
    _, out = full_run
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    pictures = [r[k] for r in rows for k in ("gradcam_overlay", "mask", "mask_overlay") if k in r]
    assert len(pictures) == len(set(pictures))
    assert all((out / p).is_file() and len(Path(p).name.encode()) <= 255 for p in pictures)
    same = {r["file"]: r for r in rows if r["file"].startswith("fs/same.")}
    png, jpg = (np.asarray(Image.open(out / same[f]["gradcam_overlay"])) for f in ("fs/same.png", "fs/same.jpg"))
    assert png.shape[:2] == (90, 80) and jpg.shape[:2] == (120, 100)  # each row shows its own picture
    assert same["fs/same.jpg"]["gradcam_overlay"] == "overlays/fs/same.jpg.gradcam.png"


def test_a_rerun_changes_nothing(corpus, full_run, light_bundle, seg_model):
    folder, _ = corpus
    _, out = full_run
    before = {p: (out / p).read_bytes() for p in ("results.csv", "failures.csv", "results.jsonl")}
    assert _run(folder, out, light_bundle, seg_model) == 1
    assert {p: (out / p).read_bytes() for p in before} == before


def test_resumed_run_equals_uninterrupted(corpus, full_run, loaded_bundles, light_bundle, seg_model, tmp_path):
    from pipeline.run import run_pipeline

    folder, _ = corpus
    _, full = full_run
    part = tmp_path / "part"
    clf, seg = loaded_bundles
    res = run_pipeline(folder, part, classifier=clf, segmenter=seg, batch_size=4, stop_after=5, segment_all=True)
    assert res.n_done == 5
    with (part / "results.jsonl").open("ab") as handle:
        handle.write(b'{"file": "torn')  # a line half-written when the process was killed
    assert _run(folder, part, light_bundle, seg_model) == 1
    for name in ("results.csv", "failures.csv"):
        assert (part / name).read_text(encoding="utf-8") == (full / name).read_text(encoding="utf-8")
    lines = (part / "results.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(_rows(full / "results.csv"))  # no duplicate, no torn row


def test_out_inside_the_input_folder_is_never_read(light_bundle, seg_model, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        (folder / f"c{i}.png").write_bytes(png_bytes(xray_like(80, 80, seed=60 + i)))
    out = folder / "out"
    assert _run(folder, out, light_bundle, seg_model) == 0
    assert _run(folder, out, light_bundle, seg_model) == 0  # the rerun sees the same 2 X-rays
    assert _run(folder, folder / "out2", light_bundle, seg_model) == 0  # and so does a run into a sibling OUT
    for o in (out, folder / "out2"):
        assert sorted(r["file"] for r in _rows(o / "results.csv")) == ["c0.png", "c1.png"]


def test_an_output_folder_given_as_input_is_refused(light_bundle, seg_model, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes(xray_like(80, 80, seed=70)))
    assert _run(folder, tmp_path / "out", light_bundle, seg_model) == 0
    assert _run(tmp_path / "out", tmp_path / "out3", light_bundle, seg_model) == 2
    assert "holds the outputs of a cxr job" in capsys.readouterr().err


def test_second_run_on_the_same_out_is_refused_while_the_first_writes(light_bundle, seg_model, tmp_path, capsys):
    from pipeline.outputs import claim_output

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes(xray_like(80, 80, seed=71)))
    out = tmp_path / "out"
    with claim_output(out, job="run"):  # what a first `cxr run` holds while it works
        assert _run(folder, out, light_bundle, seg_model) == 2
        err = capsys.readouterr().err
        assert f"pid {os.getpid()}" in err and "is writing here" in err and "Traceback" not in err
    assert not (out / "results.csv").exists()
    assert _run(folder, out, light_bundle, seg_model) == 0  # the lock ends with its holder
    assert len(_rows(out / "results.csv")) == 1


def test_write_failures_become_failure_rows_and_are_retried(light_bundle, seg_model, tmp_path, monkeypatch, capsys):
    from pipeline import run as files_module  # where `cxr run` writes each picture

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        (folder / f"c{i}.png").write_bytes(png_bytes(xray_like(80, 80, seed=80 + i)))
    real_write = files_module.write_bytes_atomic

    def disk_full_for_c1(path, data):
        if "c1.png" in path.name:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, data)

    monkeypatch.setattr(files_module, "write_bytes_atomic", disk_full_for_c1)
    out = tmp_path / "out"
    assert _run(folder, out, light_bundle, seg_model) == 1
    assert "Traceback" not in capsys.readouterr().err
    assert [r["file"] for r in _rows(out / "results.csv")] == ["c0.png", "c2.png"]
    (fail,) = _rows(out / "failures.csv")
    assert fail["file"] == "c1.png" and "no space left on device" in fail["reason"]
    assert not _leftovers(out)
    monkeypatch.setattr(files_module, "write_bytes_atomic", real_write)  # space freed
    assert _run(folder, out, light_bundle, seg_model) == 0
    assert [r["file"] for r in _rows(out / "results.csv")] == ["c0.png", "c1.png", "c2.png"]
    assert _rows(out / "failures.csv") == []


def test_a_log_that_cannot_be_written_stops_the_run_cleanly(light_bundle, seg_model, tmp_path, monkeypatch, capsys):
    from pipeline import run as run_module

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes(xray_like(80, 80, seed=90)))

    def full(self, record):
        raise OSError(errno.ENOSPC, "No space left on device", "results.jsonl")

    monkeypatch.setattr(run_module._Log, "append", full)
    out = tmp_path / "out"
    assert _run(folder, out, light_bundle, seg_model) == 2
    err = capsys.readouterr().err
    assert "no space left on device" in err and "rerun the same command" in err and "Traceback" not in err
    monkeypatch.undo()
    assert _run(folder, out, light_bundle, seg_model) == 0  # recovers once there is space
    assert not _leftovers(out)


def test_max_pixels_is_a_flag(light_bundle, seg_model, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "big.png").write_bytes(png_bytes(xray_like(100, 100, seed=91)))
    (folder / "small.png").write_bytes(png_bytes(xray_like(60, 60, seed=92)))
    out = tmp_path / "out"
    assert _run(folder, out, light_bundle, seg_model, "--max-pixels", "5000") == 1
    (fail,) = _rows(out / "failures.csv")
    assert fail["file"] == "big.png" and "too large: 100x100" in fail["reason"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_a_clear_error(light_bundle, seg_model, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes(xray_like(80, 80, seed=93)))
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert _run(folder, out, light_bundle, seg_model) == 2
        assert "choose a writable --out" in capsys.readouterr().err
    finally:
        out.chmod(0o700)


def test_output_names_are_unique_stable_and_short():
    from pipeline.outputs import output_name

    assert output_name("a/x.png", ".gradcam.png") == "a/x.png.gradcam.png"
    assert output_name("a/x.png", ".png") != output_name("a/x.jpg", ".png")
    long = "é" * 200 + ".png"  # 402 bytes in UTF-8
    a, b = output_name(f"d/{long}", ".mask.png"), output_name(f"d/{long[:-4]}.jpg", ".mask.png")
    assert a != b and a == output_name(f"d/{long}", ".mask.png")
    assert len(Path(a).name.encode()) + len(".tmp.png") <= 255 and a.startswith("d/éé") and a.endswith(".mask.png")


def test_unwritable_out_is_a_clear_error_even_as_root(light_bundle, seg_model, tmp_path, monkeypatch, capsys):
    """What a non-root user sees on a read-only OUT (root writes anyway, so the refusal is simulated)."""
    from pipeline import outputs

    def refuse(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes(xray_like(80, 80, seed=94)))
    monkeypatch.setattr(outputs, "open", refuse, raising=False)
    assert _run(folder, tmp_path / "out", light_bundle, seg_model) == 2
    err = capsys.readouterr().err
    assert "choose a writable --out" in err and "Traceback" not in err
