"""`cxr run --ray`: a local Ray with 2 CPUs gives the local run's files, reasons and resuming
(pipeline.ray_run). One Ray session for the module: starting Ray takes seconds."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[test]' brings it")

HERE = Path(__file__).resolve().parents[1]
PROBABILITY_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as handle:
        return {r["file"]: r for r in csv.DictReader(handle)}


def _pictures(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*.png")}


def _assert_same_run(distributed: Path, local: Path, good: list[str], bad: list[str]) -> None:
    ours, theirs = _rows(distributed / "results.csv"), _rows(local / "results.csv")
    assert sorted(ours) == sorted(theirs) == good
    for name, row in ours.items():
        assert row["label"] == theirs[name]["label"]
        for c in ("normal", "pneumonia", "covid"):
            assert abs(float(row[f"p_{c}"]) - float(theirs[name][f"p_{c}"])) <= PROBABILITY_TOLERANCE
        assert (row["segmented"], row["lesion_count"], row["refer"]) == \
            (theirs[name]["segmented"], theirs[name]["lesion_count"], theirs[name]["refer"])
    assert _rows(distributed / "failures.csv") == _rows(local / "failures.csv")
    assert sorted(_rows(local / "failures.csv")) == bad
    assert _pictures(distributed) == _pictures(local)
    assert len((distributed / "results.jsonl").read_text().splitlines()) == len(good)  # no image done twice
    assert (distributed / "report.html").is_file()


def _cli_args(folder, light_bundle, seg_model, out):
    """The arguments of the reference run (conftest.mixed_run), into ``out``."""
    return ["run", str(folder), "--classifier", str(light_bundle), "--segmenter", str(seg_model), "--lung-model",
            str(seg_model), "--batch-size", "4", "--out", str(out)]


def test_ray_finishes_a_stopped_run_with_the_local_results(mixed_folder, mixed_run, light_bundle, seg_model,
                                                          loaded_bundles, tmp_path, models_loaded_once, local_ray):
    """Good, bad and DICOM files. A run stops after its 3rd image with a torn log line (what a kill
    leaves); `--ray` on a local Ray with 2 CPUs finishes the rest, and the whole equals the local
    run: rows, failure reasons, pictures. (One Ray execution keeps this in CI's budget; a Ray run
    killed by SIGKILL and rerun is the slow test below.)"""
    from pipeline.run import run_pipeline

    folder, good, bad = mixed_folder
    clf, seg = loaded_bundles
    distributed = tmp_path / "ray"
    assert run_pipeline(folder, distributed, classifier=clf, segmenter=seg, lung_model=seg, batch_size=4,
                        stop_after=3).n_done == 3
    done_first = {json.loads(line)["file"] for line in (distributed / "results.jsonl").read_text().splitlines()}
    failed_first = len((distributed / "failures.jsonl").read_text().splitlines())
    with (distributed / "results.jsonl").open("ab") as handle:
        handle.write(b'{"file": "torn')
    assert main([*_cli_args(folder, light_bundle, seg_model, distributed), "--ray", "--ray-workers", "1"]) == 1
    _assert_same_run(distributed, mixed_run[1], good, bad)
    # Ray decoded the DICOM and the generated X-rays, and gave the failure reasons
    assert {"bad/mono1.dcm", *[g for g in good if g.startswith("gen/")]}.isdisjoint(done_first)
    assert len((distributed / "failures.jsonl").read_text().splitlines()) == len(bad)  # each once
    assert failed_first < len(bad) // 2  # the rest came from Ray


@pytest.mark.slow
def test_a_killed_ray_run_resumes_and_equals_the_local_run(mixed_folder, mixed_run, light_bundle, seg_model, tmp_path,
                                                            models_loaded_once, local_ray):
    """The first Ray run, in a process of its own, is SIGKILLed right after its 3rd image; the rerun
    finishes the rest."""
    folder, good, bad = mixed_folder
    distributed = tmp_path / "ray"
    # -P: the script's folder (tests/, whose pipeline/ would shadow the package) is not put on sys.path
    killed = subprocess.Popen([sys.executable, "-P", str(HERE / "ray_killed_run.py"), str(folder), str(distributed),
                               str(light_bundle), str(seg_model), "3"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = killed.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the local Ray it left behind: end its process group
            os.killpg(killed.pid, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL, stderr[-2000:]
    assert len((distributed / "results.jsonl").read_text().splitlines()) == 3
    assert main([*_cli_args(folder, light_bundle, seg_model, distributed), "--ray"]) == 1
    _assert_same_run(distributed, mixed_run[1], good, bad)


def test_bundles_travel_through_the_object_store_checked_by_sha256(light_bundle, loaded_bundles, tmp_path,
                                                                   local_ray):
    from dataclasses import replace

    from pipeline.ray_run import BundleRef, RayRunError

    clf, _ = loaded_bundles
    shipped = replace(BundleRef.of("classifier", clf, ship=True), path=str(tmp_path / "not-on-this-node"))
    assert shipped.load(tmp_path).checkpoint_sha256 == clf.checkpoint_sha256

    by_path = BundleRef.of("classifier", clf, ship=False)
    with pytest.raises(RayRunError, match="not-on-this-node.*no classifier bundle there.*--ray-ship-bundles"):
        replace(by_path, path=str(tmp_path / "not-on-this-node")).load(tmp_path)
    with pytest.raises(RayRunError, match=r"has sha256 \w+…, the driver's 000000000000…"):
        replace(by_path, sha256="0" * 64).load(tmp_path)


def test_a_worker_without_the_bundle_stops_the_run_with_the_fix(loaded_bundles, mixed_folder, tmp_path, local_ray):
    """The driver's bundle folder is not there for the worker (no shared storage, nothing shipped):
    the run stops with the worker's reason and the fix, not a Ray traceback, and nothing is lost."""
    from dataclasses import replace

    from pipeline.ray_run import RayOptions, RayRunError
    from pipeline.run import run_pipeline

    clf, seg = loaded_bundles
    elsewhere = replace(clf, path=tmp_path / "only-on-the-driver")
    with pytest.raises(RayRunError, match="only-on-the-driver on worker .*: no classifier bundle there; put the "
                                          "bundles on storage every node mounts"):
        run_pipeline(mixed_folder[0], tmp_path / "out", classifier=elsewhere, segmenter=seg, ray=RayOptions(workers=1))
    assert (tmp_path / "out" / "run.json").is_file() and not (tmp_path / "out" / "results.csv").exists()


