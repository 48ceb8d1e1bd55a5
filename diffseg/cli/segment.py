"""``diffseg segment``: segment image files, write label maps, overlays and mask records.

::

    diffseg segment photos/ extra.jpg "more/*.png" -o out --model bundle-dir

Inputs are files, folders (their images, sorted; ``-r`` for subfolders) and
glob patterns (expanded here too, for shells that pass them on). One model is
loaded for the whole batch. For an input named ``NAME`` (the file name without
extension; for files found in a folder, the path below that folder) it writes

* ``OUT/NAME.labels.png`` -- single-channel label map at the image's size
  (8-bit; 16-bit when a label exceeds 255), pixel value = segment id;
* ``OUT/NAME.overlay.png`` -- the image with the segments in colour;
* ``OUT/NAME.json`` -- image size, crop or frame, the settings and model
  (``made_with``) and one mask record per segment with the keys of SAM's automatic mask generator (see
  :func:`diffseg.pipeline.result_records`): ``id``, ``area``, ``bbox`` (XYWH),
  ``segmentation`` (``--output-mode``: ``coco_rle`` compressed string counts,
  ``uncompressed_rle`` list counts, or ``binary_mask`` as nested 0/1 lists),
  ``point_coords``, ``crop_box``, ``score`` (``exp(-mean_kl)``), ``mean_kl`` and ``proposal``.

Semantic labels: ``--vocabulary cat,grass,sky`` names each segment with one
of the words (from the cross-attention of a pass conditioned on the prompt
"cat, grass, sky"), ``--prompt "a cat on the grass"`` with the prompt's nouns
(or with ``--vocabulary`` words that must be in the prompt); ``--voting mean``
(default) or ``majority``. The records get ``name``, the JSON ``prompt`` and
``words``, and the overlay colours segments by name with a legend. Needs a
bundle exported with ``diffseg export --cross-attention`` (a checkpoint or
model id given to ``--model`` is exported with it).

Every output records what made it (the JSON's ``made_with``; a ``diffseg``
text chunk in each PNG): the whole :class:`diffseg.Settings` and the model.
``--skip-existing`` skips an image only when all its outputs exist and were
made with the same settings and model.

Images named ``*.labels.png`` / ``*.overlay.png`` in the output folder are
our outputs and never inputs, so OUT may be the input folder itself.
Two inputs with the same NAME get ``NAME_2``, ``NAME_3``, ... in input order.
``--format`` picks the outputs (``labels,overlay,json``; default all).
Files that cannot be read are reported, skipped and counted; the exit status
is 0 when every input was segmented, 1 when some failed, 2 for a usage error
(no inputs, a model that cannot be opened, bad options).

The whole image is segmented (``--frame whole``, default): it runs on a
latent grid of its own aspect ratio. ``--frame crop`` segments the centred
square crop as the published protocol; pixels outside it take the label of
the nearest crop pixel (see :mod:`diffseg.pipeline`).
"""
import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from ..io.records import OUTPUT_MODES
from .._util import atomic_path, atomic_write
from . import _common
from ._common import (UserError, add_model_arguments, add_settings_arguments, apply_threads, output_folder,
                      collect_inputs, positive_int, report, settings_from_args, unique_names)

FORMATS = ("labels", "overlay", "json")
SCORE_DEFINITION = ("score = exp(-mean_kl); mean_kl = mean symmetric KL between the aggregated "
                    "attention of the segment's latent positions and the proposal it comes from")


# ---------------------------------------------------------------- API
def build_document(path, result, records, made_with):
    """The JSON document of one image (see the module docstring);
    ``made_with``: :func:`made_with` of the run."""
    rgb = result["rgb"]
    return {
        "image": str(path),
        "height": int(rgb.shape[0]), "width": int(rgb.shape[1]),
        **_frame_entry(result),
        "made_with": made_with,
        "n_segments": len(records),
        "score": SCORE_DEFINITION,
        "annotations": records,
        **({"prompt": result["prompt"], "words": result["words"]} if "names" in result else {}),
    }


def _frame_entry(result):
    """What part of the image was segmented: ``crop`` (top, left, size) of the
    centre crop, or the whole ``frame`` (working size, padding, scale)."""
    if result.get("frame", "crop") == "crop":
        top, left, side = result["crop"]
        return {"crop": {"top": int(top), "left": int(left), "size": int(side)}}
    g = result["geometry"]
    return {"frame": {"height": g.frame_height, "width": g.frame_width,
                      "grid": list(result["proposals"].shape[1:]),
                      "padding": {"top": g.top, "bottom": g.bottom, "left": g.left, "right": g.right},
                      "scale": g.scale}}


