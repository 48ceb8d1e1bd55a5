"""DiffSeg on Ray Data: ``map_batches`` over a pool of actors, each holding one model.

::

    import ray, diffseg.distributed as dd
    ray.init()                                   # or ray.init("auto") on a cluster
    ds = dd.segment_dataset(paths, "bundle-dir", settings, actors=4, num_gpus=1)
    for row in ds.iter_rows(): row["index"], row["path"], row["labels"]

Each actor opens the bundle once (in its ``__init__``) and segments its
batches with :func:`diffseg.segment_many`, so inside an actor the UNet pass
of one image overlaps the post-processing of the previous one. The bundle
path and the image paths must be readable from every node (a shared file
system).

Actor sizing: an actor's CPU request is what Ray reserves, not what it uses.
Without GPUs actors request half a CPU each (``num_cpus=0.5``): with a whole
CPU per actor on every CPU, Ray Data's read tasks get no CPU and the job
stalls. What an actor *uses* is ``threads`` (libtorch and the C core), by
default the cores of its node divided by the number of actors (at least one):
Ray sets ``OMP_NUM_THREADS=1`` in actors with fractional CPUs, so without
this an actor would run the UNet and the merge on one thread. One actor on one
machine thus uses every core, as a serial :func:`diffseg.segment` does, and
its labels equal the serial ones exactly (libtorch sums convolutions in an
order that depends on its thread count). On GPUs, ``num_gpus=1`` per actor and
``actors`` = the number of GPUs.

Evaluation (:func:`evaluate_dataset`, ``diffseg eval --ray``): actors return
each image's Hungarian TP/FP/FN counts (:class:`HungarianMetrics` state), the
driver sums them; sums of integers do not depend on order, so the numbers
equal a serial :func:`diffseg.evaluate` exactly.
"""
import json
import logging
import numbers
import os

import numpy as np

from .settings import resolve_settings

CPU_ACTOR_CPUS = 0.5
"""CPU request of an actor without GPUs (see the module docstring)."""


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401 -- Ray Data is a separate extra of ray
    except ImportError as e:
        raise ImportError(f"the Ray path needs ray[data]: pip install 'diffseg[ray]' ({e})") from None
    return ray


def _pool_size(actors):
    """``actors`` (a count, or ``(min, max)``) -> ``(min, max)``."""
    sizes = actors if isinstance(actors, tuple) else (actors, actors)
    if len(sizes) != 2 or any(isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 1 for c in sizes) \
            or sizes[0] > sizes[1]:
        raise ValueError(f"actors must be a positive integer or a (min, max) tuple of them, got {actors!r}")
    return int(sizes[0]), int(sizes[1])


def _actor_options(num_gpus, num_cpus, actors, ray_batch_size):
    """``map_batches`` keywords: the actor pool (``compute=``) and each actor's resources."""
    ray = _ray()
    if num_gpus is not None and (isinstance(num_gpus, bool) or not isinstance(num_gpus, numbers.Real)
                                 or num_gpus < 0):
        raise ValueError(f"num_gpus must be a non-negative number, got {num_gpus!r}")
    if num_cpus is None:
        num_cpus = 1 if num_gpus else CPU_ACTOR_CPUS
    if isinstance(num_cpus, bool) or not isinstance(num_cpus, numbers.Real) or num_cpus <= 0:
        raise ValueError(f"num_cpus must be a positive number, got {num_cpus!r}")
    low, high = _pool_size(actors)
    if isinstance(ray_batch_size, bool) or not isinstance(ray_batch_size, numbers.Integral) or ray_batch_size < 1:
        raise ValueError(f"ray_batch_size must be a positive integer, got {ray_batch_size!r}")
    options = {"compute": ray.data.ActorPoolStrategy(min_size=low, max_size=high), "num_cpus": num_cpus,
               "batch_size": int(ray_batch_size), "batch_format": "numpy"}
    if num_gpus:
        options["num_gpus"] = num_gpus
    return options


