"""``diffseg attention``: write the self-attention maps of images (.npz).

Inputs are files, folders and glob patterns as for ``diffseg segment``; files
that cannot be read are reported, skipped and counted (exit status 1).
"""
import time
from pathlib import Path

from . import _common
from ._common import UserError, add_model_arguments, apply_threads, collect_inputs, report, unique_names


def register_cli(subparsers):
    p = subparsers.add_parser(
        "attention",
        help="write the self-attention maps of images (.npz, one per image)",
        description="Run the model bundle on each image and write its self-attention maps "
                    "(keys attn_<res>, (s*s, s*s); attn_<h>x<w> for the non-square grids of --frame whole) "
                    "to DIR/<image name>.npz. Exit status: 0 all written, 1 some inputs failed, 2 usage error.",
    )
    p.add_argument("images", nargs="+", metavar="PATH", help="image files, folders or glob patterns")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("-r", "--recursive", action="store_true", help="also images in subfolders of folders")
    add_model_arguments(p)
    p.add_argument("--timestep", type=_common._int_at_least(0, 999), default=300, metavar="T",
                   help="UNet timestep, 0..999 (default 300, as the official code)")
    p.add_argument("--stored-orientation", action="store_true",
                   help="ignore EXIF orientation: the image as stored, like evaluation datasets "
                        "(their labels are stored that way); default: as displayed")
    p.add_argument("--frame", choices=("crop", "whole"), default="crop",
                   help="crop (default: the centre crop of the published protocol, which diffseg eval "
                        "--attention-dir expects) or whole (the whole image on a grid of its aspect ratio, "
                        "as diffseg segment uses)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="stored precision: float32 (default, ~72 MB per 512 px image) or float16 "
                        "(half the size; see docs/evaluation.md for its effect on labels)")
    p.set_defaults(func=_run)


def _run(args):
    with _common.output_folder(args.out, "-o/--out") as out:
        return _write_attention(args, out)


def _write_attention(args, out):
    from ..io.attention import save_attention
    from ..io.images import load_image

    apply_threads(args)
    inputs, problems = collect_inputs(args.images, args.recursive)
    for message in problems:
        report("attention", message)
    if not inputs:
        raise UserError("no images to read")
    model = _common.open_model(args)
    written, failed = 0, len(problems)
    try:
        for image, name in unique_names([(p, p.stem) for p, _ in inputs]):
            t0 = time.perf_counter()
            target = out / f"{name}.npz"
            try:
                rgb = load_image(image, exif_transpose=not args.stored_orientation)
                attn = (model.attention(rgb, args.timestep) if args.frame == "crop"
                        else model.attention(rgb, args.timestep, frame="whole"))
                save_attention(target, attn, dtype=args.dtype)
            except (ValueError, OSError) as e:  # unreadable image, unwritable output
                failed += 1
                report("attention", f"skipped {image}: {e}")
                continue
            written += 1
            print(f"{image} -> {target} ({time.perf_counter() - t0:.2f} s)")
    except KeyboardInterrupt:
        report("attention", f"interrupted: {written} of {len(inputs)} file(s) written to {out}"
                            + (f", {failed} failed" if failed else ""))
        return 130
    finally:
        model.close()
    if failed:
        report("attention", f"{written} file(s) written to {out}, {failed} failed")
    return 1 if failed else 0
