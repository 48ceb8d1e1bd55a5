"""Benchmark evaluation: segment a dataset, score it with Hungarian matching.

Per image, the attention maps come from precomputed ``<attention_dir>/<id>.npz``
files (:func:`diffseg.save_attention`, ``diffseg attention``) or from a model
(``model.attention(image)``, one UNet pass); they are aggregated once, then
merged and labelled once per :class:`diffseg.Settings`, so several settings
(other thresholds, grids, refinement) cost one attention computation. Labels are predicted at the label map's size (512 after
the standard preprocessing).

With ``output_dir``, the accumulated counts are saved after every image
(``state.json``); running again with the same settings skips the images already
done and ends with the same numbers. ``results.json`` and ``results.md`` are
written at the end.
"""
import contextlib
import json
import math
import numbers
import os
import time
import warnings
from pathlib import Path

import numpy as np

from .._util import atomic_write, progress_bar
from ..batch import pipelined
from ..core import aggregate, run_stages
from ..settings import Settings, resolve_settings
from .metrics import DATASET_WIDE, HungarianMetrics, _check_protocol

STATE_VERSION = 3  # 2: attention source and per-file identities; 3: whole settings records
STATE_FILE = "state.json"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


# -- settings -----------------------------------------------------------------
SHARED_FIELDS = ("timestep", "weights", "frame")
"""Fields every setting of one evaluation shares: they determine the attention
and its aggregation, computed once per image."""
VARYING_FIELDS = ("kl_threshold", "iterations", "grid", "refine")
"""Fields in which the settings of one evaluation may differ."""


def dataset_settings(dataset):
    """The published settings for ``dataset``: its threshold (1.1
    COCO-Stuff-27, 0.9 Cityscapes) on the centre crop."""
    return Settings(kl_threshold=getattr(dataset, "kl_threshold", None) or 1.1, frame="crop")


def evaluation_settings(settings=None, dataset=None, **overrides):
    """The list of :class:`Settings` one evaluation scores.

    ``settings``: a :class:`Settings`, a list of them, or None (the dataset's
    published settings, :func:`dataset_settings`). ``overrides`` apply to
    each; ``kl_threshold`` may be a **list** of thresholds (each a number or a
    per-iteration sequence), which gives one setting per threshold. The
    settings must share :data:`SHARED_FIELDS`, use the centre crop (the
    published protocol) and not name segments.
    """
    if isinstance(settings, (list, tuple)):
        if not settings:
            raise ValueError("settings: empty list")
        base = list(settings)
    else:
        base = [dataset_settings(dataset) if settings is None else settings]
    thresholds = overrides.pop("kl_threshold", None)
    if isinstance(thresholds, list):
        if len(base) > 1:
            raise ValueError("give several settings or a list of kl_threshold values, not both")
        if not thresholds:
            raise ValueError("kl_threshold: empty list of thresholds")
        result = [resolve_settings(base[0], kl_threshold=t, **overrides) for t in thresholds]
    else:
        more = {} if thresholds is None else {"kl_threshold": thresholds}
        result = [resolve_settings(s, **more, **overrides) for s in base]
    first = result[0]
    for s in result:
        if s.frame != "crop":
            raise ValueError("settings: frame='whole' -- evaluation follows the published protocol on the centre "
                             "crop: use Settings(frame='crop', ...) or Settings.preset('coco-stuff-27')")
        if s.names_segments:
            raise ValueError("settings: evaluation does not name segments; leave vocabulary and prompt unset")
        differ = [f for f in SHARED_FIELDS if getattr(s, f) != getattr(first, f)]
        if differ:
            raise ValueError(f"settings: the settings of one evaluation share one attention pass per image, so "
                             f"they must have the same {', '.join(differ)}")
    if len(set(result)) != len(result):
        raise ValueError("settings: a setting is given twice")
    return result


