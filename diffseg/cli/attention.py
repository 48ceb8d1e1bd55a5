"""``diffseg attention``: write the self-attention maps of images (.npz).

Inputs are files, folders and glob patterns as for ``diffseg segment``; files
that cannot be read are reported, skipped and counted (exit status 1). Each
file records how it was made (:func:`diffseg.io.attention.attention_record`):
the image's hash and size, its orientation and decoding, the frame, the
timestep and the bundle; ``diffseg eval --attention-dir`` checks them.

For an evaluation dataset, ``--stored-orientation --decoder official`` gives
the pixels the evaluation uses (or let ``diffseg eval --model M
--attention-dir DIR`` compute and keep them).
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
    p.add_argument("--decoder", choices=("accurate", "official"), default="accurate",
                   help="how JPEGs are decoded: accurate (default: Pillow, as diffseg segment reads photos) or "
                        "official (as the official evaluation loader: what diffseg eval's datasets use)")
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
                rgb, record = _read(image, args, model)
                attn = (model.attention(rgb, args.timestep) if args.frame == "crop"
                        else model.attention(rgb, args.timestep, frame="whole"))
                save_attention(target, attn, dtype=args.dtype, record=record)
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


def _read(path, args, model):
    """``(rgb, record)``: the image as the options say, and how it was read (and by which bundle)."""
    from PIL import Image

    from ..io.attention import attention_record
    from ..io.images import load_image, read_dataset_image

    with open(path, "rb") as f:
        jpeg = f.read(3) == b"\xff\xd8\xff"
    with Image.open(path) as im:
        orientation = im.getexif().get(0x0112, 1)
    rotated = not args.stored_orientation and orientation not in (0, 1)  # 1 or none: nothing to turn
    if rotated and args.decoder == "official":
        raise ValueError("it has an EXIF rotation and --decoder official reads images as stored: "
                         "add --stored-orientation")
    rgb = load_image(path) if rotated else read_dataset_image(path, args.decoder)
    record = attention_record(image_path=path, image_shape=rgb.shape, exif_applied=not args.stored_orientation,
                              exif_rotated=rotated, decoder=args.decoder if jpeg else None, frame=args.frame,
                              timestep=args.timestep, model=model)
    return rgb, record
