"""diffseg.metrics: Hungarian-matched pixel accuracy and mIoU."""
import itertools
import json
import math

import numpy as np
import pytest

from diffseg.evaluation.metrics import HungarianMetrics, hungarian_metrics


def one(pred, gt, n, **kw):
    m = HungarianMetrics(n, **kw)
    m.update(np.array(pred), np.array(gt))
    return m.compute()


def assert_result(r, tp, fp, fn, acc, iou):
    assert r["tp"] == tp and r["fp"] == fp and r["fn"] == fn
    assert r["pixel_accuracy"] == pytest.approx(acc)
    for got, want in zip(r["iou"], iou):
        if want is None:
            assert math.isnan(got)
        else:
            assert got == pytest.approx(want)
    want = [w for w in iou if w is not None]
    assert r["miou"] == pytest.approx(sum(want) / len(want))


# -- hand-computed cases (per-image protocol) -------------------------------------
def test_more_segments_than_classes():
    # hist (2 x 3): class 0 -> [2, 1, 0], class 1 -> [0, 0, 2]; match 0->0, 1->2.
    # Segment 1 is unmatched: its pixel counts only as a FN of class 0.
    r = one([[0, 0, 1, 2, 2]], [[0, 0, 0, 1, 1]], 2)
    assert_result(r, tp=[2, 2], fp=[0, 0], fn=[1, 0], acc=4 / 5, iou=[2 / 3, 1.0])
    assert r["images"] == 1 and r["valid_pixels"] == 5


def test_fewer_segments_than_classes():
    # hist (3 x 3): [2,0,0], [1,1,0], [0,2,0]; optimum 0->0, 2->1, 1->(empty) 2.
    r = one([[0, 0, 0, 1, 1, 1]], [[0, 0, 1, 1, 2, 2]], 3)
    assert_result(r, tp=[2, 0, 2], fp=[1, 0, 1], fn=[0, 2, 0], acc=4 / 6,
                  iou=[2 / 3, 0.0, 2 / 3])


def test_ignored_pixels():
    # -1, 255 and anything >= n_classes are ignored, whatever is predicted there;
    # the width still comes from pred.max() over the whole image (as official).
    r = one([[1, 1, 0, 0, 0, 5, 0, 3]], [[0, 0, 1, 1, -1, 255, 7, 2]], 2)
    assert_result(r, tp=[2, 2], fp=[0, 0], fn=[0, 0], acc=1.0, iou=[1.0, 1.0])
    assert r["valid_pixels"] == 4


def test_ignore_index_inside_range_removes_the_class():
    r = one([[0, 0, 1, 1, 2]], [[0, 0, 1, 1, 2]], 3, ignore_index=2)
    assert r["valid_pixels"] == 4
    assert_result(r, tp=[2, 2, 0], fp=[0, 0, 0], fn=[0, 0, 0], acc=1.0, iou=[1.0, 1.0, None])


def test_absent_class_is_nan():
    # class 2 never occurs; it gets the empty column 2: TP = FP = FN = 0 -> NaN.
    r = one([[0, 0, 1, 1]], [[0, 0, 1, 1]], 3)
    assert_result(r, tp=[2, 2, 0], fp=[0, 0, 0], fn=[0, 0, 0], acc=1.0, iou=[1.0, 1.0, None])


def test_absent_class_matched_to_leftover_segment_scores_zero():
    # hist (2 x 2): [3, 1], [0, 0]: the absent class 1 takes segment 1 -> FP 1, IoU 0
    # (the official per-image protocol does this too).
    r = one([[0, 0, 0, 1]], [[0, 0, 0, 0]], 2)
    assert_result(r, tp=[3, 0], fp=[0, 1], fn=[1, 0], acc=3 / 4, iou=[3 / 4, 0.0])


def test_one_segment_image():
    # hist column 0 = [2, 1, 3]: class 2 wins it; the others match empty columns.
    r = one([[0, 0, 0, 0, 0, 0]], [[0, 0, 1, 2, 2, 2]], 3)
    assert_result(r, tp=[0, 0, 3], fp=[0, 0, 3], fn=[2, 1, 0], acc=3 / 6,
                  iou=[0.0, 0.0, 0.5])


def test_image_without_valid_pixels_counts_but_adds_nothing():
    m = HungarianMetrics(3)
    m.update(np.zeros((2, 2), int), np.full((2, 2), 255))
    r = m.compute()
    assert r["images"] == 1 and r["valid_pixels"] == 0
    assert math.isnan(r["pixel_accuracy"]) and math.isnan(r["miou"])


