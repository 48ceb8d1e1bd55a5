"""Helpers shared by the subcommands: argument types and options that mean
the same everywhere, input collection, opening a model, summaries."""
import argparse
import contextlib
import glob
import sys
import tempfile
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
threads = _int_at_least(0)  # 0 = OpenMP's default


def kl_threshold(text):
    """``--kl-threshold T``: a number, or per-iteration values ``0.9,1.0,1.1``
    (checked against ``--iterations`` when the settings are made)."""
    from ..settings import parse_thresholds

    try:
        value = parse_thresholds(text, "--kl-threshold")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    values = value if isinstance(value, tuple) else (value,)
    bad = [v for v in values if not (v > 0 and v < float("inf"))]
    if bad:
        raise argparse.ArgumentTypeError(f"thresholds must be finite and > 0, got {text!r}")
    return value


KL_HELP = ("a number (the same for each merge iteration) or one value per iteration, comma-separated "
           "(0.9,1.0,1.1; as many values as --iterations)")
THREADS_HELP = "threads for diffseg: the C core and libtorch (default: all cores; 0 = OpenMP's default)"


def add_settings_arguments(p, *, several=False, naming=False, frame=True, default_threshold="1.1"):
    """The options of :class:`diffseg.Settings`, the same in every subcommand.
    ``several``: ``--kl-threshold`` may be repeated (one setting each)."""
    from ..settings import MAX_GRID, MAX_TIMESTEP

    if several:
        p.add_argument("--kl-threshold", type=kl_threshold, action="append", metavar="T",
                       help=f"merge threshold: {KL_HELP}; repeat the option for several settings, all scored "
                            f"from one attention pass per image (default: {default_threshold})")
    else:
        p.add_argument("--kl-threshold", type=kl_threshold, default=None, metavar="T",
                       help=f"merge threshold: {KL_HELP} (default {default_threshold})")
    p.add_argument("--iterations", type=_int_at_least(1, 10), default=None, metavar="N",
                   help="merge iterations (default 3, as the official code)")
    p.add_argument("--grid", type=_int_at_least(1, MAX_GRID), default=None, metavar="N",
                   help=f"anchors along the short side, 1..{MAX_GRID} (default 16)")
    p.add_argument("--timestep", type=_int_at_least(0, MAX_TIMESTEP), default=None, metavar="T",
                   help="UNet timestep, 0..999 (default 300, as the official code)")
    if frame:
        p.add_argument("--frame", choices=("whole", "crop"), default=None,
                       help="segment the whole image (default), or its centred square crop as the published "
                            "protocol (pixels outside take the nearest crop pixel's label)")
    p.add_argument("--refine", action="store_true", default=None,
                   help="k-means refinement of the merged proposals, as the official refine=True "
                        "(off by default, as in the official benchmarks)")
    if naming:
        p.add_argument("--vocabulary", type=_vocabulary, default=None, metavar="WORDS",
                       help="name segments with these comma-separated words or phrases (prompt: the words "
                            "joined by ', ')")
        p.add_argument("--prompt", default=None, metavar="TEXT",
                       help="prompt of the UNet pass; names segments with its nouns (or with --vocabulary)")
        p.add_argument("--voting", choices=("mean", "majority"), default=None,
                       help="how a segment picks its name: mean (default, as the official demo) or majority")


def _vocabulary(text):
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words:
        raise argparse.ArgumentTypeError("expected comma-separated words, e.g. cat,grass,sky")
    return words


_OPTION = {"kl_threshold": "--kl-threshold", "iterations": "--iterations", "grid": "--grid",
           "timestep": "--timestep", "frame": "--frame", "refine": "--refine", "vocabulary": "--vocabulary",
           "prompt": "--prompt", "voting": "--voting"}


def settings_from_args(args, base=None):
    """The :class:`diffseg.Settings` of the options given (on top of
    ``base``, e.g. a preset), or a list of them for a repeated
    ``--kl-threshold``; a bad combination is a :class:`UserError` naming the
    options, before any work."""
    from ..settings import resolve_settings

    given = {name: getattr(args, name) for name in _OPTION if getattr(args, name, None) is not None}
    thresholds = given.pop("kl_threshold", None)
    try:
        if isinstance(thresholds, list):
            if len(set(thresholds)) != len(thresholds):
                raise ValueError("kl_threshold: a threshold is given twice")
            return [resolve_settings(base, kl_threshold=t, **given) for t in thresholds]
        return resolve_settings(base, **given, **({} if thresholds is None else {"kl_threshold": thresholds}))
    except (TypeError, ValueError) as e:
        raise UserError(cli_message(str(e))) from None


def cli_message(text):
    """A settings error as the command line says it: ``--frame crop``, not
    ``frame='crop'``; ``--grid must be ...``, not ``grid must be ...``."""
    import re

    for name, option in _OPTION.items():
        text = re.sub(rf"\b{name}=('?)([\w.-]+)\1", rf"{option} \2", text)
        text = re.sub(rf"^{name}\b", option, text)  # the field the message is about
    text = re.sub(r"\bframe='(\w+)'", r"--frame \1", text)
    return text.replace("--refine True", "--refine")


@contextlib.contextmanager
def output_folder(folder, option):
    """The output folder, checked before any model is opened: it exists or
    can be made, and is writable. Made here, it is removed again when the
    command fails before writing into it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{option}: {folder} is a file, not a folder")
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"{option}: cannot write into {folder}: {e.strerror or e}") from None
    try:
        yield folder
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty
        raise


def add_model_arguments(p):
    """--model, --device, --threads: the same in every subcommand that runs a model."""
    p.add_argument("-m", "--model", default=None,
                   help="bundle file/folder, or a checkpoint (hub id owner/name, diffusers folder, "
                        ".safetensors/.ckpt) exported once into the cache "
                        "(default: CompVis/stable-diffusion-v1-4)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (the bundle's device; default cpu)")
    p.add_argument("--threads", type=threads, default=None, metavar="N", help=THREADS_HELP)


def apply_threads(args):
    if getattr(args, "threads", None) is not None:
        from ..core import set_num_threads

        set_num_threads(args.threads)  # the C core (and libtorch if loaded; load_model gets it too)


def open_model(args, cross_attention=False):
    """``load_model`` for a subcommand: any failure to open or export the
    model is a usage error (exit 2) in one line. ``cross_attention``: a
    checkpoint is exported with it (to name segments)."""
    from ..sd.model import load_model

    try:
        model = load_model(args.model, device=args.device, threads=args.threads, cross_attention=cross_attention)
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
