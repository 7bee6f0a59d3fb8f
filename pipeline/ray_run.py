"""`cxr run --ray`: the analysis of `cxr run` on a Ray cluster (Ray Data), the files written as today.

The driver (the `cxr run` process) keeps everything that makes a run resumable: it claims the
output folder, works out what is left to do, and appends each finished image's files and log
line itself, as the local run does. Ray does the compute:

* a Ray Dataset of the paths left to do (with the names they get in the outputs);
* ``map_batches(decode_batch)``: CPU tasks decode and prepare each file (data.io), failures kept
  as rows with their reason, exactly the local run's reasons;
* ``map_batches(Analyser)``: a pool of actors, each of which loads the bundles once, runs
  :func:`pipeline.analysis.analyse_batch` and renders the pictures as PNG bytes
  (:func:`pipeline.run.render_result`); one GPU per actor where the cluster has GPUs.

On a CPU-only cluster the decode asks for the actors' resources, so Ray fuses the two steps into
one worker and the decoded pixels never pass through the object store (it also means no decode
task waits for a CPU that the actors hold); with GPUs the decode runs in tasks of its own on the
CPUs the actors leave.

Bundles reach the actors by path (shared storage) and, when ``ship_bundles`` (the default when
connecting to an existing cluster), also through Ray's object store as an archive; either way
each actor checks the model file's sha256 against the driver's before it analyses anything.
"""

from __future__ import annotations

import io
import logging
import math
import pickle
import re
import socket
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from data.errors import CxrError

#: what to run on the workers, shown in errors when Ray is missing
RAY_REQUIREMENT = "ray[data]>=2.50,<3"


class RayRunError(CxrError):
    """Ray cannot be used for this run (not installed, cluster unreachable, a worker without the bundles)."""


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide `cxr run --ray` runs.

    ``address``: None starts a local Ray in this process (stopped at the end); "auto" or
    "ray://host:port" joins an existing cluster. ``workers``: actors in the analysis pool
    (default: one per GPU where the cluster has GPUs, else one per CPU). ``ship_bundles``: also
    send the bundles through the object store (default: only when joining a cluster).
    ``threads``: each actor's compute threads (TensorFlow or ONNX Runtime).
    """

    address: str | None = None
    workers: int | None = None
    ship_bundles: bool | None = None
    threads: int = 1

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be ≥ 1, got {self.workers}")
        if self.threads < 1:
            raise ValueError(f"threads must be ≥ 1, got {self.threads}")


@dataclass
class Analysed:
    """One input back from the cluster: a failure ``reason``, or its result ``row`` and picture ``files``."""

    path: Path
    rel: str
    reason: str | None
    row: dict[str, Any] | None = None
    files: dict[str, bytes] | None = None


@dataclass(frozen=True)
class BundleRef:
    """A loaded bundle as the actors get it: its folder, the model file's sha256, and (when shipped)
    an object-store reference to an archive of the folder."""

    role: str  # the bundle kind: "classifier" | "segmenter" (the lung model is a segmenter)
    path: str
    sha256: str
    archive: Any = None  # ray.ObjectRef of a tar archive's bytes

    @classmethod
    def of(cls, role: str, model, *, ship: bool) -> BundleRef:
        ref = None
        if ship:
            import ray

            ref = ray.put(_archive(Path(model.path)))
        return cls(role, str(Path(model.path).resolve()), model.checkpoint_sha256, ref)

    def load(self, scratch: Path):
        """The bundle loaded on this worker, from its path or else from the shipped archive;
        RayRunError when neither is there with the driver's sha256."""
        from data.runtime.bundle import MODEL_FILE, SIDECAR, BundleError, read_sidecar

        here = Path(self.path)
        problem = f"no {self.role} bundle there"
        if (here / SIDECAR).is_file():
            try:
                found = read_sidecar(here, kind=self.role)["files"][MODEL_FILE]
            except BundleError as err:
                found, problem = None, str(err)
            if found == self.sha256:
                return _loader(self.role)(here)
            if found is not None:
                problem = f"the {self.role} bundle there has sha256 {found[:12]}…, the driver's {self.sha256[:12]}…"
        if self.archive is not None:
            import ray

            target = scratch / self.role
            with tarfile.open(fileobj=io.BytesIO(ray.get(self.archive))) as tar:
                tar.extractall(target, filter="data")
            model = _loader(self.role)(target)
            if model.checkpoint_sha256 != self.sha256:
                raise RayRunError(f"{self.path}: the shipped {self.role} bundle arrived with another sha256")
            return model
        raise RayRunError(f"{self.path} on worker {socket.gethostname()}: {problem}; put the bundles on storage every "
                          "node mounts at the same path, or pass --ray-ship-bundles")


