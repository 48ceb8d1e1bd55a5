"""Many images: the UNet pass of one image overlaps the post-processing of earlier ones.

::

    for index, labels in diffseg.segment_many(paths, model, settings, pool_size=2):
        ...   # in input order, labels as diffseg.segment(paths[index], model, settings) gives

One producer thread runs the model (``model.attention``: VAE encode + UNet in
the libtorch shim) image after image, or ``batch_size`` images per UNet call
(``model.attention_batch``); a pool of ``pool_size`` threads runs the
C core (aggregate, merge, NMS) on the attention it produced. Both release the
GIL, so on a GPU the UNet pass of image i+1 runs while the CPU post-processes
image i; on a CPU the two share the cores (libtorch and OpenMP threads), which
fills each other's serial sections.

Memory is bounded by ``max_pending``: at most that many batches (of
``batch_size`` images, default 1) are between
the start of their UNet pass and the moment their result is handed to the
caller (computed ahead, in post-processing, or finished and waiting for an
earlier image in ordered mode). At 512 px one pending image holds its
attention (about 68 MB: the 4096 x 4096 map at 64 plus the smaller ones) and,
while it is post-processed, the aggregated 4096 x 4096 matrix and the core's
work buffers (about 130 MB more); ``benchmarks/bench_throughput.py`` reports
the peak. The producer blocks while ``max_pending`` images are pending.

:func:`pipelined` is the engine, for any two-stage job (the evaluation runner
uses it to compute the attention of image i+1 while image i is scored).
"""
import itertools
import numbers
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from .settings import resolve_settings

_END = object()


