"""DiffSeg on Ray Data: ``map_batches`` over a pool of actors, each holding one model.

::

    import ray, diffseg.distributed as dd
    ray.init()                                   # or ray.init("auto") on a cluster
    ds = dd.segment_dataset(paths, model="bundle-dir", concurrency=4, num_gpus=1)
    for row in ds.iter_rows(): row["path"], row["labels"]

Each actor opens the bundle once (in its ``__init__``) and segments its
batches with :func:`diffseg.segment_many`, so inside an actor the UNet pass
of one image overlaps the post-processing of the previous one. The bundle
path and the image paths must be readable from every node (a shared file
system).

Actor sizing: an actor's CPU request is what Ray reserves, not what it uses.
On a CPU machine give actors fractional CPUs (``num_cpus=0.5``, the default
here without GPUs) or fewer actors than CPUs: with ``num_cpus=1`` per actor on
every CPU, Ray Data's read tasks get no CPU and the job stalls. On GPUs,
``num_gpus=1`` per actor and ``concurrency`` = the number of GPUs.

Evaluation (:func:`evaluate_dataset`, ``diffseg eval --ray``): actors return
each image's Hungarian TP/FP/FN counts (:class:`HungarianMetrics` state), the
driver sums them; sums of integers do not depend on order, so the numbers
equal a serial :func:`diffseg.evaluate` exactly.
"""
import json
import numbers
import os

import numpy as np

from .core import DEFAULT_KL_THRESHOLD, kl_thresholds
from .sd.bundle import DEFAULT_TIMESTEP

CPU_ACTOR_CPUS = 0.5
"""Default CPU request of an actor without GPUs (see the module docstring)."""


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401 -- Ray Data is a separate extra of ray
    except ImportError as e:
        raise ImportError(f"the Ray path needs ray[data]: pip install 'diffseg[ray]' ({e})") from None
    return ray


def _actor_options(num_gpus, num_cpus, concurrency, batch_size):
    if num_gpus is not None and (isinstance(num_gpus, bool) or not isinstance(num_gpus, numbers.Real)
                                 or num_gpus < 0):
        raise ValueError(f"num_gpus must be a non-negative number, got {num_gpus!r}")
    if num_cpus is None:
        num_cpus = 1 if num_gpus else CPU_ACTOR_CPUS
    if isinstance(num_cpus, bool) or not isinstance(num_cpus, numbers.Real) or num_cpus <= 0:
        raise ValueError(f"num_cpus must be a positive number, got {num_cpus!r}")
    sizes = concurrency if isinstance(concurrency, tuple) else (concurrency,)
    if not 1 <= len(sizes) <= 2 or any(isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 1
                                       for c in sizes):
        raise ValueError(f"concurrency must be a positive integer or a (min, max) tuple of them, got {concurrency!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    options = {"concurrency": concurrency, "num_cpus": num_cpus, "batch_size": int(batch_size),
               "batch_format": "numpy"}
    if num_gpus:
        options["num_gpus"] = num_gpus
    return options


def _bundle_path(model):
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a bundle path (each actor opens it), got {type(model).__name__}")
    from .sd.model import _resolve_bundle

    bundle = _resolve_bundle(model)
    if bundle is None:
        raise FileNotFoundError(f"model: no such bundle: {model}")
    return str(bundle.resolve())


def _as_dataset(data):
    """A Ray Dataset with an ``index`` column (input order) and ``path``."""
    ray = _ray()
    if isinstance(data, ray.data.Dataset):
        return data
    if isinstance(data, (str, bytes, os.PathLike)) or not hasattr(data, "__iter__"):
        raise TypeError(f"data must be a list of image paths or a ray.data.Dataset, got {type(data).__name__}")
    rows = [p if isinstance(p, dict) else {"index": i, "path": os.fspath(p)} for i, p in enumerate(data)]
    if not rows:
        raise ValueError("data: no images")
    return ray.data.from_items(rows)


def init_ray(address="local"):
    """Connect to Ray: ``"local"`` starts a local instance (unless one is
    running in this process), anything else is ``ray.init(address)``."""
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=None if address in (None, "local") else address)
    return ray