def _json_records(result, output_mode):
    from ..pipeline import result_records

    records = result_records(result, output_mode)
    if output_mode == "binary_mask":  # JSON has no arrays
        for r in records:
            r["segmentation"] = r["segmentation"].astype(np.uint8).tolist()
    return records


def output_paths(out_dir, name, formats):
    """``{format: path}`` of the outputs of one image."""
    suffix = {"labels": ".labels.png", "overlay": ".overlay.png", "json": ".json"}
    return {f: Path(out_dir) / f"{name}{suffix[f]}" for f in formats}


# ---------------------------------------------------------------- CLI
def _parse_formats(text):
    parts = [p.strip().lower() for p in text.replace(" ", ",").split(",") if p.strip()]
    if not parts or parts == ["all"]:
        return FORMATS
    bad = [p for p in parts if p not in FORMATS]
    if bad:
        raise UserError(f"--format: unknown output(s) {', '.join(bad)} (choose from {', '.join(FORMATS)}, all)")
    return tuple(f for f in FORMATS if f in parts)


def made_with(settings, model_id, bundle):
    """What made an output: the whole settings and the model, as recorded in
    each output and compared by ``--skip-existing``."""
    return {"settings": settings.to_dict(), "model": {"model_id": model_id,
                                                      "bundle": None if bundle is None else str(bundle)}}


def _run(args):
    formats = _parse_formats(args.format)
    settings = settings_from_args(args)  # bad options fail here, before any model is opened
    with output_folder(args.output, "-o/--output") as out_dir:
        return _segment(args, settings, formats, out_dir)


def _segment(args, settings, formats, out_dir):
    from ..sd.model import _resolve_bundle

    if args.ray is not None:
        _check_ray_args(args, settings)
    inputs, problems = collect_inputs(args.inputs, args.recursive, exclude=out_dir.resolve())
    for message in problems:
        report("segment", message)
    if not inputs:
        raise UserError("no images to segment")
    inputs = unique_names(inputs)
    apply_threads(args)
    bundle = _resolve_bundle(args.model) if args.model is not None else None
    todo = []
    for path, name in inputs:
        paths = output_paths(out_dir, name, formats)
        if args.skip_existing and bundle is not None and _done_with(paths, made_with(settings, *_bundle_id(bundle))):
            continue
        todo.append((path, name, paths))
    if args.skip_existing and bundle is None:  # a checkpoint: its bundle is known once opened
        todo = None
    ok, failed, interrupted = 0, len(problems), False
    if todo is None or todo:
        if args.ray is not None:
            ok, errors = _run_ray(args, settings, todo, formats)
            for message in errors:
                report("segment", message)
            failed += len(errors)
        else:
            todo, ok, errors, interrupted = _run_local(args, settings, inputs, todo, formats)
            failed += errors
    skipped = len(inputs) - len(todo)
    summary = f"{ok} image(s) segmented into {out_dir}"
    if skipped:
        summary += f", {skipped} already done"
    if failed:
        summary += f", {failed} failed"
    if interrupted:
        left = len(todo) - ok - (failed - len(problems))
        report("segment", f"interrupted: {summary}, {left} not done (--skip-existing resumes)")
        return 130
    if not args.quiet or failed:
        report("segment", summary)
    return 1 if failed else 0


def _bundle_id(bundle):
    """``(model id, bundle path)`` of a bundle file, read without opening it."""
    from ..sd.bundle import read_metadata

    try:
        return read_metadata(bundle).get("model_id"), bundle.resolve()
    except (OSError, ValueError):
        return None, bundle.resolve()


