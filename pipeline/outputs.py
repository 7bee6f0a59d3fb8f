"""Output folders that jobs own: one naming scheme, an exclusive lock, and a marker.

* :func:`output_name` maps an input's path (relative to the input folder) to the name its
  pictures get. The input's extension stays in the name, so ``x.png`` and ``x.jpg`` in one folder
  never share pictures, and the name depends on that path alone, so it is stable across runs. A
  name that would pass the file system's 255-byte limit keeps its start plus a hash of the whole
  path (still unique, still stable).
* :func:`claim_output` takes an exclusive lock on the folder for as long as a job writes there
  (a second ``cxr run`` on the same ``--out`` is refused, naming the process that holds it) and
  leaves a marker file, so that :func:`data.datasets.walk_images` never reads a job's outputs
  back as inputs (``--out`` inside the input folder).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import socket
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator

from data.datasets import OUTPUT_MARKER, DatasetError
from data.files import write_text_atomic

LOCK_FILE = ".cxr.lock"
#: bytes a file name may take (ext4, XFS, APFS, NTFS: 255), less the temporary suffix of atomic writes
_NAME_BYTES = 255 - len(".tmp.png")


def output_name(rel: str | os.PathLike[str], suffix: str) -> str:
    """``<relative path with its extension><suffix>``, each part within the file-name limit.

    ``output_name("a/x.jpg", ".gradcam.png") == "a/x.jpg.gradcam.png"``.
    """
    rel = PurePosixPath(Path(rel).as_posix())
    digest = hashlib.sha256(rel.as_posix().encode("utf-8", "surrogateescape")).hexdigest()[:16]
    name = _shorten(rel.name, _NAME_BYTES - len(suffix.encode()), digest)
    return (rel.parent / name).as_posix() + suffix  # folders exist as inputs: they already fit


def _shorten(part: str, limit: int, digest: str) -> str:
    raw = part.encode("utf-8", "surrogateescape")
    if len(raw) <= limit:
        return part
    keep = raw[: limit - len(digest) - 1].decode("utf-8", "ignore")
    return f"{keep}~{digest}"


def describe_os_error(err: OSError, path: str | os.PathLike[str] | None = None) -> str:
    """One line for a failed write: 'no space left on device' said as such, with the path."""
    where = path or err.filename or ""
    if err.errno == errno.ENOSPC:
        return (f"no space left on device writing {where}; free space and rerun the same command "
                "(finished images are kept)")
    if err.errno == errno.EDQUOT:
        return f"disk quota exceeded writing {where}; free space and rerun the same command"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {where}: {err.strerror or 'permission denied'}; choose a writable --out"
    if err.errno == errno.ENAMETOOLONG:
        return f"cannot write {where}: file name too long"
    return f"cannot write {where}: {err.strerror or err}"


@contextmanager
def claim_output(out: Path, *, job: str) -> Iterator[Path]:
    """Create ``out`` if needed, lock it for this process and mark it as a job's output folder.

    DatasetError (rc 2) when the folder cannot be created or written, or when another process holds it.
    The lock is an OS lock (fcntl): it ends with the process, so a killed run never leaves a stale one.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DatasetError(f"{out}: cannot create output folder ({err.strerror or err}); "
                           "choose another --out") from None
    try:
        handle = open(out / LOCK_FILE, "a+", encoding="utf-8")
    except OSError as err:
        raise DatasetError(describe_os_error(err, out)) from None
    try:
        _lock(handle, out)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "job": job,
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
        handle.flush()
        marker = out / OUTPUT_MARKER
        if not marker.exists():
            marker.write_text(f"written by cxr {job}; cxr never reads images below this folder as inputs\n",
                              encoding="utf-8")
    except OSError as err:
        handle.close()
        raise DatasetError(describe_os_error(err, out)) from None
    try:
        yield out
    finally:
        # No stale holder named, so identical jobs leave identical folders. A failure here (a full
        # disk, a folder gone) must not keep the lock: closing below releases it either way.
        with suppress(OSError):
            handle.seek(0)
            handle.truncate()
        handle.close()  # releases the lock


def _lock(handle, out: Path) -> None:
    if sys.platform == "win32":  # pragma: no cover - msvcrt locks a byte range of the same file
        import msvcrt

        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            raise DatasetError(f"{out}: another cxr job is writing here; "
                               "wait for it to end or use another --out") from None
        return
    import fcntl

    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        try:
            info = json.loads(holder)
            who = f"cxr {info.get('job')} (pid {info.get('pid')} on {info.get('host')}, started {info.get('started')})"
        except json.JSONDecodeError:
            who = "another cxr job"
        raise DatasetError(f"{out}: {who} is writing here; wait for it to end or use another --out") from None


def write_rows_csv(path: Path, columns: tuple[str, ...], rows: Iterable[dict[str, Any]], *,
                   sort_by: str | None = "file") -> None:
    """A CSV of ``columns`` (atomically), rows sorted by ``sort_by`` (None: as given); None is an empty
    cell and a mapping "a=1;b=2" (areas by lesion type)."""
    def cell(value: Any) -> Any:
        if value is None:
            return ""
        if isinstance(value, dict):
            return ";".join(f"{k}={v}" for k, v in value.items())
        return value

    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=list(columns), extrasaction="ignore")
    w.writeheader()
    for r in (sorted(rows, key=lambda r: r[sort_by]) if sort_by else rows):
        w.writerow({k: cell(r.get(k)) for k in columns})
    write_text_atomic(path, text.getvalue())