class _Segmenter:
    """Ray actor: one model, opened once; segments a batch of paths (or images)."""

    def __init__(self, bundle, device, threads, settings, postprocess):
        from .sd.model import Model

        if threads:
            from .core import set_num_threads

            set_num_threads(threads)
        self.model = Model(bundle, device=device, threads=threads)
        self.settings, self.postprocess = settings, postprocess

    def __call__(self, batch):
        from .batch import segment_many

        images = batch["image"] if "image" in batch else batch["path"]
        n = len(images)
        out = {k: v for k, v in batch.items() if k != "image"}
        column = "labels" if self.postprocess is None else "output"
        values = [None] * n
        results = segment_many(list(images), self.model, return_exceptions=self.postprocess is not None,
                               **self.settings)
        for i, result in results:
            if self.postprocess is None:
                values[i] = result
            else:  # e.g. write files on the worker; only its (small) return value comes back
                values[i] = self.postprocess({k: v[i] for k, v in out.items()}, result)
        out[column] = values
        return out


def segment_dataset(data, model, *, batch_size=4, num_gpus=None, num_cpus=None, concurrency=1, device=None,
                    threads=None, workers=1, kl_threshold=DEFAULT_KL_THRESHOLD, grid=16, timestep=DEFAULT_TIMESTEP,
                    weights=None, frame="whole", border="nearest", refine=False, detailed=False, postprocess=None,
                    as_list=False):
    """Segment images on Ray: one record per image with ``path`` and ``labels``
    (as :func:`diffseg.segment` gives) and the input's other columns.

    Parameters
    ----------
    data : list of image paths (records also get ``index``, the position in
        the list) or of row dicts with ``path``, or a ``ray.data.Dataset`` with a ``path`` column (read by the
        actors) or an ``image`` column (uint8 arrays, e.g. ``ray.data.read_images``).
    model : bundle file or folder, readable on every node.
    batch_size : images per ``map_batches`` batch.
    num_gpus, num_cpus : per actor; default ``num_cpus`` is 0.5 without GPUs, 1 with.
    concurrency : actors (an int, or ``(min, max)`` for an autoscaling pool).
    device : ``"cpu"`` or ``"cuda"`` (default: ``"cuda"`` with ``num_gpus``).
    threads : libtorch and C-core threads in each actor (default: leave as is).
    workers, kl_threshold, grid, timestep, weights, frame, border, refine : as :func:`diffseg.segment_many`.
    detailed, postprocess : with ``postprocess``, a picklable callable run in
        the actors as ``postprocess(row, result)`` for each image, with
        ``result`` the :func:`segment_many` result (or the image's exception);
        the record gets its return value as ``output`` instead of ``labels``
        (``diffseg segment --ray`` writes the output files this way).
    as_list : return the records as a list (sorted by ``index`` when there is
        one) instead of a lazy Dataset.
    """
    from .pipeline import check_frame

    options = _actor_options(num_gpus, num_cpus, concurrency, batch_size)
    settings = {"workers": workers, "kl_threshold": kl_thresholds(kl_threshold), "grid": grid,
                "timestep": timestep, "weights": weights, "frame": check_frame(frame), "border": border,
                "refine": bool(refine),
                "detailed": bool(detailed)}
    if postprocess is not None and not callable(postprocess):
        raise TypeError(f"postprocess must be callable, got {type(postprocess).__name__}")
    device = device or ("cuda" if num_gpus else "cpu")
    ds = _as_dataset(data).map_batches(
        _Segmenter, fn_constructor_args=(_bundle_path(model), device, threads, settings, postprocess), **options)
    if not as_list:
        return ds
    rows = ds.take_all()
    return sorted(rows, key=lambda r: r["index"]) if rows and "index" in rows[0] else rows


class _Scorer:
    """Ray actor: one model and the dataset; per image, the Hungarian counts of every setting."""

    def __init__(self, bundle, device, threads, dataset, config):
        from .sd.model import Model

        if threads:
            from .core import set_num_threads

            set_num_threads(threads)
        self.model = Model(bundle, device=device, threads=threads)
        self.dataset, self.config = dataset, config

    def __call__(self, batch):
        import time

        from .batch import pipelined
        from .core import aggregate, run_stages
        from .evaluation.metrics import HungarianMetrics

        cfg = self.config

        def load(index):
            t0 = time.perf_counter()
            sample = self.dataset[int(index)]
            return sample, self.model.attention(sample.image), time.perf_counter() - t0

        ids, states, seconds = [], [], []
        # as in diffseg.evaluate: the next image's UNet pass overlaps this one's scoring
        for _, (sample, attn, t_load) in pipelined(batch["index"], load, max_pending=1):
            t0 = time.perf_counter()
            A = aggregate(attn, weights=cfg["weights"])
            times = [t_load + time.perf_counter() - t0]
            label = np.asarray(sample.label)
            per_setting = []
            for setting in cfg["settings"]:
                t0 = time.perf_counter()
                pred = run_stages(A=A, grid=cfg["grid"], kl_threshold=setting, size=label.shape,
                                  refine=cfg["refine"])["labels"]
                m = HungarianMetrics(cfg["n_classes"], cfg["protocol"], cfg["ignore_index"]).update(pred, label)
                per_setting.append(m.state_dict())
                times.append(time.perf_counter() - t0)
            ids.append(str(sample.id))
            states.append(json.dumps(per_setting))
            seconds.append(times)
        return {"index": batch["index"], "id": np.array(ids), "state": np.array(states),
                "seconds": np.array(seconds, dtype=np.float64)}


