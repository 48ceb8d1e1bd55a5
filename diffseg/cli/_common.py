"""Helpers shared by the subcommands: argument types and options that mean
the same everywhere, input collection, opening a model, summaries."""
import argparse
import glob
import sys
from pathlib import Path

OUTPUT_SUFFIXES = (".labels.png", ".overlay.png")
"""Images that ``diffseg segment`` writes: never taken as inputs from its output folder."""


class UserError(Exception):
    """A mistake in the command line or its inputs: printed as one line, exit status 2."""


# ---------------------------------------------------------------- argument types
def _int_at_least(low, high=None):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"in {low}..{high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value
    return parse


positive_int = _int_at_least(1)
timestep = _int_at_least(0, 999)  # SD's 1000 training timesteps
threads = _int_at_least(0)  # 0 = OpenMP's default


def kl_setting(text):
    """``--kl-threshold T``: a number, or per-iteration values ``0.9,1.0,1.1``."""
    from ..core import kl_thresholds

    try:
        return kl_thresholds(text, "kl threshold")
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


KL_HELP = "a number (the same for every merge iteration) or per-iteration values 0.9,1.0,1.1"
THREADS_HELP = "threads for diffseg: the C core and libtorch (default: all cores; 0 = OpenMP's default)"


def add_model_arguments(p, timestep_help="UNet timestep, 0..999 (default: the bundle's, 300)"):
    """--model, --device, --threads, --timestep: the same in every subcommand that runs a model."""
    p.add_argument("-m", "--model", default=None,
                   help="bundle file/folder, or a checkpoint (hub id owner/name, diffusers folder, "
                        ".safetensors/.ckpt) exported once into the cache "
                        "(default: CompVis/stable-diffusion-v1-4)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (the bundle's device; default cpu)")
    p.add_argument("--threads", type=threads, default=None, metavar="N", help=THREADS_HELP)
    if timestep_help:
        p.add_argument("--timestep", type=timestep, default=None, metavar="T", help=timestep_help)


def apply_threads(args):
    if getattr(args, "threads", None) is not None:
        from ..core import set_num_threads

        set_num_threads(args.threads)  # the C core (and libtorch if loaded; load_model gets it too)


def open_model(args):
    """``load_model`` for a subcommand: any failure to open or export the
    model is a usage error (exit 2) in one line."""
    from ..sd.model import load_model

    try:
        # Names (segment --vocabulary/--prompt) need a bundle with cross-attention when exporting here.
        naming = getattr(args, "vocabulary", None) is not None or getattr(args, "prompt", None) is not None
        model = load_model(args.model, device=args.device, threads=args.threads, cross_attention=naming)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 -- ImportError, BundleError, export failures...
        what = args.model or "the default model"
        raise UserError(f"cannot open {what}: {e}") from None
    return model


# ---------------------------------------------------------------- inputs
def _is_image(p):
    from ..io.images import IMAGE_SUFFIXES

    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES


def _is_output(p, exclude):
    """A file that ``diffseg segment`` wrote into the output folder ``exclude``."""
    return (exclude is not None and p.name.endswith(OUTPUT_SUFFIXES)
            and (p.resolve().parent == exclude or exclude in p.resolve().parents))


def _scan(folder, recursive, exclude):
    """``(found, outputs)``: the images of a folder as ``(path, name)``, and how
    many were left out as our own outputs."""
    pattern = "**/*" if recursive else "*"
    found, outputs = [], 0
    for p in sorted(folder.glob(pattern)):
        if not _is_image(p):
            continue
        if _is_output(p, exclude):
            outputs += 1
            continue
        found.append((p, p.relative_to(folder).with_suffix("").as_posix()))
    return found, outputs


def collect_inputs(paths, recursive=False, exclude=None):
    """``(inputs, problems)``: ``inputs`` a list of ``(path, name)`` in order,
    without repeats; ``problems`` messages for arguments that matched nothing.
    ``exclude``: the output folder, whose ``*.labels.png`` / ``*.overlay.png``
    are never inputs (so outputs may be written beside the images)."""
    exclude = Path(exclude).resolve() if exclude is not None else None
    inputs, problems, seen = [], [], set()

    def add(p, name):
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            inputs.append((p, name))

    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            found, outputs = _scan(p, recursive, exclude)
            if not found:
                why = (f" other than {outputs} diffseg output(s) (*.labels.png, *.overlay.png), "
                       "which are not inputs" if outputs else "")
                problems.append(f"{arg}: no images in this folder{why}"
                                + ("" if recursive else " (-r for subfolders)"))
            for q, name in found:
                add(q, name)
        elif p.exists():
            add(p, p.stem)  # any file given by name is tried, whatever its extension
        elif glob.has_magic(arg):
            matches = sorted(glob.glob(arg, recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file() and not _is_output(Path(m), exclude)]
            for m in matches:
                if Path(m).is_dir():
                    files.extend(q for q, _ in _scan(Path(m), recursive, exclude)[0])
            if not files:
                problems.append(f"{arg}: no files match")
            for q in files:
                add(q, q.stem)
        else:
            problems.append(f"{arg}: no such file or folder")
    return inputs, problems


def unique_names(inputs):
    """Second and later inputs with one name get ``NAME_2``, ``NAME_3``, ..."""
    used, out = set(), []
    for path, name in inputs:
        candidate, n = name, 1
        while candidate in used:
            n += 1
            candidate = f"{name}_{n}"
        used.add(candidate)
        out.append((path, candidate))
    return out


def report(command, text):
    """One status line on stderr, prefixed with the subcommand."""
    print(f"diffseg {command}: {text}", file=sys.stderr)
