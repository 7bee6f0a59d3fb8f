"""The quiet console: TensorFlow's native start-up lines are dropped, every other line is kept."""

from __future__ import annotations

import os

from pipeline.console import native_stderr_filtered


def test_native_noise_is_dropped_and_other_lines_kept(capfd):
    with native_stderr_filtered():
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
        os.write(2, b"I0000 00:00:1 port.cc:153] oneDNN custom operations are on. You may see ...\n")
        os.write(2, b"E0000 00:00:1 something.cc:1] a real native error\n")
    err = capfd.readouterr().err
    assert "a real native error" in err
    assert "oneDNN" not in err and "absl::InitializeLog" not in err


def test_the_keras_warning_about_streams_of_unknown_length_is_silenced_for_fit_only():
    import warnings

    from data.runtime.training import fit_streamed

    class Model:
        def fit(self, data, **kwargs):
            warnings.warn("Your input ran out of data; interrupting training.", UserWarning, stacklevel=2)
            warnings.warn("something else", UserWarning, stacklevel=2)
            return "history"

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert fit_streamed(Model(), None) == "history"
    assert [str(w.message) for w in seen] == ["something else"]


def test_every_user_error_shares_one_base_that_the_cli_catches():
    from data.datasets import DatasetError
    from data.errors import CxrError, UsageError
    from data.io import ImageReadError
    from data.runtime.bundle import BundleError
    from data.runtime.engines import ExportError
    from data.runtime.weights import WeightsError
    from gradcam.imports import AnnotationError
    from pipeline.config import ConfigError

    for cls in (BundleError, DatasetError, ExportError, ImageReadError, WeightsError, AnnotationError, UsageError,
                ConfigError):
        assert issubclass(cls, CxrError), cls
