"""``diffseg info``: what this installation has."""
import json
import sys

from ..info import format_info, info


def _run(args):
    d = info()
    if args.json:
        json.dump(d, sys.stdout, indent=1)
        print()
    else:
        print(format_info(d))
    return 0


def register_cli(subparsers):
    p = subparsers.add_parser(
        "info", help="versions, OpenMP threads, GEMM backend, libtorch/CUDA, cached bundles",
        description="Show what this diffseg installation has: versions, the C core's OpenMP and "
                    "threads, the GEMM backend, whether the libtorch shim loads and CUDA is available, "
                    "and the model bundles in the cache.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_run)
