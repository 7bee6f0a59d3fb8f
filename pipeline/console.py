"""A quiet console by default: TensorFlow's native start-up lines and its Python logger's
notices are kept from users unless they ask for them (``cxr -v``).

TensorFlow writes its start-up lines ("oneDNN custom operations are on", "This TensorFlow binary
is optimized ...", absl's "All log messages before absl::InitializeLog()") from C++ straight to
file descriptor 2 while it loads, whatever TF_CPP_MIN_LOG_LEVEL says. They are caught here while
Keras (and so TensorFlow) is imported, and every other line is written back unchanged: an
import error or a real native message is never hidden.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from contextlib import contextmanager
from typing import Iterator

#: native start-up lines that say nothing a user can act on
START_UP_NOISE = re.compile(
    r"All log messages before absl::InitializeLog|oneDNN custom operations are on|cpu_feature_guard|"
    r"To enable the following instructions|rebuild TensorFlow with the appropriate compiler flags"
)


@contextmanager
def native_stderr_filtered(noise: re.Pattern[str] = START_UP_NOISE) -> Iterator[None]:
    """Inside the block, file descriptor 2 goes to a temporary file; afterwards its lines that do
    not match ``noise`` are written to stderr. Nothing changes where fd 2 cannot be redirected."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode("utf-8", "replace").splitlines()
                    if not noise.search(line)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()


def quiet_start(verbose: bool, *, needs_models: bool = True) -> None:
    """Import Keras (TensorFlow with it) quietly unless ``verbose``; TensorFlow's own INFO and
    WARNING logs then stay off too (errors still show). Commands that load no model
    (``needs_models`` False) do not pay for the import."""
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not needs_models:
        return
    with native_stderr_filtered():
        import keras  # noqa: F401  (loads the backend, whose start-up lines are filtered)
    if "tensorflow" in sys.modules:
        import logging

        logging.getLogger("tensorflow").setLevel(logging.ERROR)