def actor_threads(threads, actors):
    """Threads of each actor: ``threads`` when given, else the cores this
    process may use divided by the most actors of the pool (at least 1)."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        return int(threads)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // _pool_size(actors)[1])


def _bundle_path(model):
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a bundle path (each actor opens it), got {type(model).__name__}")
    from .sd.model import _resolve_bundle

    bundle = _resolve_bundle(model)
    if bundle is None:
        raise FileNotFoundError(f"model: no such bundle: {model}")
    return str(bundle.resolve())


def _with_index(ds):
    """A Ray Dataset with an ``index`` column: its row numbers in the
    Dataset's order. The Dataset is materialized for that (its blocks, in
    order, tell where each starts)."""
    ray = _ray()
    import pyarrow as pa
    from ray.data.block import BlockAccessor

    @ray.remote
    def add_index(block, start):
        table = BlockAccessor.for_block(block).to_arrow()
        return table.append_column("index", pa.array(np.arange(start, start + table.num_rows, dtype=np.int64)))

    refs, start = [], 0
    for bundle in ds.materialize().iter_internal_ref_bundles():
        for entry in bundle.blocks:
            refs.append(add_index.remote(entry.ref, start))
            start += entry.metadata.num_rows
    return ray.data.from_arrow_refs(refs)


def _as_dataset(data):
    """A Ray Dataset with an ``index`` column (input order) and ``path`` or ``image``."""
    ray = _ray()
    if isinstance(data, ray.data.Dataset):
        return data if "index" in (data.columns() or ()) else _with_index(data)
    if isinstance(data, (str, bytes, os.PathLike)) or not hasattr(data, "__iter__"):
        raise TypeError(f"data must be a list of image paths or a ray.data.Dataset, got {type(data).__name__}")
    rows = [{"index": i, **p} if isinstance(p, dict) else {"index": i, "path": os.fspath(p)}
            for i, p in enumerate(data)]
    if not rows:
        raise ValueError("data: no images")
    return ray.data.from_items(rows)


def init_ray(address="local", *, quiet=False):
    """Connect to Ray: ``"local"`` starts a local instance (unless one is
    running in this process), anything else is ``ray.init(address)``.
    ``quiet``: no log lines from Ray or its workers, no progress bars."""
    ray = _ray()
    if quiet:
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)
        ray.data.DataContext.get_current().enable_progress_bars = False
    if not ray.is_initialized():
        ray.init(address=None if address in (None, "local") else address, log_to_driver=not quiet,
                 logging_level=logging.ERROR if quiet else logging.INFO, include_dashboard=False)
    return ray


def _open_model(bundle, device, threads):
    """The actor's model, libtorch and the C core on ``threads`` threads."""
    from .core import set_num_threads
    from .sd.model import Model

    set_num_threads(threads)
    return Model(bundle, device=device, threads=threads)


class _Segmenter:
    """Ray actor: one model, opened once; segments a batch of paths (or images)."""

    def __init__(self, bundle, device, threads, settings, options, postprocess):
        self.model = _open_model(bundle, device, threads)
        self.settings, self.options, self.postprocess = settings, options, postprocess

    def __call__(self, batch):
        from .batch import segment_many

        images = batch["image"] if "image" in batch else batch["path"]
        n = len(images)
        out = {k: v for k, v in batch.items() if k != "image"}
        column = "labels" if self.postprocess is None else "output"
        values = [None] * n
        results = segment_many(list(images), self.model, self.settings,
                               return_exceptions=self.postprocess is not None, **self.options)
        for i, result in results:
            if self.postprocess is None:
                values[i] = result
            else:  # e.g. write files on the worker; only its (small) return value comes back
                values[i] = self.postprocess({k: v[i] for k, v in out.items()}, result)
        out[column] = values
        return out