def setting_label(setting, others=()):
    """A short name of ``setting``: its threshold (``"1.1"``, or
    ``"0.9,1,1.1"`` per iteration), with the fields in which it differs from
    ``others`` (``"1.1 grid 8 refine"``)."""
    fmt = lambda t: f"{t:g}"  # noqa: E731
    kl = setting.kl_threshold
    parts = [fmt(kl[0]) if len(set(kl)) == 1 else ",".join(fmt(t) for t in kl)]
    if any(o.iterations != setting.iterations for o in others) or setting.iterations != 3:
        parts.append(f"x{setting.iterations}")
    if any(o.grid != setting.grid for o in others):
        parts.append(f"grid {setting.grid}")
    if any(o.refine != setting.refine for o in others):
        parts.append("refine" if setting.refine else "no refine")
    return " ".join(parts)


# -- helpers ----------------------------------------------------------------
def _json_clean(x):
    """NaN/inf -> None, NumPy scalars -> Python (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): _json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_clean(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    return x


def _write_json(path, data):
    with atomic_write(path) as f:  # an interruption never leaves a half-written file
        json.dump(_json_clean(data), f, indent=1, allow_nan=False)
        f.write("\n")


def _item_parts(item):
    """Sample, or an ``(id, image, label)`` tuple -> (id, label, image getter, image path, label path)."""
    if hasattr(item, "id") and hasattr(item, "label"):
        return (str(item.id), item.label, lambda: item.image, getattr(item, "image_path", None),
                getattr(item, "label_path", None))
    try:
        sample_id, image, label = item
    except (TypeError, ValueError):
        raise TypeError("dataset items must be Samples or (id, image, label) tuples") from None
    return str(sample_id), label, lambda: image, None, None


def _describe(dataset, n_classes):
    if hasattr(dataset, "describe"):
        info = dict(dataset.describe())
    else:
        info = {"name": type(dataset).__name__, "images": len(dataset)}
    info["n_classes"] = n_classes
    return info


# -- evaluation ---------------------------------------------------------------
def segmentation_protocol(protocol):
    """``protocol`` for scoring DiffSeg's own segments: per image only."""
    protocol = _check_protocol(protocol)
    if protocol in DATASET_WIDE:
        raise ValueError(f"protocol={protocol!r} matches dataset-wide class ids once over the dataset; DiffSeg "
                         "numbers its segments per image, so its output is scored per image (protocol='per-image'). "
                         "Label maps with dataset-wide ids (e.g. of a STEGO-family method) are scored with "
                         "score_predictions / `diffseg eval --predictions-dir`")
    return protocol


