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
* ``OUT/NAME.json`` -- image size, crop or frame, settings and one mask record per
  segment with the keys of SAM's automatic mask generator (see
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
bundle exported with ``diffseg export --cross-attention``.

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
from ..sd.bundle import DEFAULT_TIMESTEP
from . import _common
from ._common import (KL_HELP, UserError, add_model_arguments, apply_threads, collect_inputs, kl_setting,
                      positive_int, report, unique_names)

FORMATS = ("labels", "overlay", "json")
SCORE_DEFINITION = ("score = exp(-mean_kl); mean_kl = mean symmetric KL between the aggregated "
                    "attention of the segment's latent positions and the proposal it comes from")


# ---------------------------------------------------------------- API
def build_document(path, result, records, settings):
    """The JSON document of one image (see the module docstring)."""
    rgb = result["rgb"]
    return {
        "image": str(path),
        "height": int(rgb.shape[0]), "width": int(rgb.shape[1]),
        **_frame_entry(result),
        "settings": settings,
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


def _run(args):
    from tqdm import tqdm

    from ..batch import segment_many

    formats = _parse_formats(args.format)
    apply_threads(args)
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"-o/--output: {out_dir} is a file, not a folder")
    inputs, problems = collect_inputs(args.inputs, args.recursive, exclude=out_dir)
    for message in problems:
        report("segment", message)
    if not inputs:
        raise UserError("no images to segment")
    inputs = unique_names(inputs)
    todo = []
    for path, name in inputs:
        paths = output_paths(out_dir, name, formats)
        if args.skip_existing and _done_with(paths, _requested(args)):
            continue
        todo.append((path, name, paths))
    skipped = len(inputs) - len(todo)

    ok, failed = 0, len(problems)
    interrupted = False
    if todo and args.ray is not None and _naming(args):
        raise UserError("--vocabulary/--prompt are not available with --ray")
    if todo and args.ray is not None:
        ok, errors = _run_ray(args, todo)
        for message in errors:
            report("segment", message)
        failed += len(errors)
    elif todo:
        model = _common.open_model(args)
        if _naming(args) and getattr(model, "has_cross_attention", True) is False:
            model.close()
            raise UserError(f"--vocabulary/--prompt need a bundle exported with --cross-attention; {model.path} "
                            "has none: export it again (`diffseg export SOURCE DIR --cross-attention`)")
        settings = {**_requested(args),
                    "model": getattr(model, "metadata", {}).get("model_id"),
                    "bundle": getattr(model, "path", None)}
        bar = tqdm(total=len(todo), unit="img", disable=args.quiet, file=sys.stderr, dynamic_ncols=True,
                   desc="segment")
        # The UNet pass of the next image overlaps the post-processing and writing of earlier ones.
        results = segment_many([path for path, _, _ in todo], model, workers=args.workers,
                               kl_threshold=args.kl_threshold, grid=args.grid, timestep=args.timestep,
                               frame=args.frame, refine=args.refine, detailed=True, return_exceptions=True,
                               batch_size=args.batch_size,
                               **_naming(args))
        try:
            with contextlib.closing(results):
                t0 = time.perf_counter()
                for index, result in results:
                    path, name, paths = todo[index]
                    bar.update(1)
                    message = _write_or_message(result, path, paths, args.rle, settings)
                    if message:
                        failed += 1
                        tqdm.write(message, file=sys.stderr)
                        continue
                    ok += 1
                    if args.verbose:
                        now = time.perf_counter()
                        tqdm.write(f"{path} -> {out_dir / name}.* ({int(result['labels'].max()) + 1} "
                                   f"segments, {now - t0:.2f} s)", file=sys.stderr)
                        t0 = now
        except KeyboardInterrupt:
            interrupted = True
        finally:
            bar.close()
            if hasattr(model, "close"):
                model.close()
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


