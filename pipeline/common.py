"""Helpers shared by the training and evaluation jobs: output folders, splits, run records."""

from __future__ import annotations

import csv
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np

from data.datasets import DatasetError, FailureLog, Record, open_csv
from data.runtime.bundle import SIDECAR, git_revision, package_versions
from data.splits import plan_split, read_splits, select_split, write_splits
from pipeline.config import build_settings, read_toml, settings_to_toml

T = TypeVar("T")


#: What `cxr evaluate` and `cxr evaluate-segmenter` write last: a folder holding it is a finished evaluation.
METRICS_FILE = "metrics.json"


def refuse_finished_output(out: str | os.PathLike[str], *, marker: str = SIDECAR) -> None:
    """DatasetError if ``out`` already holds a finished result (never overwritten): jobs call it before
    loading a model, which costs seconds to tens of seconds, to refuse at once."""
    if (Path(out) / marker).exists():
        raise DatasetError(f"{out}: already holds a result ({marker}); choose another --out or remove it")


def prepare_output_dir(out: str | os.PathLike[str], *, marker: str = SIDECAR) -> Path:
    """Create ``out`` unless it already holds a finished result (never overwritten)."""
    out = Path(out)
    refuse_finished_output(out, marker=marker)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DatasetError(f"{out}: cannot create output folder ({err.strerror or err})") from None
    if not os.access(out, os.W_OK):
        raise DatasetError(f"{out}: output folder is not writable")
    return out


def resolve_splits(records: Sequence[Record], splits: str | os.PathLike[str] | None, out: Path, *,
                   seed: int, allow_leaks: bool, progress=None) -> dict[str, str]:
    """Read ``splits`` (or make a patient-level split), check for leaks, save a copy in ``out``."""
    plan = plan_split(records, splits=read_splits(splits) if splits is not None else None, seed=seed,
                      failures=FailureLog(), progress=progress)
    if splits is not None and plan.usable and not any(r.key in plan.assignment for r in plan.usable):
        raise DatasetError(f"{splits}: names none of the images (e.g. {plan.usable[0].key}); "
                           "was it made for this folder?")
    if plan.leaks and not allow_leaks:
        shown = "; ".join(leak.describe() for leak in plan.leaks[:5])
        raise DatasetError(
            f"{len(plan.leaks)} leak(s) across splits: {shown}. Fix the splits (cxr data split) or pass --allow-leaks"
        )
    write_splits(out / "splits.csv", plan.usable, plan.assignment, plan.groups)
    return plan.assignment


def held_out_records(records: Sequence[Record], model_dir: str | os.PathLike[str], *,
                     include_training: bool = False) -> tuple[list[Record], dict[str, Any]]:
    """The records a bundle did not train or validate on, and what was done (for metrics.json).

    A bundle's ``splits.csv`` lists the images it was trained and validated on; scoring those is
    not a held-out result, so they are left out unless ``include_training``, and so are other images
    of their patients. Images the bundle never saw (absent from its splits.csv, of other patients)
    are kept. DatasetError when nothing is left.
    """
    side = Path(model_dir) / "splits.csv"
    if include_training or not side.is_file():
        why = "--include-training" if include_training else "the bundle has no splits.csv"
        return list(records), {"scored": "all images", "why": why, "excluded_training_images": 0}
    assignment = read_splits(side)
    seen = trained_patients(side)
    kept = [r for r in records if assignment.get(r.key) == "test"
            or (r.key not in assignment and not (r.patient_id and r.patient_id in seen))]
    excluded = len(records) - len(kept)
    if not kept:
        raise DatasetError(f"all {len(records)} images were used to train or validate {model_dir} (its splits.csv); "
                           "evaluate on other images, or pass --include-training to score them anyway")
    return kept, {"scored": "held-out images only", "excluded_training_images": excluded, "splits": str(side)}


def trained_patients(splits_csv: str | os.PathLike[str]) -> set[str]:
    """Patient ids of a bundle's train and val rows: their other images are not held out either."""
    import csv

    with open_csv(splits_csv, "splits file") as handle:
        return {row["patient_id"] for row in csv.DictReader(handle)
                if row.get("split") in ("train", "val") and row.get("patient_id")}


def patient_ids(records: Sequence[Record]) -> list[str]:
    """One id per record for patient-level bootstraps: patient id, else group id, else the file."""
    return [r.patient_id or r.group_id or r.key for r in records]