def evaluate(dataset, model=None, settings=None, *, attention_dir=None, limit=None, protocol="per-image",
             n_classes=None, class_names=None, ignore_index=-1, output_dir=None, resume=True, progress=True,
             workers=None, **overrides):
    """Segment every image of ``dataset`` and score it.

    Parameters
    ----------
    dataset : a :mod:`diffseg.evaluation.datasets` dataset, or a sequence of
        ``(id, image, label)`` (image may be None with ``attention_dir``).
    model : object with ``.attention(image, timestep) -> {res: array}``, or a
        bundle path for :func:`diffseg.load_model`; optional with ``attention_dir``.
    settings : :class:`diffseg.Settings`, or a list of them
        Several settings are scored from one attention computation per image;
        they may differ in ``kl_threshold``, ``iterations``, ``grid`` and
        ``refine``. Default: the dataset's published settings (threshold 1.1
        COCO-Stuff, 0.9 Cityscapes; centre crop). The frame must be
        ``"crop"`` (the published protocol). ``**overrides`` apply to each;
        ``kl_threshold=[0.9, 1.0, 1.1]`` (a list) gives one setting per value.
    attention_dir : directory of ``<id>.npz`` attention files. Without a
        model every file must exist; with a model, missing ones are computed
        and saved there (a cache).
    limit : evaluate only the first ``limit`` images.
    protocol : ``"per-image"`` (DiffSeg's: one Hungarian matching per image).
        The dataset-wide protocols (``"per-dataset"``, ``"stego"``) need
        dataset-wide class ids, which DiffSeg's per-image segments are not:
        score such predictions with :func:`score_predictions`.
    n_classes, class_names : default from the dataset.
    output_dir : where ``state.json``, ``results.json`` and ``results.md`` go.
        Needed to resume.
    resume : continue the run saved in ``output_dir`` (same settings); False
        starts over.
    progress : show a tqdm progress bar.
    workers : C-core threads of each post-processing call (see :func:`diffseg.merge`).

    Returns
    -------
    dict with ``dataset``, ``protocol``, ``settings`` (one entry per setting:
    ``settings`` (its :meth:`Settings.to_dict`), ``label``,
    ``pixel_accuracy``, ``miou``, ``iou`` and counts, ``seconds_per_image``)
    and timing.
    """
    from ..core import _workers_arg

    protocol = segmentation_protocol(protocol)
    settings = evaluation_settings(settings, dataset, **overrides)
    _workers_arg(workers)
    if n_classes is None:
        n_classes = getattr(dataset, "n_classes", None)
        if n_classes is None:
            raise ValueError("n_classes: the dataset does not say; pass n_classes=")
    if class_names is None:
        class_names = tuple(getattr(dataset, "class_names", ()) or ())
    class_names = [str(c) for c in class_names]
    if len(class_names) != n_classes:
        class_names = [str(i) for i in range(n_classes)]
    total = len(dataset)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1:
            raise ValueError(f"limit must be a positive integer, got {limit!r}")
        total = min(total, int(limit))
    if total == 0:
        raise ValueError("dataset is empty")

    if isinstance(model, (str, os.PathLike)):
        from ..pipeline import resolve_model  # lazy: torch

        model = resolve_model(model)
    if model is not None and not callable(getattr(model, "attention", None)):
        raise TypeError(f"model must have an .attention(image, timestep) method, got {type(model).__name__}")
    if attention_dir is not None:
        attention_dir = Path(attention_dir)
        if model is None and not attention_dir.is_dir():
            raise FileNotFoundError(f"attention_dir: no such directory: {attention_dir}")
    elif model is None:
        raise ValueError("give a model or attention_dir (precomputed attention)")
    if model is not None and hasattr(dataset, "check_sizes"):
        dataset.check_sizes(total)  # before any work: a label that does not fit its image
    if model is not None and attention_dir is not None:
        _claim_cache(attention_dir, _model_identity(model))

    ids = getattr(dataset, "ids", None)
    ids = [str(i) for i in ids[:total]] if ids is not None else None
    if model is None and ids is not None:
        missing = [attention_dir / f"{i}.npz" for i in ids if not (attention_dir / f"{i}.npz").is_file()]
        if missing:
            from .datasets import _missing_error

            raise _missing_error("attention files", missing, total,
                                 "(one <id>.npz per image, from diffseg.save_attention / "
                                 "`diffseg attention`; or pass a model)")

    described = _describe(dataset, n_classes)
    source = _attention_source(model, attention_dir)
    config = {  # everything that determines the numbers: a saved run resumes only if all match
        "dataset": {k: v for k, v in described.items() if k != "images"},
        "attention": {"dir": None if attention_dir is None else str(attention_dir.resolve()),
                      "model": None if model is None else _model_identity(model)},
        "protocol": protocol,
        "ignore_index": int(ignore_index),
        "settings": [s.to_dict() for s in settings],
    }

    metrics = [HungarianMetrics(n_classes, protocol, ignore_index) for _ in settings]
    done = []
    files = {}  # id -> identity of the attention file it was scored from
    seconds = {"attention": 0.0, "total": 0.0, "segment": [0.0] * len(settings)}
    state_path = None
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        state_path = output_dir / STATE_FILE
        if resume and state_path.is_file():
            done, metrics, seconds, files = _load_state(state_path, config, metrics)
            _check_attention_files(state_path, files, attention_dir, model is not None)

    done_set = set(done)
    todo = [index for index in range(total) if ids is None or ids[index] not in done_set]
    produced = set(done_set)  # the producer's view: ids read so far (a repeated id is scored once)
    source_of = AttentionSource(model, attention_dir, dataset, settings[0].timestep)

    def load(index):
        """Read one item and its attention; runs one image ahead of the scoring, in a thread."""
        t_start = time.perf_counter()
        sample_id, label, get_image, image_path, label_path = _item_parts(dataset[index])
        if sample_id in produced:
            return None
        produced.add(sample_id)
        label = np.asarray(label)
        if label.ndim != 2:
            raise ValueError(f"label of {sample_id!r} must be (H, W), got shape {label.shape}")
        attn, identity = source_of.get(sample_id, get_image, image_path, label_path)
        return sample_id, label, attn, identity, time.perf_counter() - t_start

    bar = progress_bar(total=total, initial=total - len(todo), disable=not progress, unit="img",
               desc=f"eval {config['dataset'].get('name', '')}".strip(), dynamic_ncols=True)
    try:
        # The attention of the next image (a UNet pass, or a file read) overlaps the scoring of this one.
        with contextlib.closing(pipelined(todo, load, max_pending=1)) as loaded:
            t_last = time.perf_counter()
            for _, item in loaded:
                if item is None:
                    continue
                sample_id, label, attn, files[sample_id], t_load = item
                t0 = time.perf_counter()
                A = aggregate(attn, weights=settings[0].weights_for(list(attn)), workers=workers)
                seconds["attention"] += t_load + time.perf_counter() - t0
                for k, setting in enumerate(settings):
                    t0 = time.perf_counter()
                    metrics[k].update(score_labels(A, setting, label.shape, workers), label)
                    seconds["segment"][k] += time.perf_counter() - t0
                now = time.perf_counter()
                seconds["total"] += now - t_last  # wall time per image: overlapped stages count once
                t_last = now
                done.append(sample_id)
                done_set.add(sample_id)
                if state_path is not None:
                    _save_state(state_path, config, done, metrics, seconds, files)
                bar.update(1)
                if progress:
                    first = metrics[0].compute()
                    bar.set_postfix(acc=f"{100 * first['pixel_accuracy']:.1f}",
                                    miou=f"{100 * first['miou']:.1f}", refresh=False)
    finally:
        bar.close()

    if source_of.unrecorded:
        warnings.warn(f"{source_of.unrecorded} attention file(s) in {attention_dir} record nothing about how they "
                      "were made (an older diffseg): they could not be checked against the dataset images",
                      RuntimeWarning, stacklevel=2)
    results = _results(config, settings, metrics, seconds, len(done), class_names, source)
    results["dataset"] = _json_clean({**described, "evaluated": len(done)})
    if output_dir is not None:
        write_results(output_dir, results)
    return results