def _run_local(args, settings, inputs, todo, formats):
    """Segment in this process: ``(todo, ok, failed, interrupted)``."""
    from tqdm import tqdm

    from ..batch import segment_many

    model = _common.open_model(args, cross_attention=settings.names_segments)
    try:
        record = made_with(settings, getattr(model, "metadata", {}).get("model_id"), getattr(model, "path", None))
        if todo is None:  # --skip-existing with a checkpoint: now the bundle is known
            todo = [(path, name, paths) for path, name in inputs
                    for paths in [output_paths(Path(args.output), name, formats)]
                    if not _done_with(paths, record)]
        if settings.names_segments:
            _check_naming(model, settings)
        ok, failed, interrupted = 0, 0, False
        if not todo:
            return todo, ok, failed, interrupted
        bar = tqdm(total=len(todo), unit="img", disable=args.quiet, file=sys.stderr, dynamic_ncols=True,
                   desc="segment")
        # The UNet pass of the next image overlaps the post-processing and writing of earlier ones.
        results = segment_many([path for path, _, _ in todo], model, settings, pool_size=args.pool_size,
                               batch_size=args.batch_size, detailed=True, return_exceptions=True)
        try:
            with contextlib.closing(results):
                t0 = time.perf_counter()
                for index, result in results:
                    path, name, paths = todo[index]
                    bar.update(1)
                    message = _write_or_message(result, path, paths, args.rle, record)
                    if message:
                        failed += 1
                        tqdm.write(f"diffseg segment: {message}", file=sys.stderr)
                        continue
                    ok += 1
                    if args.verbose:
                        now = time.perf_counter()
                        n = int(result["labels"].max()) + 1
                        tqdm.write(f"{path} -> {Path(args.output) / name}.* ({n} segment{'s' * (n != 1)}, "
                                   f"{now - t0:.2f} s)", file=sys.stderr)
                        t0 = now
        except KeyboardInterrupt:
            interrupted = True
        finally:
            bar.close()
        return todo, ok, failed, interrupted
    finally:
        if hasattr(model, "close"):
            model.close()


def _check_naming(model, settings):
    """Names need a bundle with cross-attention and words the prompt can hold: refused before any pass."""
    from ..semantic import naming

    try:
        naming(settings).check_model(model)
    except ValueError as e:
        raise UserError(_common.cli_message(str(e))) from None


def _write_or_message(result, path, paths, rle, record):
    """Write one image's outputs; None, or why it failed (without the command's prefix)."""
    try:
        if isinstance(result, BaseException):
            raise result
        _write(result, path, paths, rle, record)
    except (ValueError, OSError) as e:  # unreadable image, unwritable output
        return f"skipped {path}: {_common.cli_message(str(e))}"
    except Exception as e:  # noqa: BLE001 -- keep going; the exit status says so
        return f"failed on {path}: {type(e).__name__}: {e}"
    return None


class _RayWriter:
    """Run in each Ray actor: writes one image's outputs, as a serial run does."""

    def __init__(self, rle, record):
        self.rle, self.record = rle, record

    def __call__(self, row, result):
        paths = {f: Path(p) for f, p in json.loads(str(row["outputs"])).items()}
        return _write_or_message(result, row["path"], paths, self.rle, self.record) or ""


def _check_ray_args(args, settings):
    """The Ray run's own refusals, before any work."""
    from ..sd.model import _resolve_bundle

    if settings.names_segments:
        raise UserError("--vocabulary/--prompt are not available with --ray")
    if args.model is None or _resolve_bundle(args.model) is None:
        raise UserError("--ray needs --model BUNDLE (an exported bundle file or folder readable by every worker)")
    if Path(args.ray).exists():  # `--ray photos/`: argparse took the input for the address
        raise UserError(f"--ray took {args.ray!r} as the Ray address; put --ray after the inputs, or write "
                        "--ray=local / --ray=ADDRESS")


def _run_ray(args, settings, todo, formats):
    """``diffseg segment --ray``: actors segment and write; ``(ok, error lines)``."""
    from ..distributed import init_ray, segment_dataset
    from ..sd.model import _resolve_bundle

    init_ray(args.ray, quiet=args.quiet)
    bundle = _resolve_bundle(args.model)
    record = made_with(settings, *_bundle_id(bundle))  # what a serial run records, without opening the model
    rows = [{"path": str(path), "outputs": json.dumps({f: str(p) for f, p in paths.items()})}
            for path, _, paths in todo]
    records = segment_dataset(rows, args.model, settings, actors=args.actors, num_gpus=args.gpus_per_actor or None,
                              threads=args.threads or None, batch_size=args.batch_size, pool_size=args.pool_size,
                              detailed=True, postprocess=_RayWriter(args.rle, record), as_list=True)
    errors = [r["output"] for r in records if r["output"]]
    return len(records) - len(errors), errors


