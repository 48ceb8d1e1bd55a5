"""``diffseg attention``: write the self-attention maps of images (.npz)."""
import time
from pathlib import Path


def register_cli(subparsers):
    p = subparsers.add_parser(
        "attention",
        help="write the self-attention maps of images (.npz, one per image)",
        description="Run the model bundle on each image and write its self-attention maps "
                    "(keys attn_<res>, float32 (s*s, s*s)) to DIR/<image name>.npz.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("-m", "--model", default=None,
                   help="bundle file/folder or checkpoint (default: the cached CompVis/stable-diffusion-v1-4)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--timestep", type=int, default=300)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=_run)


def _run(args):
    from ..io.attention import save_attention
    from ..sd.model import load_model

    for image in args.images:
        if not Path(image).is_file():
            raise FileNotFoundError(f"image: no such file: {image}")
    model = load_model(args.model, device=args.device, threads=args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    used = set()
    for image in args.images:
        t0 = time.perf_counter()
        stem = Path(image).stem
        name, n = stem, 1
        while name in used:  # same file name in two folders
            n += 1
            name = f"{stem}_{n}"
        used.add(name)
        attn = model.attention(image, args.timestep)
        target = out / f"{name}.npz"
        save_attention(target, attn)
        print(f"{image} -> {target} ({time.perf_counter() - t0:.2f} s)")
    model.close()
    return 0