def score_predictions(dataset, predictions_dir, *, protocol="per-image", limit=None, n_classes=None,
                      ignore_index=-1, output_dir=None, progress=True):
    """Score label maps that exist as files: ``<predictions_dir>/<id>.png``
    per image (``diffseg segment --frame crop`` writes ``<id>.labels.png``,
    also read), with any protocol.

    A prediction is at the size of the dataset's label after its
    preprocessing, or at the image's own size (in its stored orientation),
    in which case it gets the label's preprocessing (centre crop and
    nearest resize; STEGO's with ``preprocessing="stego"``). ``protocol``:
    ``"per-image"``, or a dataset-wide one for dataset-wide class ids:
    ``"stego"`` needs a dataset opened with ``preprocessing="stego"`` (the
    PiCIE/STEGO tables' frame), ``"per-dataset"`` one with DiffSeg's. Returns
    the results dict of :func:`evaluate`, one row.
    """
    from .datasets import read_label_png

    protocol = _check_protocol(protocol)
    preprocessing = getattr(dataset, "preprocessing", "crop")
    if (protocol == "stego") != (preprocessing == "stego"):
        raise ValueError(f"protocol={protocol!r} with a dataset in the {preprocessing!r} preprocessing: STEGO's "
                         "protocol is scored on STEGO's frame (open the dataset with preprocessing='stego', "
                         "size=320; `diffseg eval --protocol stego`), the others on DiffSeg's")
    predictions_dir = Path(predictions_dir)
    if not predictions_dir.is_dir():
        raise FileNotFoundError(f"predictions_dir: no such directory: {predictions_dir}")
    n_classes = n_classes if n_classes is not None else getattr(dataset, "n_classes", None)
    if n_classes is None:
        raise ValueError("n_classes: the dataset does not say; pass n_classes=")
    total = len(dataset) if limit is None else min(len(dataset), int(limit))
    paths = []
    for sample_id in [str(i) for i in getattr(dataset, "ids", range(total))][:total]:
        found = [predictions_dir / f"{sample_id}{suffix}" for suffix in (".png", ".labels.png")]
        found = [p for p in found if p.is_file()]
        if not found:
            raise FileNotFoundError(f"predictions_dir: no {sample_id}.png (or {sample_id}.labels.png) in "
                                    f"{predictions_dir}")
        paths.append(found[0])
    metric = HungarianMetrics(n_classes, protocol, ignore_index)
    t0 = time.perf_counter()
    bar = progress_bar(total=total, disable=not progress, unit="img", desc="score", dynamic_ncols=True)
    try:
        for index, path in enumerate(paths):
            sample = dataset[index]
            label = np.asarray(sample.label)
            raw = _image_shape(getattr(sample, "label_path", None))
            metric.update(_prediction_in_frame(read_label_png(path), label, raw, dataset, path), label)
            bar.update(1)
    finally:
        bar.close()
    class_names = [str(c) for c in (getattr(dataset, "class_names", ()) or ())]
    if len(class_names) != n_classes:
        class_names = [str(i) for i in range(n_classes)]
    described = _describe(dataset, n_classes)
    r = metric.compute()
    per = max(len(paths), 1)
    row = {"settings": None, "label": f"predictions in {predictions_dir}", "pixel_accuracy": r["pixel_accuracy"],
           "miou": r["miou"], "iou": dict(zip(class_names, r["iou"])), "tp": r["tp"], "fp": r["fp"], "fn": r["fn"],
           "images": r["images"], "valid_pixels": r["valid_pixels"],
           "seconds_per_image": (time.perf_counter() - t0) / per}
    results = {"dataset": _json_clean({**described, "evaluated": len(paths)}), "protocol": protocol,
               "ignore_index": int(ignore_index), "attention": {"predictions_dir": str(predictions_dir.resolve())},
               "class_names": class_names, "images": len(paths), "seconds_per_image": row["seconds_per_image"],
               "attention_seconds_per_image": 0.0, "settings": [row]}
    if output_dir is not None:
        write_results(output_dir, results)
    return results


