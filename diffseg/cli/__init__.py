"""The ``diffseg`` command line: one thin module per subcommand in this
package (parse the arguments, call the library). Each defines
``register_cli(subparsers)``, adding a parser whose ``func(args)`` returns the
exit code; :mod:`._common` holds what they share. Heavy dependencies (torch,
diffusers, matplotlib) are imported inside functions, so ``diffseg --help`` is
fast.

Exit status: 0 success, 1 some inputs failed, 2 usage error (bad arguments,
missing inputs, a model that cannot be opened), 130 interrupted. Every error
is one line on stderr, never a traceback (``DIFFSEG_DEBUG=1`` shows one for
unexpected errors).
"""
import argparse
import contextlib
import importlib
import os
import sys
import warnings

from .._util import env_flag
from ._common import UserError

COMMANDS = ["demo", "export", "attention", "segment", "eval", "info"]

__all__ = ["COMMANDS", "UserError", "build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser():
    parser = _Parser(
        prog="diffseg",
        description="DiffSeg: zero-shot segmentation from Stable Diffusion self-attention.",
    )
    from .._version import __version__

    parser.add_argument("--version", action="version", version=f"diffseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register_cli(sub)
    return parser


_VERBOSITY = ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")


@contextlib.contextmanager
def _quiet_third_party():
    """Keep other libraries' warnings (torchvision, accelerate, tqdm's
    IProgress, deprecations in diffusers/transformers) from CLI users; only
    for the command's duration, so library users see them as usual."""
    with warnings.catch_warnings():
        for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
            warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("ignore", message=".*IProgress not found.*")
        warnings.filterwarnings("ignore", module=r"(torch|torchvision|accelerate|diffusers|transformers|"
                                                 r"huggingface_hub|tqdm)(\.|$)")
        unset = [name for name in _VERBOSITY if name not in os.environ]
        for name in unset:
            os.environ[name] = "error"  # their loggers' notices
        try:
            yield
        finally:
            for name in unset:
                os.environ.pop(name, None)


def main(argv=None):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed: the status, not an exception
        return e.code
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    prefix = f"diffseg {args.command}"
    try:
        with _quiet_third_party():
            return int(args.func(args) or 0)
    except (UserError, FileNotFoundError, ValueError, TypeError, ImportError) as e:
        print(f"{prefix}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # unwritable output folder, full disk...
        print(f"{prefix}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- a bug: one line, the traceback on request
        if env_flag("DIFFSEG_DEBUG"):
            raise
        print(f"{prefix}: error: {type(e).__name__}: {_one_line(e)} (DIFFSEG_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1


def _one_line(error):
    return " ".join(str(error).split())


if __name__ == "__main__":
    sys.exit(main())
