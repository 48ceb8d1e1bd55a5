"""The ``diffseg`` command line. Each subcommand lives beside the code it runs:
a module in COMMANDS defines ``register_cli(subparsers)``, adding a parser whose
``func(args)`` returns the exit code. Modules import heavy dependencies
(torch, diffusers, matplotlib) inside functions, so ``diffseg --help`` is fast."""
import argparse
import importlib
import sys

COMMANDS = [
    "diffseg.synthetic",   # demo
    "diffseg.export",      # export
    "diffseg.model",       # attention
    "diffseg.segment_cli",  # segment
    "diffseg.evaluation",  # eval
    "diffseg.info",        # info
]


class UserError(Exception):
    """A mistake in the command line or its inputs: printed without traceback."""


def build_parser():
    parser = argparse.ArgumentParser(
        prog="diffseg",
        description="DiffSeg: zero-shot segmentation from Stable Diffusion self-attention.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that command is not part of this version
                continue
            raise
        module.register_cli(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError, ValueError, TypeError) as e:
        print(f"diffseg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffseg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
