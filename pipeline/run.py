"""`cxr run`: the full pipeline on a folder, resumable.

Per batch: decode (threads, ahead of compute) → classifier (probabilities and every member's
conv maps in one pass) → closed-form Grad-CAM → segmenter on the images flagged pneumonia or
covid (all with ``segment_all``) → files, drawn and written on one writer thread while the
models run on the next batch. Each image's files are written atomically first; then one line
is appended to ``results.jsonl`` (or ``failures.jsonl``) and flushed. A line exists only for a
finished image, so a killed run restarted with the same arguments skips the finished ones and
never duplicates a row. ``results.csv``, ``failures.csv`` and
``report.html`` are rebuilt from the logs at the end.

The output folder is locked for the run (a second run on it is refused) and marked, so it is
never read as input; pictures are named by pipeline.outputs.output_name (``x.png`` and ``x.jpg``
get their own). An image whose files cannot be written (a full disk, a name the file system
refuses) gets a failure row and the run goes on; the next run retries it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np

from data import spec
from data.datasets import OUTPUT_MARKER, DatasetError, FailureLog, walk_images
from data.files import encode_png, write_bytes_atomic, write_text_atomic
from gradcam.export import Instance, encode_coco_rle, write_coco_instances
from pipeline.analysis import ImageAnalysis, analyse_batch, result_images
from pipeline.common import ImageTicks
from pipeline.outputs import claim_output, describe_os_error, output_name, write_rows_csv
from pipeline.privacy import InputNames
from pipeline.report_html import REPORT_LESIONS, write_report

if TYPE_CHECKING:
    from pipeline.ray_run import RayOptions

RESULT_COLUMNS = ("file", "label", *(f"p_{c}" for c in spec.CLASS_NAMES), "confidence", "refer", "refer_reason",
                  "segmented", "lesion_count", "lesion_area_px", "lesion_area_by_type", "lung_affected_pct")


@dataclass
class RunResult:
    out: Path
    n_done: int  # finished in this invocation
    n_skipped: int  # already finished by an earlier invocation
    n_failed: int  # failures recorded in total
    report: Path


def _read_log(path: Path, keep: Callable[[dict[str, Any]], Any] = lambda record: record) -> list[Any]:
    """``keep(record)`` for each complete JSON line of an append-only log, read line by line so that
    only what ``keep`` returns is held; a torn last line (killed mid-write) is cut off the file."""
    if not path.is_file():
        return []
    out, good = [], 0
    with path.open("rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):
                break
            good += len(line)
            if line.strip():
                out.append(keep(json.loads(line)))
    if good != path.stat().st_size:
        os.truncate(path, good)
    return out


def _summary(record: dict[str, Any]) -> dict[str, Any]:
    """A results.jsonl record without its lesions beyond the REPORT_LESIONS largest: what results.csv and
    report.html need, so that a run over many files does not hold every lesion in memory at the end."""
    return {**record, "lesions": record.get("lesions", [])[:REPORT_LESIONS]}


class _Log:
    def __init__(self, path: Path) -> None:
        self.handle = path.open("a", encoding="utf-8")

    def append(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record, sort_keys=True) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


def check_run_inputs(image_dir: Path, out: Path, identity: dict[str, Any]) -> list[Path]:
    """Images to process (never the outputs of a cxr job, see pipeline.outputs); DatasetError for a
    missing or empty folder, a folder of cxr outputs, or an OUT holding another run. ``out`` is claimed."""
    if not image_dir.is_dir():
        raise DatasetError(f"{image_dir}: no such folder")
    if (image_dir / OUTPUT_MARKER).exists():
        raise DatasetError(f"{image_dir}: holds the outputs of a cxr job, not X-rays; pass the folder of X-rays")
    paths = list(walk_images(image_dir))
    if not paths:
        raise DatasetError(f"{image_dir}: no images (PNG, JPEG, BMP, TIFF, DICOM) found")
    run_file = out / "run.json"
    if run_file.is_file():
        previous = json.loads(run_file.read_text())
        before = previous.get("identity") or {}
        differ = sorted(k for k in {*before, *identity} if before.get(k) != identity.get(k))
        if differ:
            hint = (" (with --pseudonymize: pass the --pseudonym-map that run used)" if "pseudonym_key" in differ
                    else "")
            raise DatasetError(f"{out}: holds a run with other models or settings ({', '.join(differ)} differ){hint}; "
                               "use another --out to keep both")
    else:
        write_text_atomic(run_file, json.dumps({"identity": identity}, indent=2, sort_keys=True) + "\n")
    return paths


def run_identity(image_dir: Path, classifier, segmenter, lung_model, *, segment_all: bool,
                 names: InputNames) -> dict[str, Any]:
    """What a rerun into the same folder must match: inputs, models, their engine, settings, naming.

    The input folder is kept as a hash of its absolute path (folder names can name a patient).
    """
    folder = str(image_dir.resolve()).encode("utf-8", "surrogateescape")
    return {
        "images_sha256": hashlib.sha256(folder).hexdigest()[:16],
        "classifier": classifier.checkpoint_sha256,
        "segmenter": segmenter.checkpoint_sha256,
        "lung_model": lung_model.checkpoint_sha256 if lung_model else None,
        "engine": classifier.engine,
        "segment_all": segment_all,
        "pseudonym_key": names.fingerprint(),
    }


def run_pipeline(
    image_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    classifier,
    segmenter,
    lung_model=None,
    segment_all: bool = False,
    batch_size: int = 8,
    progress: Callable[[Iterable], Iterable] | None = None,
    stop_after: int | None = None,
    model_note: str = "",
    max_pixels: int = spec.DEFAULT_MAX_PIXELS,
    names: InputNames | None = None,
    ray: RayOptions | None = None,
) -> RunResult:
    """Run both stages over ``image_dir`` into ``out`` (see the module docstring).

    ``classifier``/``segmenter``/``lung_model`` are loaded bundles. ``stop_after`` ends the run
    after that many newly finished images (used to test resuming). ``model_note`` is printed under
    the report's summary (the demo states its classifier's held-out accuracy there). ``max_pixels``:
    larger images are refused (their failure row says so). DatasetError (nothing lost) when ``out``
    cannot be claimed or a log cannot be written, e.g. on a full disk: rerun the same command.
    ``names``: how inputs are named in the outputs (pipeline.privacy; default their relative paths).
    ``ray``: analyse on a Ray cluster (pipeline.ray_run); same files, same resuming.
    """
    image_dir, out = Path(image_dir), Path(out)
    names = names or InputNames()
    identity = run_identity(image_dir, classifier, segmenter, lung_model, segment_all=segment_all, names=names)
    with claim_output(out, job="run"):
        try:
            paths = check_run_inputs(image_dir, out, identity)
            names.save()  # the key first: a run stopped half-way resumes with the same pseudonyms
            job = _FolderRun(image_dir, out, classifier=classifier, segmenter=segmenter, lung_model=lung_model,
                             segment_all=segment_all, stop_after=stop_after, names=names)
            n_done, n_skipped = job.run(paths, batch_size=batch_size, progress=progress, max_pixels=max_pixels,
                                         ray=ray)
            rows, fails = job.final_logs()
            write_rows_csv(out / "results.csv", RESULT_COLUMNS, rows)
            write_rows_csv(out / "failures.csv", ("file", "reason"), fails)
            report = write_report(out, rows, fails, identity, model_note)
            write_lesions_coco(out, segmenter.lesion_types)
            names.save()
        except OSError as err:
            raise DatasetError(f"run stopped: {describe_os_error(err)}") from None
    return RunResult(out, n_done, n_skipped, len(fails), report)


class _FolderRun:
    """One invocation of `cxr run` on a claimed output folder: what is left to do, and its writer.

    A failure to write one image's files becomes that image's failure row (``"stage": "write"``) and
    the run goes on; such rows are retried by the next run, and dropped once the image succeeds.
    """

    def __init__(self, image_dir: Path, out: Path, *, classifier, segmenter, lung_model, segment_all: bool,
                 stop_after: int | None, names: InputNames) -> None:
        self.image_dir, self.out, self.names = image_dir, out, names
        self.models = dict(classifier=classifier, segmenter=segmenter, lung_model=lung_model, segment_all=segment_all)
        self.stop_after = stop_after
        self.n_done = 0

    def run(self, paths: list[Path], *, batch_size: int, progress, max_pixels: int,
            ray: RayOptions | None = None) -> tuple[int, int]:
        """(images finished now, images finished by earlier runs). ``ray``: analyse on a Ray cluster
        (pipeline.ray_run); the files are written here either way."""
        out = self.out
        done = set(_read_log(out / "results.jsonl", itemgetter("file")))
        # A file that failed to decode is not tried again unless it changed since (a re-export, say).
        failed = {f["file"]: f.get("fingerprint") for f in _read_log(out / "failures.jsonl")
                  if f.get("stage") != "write"}
        todo = [p for p in paths
                if self._rel(p) not in done and failed.get(self._rel(p), "retry") != _fingerprint(p)]
        self.results, self.failures_log = _Log(out / "results.jsonl"), _Log(out / "failures.jsonl")
        ticks = ImageTicks(progress, len(todo))
        try:
            with contextlib.suppress(_Stop):  # stop_after reached
                if ray is None:
                    self._run_local(todo, ticks, batch_size=batch_size, max_pixels=max_pixels)
                else:
                    from pipeline.ray_run import analyse_on_ray

                    for item in analyse_on_ray(todo, [self._rel(p) for p in todo], ray, batch_size=batch_size,
                                               max_pixels=max_pixels, **self.models):
                        if item.reason is not None:
                            self._log_failure(item.path, item.reason)
                        else:
                            self._write_rendered(item.rel, item.row, item.files)
                        ticks.advance(1)
        finally:
            ticks.close()
            self.results.close()
            self.failures_log.close()
        return self.n_done, len(paths) - len(todo)

    def _run_local(self, todo: list[Path], ticks: ImageTicks, *, batch_size: int, max_pixels: int) -> None:
        """Decode ahead in threads, analyse here, and render and write on one writer thread."""
        clf = self.models["classifier"]
        heads = clf.head_weights()
        failures, logged = FailureLog(), 0
        # One writer thread draws and writes batch k while the models run on batch k + 1; at most one
        # batch waits for it, so memory stays flat. Its errors (a log it cannot write) surface at the next batch.
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="write")
        written: Future | None = None
        try:
            batches = clf.stream(todo, batch_size=batch_size, failures=failures, keep_original=True,
                                 max_pixels=max_pixels)
            for batch in batches:
                before, logged = logged, self._log_read_failures(failures, logged)
                ticks.advance(len(batch.paths) + logged - before)
                analyses = analyse_batch(batch.x, batch.originals, batch.geometries, heads=heads, **self.models)
                if written is not None:
                    written.result()
                written = writer.submit(self._write_batch, batch, analyses)
            if written is not None:
                written.result()
            ticks.advance(self._log_read_failures(failures, logged) - logged)
        finally:
            writer.shutdown(wait=True)

    def final_logs(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(results, failures) of every run into this folder: one row per file, the latest failure
        of a file that has not succeeded since."""
        rows = _read_log(self.out / "results.jsonl", _summary)
        finished = {r["file"] for r in rows}
        fails = {f["file"]: f for f in _read_log(self.out / "failures.jsonl") if f["file"] not in finished}
        return rows, list(fails.values())

    def _rel(self, path: Path) -> str:
        """The name this input has in the outputs (its relative path, or its pseudonym)."""
        return self.names.name(path.relative_to(self.image_dir).as_posix())

    def _log_read_failures(self, failures: FailureLog, logged: int) -> int:
        for path, reason in failures.items[logged:]:
            self._log_failure(Path(path), reason)
        return len(failures.items)

    def _log_failure(self, path: Path, reason: str) -> None:
        rel = path.relative_to(self.image_dir).as_posix()
        self.failures_log.append({"file": self.names.name(rel), "reason": self.names.scrub(reason, rel),
                                  "fingerprint": _fingerprint(path)})

    def _write_batch(self, batch, analyses) -> None:
        """Pictures, files and log lines of one analysed batch (on the writer thread, in input order)."""
        for path, analysis, original in zip(batch.paths, analyses, batch.originals):
            rel = self._rel(path)
            self._write_rendered(rel, *render_result(rel, analysis, original))

    def _write_rendered(self, rel: str, row: dict[str, Any], files: dict[str, bytes]) -> None:
        """One image's files (each atomically), then its results.jsonl line; a file that cannot be
        written makes a failure row instead (``"stage": "write"``, retried by the next run)."""
        try:
            for name, data in files.items():
                write_bytes_atomic(self.out / name, data)
        except OSError as err:
            self.failures_log.append({"file": rel, "reason": describe_os_error(err), "stage": "write"})
            return
        self.results.append({"file": rel, **row})
        self.n_done += 1
        if self.stop_after is not None and self.n_done >= self.stop_after:
            raise _Stop