def segment_dataset(data, model, settings=None, *, actors=1, num_gpus=None, num_cpus=None, threads=None,
                    device=None, batch_size=1, pool_size=1, ray_batch_size=4, detailed=False, postprocess=None,
                    as_list=False, **overrides):
    """Segment images on Ray: one record per image with ``index``, ``labels``
    (as :func:`diffseg.segment` gives with the same settings) and the input's
    other columns.

    Parameters
    ----------
    data : list of image paths or of row dicts with ``path``, or a
        ``ray.data.Dataset`` with a ``path`` column (read by the actors) or an
        ``image`` column (uint8 arrays, e.g. ``ray.data.read_images``). Records
        get ``index``: the position in the list, or the row number in the
        Dataset's order (a Dataset without an ``index`` column is
        materialized to number its rows). Images of an ``image`` column are
        segmented as they are: ``ray.data.read_images`` gives them in their
        stored orientation (it does not apply EXIF rotation, unlike
        :func:`diffseg.load_image` on a path).
    model : bundle file or folder, readable on every node.
    settings, **overrides : :class:`diffseg.Settings` and field overrides,
        as :func:`diffseg.segment`.
    actors : actors, each holding one model (an int, or ``(min, max)`` for
        an autoscaling pool).
    num_gpus, num_cpus : per actor; default ``num_cpus`` is 0.5 without GPUs, 1 with.
    threads : libtorch and C-core threads in each actor (default: the
        cores divided by the most actors, at least 1: see the module docstring).
    device : ``"cpu"`` or ``"cuda"`` (default: ``"cuda"`` with ``num_gpus``).
    batch_size, pool_size : in each actor, as :func:`diffseg.segment_many`
        (images per UNet call; post-processing threads).
    ray_batch_size : rows per ``map_batches`` batch (handed to an actor at once).
    detailed, postprocess : with ``postprocess``, a picklable callable run in
        the actors as ``postprocess(row, result)`` for each image, with
        ``result`` the :func:`segment_many` result (or the image's exception);
        the record gets its return value as ``output`` instead of ``labels``
        (``diffseg segment --ray`` writes the output files this way).
    as_list : return the records as a list sorted by ``index`` instead of a
        lazy Dataset.
    """
    settings = resolve_settings(settings, **overrides)
    options = _actor_options(num_gpus, num_cpus, actors, ray_batch_size)
    per_actor = {"batch_size": batch_size, "pool_size": pool_size, "detailed": bool(detailed)}
    for name in ("batch_size", "pool_size"):
        value = per_actor[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if postprocess is not None and not callable(postprocess):
        raise TypeError(f"postprocess must be callable, got {type(postprocess).__name__}")
    device = device or ("cuda" if num_gpus else "cpu")
    args = (_bundle_path(model), device, actor_threads(threads, actors), settings, per_actor, postprocess)
    ds = _as_dataset(data).map_batches(_Segmenter, fn_constructor_args=args, **options)
    if not as_list:
        return ds
    return sorted(ds.take_all(), key=lambda r: r["index"])


class _Scorer:
    """Ray actor: one model and the dataset; per image, the Hungarian counts of every setting."""

    def __init__(self, bundle, device, threads, dataset, settings, metric):
        self.model = _open_model(bundle, device, threads)
        self.dataset, self.settings, self.metric = dataset, settings, metric

    def __call__(self, batch):
        import time

        from .batch import pipelined
        from .core import aggregate
        from .evaluation.metrics import HungarianMetrics
        from .evaluation.runner import score_labels

        settings = self.settings
        timestep = settings[0].timestep

        def load(index):
            t0 = time.perf_counter()
            sample = self.dataset[int(index)]
            return sample, self.model.attention(sample.image, timestep), time.perf_counter() - t0

        ids, states, seconds = [], [], []
        # as in diffseg.evaluate: the next image's UNet pass overlaps this one's scoring
        for _, (sample, attn, t_load) in pipelined(batch["index"], load, max_pending=1):
            t0 = time.perf_counter()
            A = aggregate(attn, weights=settings[0].weights_for(list(attn)))
            times = [t_load + time.perf_counter() - t0]
            label = np.asarray(sample.label)
            per_setting = []
            for setting in settings:
                t0 = time.perf_counter()
                m = HungarianMetrics(**self.metric).update(score_labels(A, setting, label.shape), label)
                per_setting.append(m.state_dict())
                times.append(time.perf_counter() - t0)
            ids.append(str(sample.id))
            states.append(json.dumps(per_setting))
            seconds.append(times)
        return {"index": batch["index"], "id": np.array(ids), "state": np.array(states),
                "seconds": np.array(seconds, dtype=np.float64)}


def evaluate_dataset(dataset, model, settings=None, *, limit=None, protocol="per-image", n_classes=None,
                     ignore_index=-1, output_dir=None, actors=1, num_gpus=None, num_cpus=None, threads=None,
                     device=None, ray_batch_size=4, **overrides):
    """:func:`diffseg.evaluate` on Ray: the same results dict (and, with
    ``output_dir``, the same ``results.json`` / ``results.md``), from per-image
    Hungarian counts that the actors return and the driver sums, so the
    numbers equal a serial run's. No resume: the job runs as a whole.

    ``dataset``: a :mod:`diffseg.evaluation.datasets` dataset (sent to every
    actor: its files must be readable there). ``settings`` and overrides as
    :func:`diffseg.evaluate`; the Ray arguments as :func:`segment_dataset`.
    ``seconds_per_image`` is the wall time over the images, the other timings
    are the actors' sums.
    """
    import time

    from .evaluation import runner
    from .evaluation.metrics import HungarianMetrics

    ray = _ray()
    settings = runner.evaluation_settings(settings, dataset, **overrides)
    options = _actor_options(num_gpus, num_cpus, actors, ray_batch_size)
    n_classes = n_classes if n_classes is not None else getattr(dataset, "n_classes", None)
    if n_classes is None:
        raise ValueError("n_classes: the dataset does not say; pass n_classes=")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1):
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    total = len(dataset) if limit is None else min(len(dataset), int(limit))
    if total == 0:
        raise ValueError("dataset is empty")
    if hasattr(dataset, "check_sizes"):
        dataset.check_sizes(total)
    bundle = _bundle_path(model)
    metric = {"n_classes": int(n_classes), "protocol": runner.segmentation_protocol(protocol),
              "ignore_index": int(ignore_index)}
    device = device or ("cuda" if num_gpus else "cpu")
    t_start = time.perf_counter()
    args = (bundle, device, actor_threads(threads, actors), dataset, settings, metric)
    ds = ray.data.range(total).rename_columns({"id": "index"}).map_batches(_Scorer, fn_constructor_args=args,
                                                                           **options)
    rows = sorted(ds.take_all(), key=lambda r: r["index"])
    metrics = [HungarianMetrics(**metric) for _ in settings]
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
               "ignore_index": int(ignore_index)}
    from .sd.bundle import read_metadata

    source = {"attention_dir": None, "model": {"name": os.path.basename(os.path.dirname(bundle)), "path": bundle},
              "bundle_metadata": {k: v for k, v in read_metadata(bundle).items() if k in runner.BUNDLE_FIELDS},
              "ray_actors": list(_pool_size(actors))}
    results = runner._results(summary, settings, metrics, seconds, len(rows), class_names, source)
    results["dataset"] = runner._json_clean({**described, "evaluated": len(rows)})
    if output_dir is not None:
        runner.write_results(output_dir, results)
    return results