def test_a_worker_on_another_version_is_refused(loaded_bundles, local_ray):
    from pipeline.ray_run import Analyser, BundleRef, RayRunError

    clf, seg = loaded_bundles
    refs = {"classifier": BundleRef.of("classifier", clf, ship=False),
            "segmenter": BundleRef.of("segmenter", seg, ship=False)}
    with pytest.raises(RayRunError, match="install the same version on every node"):
        Analyser(refs, engine="keras", segment_all=False, version="0.0.0-other", threads=1)


def test_without_ray_the_error_names_the_install(monkeypatch, light_bundle, seg_model, tmp_path, capsys,
                                                 models_loaded_once):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    folder = tmp_path / "in"
    folder.mkdir()
    from fakes import png_bytes, xray_like

    (folder / "a.png").write_bytes(png_bytes(xray_like(80, 80, seed=5)))
    monkeypatch.setattr(builtins, "__import__", no_ray)
    assert main(["run", str(folder), "--classifier", str(light_bundle), "--segmenter", str(seg_model),
                 "--out", str(tmp_path / "out"), "--ray"]) == 2
    assert "pip install 'ray[data]" in capsys.readouterr().err


def test_a_pool_larger_than_the_local_ray_is_refused(loaded_bundles, mixed_folder, tmp_path, local_ray):
    from pipeline.ray_run import RayOptions, RayRunError
    from pipeline.run import run_pipeline

    clf, seg = loaded_bundles
    with pytest.raises(RayRunError, match=r"2 actor\(s\) × 2 thread\(s\) need 4 CPUs; this local Ray has 2"):
        run_pipeline(mixed_folder[0], tmp_path / "out", classifier=clf, segmenter=seg,
                     ray=RayOptions(workers=2, threads=2))
