"""Hungarian-matched pixel accuracy and mIoU for unsupervised segmentation.

Two protocols:

``"per-image"`` (DiffSeg, DiffCut; the default)
    For every image, a ``n_classes x max(n_classes, K)`` confusion matrix
    (rows: ground-truth classes, columns: predicted segment ids, ``K =
    pred.max() + 1`` over the whole image) is matched with
    ``scipy.optimize.linear_sum_assignment(maximize=True)``: each class gets at
    most one segment. Per class, TP is the matched entry, FP the rest of the
    matched segment's column and FN the rest of the class's row (pixels of
    unmatched segments therefore count only as FN). TP, FP and FN are summed
    over the dataset. This is google/diffseg ``diffseg/utils.py``
    (``hungarian_matching``), which adapts PiCIE's ``_fast_hist``.

``"per-dataset"`` and ``"stego"`` (PiCIE, STEGO)
    One ``n_classes x n_classes`` confusion matrix summed over the dataset and
    one matching at :meth:`HungarianMetrics.compute`. Predictions must be
    dataset-wide cluster ids in ``[0, n_classes)``; DiffSeg's segment ids are
    per image (segment 3 of one image has nothing to do with segment 3 of the
    next), so this protocol does not apply to raw DiffSeg output. ``"stego"``
    is the same matching on STEGO's evaluation frame (320 px, nearest-neighbour
    resize of the short side, centre crop: the datasets' ``preprocessing="stego"``),
    the frame of the PiCIE/STEGO-family tables; ``"per-dataset"`` keeps
    DiffSeg's frame.

All: ground-truth values outside ``[0, n_classes)`` (``-1``, ``255``, ...) and
the value ``ignore_index`` are ignored. Pixel accuracy = sum(TP) / valid pixels;
IoU = TP / (TP + FP + FN) per class (NaN for a class that never occurs and is
never predicted); mIoU = nanmean(IoU).
"""
import numbers

import numpy as np

PROTOCOLS = ("per-image", "per-dataset", "stego")
DATASET_WIDE = ("per-dataset", "stego")
"""Protocols with one matching over the dataset."""

# Above this many confusion-matrix entries, segment ids are compacted
# (np.unique) before matching instead of allocating n_classes x (max id + 1).
_MAX_HIST_ENTRIES = 1 << 24


def _as_label_map(x, name):
    arr = np.asarray(x)
    if arr.dtype == object or arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        hint = " (NaN in a prediction?)" if np.issubdtype(arr.dtype, np.floating) and np.isnan(arr).any() else ""
        raise TypeError(
            f"{name} must be an integer label map, got dtype {arr.dtype}{hint}; "
            f"convert with .astype(np.int64) if the values are whole numbers"
        )
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    return arr


def _nanmean(x):
    x = np.asarray(x, dtype=np.float64)
    ok = ~np.isnan(x)
    return float(x[ok].mean()) if ok.any() else float("nan")


def _check_protocol(protocol):
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return protocol


