"""Find labelled images and stream them as batched tf.data pipelines.

Two layouts are read: a folder per class (``DIR/{normal,pneumonia,covid}/...``) and a
CSV manifest (``file,label[,patient_id][,source]``, paths relative to the CSV's folder
or to ``--data``). Masks pair by file stem from ``MASKDIR/<kind>/``. A file that cannot
be decoded is recorded in a :class:`FailureLog` and skipped, never dropped silently.
"""

from __future__ import annotations

import csv
import itertools
import os
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from data import spec
from data.augment import AugmentParams, augment
from data.errors import CxrError
from data.io import ImageReadError, read_image, read_mask
from data.preprocess import preprocess_image, preprocess_mask

#: The bundled licensed sample (see data/samples/NOTICE): 9 X-rays, 3 per class.
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
SAMPLE_MASKS_DIR = Path(__file__).resolve().parent / "sample_masks"


class DatasetError(CxrError):
    """A data folder, manifest or split file that cannot be used; the message names it and the fix."""


@dataclass(frozen=True)
class Record:
    """One image on disk with what is known about it."""

    path: Path
    label: str | None = None
    name: str = ""  # path relative to the data root, POSIX style
    patient_id: str = ""
    source: str = ""
    group_id: str = ""
    masks: dict[str, Path] = field(default_factory=dict, hash=False, compare=False)
    #: mask kinds known to be empty without a file (:func:`mark_lesion_free`); a file in ``masks`` wins
    empty_masks: frozenset[str] = field(default=frozenset(), hash=False, compare=False)

    def has_mask(self, kind: str) -> bool:
        """A ``kind`` mask is known: a file, or known to be empty."""
        return kind in self.masks or kind in self.empty_masks

    @property
    def key(self) -> str:
        """Stable identifier: the path relative to the data root (else the path as given)."""
        return self.name or self.path.as_posix()


@dataclass
class FailureLog:
    """Thread-safe list of (path, reason) for files that could not be used."""

    items: list[tuple[str, str]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, path: str, reason: str) -> None:
        with self._lock:
            self.items.append((path, reason))

    def __len__(self) -> int:
        return len(self.items)


def is_image_file(path: Path) -> bool:
    """True for a file whose suffix names a supported format (the content is checked on read)."""
    return path.is_file() and path.suffix.lower() in spec.IMAGE_SUFFIXES


#: a file that cxr's jobs leave in their output folders (pipeline.outputs); folders holding one are never inputs
OUTPUT_MARKER = ".cxr-output"


def walk_images(root: str | os.PathLike[str]) -> Iterator[Path]:
    """Image files below ``root`` in sorted, deterministic order (hidden entries skipped, and folders
    that hold a cxr job's outputs, marked by :data:`OUTPUT_MARKER`, so results are never read as inputs)."""
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        if OUTPUT_MARKER in filenames:
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            if p.suffix.lower() in spec.IMAGE_SUFFIXES:
                yield p


