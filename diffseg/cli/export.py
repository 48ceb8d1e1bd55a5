"""``diffseg export``: a checkpoint -> a model bundle."""
import os
import time

from ..sd.bundle import BACKENDS, DEFAULT_BACKEND, DEFAULT_MODEL, DTYPE_CHOICES, LAYER_MODES
from ._common import positive_int


def register_cli(subparsers):
    p = subparsers.add_parser(
        "export",
        help="export a Stable Diffusion checkpoint to a diffseg bundle",
        description="Export a Stable Diffusion 1.x/2.x checkpoint (hub id, diffusers folder, or "
                    ".safetensors/.ckpt file) to a bundle that diffseg runs through libtorch: a TorchScript "
                    "archive (seconds to export) or an AOTInductor package (compiled for this machine's CPU: "
                    "minutes and several GB of memory; progress is shown).",
    )
    p.add_argument("source", help=f"hub id (e.g. {DEFAULT_MODEL}), diffusers folder, or checkpoint file")
    p.add_argument("out", help="output folder (gets diffseg_bundle.pt, or .pt2 with --backend aoti, "
                               "and metadata.json)")
    p.add_argument("--size", type=positive_int, default=512,
                   help="image side the bundle is traced for (default 512)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES,
                   help="precision the bundle runs in (default float32; float16 needs CUDA; auto: bfloat16 on a "
                        "CPU with AVX512-BF16 or AMX, float16 on CUDA, else float32)")
    p.add_argument("--backend", default=DEFAULT_BACKEND, choices=BACKENDS,
                   help=f"torchscript or aoti (AOTInductor; default {DEFAULT_BACKEND}); see docs/performance.md")
    p.add_argument("--layers", default="per-resolution", choices=LAYER_MODES,
                   help="4 per-resolution means (default) or all 16 per-layer maps")
    p.add_argument("--cross-attention", action="store_true",
                   help="also store the text encoder, the tokenizer and the prompt methods, for semantic "
                        "labels (diffseg segment --vocabulary/--prompt)")
    p.add_argument("--config", default=None, help="configs for a single-file checkpoint (diffusers folder)")
    p.set_defaults(func=_run)


def _run(args):
    t0 = time.perf_counter()
    from ..sd.export import export_bundle

    path = export_bundle(args.source, args.out, size=args.size, device=args.device, dtype=args.dtype,
                         layers=args.layers, config=args.config, cross_attention=args.cross_attention,
                         backend=args.backend)
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s")
    return 0