def _loader(role: str):
    if role == "classifier":
        from ensemble.classifier import load_classifier

        return load_classifier
    from segmenter.model import load_segmenter

    return load_segmenter


def _archive(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.name.endswith(".tmp"):
                tar.add(path, arcname=path.relative_to(folder).as_posix())
    return buf.getvalue()


def decode_batch(batch: dict[str, np.ndarray], *, input_config, max_pixels: int) -> dict[str, np.ndarray]:
    """Ray task: read and prepare each file of a batch for the classifier. Adds "reason" (empty when
    the file decoded) and "decoded" (pickled (x, decoded array, geometry); empty when it failed)."""
    from data.io import ImageReadError, read_image

    reasons, decoded = [], []
    for path in batch["path"]:
        try:
            image = read_image(path, max_pixels=max_pixels)
            x, geometry = input_config.preprocess(image)
        except ImageReadError as err:
            reasons.append(err.reason)
            decoded.append(b"")
            continue
        reasons.append("")
        decoded.append(pickle.dumps((x, image, geometry), protocol=5))
    return {"path": batch["path"], "rel": batch["rel"], "reason": np.array(reasons, dtype=object),
            "decoded": _objects(decoded)}


class Analyser:
    """Ray actor: loads the bundles once, then analyses and renders decoded batches."""

    def __init__(self, bundles: dict[str, BundleRef], *, engine: str, segment_all: bool, version: str,
                 threads: int) -> None:
        from pipeline import __version__

        if version != __version__:
            raise RayRunError(f"worker {socket.gethostname()} runs cxr {__version__}, the driver {version}: "
                              "install the same version on every node")
        from data.runtime.tf_setup import limit_threads

        limit_threads(threads)
        self._scratch = tempfile.TemporaryDirectory(prefix="cxr-bundles-")
        loaded = {role: ref.load(Path(self._scratch.name)) for role, ref in bundles.items()}
        for model in loaded.values():
            model.use_engine(engine, threads=threads)
        self.models = dict(classifier=loaded["classifier"], segmenter=loaded["segmenter"],
                           lung_model=loaded.get("lung_model"), segment_all=segment_all)
        self.heads = loaded["classifier"].head_weights()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from data.preprocess import to_rgb_float
        from pipeline.analysis import analyse_batch
        from pipeline.run import render_result

        results = [b""] * len(batch["path"])
        ok = [k for k, reason in enumerate(batch["reason"]) if not reason]
        if ok:
            items = [pickle.loads(batch["decoded"][k]) for k in ok]
            originals = [to_rgb_float(image) for _, image, _ in items]
            analyses = analyse_batch(np.stack([x for x, _, _ in items]), originals, [g for _, _, g in items],
                                     heads=self.heads, **self.models)
            for k, analysis, original in zip(ok, analyses, originals):
                results[k] = pickle.dumps(render_result(str(batch["rel"][k]), analysis, original), protocol=5)
        return {"path": batch["path"], "rel": batch["rel"], "reason": batch["reason"], "result": _objects(results)}


def _objects(items: list[Any]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def analyse_on_ray(paths: Sequence[Path], rels: Sequence[str], options: RayOptions, *, batch_size: int,
                   max_pixels: int, classifier, segmenter, lung_model=None,
                   segment_all: bool = False) -> Iterator[Analysed]:
    """Each of ``paths`` analysed on Ray, as :class:`Analysed`, in the order they finish.

    ``rels`` are the names the inputs get in the outputs (pipeline.run). The models are the
    driver's loaded bundles: their folders and sha256s go to the actors, which load them
    on the driver's engine.
    """
    if not paths:
        return
    ray = _import_ray()
    started = _connect(options)
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        cpus = int(resources.get("CPU", 1))
        workers = options.workers or (gpus if gpus else max(1, cpus // options.threads))
        if options.address is None and not gpus and workers * options.threads > cpus:
            # a local Ray never grows: the pool would wait for CPUs that do not exist
            raise RayRunError(f"{workers} actor(s) × {options.threads} thread(s) need {workers * options.threads} "
                              f"CPUs; this local Ray has {cpus}: lower --ray-workers or --ray-threads")
        ship = options.ship_bundles if options.ship_bundles is not None else options.address is not None
        bundles = {"classifier": BundleRef.of("classifier", classifier, ship=ship),
                   "segmenter": BundleRef.of("segmenter", segmenter, ship=ship)}
        if lung_model is not None:
            bundles["lung_model"] = BundleRef.of("segmenter", lung_model, ship=ship)
        from pipeline import __version__

        items = [{"path": str(p), "rel": r} for p, r in zip(paths, rels)]
        ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / batch_size)))
        # CPU only: the decode asks for what the actors ask for, so that Ray fuses the two (a decode
        # task waiting for a CPU that the actors hold would otherwise never run). With GPUs the decode
        # runs in tasks of its own, on the CPUs the actors leave.
        ds = ds.map_batches(decode_batch, batch_size=batch_size, batch_format="numpy",
                            num_cpus=1 if gpus else options.threads,
                            fn_kwargs={"input_config": classifier.input, "max_pixels": max_pixels})
        ds = ds.map_batches(Analyser, batch_size=batch_size, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=options.threads,
                            num_gpus=1 if gpus else 0,
                            fn_constructor_kwargs={"bundles": bundles, "engine": classifier.engine,
                                                   "segment_all": segment_all, "version": __version__,
                                                   "threads": options.threads})
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for path, rel, reason, result in zip(batch["path"], batch["rel"], batch["reason"], batch["result"]):
                    if reason:
                        yield Analysed(Path(path), str(rel), str(reason))
                    else:
                        row, files = pickle.loads(result)
                        yield Analysed(Path(path), str(rel), None, row, files)
        except ray.exceptions.RayError as err:
            raise _worker_error(err) from err
    finally:
        if started:
            ray.shutdown()


def _worker_error(err: Exception) -> RayRunError:
    """A worker's failure as one line: our own error's message where a worker raised one (a missing
    bundle, another version), else the last line of Ray's report. Ray keeps the original only as
    text when an actor dies in ``__init__``."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, CxrError):
        return RayRunError(str(cause))
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).splitlines()]
    ours = [line.split(": ", 1)[1] for line in lines if _RAISED.match(line)]
    return RayRunError(ours[-1] if ours else f"a Ray worker failed: {next((x for x in reversed(lines) if x), err)}")


#: a line of a traceback naming one of this project's errors ("pipeline.ray_run.RayRunError: ...")
_RAISED = re.compile(r"^(data|ensemble|segmenter|gradcam|pipeline)(\.\w+)+Error: ")


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401 - the Data library is what `cxr run --ray` needs
    except ImportError:
        raise RayRunError(f"--ray needs Ray: pip install '{RAY_REQUIREMENT}' (or the project's [ray] extra)") from None
    return ray


def _connect(options: RayOptions) -> bool:
    """Join ``options.address`` or start a local Ray; True when this call started it (and so stops it)."""
    import ray

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # cxr run draws its own progress bar; Ray Data would warn that its own are off
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    try:
        if options.address is None:
            ray.init(**kwargs)
        else:
            ray.init(address=options.address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = options.address or "a local Ray"
        raise RayRunError(f"cannot start or reach {where}: {err}") from None
    return True


__all__ = ["RAY_REQUIREMENT", "Analysed", "RayOptions", "RayRunError", "analyse_on_ray"]
