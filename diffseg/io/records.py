"""Mask records: a label map as a list of per-segment dicts, COCO style.

::

    records = diffseg.masks_to_records(labels)           # [{id, area, bbox, segmentation}, ...]
    labels2 = diffseg.records_to_labels(records)         # the label map again

A record (one per label value ``>= 0`` present in the map, in increasing order)::

    {"id": 3,                      # the label value
     "area": 1234,                 # pixels
     "bbox": [x, y, w, h],         # COCO XYWH, integers, inclusive pixel extent
     "segmentation": {"size": [h, w], "counts": "..."},
     "score": 0.71}                # only when scores are given

Segmentation encodings (``output_mode=``, the names of SAM's automatic mask generator):

* ``"coco_rle"`` (default): COCO run-length encoding with the counts as
  COCO's compressed ASCII string -- exactly what ``pycocotools.mask.encode``
  produces (there as ``bytes``; here ``str``, so that it goes into JSON; pycocotools
  accepts both).
* ``"uncompressed_rle"``: COCO RLE with ``counts`` a list of ints (what
  ``iscrowd`` annotations in COCO JSON files hold; pycocotools reads it with
  ``frPyObjects``).
* ``"binary_mask"``: the ``(h, w)`` bool mask itself.

RLE details (as pycocotools, implemented here in NumPy, no pycocotools
needed): the mask is read in **column-major (Fortran) order** -- down the
first column, then the second, ... -- and ``counts`` alternates runs of 0 and
1 **starting with 0** (so the first count is 0 when the top-left pixel is in
the mask). The string form stores each count, minus the count two places
before it from the fourth count on (``i > 2``), as a little-endian sequence of
5-bit groups with a continuation bit (0x20), sign taken from bit 0x10 of the
last group, each group + 48 as one ASCII character.
"""
from collections.abc import Mapping

import numpy as np

OUTPUT_MODES = ("coco_rle", "uncompressed_rle", "binary_mask")
"""Segmentation encodings, named as in SAM's automatic mask generator."""


# ---------------------------------------------------------------- RLE
def _runs(flat):
    """Run starts, lengths and values of a 1-D array."""
    n = flat.size
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate(([0], change))
    lengths = np.diff(np.concatenate((starts, [n])))
    return starts, lengths, flat[starts]


def _counts_from_runs(starts, lengths, n):
    """Counts (0-run, 1-run, 0-run, ...) of a mask whose 1-runs are given."""
    if starts.size == 0:
        return np.array([n], dtype=np.int64)
    ends = starts + lengths
    zeros = starts - np.concatenate(([0], ends[:-1]))
    counts = np.empty(2 * starts.size, dtype=np.int64)
    counts[0::2] = zeros
    counts[1::2] = lengths
    tail = n - ends[-1]
    if tail > 0:
        counts = np.append(counts, tail)
    return counts


def mask_to_counts(mask):
    """Uncompressed COCO RLE counts (int64 array) of a 2-D mask."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    flat = mask.astype(bool).ravel(order="F")
    if flat.size == 0:
        return np.zeros(0, dtype=np.int64)
    starts, lengths, values = _runs(flat)
    return _counts_from_runs(starts[values], lengths[values], flat.size)


def counts_to_string(counts):
    """COCO's compressed string of RLE counts (pycocotools ``rleToString``)."""
    x = np.asarray(counts, dtype=np.int64).copy()
    if x.size == 0:
        return ""
    if x.size > 3:
        x[3:] -= np.asarray(counts, dtype=np.int64)[1:-2]
    groups = []
    active = np.ones(x.size, dtype=bool)
    rest = x
    while active.any():
        c = rest & 0x1F
        rest = rest >> 5  # arithmetic shift, as C's on a signed long
        more = np.where(c & 0x10, rest != -1, rest != 0) & active
        groups.append(np.where(active, (c | (more << 5)) + 48, 0))
        active = more
    table = np.stack(groups, axis=1)  # (n, n_groups), 0 = no character
    chars = table[table > 0].astype(np.uint8)  # row-major: count by count
    return chars.tobytes().decode("ascii")


def string_to_counts(s):
    """RLE counts from COCO's compressed string (pycocotools ``rleFrString``)."""
    if isinstance(s, str):
        s = s.encode("ascii")
    c = np.frombuffer(bytes(s), dtype=np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, dtype=np.int64)
    if np.any((c < 0) | (c > 63)):
        raise ValueError("RLE counts string has characters outside '0'..'o'")
    last = (c & 0x20) == 0  # the last group of each number
    if not last[-1]:
        raise ValueError("RLE counts string ends in the middle of a number")
    number = np.concatenate(([0], np.cumsum(last)[:-1]))
    first_of = np.concatenate(([0], np.flatnonzero(last)[:-1] + 1))
    k = np.arange(c.size) - first_of[number]  # group index within its number
    if k.max() > 12:
        raise ValueError("RLE counts string holds a number too large")
    x = np.zeros(int(last.sum()), dtype=np.int64)
    np.add.at(x, number, (c & 0x1F) << (5 * k))
    sign = last & ((c & 0x10) != 0)
    x[number[sign]] |= -(np.int64(1) << (5 * (k[sign] + 1)))
    if x.size > 3:  # counts[m] = x[m] + counts[m - 2] for m > 2
        odd = x[1::2].copy()
        odd[1:] = np.cumsum(odd[1:]) + odd[0]
        even = x[0::2].copy()
        if even.size > 2:
            even[1:] = np.cumsum(even[1:])
        x[1::2], x[0::2] = odd, even
    return x