def run_metadata(settings: dict[str, Any], *, seed: int) -> dict[str, Any]:
    """What a run directory records besides its results."""
    return {"config": settings, "seed": seed, "git_revision": git_revision(), "package_versions": package_versions(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_failures(path: Path, failures: Sequence[tuple[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        w = csv.writer(handle)
        w.writerow(["file", "reason"])
        w.writerows(failures)


def load_settings(cls: type[T], with_preset: Callable[[dict[str, Any]], dict[str, Any]],
                  config: str | os.PathLike[str] | None, overrides: dict[str, Any] | None) -> T:
    """Settings of a training job: the TOML ``config`` (if any), then ``overrides`` (None values
    ignored), completed by the preset rule, checked (pipeline.config.build_settings)."""
    values = read_toml(config) if config is not None else {}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return build_settings(cls, with_preset(values), source=str(config or "arguments"))


@dataclass
class TrainingRun:
    """What :func:`run_training_job` leaves: the folder, the split, and the trainer's own result."""

    out: Path
    assignment: dict[str, str]
    train: list[Record]
    val: list[Record]
    result: Any  # the trainer's result: .history and .failures at least
    seconds: float


def run_training_job(records: Sequence[Record], out: str | os.PathLike[str], settings: Any, train_fn: Callable, *,
                     splits: str | os.PathLike[str] | None, allow_leaks: bool, progress=None,
                     verbose: int | None = None, what: str = "", fix: str = "",
                     check_split: Callable[[dict[str, str]], None] | None = None) -> TrainingRun:
    """The sequence both trainers' jobs share: claim a new output folder, resolve and save the
    patient-level split (``check_split`` may refuse it before any training), record the settings
    (config.toml, run.json), train on the train split with the val split, then plot the curves and
    list the unreadable files."""
    from data.files import write_json
    from data.runtime.distribute import start_distribution
    from pipeline.report import plot_history

    # Devices first: a distribution that cannot be set up fails before any folder or split is made
    # (and logical CPU devices must exist before TensorFlow starts); the trainer gets the same one.
    start_distribution(settings.distribute, replicas=settings.replicas, global_batch=settings.batch_size)
    out = prepare_output_dir(out)
    t0 = time.perf_counter()
    assignment = resolve_splits(records, splits, out, seed=settings.seed, allow_leaks=allow_leaks, progress=progress)
    if check_split is not None:
        check_split(assignment)
    train, val = select_split(records, assignment, "train"), select_split(records, assignment, "val")
    if not train or not val:
        raise DatasetError(f"the split leaves {len(train)} training and {len(val)} validation images{what}; "
                           f"need both{fix}")
    (out / "config.toml").write_text(settings_to_toml(settings.to_dict()))
    write_json(out / "run.json", run_metadata(settings.to_dict(), seed=settings.seed))
    result = train_fn(settings, train, val, out, verbose=verbose)
    plot_history(result.history, out / "training_curves.png")
    write_failures(out / "failures.csv", result.failures)
    return TrainingRun(out, assignment, train, val, result, time.perf_counter() - t0)


class ImageTicks:
    """A progress bar that counts images while a job walks batches: ``progress`` (the jobs' usual
    ``progress(items)`` wrapper) is given ``range(total)``, so the bar knows the total and an ETA,
    and :meth:`advance` moves it by the images a batch finished (failed ones included)."""

    def __init__(self, progress: Callable | None, total: int) -> None:
        self._ticks = iter(progress(range(total))) if progress else iter(())

    def advance(self, n: int) -> None:
        for _ in range(n):
            next(self._ticks, None)

    def close(self) -> None:
        getattr(self._ticks, "close", lambda: None)()


def read_mask_of(path: Path | None, shape: tuple[int, ...], failures: FailureLog) -> np.ndarray | None:
    """The bool mask at ``path`` when it has the image's ``shape``; None without a path, or with the
    reason (unreadable, another size) recorded in ``failures``."""
    from data.io import ImageReadError, read_mask

    if path is None:
        return None
    try:
        mask = read_mask(path)
    except ImageReadError as err:
        failures.add(err.path, f"mask: {err.reason}")
        return None
    if mask.shape != shape:
        failures.add(str(path), f"mask size {mask.shape[1]}x{mask.shape[0]} differs from image {shape[1]}x{shape[0]}")
        return None
    return mask