def _image_shape(path):
    """``(height, width)`` of an image file from its header; None without a file."""
    if path is None:
        return None
    from PIL import Image

    with Image.open(path) as im:
        return im.size[1], im.size[0]


def _prediction_in_frame(pred, label, raw_shape, dataset, path):
    """A prediction at the evaluated label's size, or at the image's own
    (``raw_shape``): the latter gets the label's preprocessing."""
    from ..io.images import preprocess_labels, stego_resize_crop

    pred = np.asarray(pred).astype(np.int64)
    if pred.shape == label.shape:
        return pred
    if pred.shape != raw_shape:
        raise ValueError(f"{path}: a {pred.shape[1]}x{pred.shape[0]} prediction fits neither the evaluated label "
                         f"({label.shape[1]}x{label.shape[0]}) nor its image"
                         + ("" if raw_shape is None else f" ({raw_shape[1]}x{raw_shape[0]})"))
    size = getattr(dataset, "size", None)
    if getattr(dataset, "preprocessing", "crop") == "stego":
        framed = stego_resize_crop(pred, size)
    elif size is None:
        from ..io.images import center_crop

        framed = center_crop(pred)
    else:
        framed = preprocess_labels(pred, size)
    return framed


def score_labels(A, setting, size, workers=None):
    """The labels that ``setting`` gives on aggregated attention ``A``, at the label map's ``size``."""
    return run_stages(A=A, settings=setting, size=size, workers=workers)["labels"]


