"""``diffseg demo``: DiffSeg's post-processing on planted synthetic attention
(no model needed): the main job until a Stable Diffusion bundle is used."""
from ._common import KL_HELP, kl_threshold, output_folder, positive_int, settings_from_args


def _run(args):
    from pathlib import Path

    settings = settings_from_args(args)
    with output_folder(Path(args.output), "-o/--output") as out:
        return _demo(args, settings, out)


def _demo(args, settings, out):
    from PIL import Image

    from .._util import atomic_path
    from ..core import segment_attention
    from ..evaluation.metrics import hungarian_metrics, match_labels
    from ..io.images import resize_nearest
    from ..synthetic import planted_example
    from ..viz import colorize

    attn, truth = planted_example(args.resolution, args.segments, args.seed)
    labels = segment_attention(attn, settings, size=(args.size, args.size))
    truth_big = resize_nearest(truth, args.size, args.size)
    # One palette, and a found segment coloured like the planted one it matches.
    for name, image in (("labels.png", match_labels(labels, truth_big)), ("truth.png", truth_big)):
        with atomic_path(out / name) as tmp:
            Image.fromarray(colorize(image)).save(tmp, format="PNG")
    agree = hungarian_metrics([labels], [truth_big], int(truth.max()) + 1)["pixel_accuracy"]
    print(f"planted {truth.max() + 1} segments, found {labels.max() + 1}; "
          f"pixel accuracy after matching {agree:.3f}; wrote {out}/labels.png, {out}/truth.png")
    return 0


def register_cli(subparsers):
    p = subparsers.add_parser(
        "demo", help="segment planted synthetic attention (no model needed)",
        description="Plant a known segmentation into synthetic self-attention, "
                    "run DiffSeg's post-processing on it and write label images "
                    "(found segments coloured like the planted ones they match).")
    p.add_argument("-o", "--output", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--resolution", type=positive_int, default=64,
                   help="latent resolution R (default 64)")
    p.add_argument("--segments", type=positive_int, default=6, help="planted segments (default 6)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the planted partition (default 0)")
    p.add_argument("--size", type=positive_int, default=512, help="output side in pixels (default 512)")
    p.add_argument("--kl-threshold", type=kl_threshold, default=None, metavar="T",
                   help=f"merge threshold: {KL_HELP} (default 1.1)")
    p.add_argument("--iterations", type=positive_int, default=None, metavar="N",
                   help="merge iterations (default 3, as the official code)")
    p.set_defaults(func=_run)