def render_result(rel: str, a: ImageAnalysis, original: np.ndarray) -> tuple[dict[str, Any], dict[str, bytes]]:
    """One analysed image's result row (without "file") and its pictures as PNG files (output name → bytes).

    Besides the overlays and the lesion mask: the lung-field mask (with a lung model) and the
    lesion instance map (uint16 PNG, k on the k-th lesion of the row); each lesion of the row
    carries its COCO RLE for the run's ``lesions_coco.json``. Pure: runs where the analysis ran
    (here, or on a Ray worker).
    """
    images = result_images(a, original)
    names = {"gradcam_overlay": output_name(f"overlays/{rel}", ".gradcam.png")}
    stage2 = a.stage2_fields()
    if a.seg is not None:
        names.update(mask=output_name(f"masks/{rel}", ".png"),
                     mask_overlay=output_name(f"overlays/{rel}", ".mask.png"),
                     lesion_instances=output_name(f"masks/{rel}", ".instances.png"))
        images["lesion_instances"] = a.seg.instances
        for k, lesion in enumerate(stage2["lesions"], start=1):
            lesion["rle"] = encode_coco_rle(a.seg.instances == k)
        if a.seg.lung is not None:
            names["lung_mask"] = output_name(f"masks/{rel}", ".lung.png")
            images["lung_mask"] = a.seg.lung.astype(np.uint8) * 255
    pictures = {"gradcam_overlay": "gradcam"}
    files = {name: encode_png(images[pictures.get(field, field)]) for field, name in names.items()}
    row = {**a.answer_fields(), **{f"p_{c}": p for c, p in a.probabilities.items()}, **stage2,
           "width": int(original.shape[1]), "height": int(original.shape[0]), **names}
    return row, files


class _Stop(Exception):
    """Internal: ends a run early (``stop_after``)."""


def _fingerprint(path: Path) -> str | None:
    """Size and modification time: a failed file whose fingerprint changed is tried again."""
    try:
        st = path.stat()
    except OSError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"


def write_lesions_coco(out: Path, categories: tuple[str, ...]) -> Path:
    """``lesions_coco.json``: every analysed image with its lesion instances (COCO RLE), from results.jsonl;
    one category per lesion type of the segmenter (its kind for a one-lesion model)."""

    def entry(record: dict[str, Any]) -> tuple[str, int, int, list[Instance]]:
        lesions = [Instance(les.get("type", categories[0]), les["rle"], tuple(les["box"]), les["area_px"],
                            les["score"])
                   for les in record.get("lesions", []) if "rle" in les]
        return record["file"], record.get("width", 0), record.get("height", 0), lesions

    return write_coco_instances(_read_log(out / "results.jsonl", entry), out / "lesions_coco.json", list(categories),
                                description="cxr stage-2 lesion instances", source="cxr run")