def write_results(output_dir, results):
    """``results.json`` and ``results.md`` in ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_json(output_dir / RESULTS_JSON, results)
    with atomic_write(output_dir / RESULTS_MD) as f:
        f.write(markdown_table(results))


def _attention_source(model, attention_dir):
    """What the attention came from, for the results: the bundle (path and
    metadata) or the attention folder."""
    source = {"attention_dir": None if attention_dir is None else str(Path(attention_dir).resolve())}
    if model is not None:
        source["model"] = _model_identity(model)
        metadata = getattr(model, "metadata", None)
        if isinstance(metadata, dict):
            source["bundle_metadata"] = {k: metadata.get(k) for k in BUNDLE_FIELDS if k in metadata}
    return source


BUNDLE_FIELDS = ("model_id", "sd_version", "torch_version", "dtype", "device", "image_size", "created",
                 "format_version", "layers")
"""Bundle metadata recorded with evaluation results."""


def describe_source(source):
    """One line for a report: ``bundle PATH (model id, dtype)``, the attention folder, or the predictions."""
    if source.get("predictions_dir"):
        return f"label maps in {source['predictions_dir']}"
    model = source.get("model")
    parts = []
    if model is not None:
        meta = source.get("bundle_metadata") or {}
        what = model.get("path") or model.get("name")
        detail = ", ".join(str(meta[k]) for k in ("model_id", "dtype") if meta.get(k))
        parts.append(f"bundle {what}" + (f" ({detail})" if detail else ""))
    if source.get("attention_dir"):
        parts.append(("cache " if model is not None else "precomputed attention in ") + source["attention_dir"])
    return "; ".join(parts) or "unknown"


def _model_identity(model):
    """What identifies a model's attention: its bundle file (path, size,
    mtime) and export stamp; for other objects, their type."""
    identity = {"name": getattr(model, "name", None) or type(model).__name__}
    path = getattr(model, "path", None)
    if path is not None and Path(path).is_file():
        identity.update(path=str(Path(path).resolve()), file=_file_identity(path))
    metadata = getattr(model, "metadata", None)
    if isinstance(metadata, dict):
        identity.update(model_id=metadata.get("model_id"), created=metadata.get("created"))
    return identity


CACHE_MANIFEST = ".diffseg-attention-cache.json"


def _claim_cache(attention_dir, identity):
    """An attention folder used as a model's cache records that model; another
    model would silently read the first one's attention, so it is refused."""
    manifest = attention_dir / CACHE_MANIFEST
    if manifest.is_file():
        try:
            owner = json.loads(manifest.read_text()).get("model")
        except (OSError, ValueError, AttributeError):
            owner = None
        if owner != _json_clean(identity):
            raise ValueError(f"attention_dir: {attention_dir} caches the attention of another model "
                             f"({_short(owner)}; now {_short(_json_clean(identity))}); use another folder")
        return
    attention_dir.mkdir(parents=True, exist_ok=True)
    _write_json(manifest, {"model": identity})


