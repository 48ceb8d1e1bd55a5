"""Mask records and COCO RLE (diffseg.records), with pycocotools as the oracle."""
import json

import numpy as np
import pytest

import diffseg
from diffseg.core import segment_scores
from diffseg.io.records import (counts_to_string, decode_rle, encode_rle, mask_to_counts, masks_to_records,
                                records_to_labels, string_to_counts)
from diffseg.synthetic import planted_example

# pycocotools 2.0.x with NumPy 2 warns inside its own decode
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _label_maps():
    rng = np.random.default_rng(0)
    maps = [
        np.zeros((1, 1), np.int32),
        np.zeros((7, 5), np.int32),
        np.arange(12).reshape(3, 4),
        rng.integers(0, 4, (17, 23)),
        rng.integers(0, 300, (20, 31)),  # more than 255 labels
        (rng.random((40, 33)) < 0.02).astype(np.int64),  # sparse: long runs
    ]
    blocks = np.zeros((50, 60), np.int32)
    blocks[10:30, 5:45] = 1
    blocks[:, 50:] = 2
    blocks[45:, :] = 3
    maps.append(blocks)
    # a segment whose column-major runs wrap from the bottom of one column to the top of the next
    wrap = np.zeros((6, 6), np.int32)
    wrap[4:, 1] = 1
    wrap[:2, 2] = 1
    maps.append(wrap)
    return maps


@pytest.fixture(scope="module")
def mask_utils():
    return pytest.importorskip("pycocotools.mask")


@pytest.mark.parametrize("index", range(len(_label_maps())))
def test_records_match_pycocotools(mask_utils, index):
    labels = _label_maps()[index]
    records = masks_to_records(labels)
    assert [r["id"] for r in records] == sorted(np.unique(labels).tolist())
    for r in records:
        m = np.asfortranarray((labels == r["id"]).astype(np.uint8))
        ref = mask_utils.encode(m)
        assert r["segmentation"]["counts"] == ref["counts"].decode("ascii")
        assert r["segmentation"]["size"] == list(ref["size"])
        assert r["area"] == int(mask_utils.area(ref))
        assert r["bbox"] == [int(v) for v in mask_utils.toBbox(ref)]
        # pycocotools decodes our string (str and bytes) ...
        assert np.array_equal(mask_utils.decode(r["segmentation"]), m)
        # ... and we decode its
        assert np.array_equal(decode_rle(ref), m.astype(bool))


@pytest.mark.parametrize("index", range(len(_label_maps())))
def test_uncompressed_counts_read_by_pycocotools(mask_utils, index):
    labels = _label_maps()[index]
    h, w = labels.shape
    for r in masks_to_records(labels, output_mode="uncompressed_rle"):
        seg = r["segmentation"]
        assert all(isinstance(c, int) for c in seg["counts"])
        ref = mask_utils.frPyObjects(seg, h, w)
        assert ref["counts"].decode() == counts_to_string(seg["counts"])
        assert np.array_equal(mask_utils.decode(ref), (labels == r["id"]).astype(np.uint8))


def test_large_counts_and_signs(mask_utils):
    # counts needing many 5-bit groups, and negative deltas (a long run after short ones)
    m = np.zeros((3000, 2000), np.uint8)
    m[0, 0] = 1
    m[5:9, 3] = 1
    m[-1, -1] = 1
    ref = mask_utils.encode(np.asfortranarray(m))
    rle = encode_rle(m)
    assert rle["counts"] == ref["counts"].decode()
    assert np.array_equal(string_to_counts(ref["counts"]), mask_to_counts(m))
    assert np.array_equal(decode_rle(rle), m.astype(bool))


def test_counts_conventions():
    # column-major, starting with a run of zeros (0 when the first pixel is set)
    m = np.array([[1, 0], [1, 1]])
    assert mask_to_counts(m).tolist() == [0, 2, 1, 1]
    assert mask_to_counts(np.zeros((2, 3))).tolist() == [6]
    assert mask_to_counts(np.ones((2, 3))).tolist() == [0, 6]
    for counts in ([6], [0, 6], [0, 2, 1, 1], [3, 1, 40, 2, 1, 100000, 7]):
        assert string_to_counts(counts_to_string(counts)).tolist() == counts