def scan_class_folders(root: str | os.PathLike[str]) -> list[Record]:
    """Records from ``root/<class>/...`` for every class in data.spec.CLASS_NAMES.

    Raises DatasetError when ``root`` is missing or holds no class folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder; pass the folder that holds {'/, '.join(spec.CLASS_NAMES)}/")
    found = [c for c in spec.CLASS_NAMES if (root / c).is_dir()]
    if not found:
        others = sorted(p.name for p in root.iterdir() if p.is_dir())[:10]
        raise DatasetError(
            f"{root}: no class folders; expected sub-folders named {', '.join(spec.CLASS_NAMES)} "
            f"(found: {', '.join(others) or 'none'}), or pass --manifest CSV"
        )
    records = []
    for label in found:
        for p in walk_images(root / label):
            records.append(Record(path=p, label=label, name=p.relative_to(root).as_posix()))
    return records


def open_csv(path: Path, what: str, hint: str = ""):
    """Open a CSV for reading; DatasetError naming the file (and ``hint``, the fix) if it cannot be."""
    try:
        return path.open(newline="", encoding="utf-8")
    except OSError as err:
        raise DatasetError(f"{path}: cannot open {what} ({err.strerror or err}){hint}") from None


_MANIFEST_REQUIRED = ("file",)
_MANIFEST_OPTIONAL = ("label", "patient_id", "source", "group_id")


def read_manifest(csv_path: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None) -> list[Record]:
    """Records from a CSV with columns file[,label][,patient_id][,source][,group_id].

    ``file`` is relative to ``root`` (default: the CSV's folder). Unknown labels fail
    naming the row. Extra columns are ignored.
    """
    csv_path = Path(csv_path)
    base = Path(root) if root is not None else csv_path.parent
    with open_csv(csv_path, "manifest") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = [c for c in _MANIFEST_REQUIRED if c not in columns]
        if missing:
            raise DatasetError(
                f"{csv_path}: manifest lacks column(s) {', '.join(missing)}; "
                f"needs {', '.join(_MANIFEST_REQUIRED)} and may have {', '.join(_MANIFEST_OPTIONAL)}"
            )
        records = []
        for lineno, row in enumerate(reader, start=2):
            label = (row.get("label") or "").strip() or None
            if label is not None and label not in spec.CLASS_NAMES:
                raise DatasetError(
                    f"{csv_path}:{lineno}: unknown label {label!r}; valid: {', '.join(spec.CLASS_NAMES)}"
                )
            file = (row.get("file") or "").strip()
            if not file:
                raise DatasetError(f"{csv_path}:{lineno}: empty 'file' field")
            records.append(
                Record(
                    path=base / file,
                    label=label,
                    name=Path(file).as_posix(),
                    patient_id=(row.get("patient_id") or "").strip(),
                    source=(row.get("source") or row.get("source_repo") or "").strip(),
                    group_id=(row.get("group_id") or "").strip(),
                )
            )
    return records


def load_records(
    data_dir: str | os.PathLike[str] | None,
    *,
    manifest: str | os.PathLike[str] | None = None,
) -> list[Record]:
    """Records from a manifest when given, else from class folders.

    When ``data_dir`` holds a ``manifest.csv`` and none is passed, that manifest is
    merged in for patient ids and sources (labels still come from the folders).
    """
    if manifest is not None:
        return read_manifest(manifest, root=data_dir)
    if data_dir is None:
        raise DatasetError("pass a data folder or --manifest CSV")
    records = scan_class_folders(data_dir)
    side = Path(data_dir) / "manifest.csv"
    if side.is_file():
        extra = {r.path.resolve(): r for r in read_manifest(side, root=data_dir)}
        merged = []
        for r in records:
            m = extra.get(r.path.resolve())
            if m is not None:
                r = replace(r, patient_id=m.patient_id, source=m.source, group_id=m.group_id)
            merged.append(r)
        records = merged
    return records


def pair_masks(
    records: Sequence[Record], mask_root: str | os.PathLike[str], kinds: Iterable[str] | None = None
) -> list[Record]:
    """Attach ``mask_root/<kind>/<stem>.*`` to each record by file stem; returns new records."""
    mask_root = Path(mask_root)
    if not mask_root.is_dir():
        raise DatasetError(f"{mask_root}: no such mask folder; expected MASKDIR/<kind>/<image name>.png")
    available = sorted(p.name for p in mask_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    wanted = list(kinds) if kinds is not None else available
    unknown = [k for k in wanted if k not in available]
    if unknown:
        raise DatasetError(
            f"{mask_root}: no mask folder for kind(s) {', '.join(unknown)}; available: {', '.join(available) or 'none'}"
        )
    index: dict[str, dict[str, Path]] = {}
    for kind in wanted:
        for p in walk_images(mask_root / kind):
            index.setdefault(p.stem, {})[kind] = p
    return [replace(r, masks=dict(index.get(r.path.stem, {}))) for r in records]


def mark_lesion_free(records: Sequence[Record], kinds: Iterable[str]) -> list[Record]:
    """``records`` with each lesion mask kind of ``kinds`` known to be empty where the image is
    labelled lesion-free (data.spec.LESION_FREE_CLASSES: a normal X-ray) and has no such mask file;
    other records unchanged. New records; the files in ``masks`` always win."""
    kinds = frozenset(kinds)
    out = []
    for r in records:
        empty = {k for k in kinds if k not in r.masks} if r.label in spec.LESION_FREE_CLASSES else set()
        out.append(replace(r, empty_masks=r.empty_masks | empty) if empty - r.empty_masks else r)
    return out


def load_example(
    record: Record,
    *,
    size: int,
    mode: str = spec.DEFAULT_RESIZE_MODE,
    clahe: bool = False,
    mask_kind: str | tuple[str, ...] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode and preprocess one record → (float32 (size, size, 3), mask or None).

    The mask is float32 (size, size) in {0, 1} for one kind, (size, size, K) for a tuple of K
    kinds; a kind in ``record.empty_masks`` without a file is all zeros. Raises ImageReadError
    naming the image or mask file.
    """
    image = read_image(record.path)
    x, geo = preprocess_image(image, size=size, mode=mode, clahe=clahe)
    if mask_kind is None:
        return x, None
    kinds = (mask_kind,) if isinstance(mask_kind, str) else tuple(mask_kind)
    channels = []
    for kind in kinds:
        mpath = record.masks.get(kind)
        if mpath is None and kind in record.empty_masks:
            channels.append(np.zeros((size, size), np.float32))
            continue
        if mpath is None:
            raise ImageReadError(record.path, f"no {kind!r} mask paired with this image")
        try:
            channels.append(preprocess_mask(read_mask(mpath), geo))
        except ValueError as err:
            raise ImageReadError(mpath, str(err)) from None
    return x, (channels[0] if isinstance(mask_kind, str) else np.stack(channels, axis=-1))


#: Bytes of decoded, preprocessed examples one stream keeps in memory (see :class:`_ExampleLoader`).
#: 64 px examples take 48 KiB each, so a few thousand fit; at 224 px about 870 do, the rest are
#: decoded again each epoch.
DECODE_CACHE_BYTES = 512 * 2**20


class _ExampleLoader:
    """Decode, preprocess and augment example ``i`` of ``records`` for a given epoch (numpy; shared by
    the tf.data pipeline and :class:`RecordBatches`).

    With ``cache``, the preprocessed example (before augmentation, which is seeded per epoch), the
    same every epoch, is kept read-only up to DECODE_CACHE_BYTES: later epochs skip the PNG decode
    and resize, which otherwise take CPU from training on a small machine. Outputs are identical
    with and without the cache.
    """

    def __init__(self, records, *, size, mode, clahe, augment_params, seed, mask_kind, failures,
                 cache: bool = False) -> None:
        self.records, self.size, self.mode, self.clahe = records, size, mode, clahe
        self.augment_params, self.seed, self.mask_kind, self.failures = augment_params, seed, mask_kind, failures
        single = mask_kind is None or isinstance(mask_kind, str)
        self.mask_shape = (size, size) if single else (size, size, len(mask_kind))
        self.labels = np.array([spec.class_index(r.label) if r.label is not None else -1 for r in records], np.int32)
        self.cache: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        self.cache_room = DECODE_CACHE_BYTES if cache else 0

    def _example(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        hit = self.cache.get(i)
        if hit is not None:
            return hit
        x, y = load_example(self.records[i], size=self.size, mode=self.mode, clahe=self.clahe,
                            mask_kind=self.mask_kind)
        nbytes = x.nbytes + (0 if y is None else y.nbytes)
        if nbytes <= self.cache_room:  # loader threads may race here: at worst one example each over the budget
            self.cache_room -= nbytes
            for a in (x, y):
                if a is not None:
                    a.flags.writeable = False  # shared by every epoch: nothing may change it in place
            self.cache[i] = (x, y)
        return x, y

    def order(self, epoch: int, shuffle: bool) -> np.ndarray:
        if not shuffle:
            return np.arange(len(self.records), dtype=np.int64)
        return np.random.default_rng(_mix(self.seed, int(epoch))).permutation(len(self.records)).astype(np.int64)

    def __call__(self, i: int, epoch: int) -> tuple[np.ndarray, np.ndarray, bool]:
        try:
            x, y = self._example(i)
        except ImageReadError as err:
            self.failures.add(err.path, err.reason)
            return np.zeros((self.size, self.size, 3), np.float32), np.zeros(self.mask_shape, np.float32), False
        if self.augment_params is not None:
            masks = [] if y is None else ([y] if y.ndim == 2 else [y[..., k] for k in range(y.shape[-1])])
            x, moved = augment(x, masks, seed=_mix(self.seed, int(epoch), i), params=self.augment_params)
            y = None if not moved else (moved[0] if y.ndim == 2 else np.stack(moved, axis=-1))
        return x, (y if y is not None else np.zeros(self.mask_shape, np.float32)), True

    def target(self, i: int, y: np.ndarray, one_hot: bool) -> np.ndarray:
        if self.mask_kind is not None:
            return y[..., None] if isinstance(self.mask_kind, str) else y
        label = self.labels[i]
        return np.eye(spec.NUM_CLASSES, dtype=np.float32)[label] if one_hot else np.int32(label)


def make_dataset(
    records: Sequence[Record],
    *,
    size: int,
    batch_size: int,
    mode: str = spec.DEFAULT_RESIZE_MODE,
    clahe: bool = False,
    shuffle: bool = False,
    augment_params: AugmentParams | None = None,
    seed: int = 0,
    mask_kind: str | tuple[str, ...] | None = None,
    failures: FailureLog | None = None,
    one_hot: bool = True,
    num_parallel_calls: int | None = None,
    drop_remainder: bool = False,
    cache: bool = False,
):
    """A batched stream of ``records`` from disk, for ``fit``, ``predict`` or a plain ``for`` loop.

    Elements: (x float32 (B, size, size, 3) in [0, 255], y) where y is one-hot
    float32 (B, num_classes) for classification, or float32 (B, size, size, 1) in
    {0, 1} when ``mask_kind`` is set ((B, size, size, K) for a tuple of K kinds). Files that fail to decode are added to
    ``failures`` and skipped. Nothing is held in memory beyond the prefetch buffer, unless ``cache``
    (for a stream read every epoch): then decoded examples are kept up to DECODE_CACHE_BYTES and
    only augmentation runs again.
    Augmentation is seeded per (epoch, example), so a rerun repeats exactly.

    On the TensorFlow backend this is a prefetched ``tf.data.Dataset``; on the others (PyTorch,
    JAX) a :class:`data.batches.RecordBatches` (keras.utils.PyDataset) with the same elements and seeds.
    Both have ``.map(fn)`` over batches; write ``fn`` with ``keras.ops`` to serve both.
    ``drop_remainder`` (TensorFlow only: what tf.distribute needs, data.runtime.distribute) drops
    a last batch smaller than ``batch_size``.
    """
    import keras

    if not records:
        raise DatasetError("no records to build a dataset from")
    if mask_kind is None and any(r.label is None for r in records):
        raise DatasetError("classification needs a label for every record; some have none")
    failures = failures if failures is not None else FailureLog()
    loader = _ExampleLoader(records, size=size, mode=mode, clahe=clahe, augment_params=augment_params, seed=seed,
                            mask_kind=mask_kind, failures=failures, cache=cache)
    if keras.backend.backend() != "tensorflow":
        if drop_remainder:
            raise ValueError("drop_remainder is for tf.distribute, on the TensorFlow backend only")
        from data.batches import RecordBatches

        return RecordBatches(loader, batch_size=batch_size, shuffle=shuffle, one_hot=one_hot,
                             workers=num_parallel_calls or min(8, os.cpu_count() or 1))
    return _tf_dataset(loader, batch_size=batch_size, shuffle=shuffle, one_hot=one_hot,
                       num_parallel_calls=num_parallel_calls, drop_remainder=drop_remainder)


def _tf_dataset(loader: _ExampleLoader, *, batch_size: int, shuffle: bool, one_hot: bool, num_parallel_calls,
                drop_remainder: bool = False):
    import tensorflow as tf  # data's only TensorFlow dependency, kept out of import time

    n, size, mask_shape = len(loader.records), loader.size, loader.mask_shape
    labels = loader.labels
    epochs_started = itertools.count()

    def _next_epoch() -> np.int64:
        return np.int64(next(epochs_started))

    def _order(epoch: np.ndarray) -> np.ndarray:
        return loader.order(int(epoch), shuffle)

    def _load(index: np.ndarray, epoch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x, y, ok = loader(int(index), int(epoch))
        return x, y, np.bool_(ok)

    def _map(index, epoch):
        x, y, ok = tf.numpy_function(_load, [index, epoch], [tf.float32, tf.float32, tf.bool])
        x.set_shape((size, size, 3))
        y.set_shape(mask_shape)
        ok.set_shape(())
        return index, x, y, ok

    def _target(index, x, y, ok):
        if loader.mask_kind is not None:
            return x, (tf.expand_dims(y, -1) if isinstance(loader.mask_kind, str) else y)
        label = tf.gather(labels, index)
        return x, (tf.one_hot(label, spec.NUM_CLASSES) if one_hot else label)

    def _epoch_elements(epoch):
        order = tf.numpy_function(_order, [epoch], tf.int64)
        order.set_shape((n,))
        indices = tf.data.Dataset.from_tensor_slices(order)
        return tf.data.Dataset.zip((indices, tf.data.Dataset.from_tensors(epoch).repeat()))

    # A new iterator (one per Keras epoch) bumps the epoch number exactly once; the
    # epoch seeds both the shuffle order and the augmentation, so reruns repeat exactly.
    ds = tf.data.Dataset.from_tensors(np.int64(0)).map(
        lambda _: tf.reshape(tf.py_function(_next_epoch, [], tf.int64), ())
    )
    ds = ds.flat_map(_epoch_elements)
    ds = ds.map(_map, num_parallel_calls=num_parallel_calls or tf.data.AUTOTUNE, deterministic=True)
    ds = ds.filter(lambda i, x, y, ok: ok).map(_target)
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (deterministic across runs and platforms)."""
    return int(np.random.SeedSequence([v & 0xFFFFFFFF for v in values]).generate_state(1, np.uint64)[0] >> 1)

