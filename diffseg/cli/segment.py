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
* ``OUT/NAME.json`` -- image size, crop, settings and one mask record per
  segment (see :mod:`diffseg.io.records`): ``id``, ``area``, ``bbox`` (XYWH),
  ``segmentation`` (``--output-mode``: ``coco_rle`` compressed string counts,
  ``uncompressed_rle`` list counts, or ``binary_mask`` as nested 0/1 lists),
  ``score`` (``exp(-mean_kl)``), ``mean_kl`` and ``proposal``.

Two inputs with the same NAME get ``NAME_2``, ``NAME_3``, ... in input order.
``--format`` picks the outputs (``labels,overlay,json``; default all).
Files that cannot be read are reported, skipped and counted; the exit status
is 0 when every input was segmented, 1 when some failed, 2 for a usage error
(no inputs, a model that cannot be opened, bad options).

DiffSeg segments the centred square crop of an image; pixels outside it take
the label of the nearest crop pixel (see :mod:`diffseg.pipeline`).
"""
import glob
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from ..core import kl_thresholds
from ..io.records import OUTPUT_MODES

FORMATS = ("labels", "overlay", "json")
SCORE_DEFINITION = ("score = exp(-mean_kl); mean_kl = mean symmetric KL between the aggregated "
                    "attention of the segment's latent positions and the proposal it comes from")


# ---------------------------------------------------------------- API
def build_document(path, result, records, settings):
    """The JSON document of one image (see the module docstring)."""
    rgb = result["rgb"]
    top, left, side = result["crop"]
    return {
        "image": str(path),
        "height": int(rgb.shape[0]), "width": int(rgb.shape[1]),
        "crop": {"top": int(top), "left": int(left), "size": int(side)},
        "settings": settings,
        "n_segments": len(records),
        "score": SCORE_DEFINITION,
        "annotations": records,
    }


def _json_records(result, rle):
    from ..io.records import masks_to_records

    records = masks_to_records(result["labels"], scores=result["score"], output_mode=rle)
    for r in records:
        k = r["id"]
        kl = float(result["mean_kl"][k])
        r["mean_kl"] = kl if np.isfinite(kl) else None
        r["proposal"] = int(result["proposal"][k])
        if rle == "binary_mask":
            r["segmentation"] = r["segmentation"].astype(np.uint8).tolist()
    return records


# ---------------------------------------------------------------- inputs
def _is_image(p):
    from ..io.images import IMAGE_SUFFIXES

    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES


def _scan(folder, recursive, exclude):
    pattern = "**/*" if recursive else "*"
    found = []
    for p in sorted(folder.glob(pattern)):
        if not _is_image(p):
            continue
        if exclude is not None and (p.resolve() == exclude or exclude in p.resolve().parents):
            continue  # our own outputs, when OUT is inside an input folder
        found.append((p, p.relative_to(folder).with_suffix("").as_posix()))
    return found


def collect_inputs(paths, recursive=False, exclude=None):
    """``(inputs, problems)``: ``inputs`` a list of ``(path, name)`` in order,
    without repeats; ``problems`` messages for arguments that matched nothing."""
    exclude = Path(exclude).resolve() if exclude is not None else None
    inputs, problems, seen = [], [], set()

    def add(p, name):
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            inputs.append((p, name))

    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            found = _scan(p, recursive, exclude)
            if not found:
                problems.append(f"{arg}: no images in this folder"
                                + ("" if recursive else " (-r for subfolders)"))
            for q, name in found:
                add(q, name)
        elif p.exists():
            add(p, p.stem)  # any file given by name is tried, whatever its extension
        elif glob.has_magic(arg):
            matches = sorted(glob.glob(arg, recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file()]
            for m in matches:
                if Path(m).is_dir():
                    files.extend(q for q, _ in _scan(Path(m), recursive, exclude))
            if not files:
                problems.append(f"{arg}: no files match")
            for q in files:
                add(q, q.stem)
        else:
            problems.append(f"{arg}: no such file or folder")
    return inputs, problems


def _unique_names(inputs):
    used, out = set(), []
    for path, name in inputs:
        candidate, n = name, 1
        while candidate in used:
            n += 1
            candidate = f"{name}_{n}"
        used.add(candidate)
        out.append((path, candidate))
    return out


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
        from . import UserError

        raise UserError(f"--format: unknown output(s) {', '.join(bad)} (choose from {', '.join(FORMATS)}, all)")
    return tuple(f for f in FORMATS if f in parts)


def _open_model(args):
    from . import UserError
    from ..sd.model import load_model

    try:
        return load_model(args.model, device=args.device, threads=args.threads)
    except ImportError as e:
        raise UserError(str(e)) from None


def _run(args):
    from tqdm import tqdm

    from ..pipeline import segment_detailed
    from . import UserError

    formats = _parse_formats(args.format)
    thresholds = kl_thresholds(args.kl_threshold, "--kl-threshold")
    if args.grid < 1:
        raise UserError(f"--grid must be >= 1, got {args.grid}")
    out_dir = Path(args.output)
    inputs, problems = collect_inputs(args.inputs, args.recursive, exclude=out_dir)
    for message in problems:
        print(f"diffseg segment: {message}", file=sys.stderr)
    if not inputs:
        raise UserError("no images to segment")
    inputs = _unique_names(inputs)
    todo = []
    for path, name in inputs:
        paths = output_paths(out_dir, name, formats)
        if args.skip_existing and all(p.is_file() for p in paths.values()):
            continue
        todo.append((path, name, paths))
    skipped = len(inputs) - len(todo)

    ok, failed = 0, len(problems)
    if todo:
        model = _open_model(args)
        settings = {"kl_threshold": list(thresholds), "grid": args.grid,
                    "timestep": args.timestep if args.timestep is not None else model.info.get("timestep"),
                    "model": getattr(model, "metadata", {}).get("model_id"),
                    "bundle": getattr(model, "path", None)}
        try:
            bar = tqdm(todo, unit="img", disable=args.quiet, file=sys.stderr, dynamic_ncols=True,
                       desc="segment")
            for path, name, paths in bar:
                t0 = time.perf_counter()
                try:
                    result = segment_detailed(path, model, kl_threshold=thresholds, grid=args.grid,
                                              timestep=args.timestep)
                    _write(result, path, paths, args.rle, settings)
                except (ValueError, OSError) as e:  # unreadable image, unwritable output
                    failed += 1
                    tqdm.write(f"diffseg segment: skipped {path}: {e}", file=sys.stderr)
                    continue
                except Exception as e:  # noqa: BLE001 -- keep going; the exit status says so
                    failed += 1
                    tqdm.write(f"diffseg segment: failed on {path}: {type(e).__name__}: {e}",
                               file=sys.stderr)
                    continue
                ok += 1
                if args.verbose:
                    tqdm.write(f"{path} -> {out_dir / name}.* ({int(result['labels'].max()) + 1} "
                               f"segments, {time.perf_counter() - t0:.2f} s)", file=sys.stderr)
        finally:
            if hasattr(model, "close"):
                model.close()
    summary = f"diffseg segment: {ok} image(s) segmented into {out_dir}"
    if skipped:
        summary += f", {skipped} already done"
    if failed:
        summary += f", {failed} failed"
    if not args.quiet or failed:
        print(summary, file=sys.stderr)
    return 1 if failed else 0


def _write(result, path, paths, rle, settings):
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    if "labels" in paths:
        from ..io.images import save_label_png

        save_label_png(paths["labels"], result["labels"])
    if "overlay" in paths:
        from PIL import Image

        from ..viz import overlay

        Image.fromarray(overlay(result["rgb"], result["labels"])).save(paths["overlay"])
    if "json" in paths:
        doc = build_document(path, result, _json_records(result, rle), settings)
        tmp = paths["json"].with_name(paths["json"].name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f, separators=(",", ":") if rle == "binary_mask" else (", ", ": "))
        os.replace(tmp, paths["json"])


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
    p.add_argument("-m", "--model", default=None,
                   help="bundle file/folder or checkpoint (default: CompVis/stable-diffusion-v1-4, "
                        "exported once into the cache)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (the bundle's device)")
    p.add_argument("--threads", type=int, default=None, help="libtorch threads (default: as is)")
    p.add_argument("--kl-threshold", default="1.1", metavar="T",
                   help="merge threshold, or one per iteration: 1.1 (COCO-Stuff, default) or 0.9,0.9,0.9")
    p.add_argument("--grid", type=int, default=16, help="anchors per side (default 16)")
    p.add_argument("--timestep", type=int, default=None, help="UNet timestep (default: the bundle's, 300)")
    p.add_argument("--format", default="all", metavar="LIST",
                   help="outputs, comma-separated: labels, overlay, json (default: all)")
    p.add_argument("--output-mode", dest="rle", choices=OUTPUT_MODES, default="coco_rle",
                   help="segmentation encoding in the JSON, named as SAM's automatic mask generator: "
                        "coco_rle (compressed COCO RLE, default), uncompressed_rle, binary_mask")
    p.add_argument("-r", "--recursive", action="store_true", help="also images in subfolders of folders")
    p.add_argument("--skip-existing", action="store_true",
                   help="skip images whose outputs all exist (resume a batch)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per image")
    p.set_defaults(func=_run)
