"""Benchmark evaluation: segment a dataset, score it with Hungarian matching.

Per image, the attention maps come from precomputed ``<attention_dir>/<id>.npz``
files (:func:`diffseg.save_attention`, ``diffseg attention``) or from a model
(``model.attention(image)``, one UNet pass); they are aggregated once, then
merged and labelled once per KL-threshold setting, so several settings cost one
attention computation. Labels are predicted at the label map's size (512 after
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
from pathlib import Path

import numpy as np

from .._util import atomic_write
from ..batch import pipelined
from ..core import DEFAULT_KL_THRESHOLD, aggregate, kl_thresholds, run_stages
from .metrics import HungarianMetrics, _check_protocol

STATE_VERSION = 2  # 2: attention source and per-file identities
STATE_FILE = "state.json"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


# -- KL threshold settings ----------------------------------------------------
def kl_settings(kl_threshold):
    """Normalise ``kl_threshold`` to a list of settings (tuples of floats).

    A number (``1.1`` = ``(1.1, 1.1, 1.1)``), a tuple of numbers (one
    threshold per iteration) or a string (``"1.1"``, ``"0.9,1.0,1.1"``) is one
    setting; a **list** -- or a tuple holding tuples, lists or strings -- is
    several settings, each a number, tuple/list or string.
    """
    nested = isinstance(kl_threshold, tuple) and any(
        isinstance(v, (tuple, list, str)) for v in kl_threshold)
    if isinstance(kl_threshold, list) or nested:
        kl_threshold = list(kl_threshold)
        if not kl_threshold:
            raise ValueError("kl_threshold: empty list of settings")
        settings = [kl_thresholds(v, f"kl_threshold[{i}]") for i, v in enumerate(kl_threshold)]
    else:
        settings = [kl_thresholds(kl_threshold)]
    seen = set()
    for s in settings:
        if s in seen:
            raise ValueError(f"kl_threshold: setting {setting_label(s)} is given twice")
        seen.add(s)
    return settings


def setting_label(setting):
    """``(1.1, 1.1, 1.1)`` -> ``"1.1"``; ``(0.9, 1.0, 1.1)`` -> ``"0.9,1,1.1"``."""
    fmt = lambda t: f"{t:g}"  # noqa: E731
    if len(setting) == len(DEFAULT_KL_THRESHOLD) and len(set(setting)) == 1:
        return fmt(setting[0])
    return ",".join(fmt(t) for t in setting)


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


def _weights_json(weights):
    if weights is None:
        return None
    if isinstance(weights, dict):
        return {str(int(k)): float(v) for k, v in weights.items()}
    return [float(v) for v in np.asarray(weights, dtype=np.float64).ravel()]


def _item_parts(item):
    """Sample, or an ``(id, image, label)`` tuple -> (id, label, image getter)."""
    if hasattr(item, "id") and hasattr(item, "label"):
        return str(item.id), item.label, lambda: item.image
    try:
        sample_id, image, label = item
    except (TypeError, ValueError):
        raise TypeError("dataset items must be Samples or (id, image, label) tuples") from None
    return str(sample_id), label, lambda: image


def _describe(dataset, n_classes):
    if hasattr(dataset, "describe"):
        info = dict(dataset.describe())
    else:
        info = {"name": type(dataset).__name__, "images": len(dataset)}
    info["n_classes"] = n_classes
    return info


# -- evaluation ---------------------------------------------------------------
def evaluate(dataset, model=None, *, kl_threshold=None, attention_dir=None, limit=None,
             protocol="per-image", grid=16, weights=None, n_classes=None, class_names=None,
             ignore_index=-1, output_dir=None, resume=True, progress=True, refine=False):
    """Segment every image of ``dataset`` and score it.

    Parameters
    ----------
    dataset : a :mod:`diffseg.evaluation.datasets` dataset, or a sequence of
        ``(id, image, label)`` (image may be None with ``attention_dir``).
    model : object with ``.attention(image) -> {res: array}``, or a bundle
        path for :func:`diffseg.load_model`; optional with ``attention_dir``.
    kl_threshold : setting or list of settings
        A number, a per-iteration tuple, or a list of those (several settings
        from one attention computation per image). Default: the dataset's
        official value (1.1 COCO-Stuff, 0.9 Cityscapes), else ``(1.1,)*3``.
    attention_dir : directory of ``<id>.npz`` attention files. Without a
        model every file must exist; with a model, missing ones are computed
        and saved there (a cache).
    limit : evaluate only the first ``limit`` images.
    protocol : ``"per-image"`` (DiffSeg) or ``"per-dataset"`` (see
        :mod:`diffseg.evaluation.metrics`).
    grid, weights : passed to :func:`diffseg.merge` / :func:`diffseg.aggregate`.
    refine : k-means refinement after the merge (:func:`diffseg.refine`; the
        official benchmark leaves it off).
    n_classes, class_names : default from the dataset.
    output_dir : where ``state.json``, ``results.json`` and ``results.md`` go.
        Needed to resume.
    resume : continue the run saved in ``output_dir`` (same settings); False
        starts over.
    progress : show a tqdm progress bar.

    Returns
    -------
    dict with ``dataset``, ``protocol``, ``settings`` (one entry per KL
    setting: ``kl_threshold``, ``pixel_accuracy``, ``miou``, ``iou`` and
    counts, ``seconds_per_image``) and timing.
    """
    from tqdm.auto import tqdm

    protocol = _check_protocol(protocol)
    if kl_threshold is None:
        kl_threshold = getattr(dataset, "kl_threshold", None) or DEFAULT_KL_THRESHOLD
    settings = kl_settings(kl_threshold)
    if n_classes is None:
        n_classes = getattr(dataset, "n_classes", None)
        if n_classes is None:
            raise ValueError("n_classes: the dataset does not say; pass n_classes=")
    if class_names is None:
        class_names = tuple(getattr(dataset, "class_names", ()) or ())
    class_names = [str(c) for c in class_names]
    if len(class_names) != n_classes:
        class_names = [str(i) for i in range(n_classes)]
    if isinstance(grid, bool) or not isinstance(grid, numbers.Integral) or grid < 1:
        raise ValueError(f"grid must be a positive integer, got {grid!r}")
    total = len(dataset)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1:
            raise ValueError(f"limit must be a positive integer, got {limit!r}")
        total = min(total, int(limit))
    if total == 0:
        raise ValueError("dataset is empty")

    if isinstance(model, (str, os.PathLike)):
        from ..sd.model import load_model  # lazy: torch

        model = load_model(model)
    if model is not None and not callable(getattr(model, "attention", None)):
        raise TypeError(f"model must have an .attention(image) method, got {type(model).__name__}")
    if attention_dir is not None:
        attention_dir = Path(attention_dir)
        if model is None and not attention_dir.is_dir():
            raise FileNotFoundError(f"attention_dir: no such directory: {attention_dir}")
    elif model is None:
        raise ValueError("give a model or attention_dir (precomputed attention)")
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
    config = {  # everything that determines the numbers: a saved run resumes only if all match
        "dataset": {k: v for k, v in described.items() if k != "images"},
        "attention": {"dir": None if attention_dir is None else str(attention_dir.resolve()),
                      "model": None if model is None else _model_identity(model)},
        "protocol": protocol,
        "ignore_index": int(ignore_index),
        "kl_thresholds": [list(s) for s in settings],
        "grid": int(grid),
        "weights": _weights_json(weights),
    }
    if refine:  # only when on: states saved before the option existed still resume
        config["refine"] = True

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
    source = (f"precomputed attention ({attention_dir})" if model is None
              else f"model {getattr(model, 'name', type(model).__name__)}"
              + (f", cache {attention_dir}" if attention_dir is not None else ""))
    todo = [index for index in range(total) if ids is None or ids[index] not in done_set]
    produced = set(done_set)  # the producer's view: ids read so far (a repeated id is scored once)

    def load(index):
        """Read one item and its attention; runs one image ahead of the scoring, in a thread."""
        t_start = time.perf_counter()
        sample_id, label, get_image = _item_parts(dataset[index])
        if sample_id in produced:
            return None
        produced.add(sample_id)
        label = np.asarray(label)
        if label.ndim != 2:
            raise ValueError(f"label of {sample_id!r} must be (H, W), got shape {label.shape}")
        attn, identity = _attention(sample_id, get_image, model, attention_dir)
        return sample_id, label, attn, identity, time.perf_counter() - t_start

    bar = tqdm(total=total, initial=total - len(todo), disable=not progress, unit="img",
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
                A = aggregate(attn, weights=weights)
                seconds["attention"] += t_load + time.perf_counter() - t0
                for k, setting in enumerate(settings):
                    t0 = time.perf_counter()
                    pred = run_stages(A=A, grid=grid, kl_threshold=setting, size=label.shape,
                                      refine=refine)["labels"]
                    metrics[k].update(pred, label)
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

    results = _results(config, settings, metrics, seconds, len(done), class_names, source)
    results["dataset"] = _json_clean({**described, "evaluated": len(done)})
    if output_dir is not None:
        _write_json(output_dir / RESULTS_JSON, results)
        with atomic_write(output_dir / RESULTS_MD) as f:
            f.write(markdown_table(results))
    return results


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


def _attention(sample_id, get_image, model, attention_dir):
    """``(attention, identity of its file or None)``."""
    from ..io.attention import load_attention, save_attention

    path = attention_dir / f"{sample_id}.npz" if attention_dir is not None else None
    if path is not None and path.is_file():
        identity = _file_identity(path)  # before reading: a rewrite during the read shows on resume
        return load_attention(path), identity
    if model is None:
        raise FileNotFoundError(f"attention_dir: no attention file for {sample_id!r}: {path}")
    image = get_image()
    if image is None:
        raise ValueError(f"sample {sample_id!r} has no image to run the model on")
    attn = model.attention(image)
    if path is None:
        return attn, None
    path.parent.mkdir(parents=True, exist_ok=True)
    save_attention(path, attn)
    return attn, _file_identity(path)


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
            "kl_threshold": list(setting),
            "label": setting_label(setting),
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
        "grid": config["grid"],
        "weights": config["weights"],
        "attention": source,
        "class_names": list(class_names),
        "images": n_done,
        "seconds_per_image": seconds["total"] / per,
        "attention_seconds_per_image": seconds["attention"] / per,
        "settings": rows,
    }


def _pct(x, digits=2):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"


def markdown_table(results):
    """Results dict (from :func:`evaluate`) -> a markdown report."""
    ds = results["dataset"]
    protocol = {"per-image": "Hungarian matching per image (DiffSeg, DiffCut)",
                "per-dataset": "Hungarian matching over the dataset (PiCIE, STEGO)"}
    weights = results["weights"]
    lines = [
        f"# DiffSeg evaluation: {ds.get('name', 'dataset')}",
        "",
        "| setting | value |",
        "|---|---|",
        f"| protocol | {protocol.get(results['protocol'], results['protocol'])} |",
        f"| images | {results['images']} |",
        f"| classes | {ds.get('n_classes')} |",
        f"| label size | {ds.get('size')} |",
        f"| attention | {results['attention']} |",
        f"| anchor grid | {results['grid']} |",
        f"| resolution weights | {'proportional to resolution' if weights is None else weights} |",
        f"| seconds per image | {results['seconds_per_image']:.3f} "
        f"(reading, attention and aggregation: {results['attention_seconds_per_image']:.3f}) |",
        "",
        "| KL threshold | ACC (%) | mIoU (%) | images | s / image |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in results["settings"]:
        lines.append(f"| {row['label']} | {_pct(row['pixel_accuracy'])} | {_pct(row['miou'])} "
                     f"| {row['images']} | {row['seconds_per_image']:.3f} |")
    lines += ["", "## Per-class IoU (%)", "",
              "| class | " + " | ".join(r["label"] for r in results["settings"]) + " |",
              "|---|" + "---:|" * len(results["settings"])]
    for name in results["class_names"]:
        vals = " | ".join(_pct(r["iou"].get(name), 1) for r in results["settings"])
        lines.append(f"| {name} | {vals} |")
    lines += ["", "n/a: a class that never occurs and is never matched (left out of the mean).", ""]
    return "\n".join(lines)