def _done_with(paths, record):
    """All outputs exist and each records that it was made with ``record``
    (:func:`made_with`); outputs without a record are made again."""
    return all(p.is_file() and _made_with(p) == record for p in paths.values())


def _made_with(path):
    """The record an output file holds (None if it holds none or cannot be read)."""
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text()).get("made_with")
        from PIL import Image

        with Image.open(path) as im:
            return json.loads(im.text.get(PNG_KEY, "null"))
    except (OSError, ValueError, AttributeError, SyntaxError):
        return None


PNG_KEY = "diffseg"
"""PNG text chunk holding an output's record."""


def _png_info(record):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PNG_KEY, json.dumps(record, sort_keys=True))
    return info


def _write(result, path, paths, rle, record):
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    # Atomic writes: an interrupted run never leaves a truncated output that --skip-existing would keep.
    if "labels" in paths:
        from ..io.images import save_label_png

        save_label_png(paths["labels"], result["labels"], pnginfo=_png_info(record))
    if "overlay" in paths:
        from PIL import Image

        from ..viz import named_overlay, overlay

        picture = (named_overlay(result["rgb"], result["labels"], result["names"]) if "names" in result
                   else overlay(result["rgb"], result["labels"]))
        with atomic_path(paths["overlay"]) as tmp:
            # zlib level 1: a 12 MP overlay took 10 s at the default level 6, 1.5 s here, for ~20 % more bytes
            Image.fromarray(picture).save(tmp, format="PNG", compress_level=1, pnginfo=_png_info(record))
    if "json" in paths:
        doc = build_document(path, result, _json_records(result, rle), record)
        with atomic_write(paths["json"]) as f:
            json.dump(doc, f, separators=(",", ":") if rle == "binary_mask" else (", ", ": "))


def add_throughput_arguments(p, local=True):
    """--pool-size, --batch-size and the Ray options (the Ray ones shared with ``diffseg eval``)."""
    if local:
        p.add_argument("--pool-size", type=positive_int, default=1, metavar="N",
                       help="post-processing threads beside the UNet pass (default 1)")
        p.add_argument("--batch-size", type=positive_int, default=1, metavar="B",
                       help="images per UNet call (default 1; more helps on a GPU; labels may differ from "
                            "single calls at near-tie pixels, see diffseg.segment_many)")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on Ray Data (pip install 'diffseg[ray]'): alone, a local Ray instance; with "
                        "ADDRESS (auto, ray://host:10001, host:6379), that cluster. Needs --model BUNDLE")
    p.add_argument("--actors", type=positive_int, default=1, metavar="N",
                   help="with --ray: actors, each holding one model and using the cores divided by N "
                        "(default 1)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, metavar="G",
                   help="with --ray: GPUs per actor (default 0: CPU actors)")


def register_cli(subparsers):
    p = subparsers.add_parser(
        "segment",
        help="segment images: label maps, overlays and COCO-RLE mask records",
        description="Segment image files, folders and glob patterns with one model and write, per image, "
                    "NAME.labels.png (label map at the image's size), NAME.overlay.png and NAME.json "
                    "(mask records: id, area, bbox XYWH, COCO RLE segmentation, score). Exit status: "
                    "0 all segmented, 1 some inputs failed, 2 usage error.",
    )
    p.add_argument("inputs", nargs="+", metavar="PATH", help="image files, folders or glob patterns")
    p.add_argument("-o", "--output", default="diffseg-out", metavar="DIR",
                   help="output folder (default: diffseg-out)")
    add_model_arguments(p)
    add_settings_arguments(p, naming=True)
    p.add_argument("--format", default="all", metavar="LIST",
                   help="outputs, comma-separated: labels, overlay, json (default: all)")
    p.add_argument("--output-mode", dest="rle", choices=OUTPUT_MODES, default="coco_rle",
                   help="segmentation encoding in the JSON, named as SAM's automatic mask generator: "
                        "coco_rle (compressed COCO RLE, default), uncompressed_rle, binary_mask")
    p.add_argument("-r", "--recursive", action="store_true", help="also images in subfolders of folders")
    p.add_argument("--skip-existing", action="store_true",
                   help="skip images whose outputs all exist and were made with the same settings and model "
                        "(each output records them; resume a batch)")
    add_throughput_arguments(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, summary or Ray log lines")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per image")
    p.set_defaults(func=_run)