def evaluate_dataset(dataset, model, *, kl_threshold=None, limit=None, protocol="per-image", grid=16, weights=None,
                     n_classes=None, ignore_index=-1, output_dir=None, batch_size=4, num_gpus=None, num_cpus=None,
                     concurrency=1, device=None, threads=None, refine=False):
    """:func:`diffseg.evaluate` on Ray: the same results dict (and, with
    ``output_dir``, the same ``results.json`` / ``results.md``), from per-image
    Hungarian counts that the actors return and the driver sums, so the
    numbers equal a serial run's. No resume: the job runs as a whole.

    ``dataset``: a :mod:`diffseg.evaluation.datasets` dataset (sent to every
    actor: its files must be readable there). Other arguments as
    :func:`diffseg.evaluate` and :func:`segment_dataset`; ``seconds_per_image``
    is the wall time over the images, the other timings are the actors' sums.
    """
    import time
    from pathlib import Path

    from .evaluation import runner
    from .evaluation.metrics import HungarianMetrics, _check_protocol

    ray = _ray()
    options = _actor_options(num_gpus, num_cpus, concurrency, batch_size)
    if kl_threshold is None:
        kl_threshold = getattr(dataset, "kl_threshold", None) or DEFAULT_KL_THRESHOLD
    settings = runner.kl_settings(kl_threshold)
    n_classes = n_classes if n_classes is not None else getattr(dataset, "n_classes", None)
    if n_classes is None:
        raise ValueError("n_classes: the dataset does not say; pass n_classes=")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1):
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    total = len(dataset) if limit is None else min(len(dataset), int(limit))
    if total == 0:
        raise ValueError("dataset is empty")
    bundle = _bundle_path(model)
    config = {"settings": settings, "grid": int(grid), "weights": weights, "refine": bool(refine),
              "n_classes": int(n_classes),
              "protocol": _check_protocol(protocol), "ignore_index": int(ignore_index)}
    device = device or ("cuda" if num_gpus else "cpu")
    t_start = time.perf_counter()
    ds = ray.data.range(total).rename_columns({"id": "index"}).map_batches(
        _Scorer, fn_constructor_args=(bundle, device, threads, dataset, config), **options)
    rows = sorted(ds.take_all(), key=lambda r: r["index"])
    metrics = [HungarianMetrics(n_classes, protocol, ignore_index) for _ in settings]
    for row in rows:
        for m, state in zip(metrics, json.loads(row["state"])):
            m.merge(HungarianMetrics.from_state_dict(state))
    times = np.sum([r["seconds"] for r in rows], axis=0)
    seconds = {"attention": float(times[0]), "segment": [float(t) for t in times[1:]],
               "total": time.perf_counter() - t_start}

    class_names = [str(c) for c in (getattr(dataset, "class_names", ()) or ())]
    if len(class_names) != n_classes:
        class_names = [str(i) for i in range(n_classes)]
    described = runner._describe(dataset, n_classes)
    summary = {"dataset": {k: v for k, v in described.items() if k != "images"}, "protocol": protocol,
               "ignore_index": int(ignore_index), "grid": int(grid), "weights": runner._weights_json(weights)}
    source = f"model {Path(bundle).parent.name} on Ray ({concurrency} actor(s))"
    results = runner._results(summary, settings, metrics, seconds, len(rows), class_names, source)
    results["dataset"] = runner._json_clean({**described, "evaluated": len(rows)})
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        runner._write_json(output_dir / runner.RESULTS_JSON, results)
        with runner.atomic_write(output_dir / runner.RESULTS_MD) as f:
            f.write(runner.markdown_table(results))
    return results