def test_counts_sum_over_images():
    m = HungarianMetrics(2)
    m.update(np.array([[0, 0, 1, 2, 2]]), np.array([[0, 0, 0, 1, 1]]))
    m.update(np.array([[0, 0, 0, 1]]), np.array([[0, 0, 0, 0]]))
    r = m.compute()
    assert r["tp"] == [5, 2] and r["fp"] == [0, 1] and r["fn"] == [2, 0]
    assert r["pixel_accuracy"] == pytest.approx(7 / 9)
    assert r["iou"] == pytest.approx([5 / 7, 2 / 3])


def test_batch_is_matched_per_image():
    p1, g1 = np.array([[0, 0, 1, 1]]), np.array([[0, 0, 1, 1]])
    p2, g2 = np.array([[1, 1, 0, 0]]), np.array([[0, 0, 1, 1]])
    a = HungarianMetrics(2)
    a.update(np.stack([p1, p2]), np.stack([g1, g2]))
    b = HungarianMetrics(2)
    b.update(p1, g1)
    b.update(p2, g2)
    assert a.compute() == b.compute()
    assert a.compute()["pixel_accuracy"] == 1.0  # ids swap between images: fine per image


def test_large_ids_are_handled():
    pred = np.array([[0, 0, 10**9, 10**9]])
    r = one(pred, [[0, 0, 1, 1]], 2)
    assert r["tp"] == [2, 2] and r["pixel_accuracy"] == 1.0


# -- independent implementation --------------------------------------------------
def reference_per_image(pairs, n):
    """Straightforward version: Python loops build the confusion counts, the
    matching is found by trying every assignment of classes to segments."""
    tp, fp, fn = [0] * n, [0] * n, [0] * n
    valid = 0
    for pred, gt in pairs:
        width = max(n, max(int(v) for v in pred.ravel()) + 1)
        hist = [[0] * width for _ in range(n)]
        for p, g in zip(pred.ravel().tolist(), gt.ravel().tolist()):
            if 0 <= g < n:
                hist[g][p] += 1
                valid += 1
        best, best_cols = -1, None
        for cols in itertools.permutations(range(width), n):
            score = sum(hist[c][cols[c]] for c in range(n))
            if score > best:
                best, best_cols = score, cols
        for c in range(n):
            col = best_cols[c]
            tp[c] += hist[c][col]
            fp[c] += sum(hist[r][col] for r in range(n)) - hist[c][col]
            fn[c] += sum(hist[c]) - hist[c][col]
    return tp, fp, fn, valid


def unique_optimum(pred, gt, n):
    width = max(n, int(pred.max()) + 1)
    hist = np.zeros((n, width), int)
    ok = (gt >= 0) & (gt < n)
    np.add.at(hist, (gt[ok], pred[ok]), 1)
    scores = sorted((sum(hist[c, cols[c]] for c in range(n))
                     for cols in itertools.permutations(range(width), n)), reverse=True)
    return scores[0] > scores[1]


def test_per_image_matches_straightforward_implementation():
    rng = np.random.default_rng(0)
    n = 3
    pairs = []
    while len(pairs) < 12:
        k = int(rng.integers(1, 6))  # 1..5 segments: fewer and more than classes
        shape = (int(rng.integers(3, 8)), int(rng.integers(3, 8)))
        gt = rng.integers(-1, n + 1, size=shape)  # includes -1 and n (ignored)
        gt[rng.random(shape) < 0.1] = 255
        # segments correlated with the classes, plus noise
        pred = np.where(rng.random(shape) < 0.7, np.clip(gt, 0, k - 1), rng.integers(0, k, size=shape))
        pred = pred % k
        if unique_optimum(pred, gt, n):  # ties may be broken either way: avoid them
            pairs.append((pred, gt))
    m = HungarianMetrics(n)
    for pred, gt in pairs:
        m.update(pred, gt)
    r = m.compute()
    tp, fp, fn, valid = reference_per_image(pairs, n)
    assert (r["tp"], r["fp"], r["fn"], r["valid_pixels"]) == (tp, fp, fn, valid)
    assert r["pixel_accuracy"] == pytest.approx(sum(tp) / valid)
    iou = [t / (t + p + f) if t + p + f else float("nan") for t, p, f in zip(tp, fp, fn)]
    assert r["miou"] == pytest.approx(np.nanmean(iou))


# -- per-dataset protocol ----------------------------------------------------------
def test_per_dataset_hand_computed():
    m = HungarianMetrics(2, protocol="per-dataset")
    m.update(np.array([[1, 1, 0, 0]]), np.array([[0, 0, 1, 1]]))
    m.update(np.array([[1, 1]]), np.array([[0, 1]]))
    # confusion [[0, 3], [2, 1]]: match 0->1, 1->0
    assert m.confusion.tolist() == [[0, 3], [2, 1]]
    assert m.matching().tolist() == [1, 0]
    r = m.compute()
    assert r["tp"] == [3, 2] and r["fp"] == [1, 0] and r["fn"] == [0, 1]
    assert r["pixel_accuracy"] == pytest.approx(5 / 6)
    assert r["iou"] == pytest.approx([3 / 4, 2 / 3])
    assert r["protocol"] == "per-dataset"