class HungarianMetrics:
    """Accumulates Hungarian-matched segmentation metrics over a dataset.

    Parameters
    ----------
    n_classes : int
        Number of ground-truth classes (27 for COCO-Stuff-27 and Cityscapes).
    protocol : ``"per-image"`` (default) or ``"per-dataset"``
        See the module docstring.
    ignore_index : int
        A ground-truth value that is ignored. Any value outside
        ``[0, n_classes)`` is ignored anyway; an ``ignore_index`` inside that
        range removes that class (its IoU becomes NaN).

    Usage::

        m = HungarianMetrics(27)
        for pred, gt in pairs:
            m.update(pred, gt)          # (H, W) integer maps, same shape
        m.compute()["miou"]

    Accumulators merge: ``a.merge(b)``, ``a += b`` or ``a + b`` (e.g. one per
    worker). :meth:`state_dict` / :meth:`from_state_dict` give a JSON-able
    snapshot (used to resume an interrupted evaluation).
    """

    def __init__(self, n_classes, protocol="per-image", ignore_index=-1):
        if isinstance(n_classes, bool) or not isinstance(n_classes, numbers.Integral):
            raise TypeError(f"n_classes must be an integer, got {type(n_classes).__name__}")
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be an integer, got {type(ignore_index).__name__}")
        self.n_classes = int(n_classes)
        self.protocol = _check_protocol(protocol)
        self.ignore_index = int(ignore_index)
        self.reset()

    # -- state -------------------------------------------------------------
    def reset(self):
        n = self.n_classes
        self.tp = np.zeros(n, np.int64)   # per-image protocol
        self.fp = np.zeros(n, np.int64)
        self.fn = np.zeros(n, np.int64)
        self.confusion = np.zeros((n, n), np.int64)  # per-dataset protocol
        self.valid_pixels = 0
        self.images = 0

    def _compatible(self, other):
        if not isinstance(other, HungarianMetrics):
            raise TypeError(f"other must be a HungarianMetrics, got {type(other).__name__}")
        mine = (self.n_classes, self.protocol, self.ignore_index)
        theirs = (other.n_classes, other.protocol, other.ignore_index)
        if mine != theirs:
            raise ValueError(
                "cannot merge metrics with different (n_classes, protocol, ignore_index): "
                f"{mine} vs {theirs}"
            )

    def merge(self, other):
        """Add ``other``'s counts to this accumulator (in place); returns self."""
        self._compatible(other)
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.confusion += other.confusion
        self.valid_pixels += other.valid_pixels
        self.images += other.images
        return self

    def __iadd__(self, other):
        return self.merge(other)

    def __add__(self, other):
        return self.copy().merge(other)

    def copy(self):
        new = HungarianMetrics(self.n_classes, self.protocol, self.ignore_index)
        return new.merge(self)

    def state_dict(self):
        """JSON-able snapshot of the accumulated counts."""
        state = {
            "n_classes": self.n_classes,
            "protocol": self.protocol,
            "ignore_index": self.ignore_index,
            "valid_pixels": int(self.valid_pixels),
            "images": int(self.images),
        }
        if self.protocol == "per-image":
            state.update(tp=self.tp.tolist(), fp=self.fp.tolist(), fn=self.fn.tolist())
        else:
            state["confusion"] = self.confusion.tolist()
        return state

    @classmethod
    def from_state_dict(cls, state):
        m = cls(state["n_classes"], state["protocol"], state["ignore_index"])
        m.valid_pixels = int(state["valid_pixels"])
        m.images = int(state["images"])
        n = m.n_classes
        if m.protocol == "per-image":
            for key in ("tp", "fp", "fn"):
                arr = np.asarray(state[key], dtype=np.int64)
                if arr.shape != (n,):
                    raise ValueError(f"state[{key!r}] must have {n} entries, got shape {arr.shape}")
                setattr(m, key, arr)
        else:
            arr = np.asarray(state["confusion"], dtype=np.int64)
            if arr.shape != (n, n):
                raise ValueError(f"state['confusion'] must be ({n}, {n}), got shape {arr.shape}")
            m.confusion = arr
        return m

    def __repr__(self):
        return (f"HungarianMetrics(n_classes={self.n_classes}, protocol={self.protocol!r}, "
                f"images={self.images})")

    # -- accumulation ------------------------------------------------------
    def _valid(self, pred, gt):
        pred = _as_label_map(pred, "pred")
        gt = _as_label_map(gt, "gt")
        if pred.shape != gt.shape:
            raise ValueError(f"pred and gt must have the same shape, got {pred.shape} and {gt.shape}")
        if pred.ndim not in (2, 3):
            raise ValueError(f"pred must be (H, W) or a batch (B, H, W), got shape {pred.shape}")
        if pred.min() < 0:
            raise ValueError(f"pred has negative ids (min {pred.min()}); segment ids must be >= 0")
        return pred, gt

    def _mask(self, gt):
        mask = (gt >= 0) & (gt < self.n_classes)
        if 0 <= self.ignore_index < self.n_classes:
            mask &= gt != self.ignore_index
        return mask

    def update(self, pred, gt):
        """Add one image (``(H, W)``) or a batch (``(B, H, W)``, each image
        matched on its own in the per-image protocol).

        ``pred``: integer segment ids >= 0. ``gt``: integer classes; values
        outside ``[0, n_classes)`` and ``ignore_index`` are ignored.
        """
        pred, gt = self._valid(pred, gt)
        if pred.ndim == 3:
            for p, g in zip(pred, gt):
                self._update_one(p, g)
        else:
            self._update_one(pred, gt)
        return self

    def _update_one(self, pred, gt):
        n = self.n_classes
        mask = self._mask(gt)
        g = gt[mask].astype(np.int64)
        p = pred[mask].astype(np.int64)
        if self.protocol in DATASET_WIDE:
            top = int(pred.max())
            if top >= n:
                raise ValueError(
                    f"pred has segment id {top} but protocol={self.protocol!r} needs dataset-wide "
                    f"class ids in [0, {n}) (n_classes={n}); per-image segment ids, as DiffSeg "
                    f"produces, need protocol='per-image'"
                )
            self.confusion += np.bincount(n * g + p, minlength=n * n).reshape(n, n)
        else:
            hist = self._image_hist(pred, g, p)
            tp, fp, fn = _match_counts(hist)
            self.tp += tp
            self.fp += fp
            self.fn += fn
        self.valid_pixels += int(g.size)
        self.images += 1

    def _image_hist(self, pred, g, p):
        n = self.n_classes
        width = max(n, int(pred.max()) + 1)  # as the official code: max over the whole image
        if n * width > _MAX_HIST_ENTRIES:
            # Huge ids: compact them (order kept). Only empty columns go, which
            # changes nothing but the tie-breaking among equally good matchings.
            _, p = np.unique(p, return_inverse=True)
            width = max(n, int(p.max()) + 1 if p.size else 0)
        return np.bincount(width * g + p, minlength=n * width).reshape(n, width)

    # -- results -----------------------------------------------------------
    def counts(self):
        """``(tp, fp, fn)`` per class as int64 arrays (per-dataset: from the
        matching of the summed confusion matrix)."""
        if self.protocol == "per-image":
            return self.tp.copy(), self.fp.copy(), self.fn.copy()
        return _match_counts(self.confusion)

    def matching(self):
        """Dataset-wide protocols: ``assignment[c]`` = predicted id matched to class ``c``."""
        if self.protocol not in DATASET_WIDE:
            raise ValueError("matching() is only defined for the dataset-wide protocols ('per-dataset', 'stego')")
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(self.confusion, maximize=True)
        out = np.full(self.n_classes, -1, np.int64)
        out[rows] = cols
        return out

    def compute(self):
        """Metrics so far -> dict.

        ``pixel_accuracy`` and ``miou`` are fractions in [0, 1] (NaN before
        any valid pixel); ``iou`` is a list with one value per class (NaN for
        a class with TP + FP + FN = 0, left out of the mean); ``tp``, ``fp``,
        ``fn`` are per-class pixel counts; ``images`` and ``valid_pixels``
        count what was seen.
        """
        tp, fp, fn = self.counts()
        denom = tp + fp + fn
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)
        acc = tp.sum() / self.valid_pixels if self.valid_pixels else float("nan")
        return {
            "protocol": self.protocol,
            "n_classes": self.n_classes,
            "pixel_accuracy": float(acc),
            "miou": _nanmean(iou),
            "iou": [float(v) for v in iou],
            "tp": tp.tolist(),
            "fp": fp.tolist(),
            "fn": fn.tolist(),
            "images": int(self.images),
            "valid_pixels": int(self.valid_pixels),
        }


