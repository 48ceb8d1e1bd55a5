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
from pathlib import Path

import numpy as np

from .._util import atomic_write, progress_bar
from ..batch import pipelined
from ..core import aggregate, run_stages
from ..settings import Settings, resolve_settings
from .metrics import HungarianMetrics, _check_protocol

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
    protocol : ``"per-image"`` (DiffSeg) or ``"per-dataset"`` (see
        :mod:`diffseg.evaluation.metrics`).
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

    protocol = _check_protocol(protocol)
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
    timestep = settings[0].timestep

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
        attn, identity = _attention(sample_id, get_image, model, attention_dir, timestep)
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

    results = _results(config, settings, metrics, seconds, len(done), class_names, source)
    results["dataset"] = _json_clean({**described, "evaluated": len(done)})
    if output_dir is not None:
        write_results(output_dir, results)
    return results


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
    """One line for a report: ``bundle PATH (model id, dtype)`` or the attention folder."""
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


def _attention(sample_id, get_image, model, attention_dir, timestep):
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
    attn = model.attention(image, timestep)
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


def markdown_table(results):
    """Results dict (from :func:`evaluate`) -> a markdown report."""
    ds = results["dataset"]
    protocol = {"per-image": "Hungarian matching per image (DiffSeg, DiffCut)",
                "per-dataset": "Hungarian matching over the dataset (PiCIE, STEGO)"}
    shared = results["settings"][0]["settings"]
    weights = shared["weights"]
    lines = [
        f"# DiffSeg evaluation: {ds.get('name', 'dataset')}",
        "",
        "| setting | value |",
        "|---|---|",
        f"| protocol | {protocol.get(results['protocol'], results['protocol'])} |",
        f"| images | {results['images']} |",
        f"| classes | {ds.get('n_classes')} |",
        f"| label size | {ds.get('size')} |",
        f"| attention | {describe_source(results['attention'])} |",
        f"| timestep | {shared['timestep']} |",
        f"| resolution weights | {'proportional to resolution' if weights is None else weights} |",
        f"| seconds per image | {results['seconds_per_image']:.3f} "
        f"(reading, attention and aggregation: {results['attention_seconds_per_image']:.3f}) |",
        "",
        "| KL threshold | grid | refine | ACC (%) | mIoU (%) | images | s / image |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for row in results["settings"]:
        s = row["settings"]
        lines.append(f"| {row['label']} | {s['grid']} | {'yes' if s['refine'] else 'no'} "
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