@pytest.mark.parametrize("mode", ["coco_rle", "uncompressed_rle", "binary_mask"])
@pytest.mark.parametrize("index", range(len(_label_maps())))
def test_round_trip(mode, index):
    labels = _label_maps()[index]
    records = masks_to_records(labels, output_mode=mode)
    back = records_to_labels(records)
    assert back.dtype == np.int32
    assert np.array_equal(back, labels)
    if mode != "binary_mask":  # through JSON too
        assert np.array_equal(records_to_labels(json.loads(json.dumps(records))), labels)


def test_round_trip_binary_lists():
    labels = _label_maps()[6]
    records = masks_to_records(labels, output_mode="binary_mask")
    assert records[0]["segmentation"].dtype == bool
    as_lists = [{**r, "segmentation": r["segmentation"].astype(np.uint8).tolist()} for r in records]
    assert np.array_equal(records_to_labels(json.loads(json.dumps(as_lists))), labels)


def test_negative_labels_and_fill():
    labels = np.full((5, 8), -1, np.int32)
    labels[:, 2:6] = 3
    labels[1, 2] = 7
    records = masks_to_records(labels)
    assert [r["id"] for r in records] == [3, 7]
    assert records[1]["area"] == 1 and records[1]["bbox"] == [2, 1, 1, 1]
    assert records[0]["bbox"] == [2, 0, 4, 5]
    back = records_to_labels(records)
    assert np.array_equal(back, labels)
    assert records_to_labels(records, fill=99)[0, 0] == 99
    assert masks_to_records(np.full((3, 3), -1)) == []
    assert records_to_labels([], shape=(2, 3)).tolist() == [[-1] * 3] * 2


def test_scores():
    labels = np.array([[0, 1], [2, 2]])
    recs = masks_to_records(labels, scores=[0.5, np.nan, 0.25])
    assert [r["score"] for r in recs] == [0.5, None, 0.25]
    recs = masks_to_records(labels, scores={0: 1.0, 2: 0.0})
    assert [r["score"] for r in recs] == [1.0, None, 0.0]
    assert "score" not in masks_to_records(labels)[0]


def test_bad_inputs():
    with pytest.raises(ValueError, match="rle"):
        masks_to_records(np.zeros((2, 2), int), output_mode="polygon")
    with pytest.raises(ValueError, match="labels"):
        masks_to_records(np.zeros(4, int))
    with pytest.raises(TypeError, match="integer"):
        masks_to_records(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="shape"):
        records_to_labels([])
    with pytest.raises(ValueError, match="sum"):
        decode_rle({"size": [2, 2], "counts": [1, 2]})
    with pytest.raises(ValueError, match="size"):
        decode_rle({"counts": [4]})
    recs = masks_to_records(np.zeros((2, 2), int)) + masks_to_records(np.zeros((3, 2), int))
    with pytest.raises(ValueError, match=r"records\[1\]"):
        records_to_labels(recs)


def test_segment_scores_planted():
    attn, _ = planted_example(R=16, n_segments=4, seed=2)
    A = diffseg.aggregate(attn)
    P = diffseg.merge(A)
    labels = diffseg.nms(P, size=(64, 64))
    score, mean_kl = segment_scores(labels, P, A)
    assert score.shape == mean_kl.shape == (labels.max() + 1,)
    assert np.all((score > 0) & (score <= 1))
    assert np.allclose(score, np.exp(-mean_kl))
    # by hand for segment 0: latent cells whose centre pixel has label 0
    _, index = diffseg.nms(P, size=(64, 64), return_index=True)
    small = labels[2::4, 2::4].ravel()  # nearest-exact: pixel floor((i + 0.5) * 4)
    d = diffseg.sym_kl(A[small == 0], P[index[0]].ravel())
    assert mean_kl[0] == pytest.approx(d.mean())
    # coherent planted segments: well inside the merge threshold
    assert np.all(mean_kl < 1.1)