def _write_or_message(result, path, paths, rle, settings):
    """Write one image's outputs; None, or the line reporting why it failed."""
    try:
        if isinstance(result, BaseException):
            raise result
        _write(result, path, paths, rle, settings)
    except (ValueError, OSError) as e:  # unreadable image, unwritable output
        return f"diffseg segment: skipped {path}: {e}"
    except Exception as e:  # noqa: BLE001 -- keep going; the exit status says so
        return f"diffseg segment: failed on {path}: {type(e).__name__}: {e}"
    return None


class _RayWriter:
    """Run in each Ray actor: writes one image's outputs, as a serial run does."""

    def __init__(self, rle, settings):
        self.rle, self.settings = rle, settings

    def __call__(self, row, result):
        paths = {f: Path(p) for f, p in json.loads(str(row["outputs"])).items()}
        return _write_or_message(result, row["path"], paths, self.rle, self.settings) or ""


def _run_ray(args, todo):
    """``diffseg segment --ray``: actors segment and write; ``(ok, error lines)``."""
    from ..distributed import init_ray, segment_dataset
    from ..sd.bundle import read_metadata
    from ..sd.model import _resolve_bundle

    if args.batch_size != 1:
        raise UserError("--batch-size is for runs without --ray (Ray's actors take one image per UNet call)")
    if args.model is None or _resolve_bundle(args.model) is None:
        raise UserError("--ray needs --model BUNDLE (an exported bundle file or folder readable by every worker)")
    if Path(args.ray).exists():  # `--ray photos/`: argparse took the input for the address
        raise UserError(f"--ray took {args.ray!r} as the Ray address; put --ray after the inputs, or write "
                        "--ray=local / --ray=ADDRESS")
    init_ray(args.ray)
    bundle = _resolve_bundle(args.model)
    # what a serial run records from the opened model, read without opening it here
    settings = {**_requested(args), "model": read_metadata(bundle).get("model_id"), "bundle": str(bundle)}
    rows = [{"index": i, "path": str(path), "outputs": json.dumps({f: str(p) for f, p in paths.items()})}
            for i, (path, _, paths) in enumerate(todo)]
    records = segment_dataset(rows, args.model, concurrency=args.actors, num_gpus=args.gpus_per_actor or None,
                              threads=args.threads, workers=args.workers, kl_threshold=args.kl_threshold,
                              grid=args.grid, timestep=args.timestep, frame=args.frame, refine=args.refine,
                              detailed=True,
                              postprocess=_RayWriter(args.rle, settings), as_list=True)
    errors = [r["output"] for r in records if r["output"]]
    return len(records) - len(errors), errors


def _requested(args):
    """The settings of this run that are known before the model is opened."""
    return {"kl_threshold": list(args.kl_threshold), "grid": args.grid,
            "timestep": DEFAULT_TIMESTEP if args.timestep is None else args.timestep,
            "model_arg": args.model, "refine": bool(args.refine), "frame": args.frame,
            "vocabulary": args.vocabulary, "prompt": args.prompt, "voting": args.voting}


def _naming(args):
    """The semantic-label arguments of segment_many ({} when none is asked for)."""
    if args.vocabulary is None and args.prompt is None:
        return {}
    return {"vocabulary": args.vocabulary, "prompt": args.prompt, "voting": args.voting}


def _vocabulary(text):
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words:
        raise argparse.ArgumentTypeError("expected comma-separated words, e.g. cat,grass,sky")
    return words


# Settings added after outputs were first saved: the value older outputs were made with.
_OLDER_OUTPUTS = {"refine": False, "frame": "crop", "vocabulary": None, "prompt": None, "voting": "mean"}


def _done_with(paths, wanted):
    """All outputs exist and, when the JSON is among them, were made with the
    wanted settings (outputs of other settings are not kept by --skip-existing)."""
    if not all(p.is_file() for p in paths.values()):
        return False
    if "json" not in paths:
        return True
    try:
        saved = json.loads(paths["json"].read_text()).get("settings", {})
    except (OSError, ValueError, AttributeError):
        return False
    return all(saved.get(k, _OLDER_OUTPUTS.get(k)) == v for k, v in wanted.items())


