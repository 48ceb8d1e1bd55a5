"""``diffseg demo``: DiffSeg's post-processing on planted synthetic attention
(no model needed): the main job until a Stable Diffusion bundle is used."""
import numpy as np


def _run(args):
    from pathlib import Path

    from PIL import Image

    from ..core import segment_attention
    from ..evaluation.metrics import hungarian_metrics
    from ..io.images import resize_nearest
    from ..synthetic import planted_example

    attn, truth = planted_example(args.resolution, args.segments, args.seed)
    labels = segment_attention(attn, kl_threshold=args.kl_threshold, size=(args.size, args.size))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    palette = np.random.default_rng(1).integers(0, 256, size=(256, 3), dtype=np.uint8)
    truth_big = resize_nearest(truth, args.size, args.size)
    Image.fromarray(palette[labels % 256]).save(out / "labels.png")
    Image.fromarray(palette[truth_big % 256]).save(out / "truth.png")
    agree = hungarian_metrics([labels], [truth_big], int(truth.max()) + 1)["pixel_accuracy"]
    print(f"planted {truth.max() + 1} segments, found {labels.max() + 1}; "
          f"pixel accuracy after matching {agree:.3f}; wrote {out}/labels.png, {out}/truth.png")
    return 0


def register_cli(subparsers):
    p = subparsers.add_parser(
        "demo", help="segment planted synthetic attention (no model needed)",
        description="Plant a known segmentation into synthetic self-attention, "
                    "run DiffSeg's post-processing on it and write label images.")
    p.add_argument("-o", "--output", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--resolution", type=int, default=64, help="latent resolution R (default 64)")
    p.add_argument("--segments", type=int, default=6, help="planted segments (default 6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=512, help="output side in pixels (default 512)")
    p.add_argument("--kl-threshold", type=float, default=1.1, help="KL threshold (default 1.1)")
    p.set_defaults(func=_run)
