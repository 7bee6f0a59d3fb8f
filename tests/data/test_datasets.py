"""Finding records, pairing masks, and streaming them through tf.data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data import spec
from data.augment import AugmentParams
from data.datasets import (
    SAMPLES_DIR,
    DatasetError,
    FailureLog,
    load_example,
    load_records,
    make_dataset,
    mark_lesion_free,
    pair_masks,
    read_manifest,
    scan_class_folders,
)
from data.io import ImageReadError
from fakes import png_bytes, xray_like


def make_tree(root: Path, per_class: int = 2, size=(72, 64)) -> Path:
    for ci, label in enumerate(spec.CLASS_NAMES):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            (root / label / f"{label}_{i}.png").write_bytes(png_bytes(xray_like(*size, seed=ci * 10 + i)))
    return root


def test_class_folders_are_found_in_order(tmp_path):
    recs = scan_class_folders(make_tree(tmp_path / "d"))
    assert [r.label for r in recs] == [c for c in spec.CLASS_NAMES for _ in range(2)]
    assert recs[0].key == "normal/normal_0.png"


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "no such folder"),
        (lambda d: (d / "cats").mkdir(parents=True), "no class folders"),
    ],
)
def test_bad_data_folders(tmp_path, setup, message):
    d = tmp_path / "data"
    setup(d)
    with pytest.raises(DatasetError, match=message):
        scan_class_folders(d)


def test_manifest_reading_and_errors(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "m.csv").write_text("file,label,patient_id,source\nnormal/normal_0.png,normal,p1,srcA\n")
    (rec,) = read_manifest(tmp_path / "m.csv")
    assert (rec.label, rec.patient_id, rec.source) == ("normal", "p1", "srcA")
    assert rec.path == tmp_path / "normal/normal_0.png"
    (tmp_path / "bad.csv").write_text("file,label\nx.png,cat\n")
    with pytest.raises(DatasetError, match=r"bad.csv:2: unknown label 'cat'"):
        read_manifest(tmp_path / "bad.csv")
    (tmp_path / "nofile.csv").write_text("path,label\nx.png,normal\n")
    with pytest.raises(DatasetError, match="lacks column"):
        read_manifest(tmp_path / "nofile.csv")


def test_masks_pair_by_stem(tmp_path):
    make_tree(tmp_path / "d")
    (tmp_path / "m" / "lesion").mkdir(parents=True)
    (tmp_path / "m" / "lesion" / "covid_1.png").write_bytes(png_bytes(np.zeros((72, 64), np.uint8)))
    recs = pair_masks(load_records(tmp_path / "d"), tmp_path / "m")
    paired = [r for r in recs if r.masks]
    assert [r.key for r in paired] == ["covid/covid_1.png"]
    with pytest.raises(DatasetError, match="available: lesion"):
        pair_masks(recs, tmp_path / "m", ["infection"])


def test_normal_x_rays_are_known_lesion_free(tmp_path):
    make_tree(tmp_path / "d")
    (tmp_path / "m" / "lesion").mkdir(parents=True)
    drawn = np.zeros((72, 64), np.uint8)
    drawn[10:20, 10:20] = 255  # a mask file on a normal image wins over "known empty"
    (tmp_path / "m" / "lesion" / "normal_1.png").write_bytes(png_bytes(drawn))
    recs = mark_lesion_free(pair_masks(load_records(tmp_path / "d"), tmp_path / "m"), ["lesion"])
    known = {r.key: r.has_mask("lesion") for r in recs}
    assert known == {"normal/normal_0.png": True, "normal/normal_1.png": True, "pneumonia/pneumonia_0.png": False,
                     "pneumonia/pneumonia_1.png": False, "covid/covid_0.png": False, "covid/covid_1.png": False}
    by_key = {r.key: r for r in recs}
    _, empty = load_example(by_key["normal/normal_0.png"], size=32, mask_kind="lesion")
    assert empty.shape == (32, 32) and empty.dtype == np.float32 and not empty.any()
    _, both = load_example(by_key["normal/normal_1.png"], size=32, mask_kind=("lesion", "lesion"))
    assert both.shape == (32, 32, 2) and both.any()  # the file, not zeros
    with pytest.raises(ImageReadError, match="no 'lesion' mask"):
        load_example(by_key["covid/covid_0.png"], size=32, mask_kind="lesion")


def test_bundled_sample_is_complete():
    recs = load_records(SAMPLES_DIR)
    assert len(recs) <= 9
    assert {r.label for r in recs} == set(spec.CLASS_NAMES)
    notice = (SAMPLES_DIR / "NOTICE").read_text()
    for r in recs:
        assert r.key in notice  # every bundled image is credited
        assert r.source  # and has its provenance from the manifest


def test_dataset_streams_batches_and_records_failures(tmp_path):
    d = make_tree(tmp_path / "d")
    (d / "covid" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    recs = load_records(d)
    failures = FailureLog()
    ds = make_dataset(recs, size=32, batch_size=4, failures=failures)
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    x = np.concatenate(xs)
    y = np.concatenate(ys)
    assert x.shape == (6, 32, 32, 3) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 255.0
    np.testing.assert_array_equal(y.argmax(1), [0, 0, 1, 1, 2, 2])
    assert len(failures) == 1 and failures.items[0][0].endswith("broken.png")


def test_dataset_shuffle_and_augmentation_repeat_with_seed(tmp_path):
    recs = load_records(make_tree(tmp_path / "d"))

    def two_epochs(seed):
        ds = make_dataset(recs, size=32, batch_size=6, shuffle=True, augment_params=AugmentParams(), seed=seed)
        return [np.concatenate([x.numpy() for x, _ in ds]) for _ in range(2)]

    a1, a2 = two_epochs(3)
    b1, b2 = two_epochs(3)
    np.testing.assert_array_equal(a1, b1)
    np.testing.assert_array_equal(a2, b2)
    assert not np.array_equal(a1, a2)  # each epoch sees a new order and new augmentations


def test_segmentation_dataset_pairs_masks(tmp_path):
    d = make_tree(tmp_path / "d", per_class=1)
    (tmp_path / "m" / "lesion").mkdir(parents=True)
    m = np.zeros((72, 64), np.uint8)
    m[10:30, 10:40] = 255
    for label in spec.CLASS_NAMES:
        (tmp_path / "m" / "lesion" / f"{label}_0.png").write_bytes(png_bytes(m))
    recs = pair_masks(load_records(d), tmp_path / "m")
    ds = make_dataset(recs, size=32, batch_size=3, mask_kind="lesion")
    x, y = next(iter(ds))
    assert x.shape == (3, 32, 32, 3) and y.shape == (3, 32, 32, 1)
    assert set(np.unique(y.numpy())) == {0.0, 1.0}


def test_backend_neutral_stream_matches_tf_data(tmp_path):
    """The PyDataset stream used on PyTorch/JAX yields what tf.data yields: same images, order,
    augmentation per epoch and skipped files; `.map` works on its numpy batches."""
    from data.batches import RecordBatches
    from data.datasets import _ExampleLoader

    d = make_tree(tmp_path / "d")
    (d / "covid" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    recs = load_records(d)
    common = dict(size=32, mode="stretch", clahe=False, augment_params=AugmentParams(), seed=5, mask_kind=None)
    tf_ds = make_dataset(recs, batch_size=7, shuffle=True, **{k: v for k, v in common.items() if k != "mask_kind"})
    failures = FailureLog()
    py_ds = RecordBatches(_ExampleLoader(recs, failures=failures, **common), batch_size=7, shuffle=True,
                          one_hot=True, workers=2)
    assert len(py_ds) == 1  # 7 files, one of them unreadable
    for _ in range(2):  # two epochs: new order and augmentation each time, identical on both streams
        (tx, ty), = [(x.numpy(), y.numpy()) for x, y in tf_ds]
        (px, py), = list(py_ds)
        np.testing.assert_array_equal(tx, px)
        np.testing.assert_array_equal(ty, py)
    assert py_ds.epoch == 2 and len(failures) == 2 and failures.items[0][0].endswith("broken.png")
    (mx, my), = list(py_ds.map(lambda x, y: (x[:, :1], y * 2)))
    assert mx.shape == (6, 1, 32, 3) and my.max() == 2.0


def test_decode_cache_changes_no_output_and_keeps_to_its_budget(tmp_path, monkeypatch):
    """Later epochs reuse the decoded examples (augmented anew each epoch); the stream is the same
    with the cache off, masks included; the cache stops growing at its byte budget."""
    import data.datasets as datasets

    d = make_tree(tmp_path / "d")
    (tmp_path / "m" / "lesion").mkdir(parents=True)
    for label in spec.CLASS_NAMES:
        for i in range(2):
            m = np.zeros((72, 64), np.uint8)
            m[5 + 10 * i:30, 10:40] = 255
            (tmp_path / "m" / "lesion" / f"{label}_{i}.png").write_bytes(png_bytes(m))
    recs = pair_masks(load_records(d), tmp_path / "m")

    def epochs(cache: bool):
        ds = make_dataset(recs, size=32, batch_size=4, shuffle=True, augment_params=AugmentParams(), seed=2,
                          mask_kind="lesion", cache=cache)
        return [[(x.numpy(), y.numpy()) for x, y in ds] for _ in range(3)]

    cached, plain = epochs(True), epochs(False)
    for e_cached, e_plain in zip(cached, plain):
        for (cx, cy), (px, py) in zip(e_cached, e_plain, strict=True):
            np.testing.assert_array_equal(cx, px)
            np.testing.assert_array_equal(cy, py)
    assert not np.array_equal(cached[0][0][0], cached[1][0][0])  # still a new augmentation each epoch

    one = 32 * 32 * 3 * 4 + 32 * 32 * 4  # float32 image and mask at 32 px
    monkeypatch.setattr(datasets, "DECODE_CACHE_BYTES", 2 * one)

    def make_loader(cache: bool):
        return datasets._ExampleLoader(recs, size=32, mode="stretch", clahe=False, augment_params=None, seed=0,
                                       mask_kind="lesion", failures=FailureLog(), cache=cache)

    one_pass = make_loader(False)
    for i in range(len(recs)):
        one_pass(i, 0)
    assert not one_pass.cache  # a stream read once keeps nothing
    loader = make_loader(True)
    first = [loader(i, 0)[0] for i in range(len(recs))]
    assert sorted(loader.cache) == [0, 1]  # two examples fill the budget; the other four are decoded each time
    assert loader(0, 1)[0] is first[0] and not first[0].flags.writeable  # shared, so nothing may write to it
    assert loader(5, 1)[0] is not first[5]