def _write(result, path, paths, rle, settings):
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    # Atomic writes: an interrupted run never leaves a truncated output that --skip-existing would keep.
    if "labels" in paths:
        from ..io.images import save_label_png

        save_label_png(paths["labels"], result["labels"])
    if "overlay" in paths:
        from PIL import Image

        from ..viz import named_overlay, overlay

        picture = (named_overlay(result["rgb"], result["labels"], result["names"]) if "names" in result
                   else overlay(result["rgb"], result["labels"]))
        with atomic_path(paths["overlay"]) as tmp:
            # zlib level 1: a 12 MP overlay took 10 s at the default level 6, 1.5 s here, for ~20 % more bytes
            Image.fromarray(picture).save(tmp, format="PNG", compress_level=1)
    if "json" in paths:
        doc = build_document(path, result, _json_records(result, rle), settings)
        with atomic_write(paths["json"]) as f:
            json.dump(doc, f, separators=(",", ":") if rle == "binary_mask" else (", ", ": "))


def add_throughput_arguments(p, workers=True):
    """--workers and the Ray options (the Ray ones shared with ``diffseg eval``)."""
    if workers:
        p.add_argument("--workers", type=positive_int, default=1, metavar="N",
                       help="post-processing threads beside the UNet pass (default 1)")
        p.add_argument("--batch-size", type=positive_int, default=1, metavar="B",
                       help="images per UNet call (default 1; more helps on a GPU; labels may differ from "
                            "single calls at near-tie pixels, see diffseg.segment_many)")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on Ray Data (pip install 'diffseg[ray]'): alone, a local Ray instance; with "
                        "ADDRESS (auto, ray://host:10001, host:6379), that cluster. Needs --model BUNDLE")
    p.add_argument("--actors", type=positive_int, default=1, metavar="N",
                   help="with --ray: actors, each holding one model (default 1)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, metavar="G",
                   help="with --ray: GPUs per actor (default 0: CPU actors of 0.5 CPU each)")


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
    p.add_argument("--kl-threshold", type=kl_setting, default=kl_setting("1.1"), metavar="T",
                   help=f"merge threshold: {KL_HELP} (default 1.1, COCO-Stuff; 0.9 for Cityscapes)")
    p.add_argument("--grid", type=positive_int, default=16, metavar="N",
                   help="anchors along the short side (default 16; proportionally more on the long side)")
    p.add_argument("--frame", choices=("whole", "crop"), default="whole",
                   help="segment the whole image (default), or its centred square crop as the published "
                        "protocol (pixels outside take the nearest crop pixel's label)")
    p.add_argument("--refine", action="store_true",
                   help="k-means refinement of the merged proposals, as the official refine=True "
                        "(off by default, as in the official benchmarks)")
    p.add_argument("--vocabulary", type=_vocabulary, default=None, metavar="WORDS",
                   help="name segments with these comma-separated words (prompt: the words joined by ', '); "
                        "needs a bundle exported with --cross-attention")
    p.add_argument("--prompt", default=None, metavar="TEXT",
                   help="prompt of the UNet pass; names segments with its nouns (or with --vocabulary)")
    p.add_argument("--voting", choices=("mean", "majority"), default="mean",
                   help="how a segment picks its name: mean (default, as the official demo) or majority")
    p.add_argument("--format", default="all", metavar="LIST",
                   help="outputs, comma-separated: labels, overlay, json (default: all)")
    p.add_argument("--output-mode", dest="rle", choices=OUTPUT_MODES, default="coco_rle",
                   help="segmentation encoding in the JSON, named as SAM's automatic mask generator: "
                        "coco_rle (compressed COCO RLE, default), uncompressed_rle, binary_mask")
    p.add_argument("-r", "--recursive", action="store_true", help="also images in subfolders of folders")
    p.add_argument("--skip-existing", action="store_true",
                   help="skip images whose outputs all exist and (per NAME.json) were made with the same "
                        "--kl-threshold, --grid, --refine, --timestep, --model, --vocabulary, --prompt and --voting "
                        "(resume a batch)")
    add_throughput_arguments(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per image")
    p.set_defaults(func=_run)