def encode_rle(mask, compressed=True):
    """COCO RLE dict ``{"size": [h, w], "counts": str or list}`` of a 2-D mask."""
    mask = np.asarray(mask)
    counts = mask_to_counts(mask)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])],
            "counts": counts_to_string(counts) if compressed else [int(v) for v in counts]}


def decode_rle(rle):
    """A COCO RLE dict (compressed ``str``/``bytes`` or uncompressed list counts)
    -> ``(h, w)`` bool mask."""
    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError):
        raise ValueError("RLE must be a dict with 'size': [h, w] and 'counts'") from None
    if isinstance(counts, (str, bytes, bytearray)):
        counts = string_to_counts(counts)
    else:
        counts = np.asarray(counts, dtype=np.int64).ravel()
    if np.any(counts < 0) or counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {int(counts.sum())} for a {h}x{w} mask "
                         f"(or are negative)")
    values = np.arange(counts.size) % 2 == 1
    flat = np.repeat(values, counts)
    return flat.reshape(w, h).T.copy()


# ---------------------------------------------------------------- records
def _score_lookup(scores):
    if scores is None:
        return None
    if isinstance(scores, Mapping):
        return lambda label: scores.get(label, scores.get(str(label)))
    arr = list(scores)
    return lambda label: arr[label] if 0 <= label < len(arr) else None


def masks_to_records(labels, *, scores=None, output_mode="coco_rle"):
    """Label map -> list of mask records, one per label value ``>= 0``.

    Parameters
    ----------
    labels : (H, W) integer array
        Negative values (e.g. ``-1`` outside a crop) belong to no record.
    scores : sequence indexed by label, or mapping ``{label: score}``, optional
        Adds ``"score"`` (a float; ``None`` where not finite) to each record.
    output_mode : ``"coco_rle"`` (COCO string counts), ``"uncompressed_rle"``
        (list counts) or ``"binary_mask"`` (the bool mask as an array).

    Returns
    -------
    list of dicts with ``id``, ``area``, ``bbox`` ([x, y, w, h]),
    ``segmentation`` and optionally ``score``, ordered by id.
    """
    if output_mode not in OUTPUT_MODES:
        raise ValueError(f"output_mode must be one of {', '.join(OUTPUT_MODES)}, got {output_mode!r}")
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise TypeError(f"labels must be an integer array, got dtype {labels.dtype}")
    labels = labels.astype(np.int64, copy=False)
    h, w = labels.shape
    score_of = _score_lookup(scores)

    # One pass over the column-major runs for all labels at once.
    flat = labels.ravel(order="F")
    if flat.size == 0:
        return []
    starts, lengths, values = _runs(flat)
    keep = values >= 0
    starts, lengths, values = starts[keep], lengths[keep], values[keep]
    order = np.argsort(values, kind="stable")
    starts, lengths, values = starts[order], lengths[order], values[order]
    ids, first = np.unique(values, return_index=True)
    bounds = np.append(first, values.size)

    records = []
    for n, label in enumerate(ids.tolist()):
        s, ln = starts[bounds[n]:bounds[n + 1]], lengths[bounds[n]:bounds[n + 1]]
        ends = s + ln - 1  # inclusive; a run may go on into the next column(s)
        col0, col1 = s // h, ends // h
        spans = col1 > col0  # then it covers the last row of col0 and the first of col1
        x0, x1 = int(col0.min()), int(col1.max())
        y0 = int(np.where(spans, 0, s % h).min())
        y1 = int(np.where(spans, h - 1, ends % h).max())
        record = {"id": int(label), "area": int(ln.sum()),
                  "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1]}
        if output_mode == "binary_mask":
            record["segmentation"] = labels == label
        else:
            counts = _counts_from_runs(s, ln, flat.size)
            record["segmentation"] = {
                "size": [h, w],
                "counts": counts_to_string(counts) if output_mode == "coco_rle" else [int(v) for v in counts],
            }
        if score_of is not None:
            value = score_of(label)
            value = None if value is None else float(value)
            record["score"] = value if value is not None and np.isfinite(value) else None
        records.append(record)
    return records


def _record_mask(record, index):
    seg = record.get("segmentation") if isinstance(record, Mapping) else None
    if seg is None:
        raise ValueError(f"records[{index}] has no 'segmentation'")
    if isinstance(seg, Mapping):
        return decode_rle(seg)
    if isinstance(seg, (list, tuple)) and seg and isinstance(seg[0], (int, float)):
        raise ValueError(f"records[{index}]: polygon segmentations are not supported")
    mask = np.asarray(seg)
    if mask.ndim != 2:
        raise ValueError(f"records[{index}]: a binary segmentation must be 2-D, got shape {mask.shape}")
    return mask.astype(bool)


def records_to_labels(records, shape=None, *, fill=-1, dtype=np.int32):
    """Mask records -> ``(H, W)`` label map (``record["id"]`` on its mask).

    ``shape`` defaults to the size of the first record's segmentation (needed
    when ``records`` is empty). Pixels in no mask get ``fill``; where masks
    overlap, the later record wins.
    """
    records = list(records)
    masks = [_record_mask(r, i) for i, r in enumerate(records)]
    if shape is None:
        if not masks:
            raise ValueError("records is empty: pass shape=(H, W)")
        shape = masks[0].shape
    shape = tuple(int(v) for v in shape)
    out = np.full(shape, fill, dtype=dtype)
    for i, (record, mask) in enumerate(zip(records, masks)):
        if mask.shape != shape:
            raise ValueError(f"records[{i}] has a {mask.shape} mask, expected {shape}")
        if "id" not in record:
            raise ValueError(f"records[{i}] has no 'id'")
        out[mask] = record["id"]
    return out