def _file_identity(path):
    """``[size, mtime_ns]`` of a file: changes whenever it is rewritten."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _check_attention_files(state_path, files, attention_dir, have_model):
    """Refuse to resume when an attention file already scored has changed
    (rewritten in place) or, without a model to recompute it, disappeared."""
    for sample_id, saved in files.items():
        if saved is None:
            continue
        path = attention_dir / f"{sample_id}.npz"
        if not path.is_file():
            if have_model:
                continue  # recomputed by the same model (part of the saved settings)
            now = "missing"
        elif _file_identity(path) == saved:
            continue
        else:
            now = "rewritten since"
        raise ValueError(f"{state_path}: the attention file {path} scored in this run is {now}; "
                         f"use another output directory, or resume=False / --no-resume to start over")


class AttentionSource:
    """The attention of each image: read from ``attention_dir`` (each file
    checked against its record: :func:`diffseg.io.attention.attention_record`)
    or computed by ``model`` (and then saved there with its record)."""

    def __init__(self, model, attention_dir, dataset, timestep):
        self.model, self.dir, self.timestep = model, attention_dir, timestep
        self.decoder = getattr(dataset, "decoder", None)
        self.preprocessing = getattr(dataset, "preprocessing", "crop")
        self.size = getattr(dataset, "size", None)
        self.bundle = None  # the bundle every file must come from: the model's, or the first file's
        if model is not None:
            from ..io.attention import attention_record

            self.bundle = attention_record(image_shape=(1, 1), exif_applied=False, exif_rotated=False, decoder=None,
                                           frame="crop", timestep=timestep, model=model)["bundle"]
        self.unrecorded = 0  # files from an older diffseg: nothing to check them against

    def get(self, sample_id, get_image, image_path, label_path):
        """``(attention, identity of its file or None)``."""
        from ..io.attention import load_attention

        path = self.dir / f"{sample_id}.npz" if self.dir is not None else None
        if path is not None and path.is_file():
            identity = _file_identity(path)  # before reading: a rewrite during the read shows on resume
            self.check(path, image_path, label_path)
            return load_attention(path), identity
        if self.model is None:
            raise FileNotFoundError(f"attention_dir: no attention file for {sample_id!r}: {path}")
        image = get_image()
        if image is None:
            raise ValueError(f"sample {sample_id!r} has no image to run the model on")
        attn = self.model.attention(image, self.timestep)
        if path is None:
            return attn, None
        self.save(path, attn, image, image_path)
        return attn, _file_identity(path)

    def save(self, path, attn, image, image_path):
        from ..io.attention import attention_record, save_attention

        path.parent.mkdir(parents=True, exist_ok=True)
        jpeg = image_path is not None and _is_jpeg(image_path)
        record = attention_record(image_path=image_path, image_shape=image.shape, exif_applied=False,
                                  exif_rotated=False, decoder=self.decoder if jpeg else None, frame="crop",
                                  timestep=self.timestep, model=self.model)
        save_attention(path, attn, record=record)

    def check(self, path, image_path, label_path):
        """Refuse a file made from another image (content, size, EXIF
        rotation, decoding), with other settings or by another bundle."""
        from ..io.attention import file_sha256, read_attention_record

        record = read_attention_record(path)
        if record is None:
            self.unrecorded += 1
            return
        image, why = record.get("image") or {}, None
        expected = self._expected_size(image_path, label_path)
        if image.get("exif_rotated"):
            why = ("its image was turned by its EXIF orientation, but dataset labels are stored unturned "
                   "(`diffseg attention --stored-orientation`)")
        elif expected is not None and (image.get("height"), image.get("width")) != expected:
            why = (f"it was made from a {image.get('width')}x{image.get('height')} image, the dataset's is "
                   f"{expected[1]}x{expected[0]} (width x height)")
        elif record.get("frame") != "crop":
            why = f"it holds the attention of the {record.get('frame')} frame; evaluation uses the centre crop"
        elif record.get("timestep") != self.timestep:
            why = f"it was made at timestep {record.get('timestep')}, the settings say {self.timestep}"
        elif image_path is not None and Path(image_path).is_file() and image.get("sha256") is not None \
                and image["sha256"] != file_sha256(image_path):
            why = f"it was made from another image than {image_path} (different content)"
        elif image.get("decoder") is not None and self.decoder is not None and image["decoder"] != self.decoder:
            why = (f"its JPEG was decoded with decoder={image['decoder']!r}, the dataset's is {self.decoder!r} "
                   "(see docs/evaluation.md)")
        elif self.bundle is None:
            self.bundle = record.get("bundle")
        elif record.get("bundle") != self.bundle:
            why = (f"it was made by another bundle ({_short(record.get('bundle'), 120)}; "
                   f"expected {_short(self.bundle, 120)})")
        if why:
            raise ValueError(f"attention file {path} does not match: {why}")

    def _expected_size(self, image_path, label_path):
        """``(height, width)`` of the image the model must have seen, from the files' headers."""
        if self.preprocessing == "stego":
            return (self.size, self.size)
        for source in (image_path, label_path):
            if source is not None and Path(source).is_file():
                from PIL import Image

                with Image.open(source) as im:
                    return im.size[1], im.size[0]
        return None


def _is_jpeg(path):
    with open(path, "rb") as f:
        return f.read(3) == b"\xff\xd8\xff"


def _save_state(path, config, done, metrics, seconds, files):
    _write_json(path, {
        "version": STATE_VERSION,
        "config": config,
        "done": done,
        "attention_files": files,
        "metrics": [m.state_dict() for m in metrics],
        "seconds": seconds,
    })