def test_per_dataset_differs_from_per_image():
    # the ids swap between images: per image this is perfect, over the dataset not
    pairs = [(np.array([[0, 0, 1, 1]]), np.array([[0, 0, 1, 1]])),
             (np.array([[1, 1, 1, 0]]), np.array([[0, 0, 0, 1]]))]
    per_image = hungarian_metrics(*zip(*pairs), n_classes=2)
    per_dataset = hungarian_metrics(*zip(*pairs), n_classes=2, protocol="per-dataset")
    assert per_image["pixel_accuracy"] == 1.0
    assert per_dataset["pixel_accuracy"] == pytest.approx(4 / 8)


def test_per_dataset_refuses_ids_outside_classes():
    m = HungarianMetrics(2, protocol="per-dataset")
    with pytest.raises(ValueError, match=r"per-dataset.*\[0, 2\).*per-image"):
        m.update(np.array([[0, 2]]), np.array([[0, 1]]))


# -- merging, state ------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["per-image", "per-dataset"])
def test_merge_equals_single_accumulator(protocol):
    rng = np.random.default_rng(1)
    pairs = [(rng.integers(0, 4, (6, 5)), rng.integers(-1, 4, (6, 5))) for _ in range(8)]
    whole = HungarianMetrics(4, protocol)
    a, b = HungarianMetrics(4, protocol), HungarianMetrics(4, protocol)
    for i, (p, g) in enumerate(pairs):
        whole.update(p, g)
        (a if i % 2 else b).update(p, g)
    assert (a + b).compute() == whole.compute()
    assert a.compute() != whole.compute()  # `+` left a alone
    c = a.copy()
    c += b
    assert c.compute() == whole.compute()
    assert a.merge(b) is a and a.compute() == whole.compute()
    restored = HungarianMetrics.from_state_dict(json.loads(json.dumps(whole.state_dict())))
    assert restored.compute() == whole.compute()


def test_merge_incompatible():
    with pytest.raises(ValueError, match="n_classes"):
        HungarianMetrics(3).merge(HungarianMetrics(4))
    with pytest.raises(ValueError, match="protocol"):
        HungarianMetrics(3).merge(HungarianMetrics(3, protocol="per-dataset"))
    with pytest.raises(TypeError):
        HungarianMetrics(3).merge({"tp": [0, 0, 0]})


def test_reset_and_empty_compute():
    m = HungarianMetrics(2)
    m.update(np.array([[0, 1]]), np.array([[0, 1]]))
    m.reset()
    r = m.compute()
    assert r["images"] == 0 and math.isnan(r["pixel_accuracy"]) and math.isnan(r["miou"])


# -- bad inputs ---------------------------------------------------------------------
def test_bad_inputs():
    m = HungarianMetrics(3)
    with pytest.raises(ValueError, match="same shape"):
        m.update(np.zeros((2, 3), int), np.zeros((3, 2), int))
    with pytest.raises(TypeError, match="pred.*integer"):
        m.update(np.zeros((2, 2), np.float32), np.zeros((2, 2), int))
    with pytest.raises(TypeError, match="pred.*NaN"):
        m.update(np.full((2, 2), np.nan), np.zeros((2, 2), int))
    with pytest.raises(TypeError, match="gt"):
        m.update(np.zeros((2, 2), int), np.zeros((2, 2), float))
    with pytest.raises(ValueError, match="pred.*negative"):
        m.update(np.array([[0, -1]]), np.array([[0, 1]]))
    with pytest.raises(ValueError, match="pred is empty"):
        m.update(np.zeros((0, 3), int), np.zeros((0, 3), int))
    with pytest.raises(ValueError, match="pred must be"):
        m.update(np.zeros(4, int), np.zeros(4, int))
    with pytest.raises(TypeError, match="pred"):
        m.update(np.zeros((2, 2), bool), np.zeros((2, 2), int))
    assert m.images == 0  # nothing was counted
    with pytest.raises(ValueError, match="n_classes"):
        HungarianMetrics(0)
    with pytest.raises(TypeError, match="n_classes"):
        HungarianMetrics(2.5)
    with pytest.raises(ValueError, match="protocol"):
        HungarianMetrics(3, protocol="per-pixel")
    with pytest.raises(ValueError, match="same length"):
        hungarian_metrics([np.zeros((1, 1), int)], [], 2)
