"""Shared fixtures: the real data folder (skipped where absent) and a generated bad-input corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes import make_bad_corpus

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_cxr() -> Path:
    """../shared/data/cxr, or a skip that says why (a user's clone has no shared data)."""
    path = SHARED_DATA / "cxr"
    if not (path / "manifest.csv").is_file():
        pytest.skip(f"real X-rays not found at {path} (the project's shared data lives beside the checkout)")
    return path


@pytest.fixture(scope="session")
def shared_masks(shared_cxr: Path) -> Path:
    path = SHARED_DATA / "cxr_masks"
    if not path.is_dir():
        pytest.skip(f"masks not found at {path}")
    return path


@pytest.fixture(scope="session")
def bad_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of awkward inputs made here; see fakes.BAD_CORPUS_EXPECT for what each must give."""
    return make_bad_corpus(tmp_path_factory.mktemp("bad_corpus"))
