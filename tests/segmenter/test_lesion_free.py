"""Lesion-free X-rays (normal ones, no lesion mask) as training images: which records, how many."""

from __future__ import annotations

from pathlib import Path

import pytest

from data.datasets import Record
from segmenter.settings import SegmenterSettings, with_preset
from segmenter.train import is_lesion_free, with_lesion_free


def lesion_free_count(records, settings) -> int:
    return sum(is_lesion_free(r, settings) for r in records)


def _records(n_lesion: int, n_normal: int, *, lung: bool = True) -> list[Record]:
    """COVID records with infection (and lung) mask files; normal ones with a lung mask only."""
    lung_mask = {"lung": Path("lung.png")} if lung else {}
    covid = [Record(Path(f"c{i}.png"), "covid", name=f"c{i}", masks={"infection": Path(f"i{i}.png"), **lung_mask})
             for i in range(n_lesion)]
    normal = [Record(Path(f"n{i}.png"), "normal", name=f"n{i}", masks=dict(lung_mask)) for i in range(n_normal)]
    pneumonia = [Record(Path("p.png"), "pneumonia", name="p", masks=dict(lung_mask))]  # lesions, none drawn
    return covid + normal + pneumonia


@pytest.mark.parametrize("ratio, n_normal, expect", [(0.0, 10, 0), (0.5, 10, 4), (1.0, 10, 8), (2.0, 5, 5)])
def test_lesion_free_images_join_up_to_the_ratio(ratio, n_normal, expect):
    settings = SegmenterSettings(kind="infection", lesion_free=ratio)
    kept = with_lesion_free(_records(8, n_normal), settings)
    assert lesion_free_count(kept, settings) == expect
    assert sum(r.label == "covid" for r in kept) == 8  # every lesion image stays
    assert not any(r.label == "pneumonia" for r in kept)  # no mask and not lesion-free: left out
    assert with_lesion_free(_records(8, n_normal), settings) == kept  # seeded: the same draw each time
    free = [r for r in kept if r.label == "normal"]
    assert all(r.empty_masks == {"infection"} and "infection" not in r.masks for r in free)


def test_the_lung_lesion_scheme_needs_the_lung_mask_of_lesion_free_images():
    settings = SegmenterSettings(kind="infection", classes="lung-lesion", loss="cce_dice", lesion_free=1.0)
    assert settings.lesion_kinds == ("infection",)
    with_lung = with_lesion_free(_records(4, 4), settings)
    assert lesion_free_count(with_lung, settings) == 4
    assert with_lesion_free(_records(4, 4, lung=False), settings) == []  # no lung mask anywhere: nothing usable


def test_a_lung_field_model_takes_no_lesion_free_images():
    settings = SegmenterSettings(**with_preset({"weights": "none", "kind": "lung"}))
    assert settings.lesion_kinds == () and settings.lesion_free == 0.0
    assert len(with_lesion_free(_records(3, 3), settings)) == 7  # every image with a lung mask
    with pytest.raises(ValueError, match="lesion_free needs a lesion to learn"):
        SegmenterSettings(kind="lung", lesion_free=0.5)
    with pytest.raises(ValueError, match="lesion_free must be >= 0"):
        SegmenterSettings(kind="infection", lesion_free=-1)