def _load_state(path, config, metrics):
    try:
        state = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the saved state ({e}); delete it or pass "
                         f"resume=False / --no-resume to start over") from None
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: state version {state.get('version')} is not {STATE_VERSION}; "
                         f"start over with resume=False / --no-resume")
    saved = state.get("config", {})
    if _json_clean(config) != saved:
        diff = [f"{k}: saved {_short(saved.get(k))}, now {_short(_json_clean(config.get(k)))}"
                for k in sorted(set(saved) | set(config)) if _json_clean(config.get(k)) != saved.get(k)]
        raise ValueError(
            f"{path} belongs to a run with different settings ({'; '.join(diff)}); "
            f"use another output directory, or resume=False / --no-resume to overwrite it")
    loaded = [HungarianMetrics.from_state_dict(s) for s in state["metrics"]]
    if len(loaded) != len(metrics):
        raise ValueError(f"{path}: {len(loaded)} saved accumulators for {len(metrics)} settings")
    seconds = state["seconds"]
    return list(state["done"]), loaded, seconds, dict(state.get("attention_files", {}))


def _short(value, limit=160):
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _results(config, settings, metrics, seconds, n_done, class_names, source):
    per = max(n_done, 1)
    rows = []
    for k, (setting, m) in enumerate(zip(settings, metrics)):
        r = m.compute()
        rows.append({
            "settings": setting.to_dict(),
            "label": setting_label(setting, settings),
            "pixel_accuracy": r["pixel_accuracy"],
            "miou": r["miou"],
            "iou": dict(zip(class_names, r["iou"])),
            "tp": r["tp"], "fp": r["fp"], "fn": r["fn"],
            "images": r["images"],
            "valid_pixels": r["valid_pixels"],
            # what segmenting one image with this setting alone costs
            "seconds_per_image": (seconds["attention"] + seconds["segment"][k]) / per,
        })
    return {
        "dataset": config["dataset"],
        "protocol": config["protocol"],
        "ignore_index": config["ignore_index"],
        "attention": source,
        "class_names": list(class_names),
        "images": n_done,
        "seconds_per_image": seconds["total"] / per,
        "attention_seconds_per_image": seconds["attention"] / per,
        "settings": rows,
    }


def _pct(x, digits=2):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"


PROTOCOL_NAMES = {"per-image": "Hungarian matching per image (DiffSeg, DiffCut)",
                  "per-dataset": "Hungarian matching over the dataset, DiffSeg's frame",
                  "stego": "Hungarian matching over the dataset, STEGO's frame (PiCIE, STEGO)"}


def markdown_table(results):
    """Results dict (from :func:`evaluate` or :func:`score_predictions`) -> a markdown report."""
    ds = results["dataset"]
    shared = results["settings"][0]["settings"] or {}  # None: scored predictions
    lines = [
        f"# DiffSeg evaluation: {ds.get('name', 'dataset')}",
        "",
        "| setting | value |",
        "|---|---|",
        f"| protocol | {PROTOCOL_NAMES.get(results['protocol'], results['protocol'])} |",
        f"| images | {results['images']} |",
        f"| classes | {ds.get('n_classes')} |",
        f"| label size | {ds.get('size')} |",
        f"| source | {describe_source(results['attention'])} |",
    ]
    if shared:
        weights = shared["weights"]
        lines += [f"| timestep | {shared['timestep']} |",
                  f"| resolution weights | {'proportional to resolution' if weights is None else weights} |"]
    lines += [
        f"| seconds per image | {results['seconds_per_image']:.3f} "
        f"(reading, attention and aggregation: {results['attention_seconds_per_image']:.3f}) |",
        "",
        "| KL threshold | grid | refine | ACC (%) | mIoU (%) | images | s / image |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for row in results["settings"]:
        s = row["settings"] or {}
        grid, refine = s.get("grid", "-"), {True: "yes", False: "no"}.get(s.get("refine"), "-")
        lines.append(f"| {row['label']} | {grid} | {refine} "
                     f"| {_pct(row['pixel_accuracy'])} | {_pct(row['miou'])} "
                     f"| {row['images']} | {row['seconds_per_image']:.3f} |")
    lines += ["", "## Per-class IoU (%)", "",
              "| class | " + " | ".join(r["label"] for r in results["settings"]) + " |",
              "|---|" + "---:|" * len(results["settings"])]
    for name in results["class_names"]:
        vals = " | ".join(_pct(r["iou"].get(name), 1) for r in results["settings"])
        lines.append(f"| {name} | {vals} |")
    lines += ["", "n/a: a class that never occurs and is never matched (left out of the mean).", ""]
    return "\n".join(lines)