def _check_count(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def pipelined(items, produce, finish=None, *, pool_size=1, max_pending=2, ordered=True, return_exceptions=False):
    """Run ``produce(item)`` over ``items`` in one background thread and
    ``finish(produced)`` in a pool of ``pool_size`` threads; yield
    ``(index, result)`` with ``index`` the item's position in ``items``.

    ``finish=None``: yield what ``produce`` returned (the caller does the rest,
    overlapped with the production of the next items). ``items`` is iterated
    in the producer thread, lazily. ``max_pending``: at most that many items
    are between the start of ``produce`` and being yielded (see the module
    docstring). ``ordered``: in input order (default), else as they finish.

    An ``Exception`` from ``produce`` or ``finish`` belongs to its item: with
    ``return_exceptions`` it is yielded as ``(index, exception)`` and the
    pipeline goes on, else it is raised when its item's turn comes. Anything
    else raised by ``produce`` or by iterating ``items`` (KeyboardInterrupt,
    SystemExit) ends the production: the items before it are yielded, then it
    is raised. Closing the generator early (``break``, ``close()``, an
    exception in the caller's loop, Ctrl-C) stops the producer after the item
    it is running and cancels the queued post-processing; the generator
    returns only once the producer thread has ended, so the caller may then
    close the model.
    """
    if not callable(produce):
        raise TypeError(f"produce must be callable, got {type(produce).__name__}")
    if finish is not None and not callable(finish):
        raise TypeError(f"finish must be callable or None, got {type(finish).__name__}")
    try:
        iterator = iter(items)
    except TypeError:
        raise TypeError(f"items must be iterable, got {type(items).__name__}") from None
    pool_size = _check_count(pool_size, "pool_size")
    max_pending = _check_count(max_pending, "max_pending")
    return _run(iterator, produce, finish, pool_size, max_pending, bool(ordered), bool(return_exceptions))


def _run(iterator, produce, finish, pool_size, max_pending, ordered, return_exceptions):
    done = queue.SimpleQueue()  # (index, finished future); last (_END, (count, fatal error or None))
    slots = threading.Semaphore(max_pending)
    stop = threading.Event()
    pool = None if finish is None else ThreadPoolExecutor(pool_size, thread_name_prefix="diffseg-post")

    def producer():
        count, fatal = 0, None
        try:
            while True:
                slots.acquire()
                if stop.is_set():
                    break
                try:
                    item = next(iterator)
                except StopIteration:
                    break
                future = Future()
                try:
                    value = produce(item)
                except Exception as e:  # noqa: BLE001 -- this item's error, reported with it
                    future.set_exception(e)
                    done.put((count, future))
                    count += 1
                    continue
                if stop.is_set():  # the consumer left during produce: nothing will read the result
                    break
                if pool is None:
                    future.set_result(value)
                    done.put((count, future))
                else:
                    pool.submit(finish, value).add_done_callback(lambda f, i=count: done.put((i, f)))
                count += 1  # only items reported above: a fatal error in produce is not one
        except BaseException as e:  # noqa: BLE001 -- KeyboardInterrupt, a failing iterable: ends the run
            fatal = e
        done.put((_END, (count, fatal)))

    thread = threading.Thread(target=producer, name="diffseg-producer", daemon=True)
    thread.start()
    try:
        waiting = {}  # ordered mode: finished items whose predecessors are not yet yielded
        next_index, yielded, total, fatal = 0, 0, None, None
        while total is None or yielded < total:
            index, payload = done.get()
            if index is _END:
                total, fatal = payload
                continue
            if ordered:
                waiting[index] = payload
                ready = []
                while next_index in waiting:
                    ready.append((next_index, waiting.pop(next_index)))
                    next_index += 1
            else:
                ready = [(index, payload)]
            for i, future in ready:
                slots.release()
                yielded += 1
                error = future.exception()
                if error is None:
                    yield i, future.result()
                elif return_exceptions:
                    yield i, error
                else:
                    raise error
        if fatal is not None:
            raise fatal
    finally:
        stop.set()
        for _ in range(max_pending):  # wake the producer if it waits for a slot
            slots.release()
        thread.join()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _check_images(images):
    if isinstance(images, (str, bytes, os.PathLike, np.ndarray)) or hasattr(images, "getpixel"):
        raise TypeError(f"images must be an iterable of images (paths, arrays, PIL images), got one "
                        f"{type(images).__name__}: wrap a single image in a list")
    try:
        iter(images)
    except TypeError:
        raise TypeError(f"images must be an iterable of images, got {type(images).__name__}") from None


def segment_many(images, model=None, settings=None, *, batch_size=1, pool_size=1, max_pending=None, ordered=True,
                 detailed=False, return_exceptions=False, captioner=None, workers=None, gemm=None, **overrides):
    """Segment many images, the UNet pass of one overlapping the post-processing of earlier ones.

    Yields ``(index, labels)`` -- ``labels`` exactly as :func:`diffseg.segment`
    gives for ``images[index]`` with the same settings -- or, with
    ``detailed=True``, ``(index, result)`` with the dict of
    :func:`diffseg.segment_detailed`.

    Parameters
    ----------
    images : iterable of images (paths, PIL images, uint8 arrays); read lazily
        in the producer thread, so a generator over a large folder is fine.
    model : Model, bundle path, model id, or None (the default model); any
        object with ``.attention(image, timestep)`` works.
    settings, **overrides : :class:`diffseg.Settings` and field overrides,
        as :func:`diffseg.segment`.
    batch_size : images per UNet call (``Model.attention_batch``; default 1).
        Images of one batch that preprocess to different sizes (whole frames
        of other aspect ratios) run in one call per size. On a GPU batches
        raise throughput; on a CPU they barely do. Results equal
        :func:`diffseg.segment`'s exactly with ``batch_size=1``; with larger
        batches libtorch's convolutions sum in another order (attention
        within ~2e-4 relative), so a pixel near a tie may take another label.
        Naming segments runs one image per call.
    pool_size : post-processing threads (default 1: each C core call already
        uses all of the core's threads; more helps when the UNet pass is
        shorter than the post-processing, e.g. on a GPU with many CPU cores).
    max_pending : batches in flight at once, the memory bound (module
        docstring); default ``pool_size + 1``: one in the UNet, ``pool_size``
        in post-processing.
    ordered : yield in input order (default), else as images finish.
    detailed : yield :func:`diffseg.segment_detailed` dicts instead of labels.
    return_exceptions : yield ``(index, exception)`` for an image that fails
        (unreadable file, bad array) and go on; else raise it in order.
    captioner, workers, gemm : as :func:`diffseg.segment` (``workers``: the
        C core's threads in each post-processing call).

    With names (``vocabulary``/``prompt``/``captioner``) each item is
    ``(labels, names)``, or the detailed result with ``names``. Stopping
    early (``break``, closing the generator, Ctrl-C) waits for the UNet pass
    in progress, then stops; see :func:`pipelined`.
    """
    from .core import _gemm_arg, _workers_arg
    from .pipeline import attend, check_model, finish_detailed, frame_geometry, resolve_model
    from .semantic import naming

    _check_images(images)
    settings = resolve_settings(settings, **overrides)
    namer = naming(settings, captioner)
    batch_size = _check_count(batch_size, "batch_size")
    pool_size = _check_count(pool_size, "pool_size")
    max_pending = pool_size + 1 if max_pending is None else _check_count(max_pending, "max_pending")
    _workers_arg(workers), _gemm_arg(gemm)  # refused before any work
    model = check_model(resolve_model(model, cross_attention=namer is not None))
    if namer is not None:
        namer.check_model(model)

    def attend_batch(rgbs):
        """One UNet call per preprocessed size; an error belongs to its call's images."""
        out, groups = [None] * len(rgbs), {}
        for i, rgb in enumerate(rgbs):
            try:
                geometry = frame_geometry(model, rgb, settings.frame)
            except Exception as e:  # noqa: BLE001 -- this image's error
                out[i] = e
                continue
            key = None if geometry is None else (geometry.frame_height, geometry.frame_width)
            groups.setdefault(key, []).append((i, geometry))
        for members in groups.values():
            try:
                attns = model.attention_batch([rgbs[i] for i, _ in members], settings.timestep, frame=settings.frame)
            except Exception as e:  # noqa: BLE001
                attns = [e] * len(members)
            for (i, geometry), attn in zip(members, attns):
                out[i] = attn if isinstance(attn, Exception) else (rgbs[i], attn, geometry, None)
        return out

    batched = batch_size > 1 and namer is None and callable(getattr(model, "attention_batch", None))

    def produce(chunk):
        from .io.images import load_image

        rgbs = [_attempt(load_image, image) for image in chunk]
        if batched:
            ok = [i for i, rgb in enumerate(rgbs) if not isinstance(rgb, Exception)]
            for i, value in zip(ok, attend_batch([rgbs[i] for i in ok])):
                rgbs[i] = value
            return rgbs
        return [rgb if isinstance(rgb, Exception) else _attempt(lambda x: (x, *attend(model, x, settings, namer)), rgb)
                for rgb in rgbs]

    def finish_one(produced):
        rgb, attn, geometry, info = produced
        result = finish_detailed(rgb, attn, geometry, settings, scores=detailed, workers=workers, gemm=gemm)
        result["settings"] = settings
        if namer is not None:
            namer.name(result, info)
            if not detailed:
                return result["labels"], result["names"]
        return result if detailed else result["labels"]  # the rest (A: 64 MB at 512 px) is freed here

    def finish(produced):
        return [p if isinstance(p, Exception) else _attempt(finish_one, p) for p in produced]

    chunks = pipelined(_chunks(images, batch_size), produce, finish, pool_size=pool_size, max_pending=max_pending,
                       ordered=ordered, return_exceptions=True)
    return _per_image(chunks, batch_size, return_exceptions)


def _attempt(fn, value):
    """``fn(value)``, or the ``Exception`` it raised (an image's own error)."""
    try:
        return fn(value)
    except Exception as e:  # noqa: BLE001
        return e


def _chunks(items, size):
    """Lists of ``size`` consecutive items (the last may be shorter), lazily."""
    iterator = iter(items)
    while True:
        chunk = list(itertools.islice(iterator, size))
        if not chunk:
            return
        yield chunk


def _per_image(chunks, size, return_exceptions):
    """``(chunk index, [result or exception, ...])`` -> ``(image index,
    result)``; an image's exception is yielded or raised as
    :func:`segment_many` says. Closing this closes ``chunks``."""
    try:
        for k, values in chunks:
            if isinstance(values, Exception):  # the whole chunk failed
                values = [values]
            for j, value in enumerate(values):
                if isinstance(value, Exception) and not return_exceptions:
                    raise value
                yield k * size + j, value
    finally:
        chunks.close()