def _match_counts(hist):
    """Hungarian matching of a ``(n, m)`` confusion matrix (``m >= n``) ->
    per-class ``(tp, fp, fn)``, as google/diffseg ``hungarian_matching``."""
    from scipy.optimize import linear_sum_assignment

    n = hist.shape[0]
    rows, cols = linear_sum_assignment(hist, maximize=True)
    tp = np.zeros(n, np.int64)
    fp = np.zeros(n, np.int64)
    tp[rows] = hist[rows, cols]
    fp[rows] = hist[:, cols].sum(axis=0) - tp[rows]
    fn = hist.sum(axis=1) - tp
    return tp, fp, fn


def hungarian_metrics(preds, gts, n_classes, protocol="per-image", ignore_index=-1):
    """One-shot helper: metrics for paired sequences of label maps."""
    preds, gts = list(preds), list(gts)
    if len(preds) != len(gts):
        raise ValueError(f"preds and gts must have the same length, got {len(preds)} and {len(gts)}")
    m = HungarianMetrics(n_classes, protocol=protocol, ignore_index=ignore_index)
    for p, g in zip(preds, gts):
        m.update(p, g)
    return m.compute()


def match_labels(pred, truth):
    """``pred`` relabelled with the ids of the ``truth`` segments they match
    (Hungarian matching on shared pixels), so matched segments share an id
    (and a colour in figures); unmatched predicted segments get the ids after
    ``truth.max()``. Negative truth pixels are ignored. Both ``(H, W)`` ints >= 0
    for ``pred``."""
    from scipy.optimize import linear_sum_assignment

    pred = _as_label_map(pred, "pred").astype(np.int64)
    truth = _as_label_map(truth, "truth").astype(np.int64)
    if pred.shape != truth.shape:
        raise ValueError(f"pred and truth must have the same shape, got {pred.shape} and {truth.shape}")
    if pred.min() < 0:
        raise ValueError(f"pred: labels must be >= 0, got {pred.min()}")
    ids, index = np.unique(pred, return_inverse=True)  # the segments present
    index = index.reshape(pred.shape)
    n_truth = max(int(truth.max()) + 1, 0)
    valid = truth >= 0
    hist = np.bincount(index[valid] * n_truth + truth[valid],
                       minlength=ids.size * n_truth).reshape(ids.size, n_truth)
    rows, cols = linear_sum_assignment(hist, maximize=True)
    mapping = np.full(ids.size, -1, np.int64)
    mapping[rows] = cols
    unmatched = np.flatnonzero(mapping < 0)
    mapping[unmatched] = n_truth + np.arange(unmatched.size)
    return mapping[index]
