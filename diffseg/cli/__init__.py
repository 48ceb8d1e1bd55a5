"""The ``diffseg`` command line: one thin module per subcommand in this
package (parse the arguments, call the library). Each defines
``register_cli(subparsers)``, adding a parser whose ``func(args)`` returns the
exit code. Heavy dependencies (torch, diffusers, matplotlib) are imported
inside functions, so ``diffseg --help`` is fast."""
import argparse
import importlib
import sys

COMMANDS = ["demo", "export", "attention", "segment", "eval", "info"]


class UserError(Exception):
    """A mistake in the command line or its inputs: printed without traceback."""


def build_parser():
    parser = argparse.ArgumentParser(
        prog="diffseg",
        description="DiffSeg: zero-shot segmentation from Stable Diffusion self-attention.",
    )
    from .._version import __version__

    parser.add_argument("--version", action="version", version=f"diffseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register_cli(sub)
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
