"""`cxr run --ray` killed hard after its N-th finished image (run by tests/pipeline/test_ray_run.py).

Usage: python ray_killed_run.py FOLDER OUT CLASSIFIER SEGMENTER N (the segmenter also serves as
the lung model, as in conftest.mixed_run). The process sends itself
SIGKILL right after the N-th image's results line is written: no cleanup, no finally blocks,
and its local Ray is left behind (the test ends the process group).
"""

from __future__ import annotations

import os
import signal
import sys

from pipeline import api
from pipeline import run as run_module


def main(folder: str, out: str, classifier: str, segmenter: str, n: str) -> None:
    real = run_module._FolderRun._write_rendered
    finished = 0

    def write_then_die(self, *args):
        nonlocal finished
        real(self, *args)
        finished += 1
        if finished == int(n):
            os.kill(os.getpid(), signal.SIGKILL)

    run_module._FolderRun._write_rendered = write_then_die
    models = api.load_models(classifier, segmenter, segmenter)  # the segmenter doubles as the lung model
    api.run_folder(folder, out, models, batch_size=2, ray=api.RayOptions(workers=1))
    raise SystemExit("the run finished before it was killed")


if __name__ == "__main__":
    main(*sys.argv[1:])
