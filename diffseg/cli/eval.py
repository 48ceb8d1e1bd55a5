"""``diffseg eval``: evaluate on COCO-Stuff-27, Cityscapes or a folder.

::

    diffseg eval --preset coco-stuff-27 --root coco             # the paper's COCO-Stuff-27 number
    diffseg eval --preset cityscapes --root cityscapes --limit 20   # a quick check

A preset sets the dataset, the paper's settings (threshold 1.1 / 0.9, grid 16,
timestep 300, 512 px, centre crop) and its model (SD v1.4); options given
beside it override it.
"""
import json
from pathlib import Path

from ..evaluation.runner import RESULTS_JSON, RESULTS_MD, STATE_FILE, evaluate, markdown_table
from . import _common
from .segment import add_throughput_arguments
from ._common import (UserError, add_model_arguments, add_settings_arguments, apply_threads,
                      positive_int, report, settings_from_args)

STEGO_SIZE = 320
"""The evaluation size of STEGO's tables."""


def _open_dataset(args, need_images):
    from ..evaluation.datasets import CocoStuff27, Cityscapes, FolderDataset

    size = None if args.size == 0 else args.size
    frame = {"size": size, "require_images": need_images, "decoder": args.decoder,
             "preprocessing": "stego" if args.protocol == "stego" else "crop"}
    if args.dataset == "coco-stuff-27":
        if args.root is None and (args.label_dir is None):
            raise UserError("--dataset coco-stuff-27 needs --root (or --label-dir and --image-list)")
        return CocoStuff27(args.root, args.image_list, image_dir=args.image_dir, label_dir=args.label_dir, **frame)
    if args.dataset == "cityscapes":
        if args.root is None:
            raise UserError("--dataset cityscapes needs --root (the folder holding leftImg8bit/ and gtFine/)")
        return Cityscapes(args.root, args.split, **frame)
    image_dir, label_dir = args.image_dir, args.label_dir
    if args.root is not None:
        image_dir = image_dir or Path(args.root) / "images"
        label_dir = label_dir or Path(args.root) / "labels"
    if label_dir is None:
        raise UserError("--dataset folder needs --label-dir (and --image-dir), or --root with images/ and labels/")
    return FolderDataset(image_dir, label_dir, n_classes=args.n_classes, label_suffix=args.label_suffix,
                         ignore_values=tuple(args.ignore_value or (255,)), **frame)


def _apply_preset(args):
    """``--preset NAME``: the dataset and the model of the paper's number, unless given."""
    from ..sd.bundle import DEFAULT_MODEL

    if args.preset is None:
        if args.dataset is None:
            raise UserError("give --dataset (coco-stuff-27, cityscapes, folder) or --preset")
        return
    if args.dataset not in (None, args.preset):
        raise UserError(f"--preset {args.preset} evaluates --dataset {args.preset}, not {args.dataset}")
    args.dataset = args.preset
    if args.model is None and args.attention_dir is None and args.predictions_dir is None:
        args.model = DEFAULT_MODEL  # the paper's: Stable Diffusion v1.4


def _settings(args):
    """The settings scored: the dataset's published ones (the preset's) with the options given on top."""
    from ..settings import PRESETS, Settings

    base = Settings.preset(args.dataset) if args.dataset in PRESETS else Settings(frame="crop")
    settings = settings_from_args(args, base)
    return settings if isinstance(settings, list) else [settings]


def _run(args):
    _apply_preset(args)
    if args.protocol == "stego" and args.size == 512:
        args.size = STEGO_SIZE  # STEGO's tables are at 320 px unless --size says otherwise
    sources = [s for s in ("model", "attention_dir", "predictions_dir") if getattr(args, s) is not None]
    if args.predictions_dir is not None and len(sources) > 1:
        raise UserError("--predictions-dir scores label maps as they are: leave out --model and --attention-dir")
    if not sources:
        raise UserError("give --model (a bundle or checkpoint), --attention-dir (precomputed attention) or "
                        "--predictions-dir (label maps to score)")
    settings = None if args.predictions_dir is not None else _settings(args)
    if settings is not None and args.protocol != "per-image":
        raise UserError(f"--protocol {args.protocol} matches dataset-wide class ids once over the dataset; "
                        "DiffSeg numbers its segments per image, so its output is scored with --protocol per-image. "
                        "Score label maps with dataset-wide ids with --predictions-dir")
    with _common.output_folder(args.output_dir, "-o/--output-dir") as output_dir:
        return _evaluate(args, settings, output_dir)


def _evaluate(args, settings, output_dir):
    dataset = _open_dataset(args, need_images=args.model is not None)
    if args.predictions_dir is not None:
        return _score(args, dataset, output_dir)
    if args.model is not None:
        dataset.check_sizes(args.limit)  # before the model is opened
    apply_threads(args)
    if args.ray is not None:
        return _run_ray(args, dataset, settings, output_dir)
    model = _common.open_model(args) if args.model is not None else None
    try:
        results = evaluate(
            dataset, model, settings, attention_dir=args.attention_dir, limit=args.limit, protocol=args.protocol,
            n_classes=args.n_classes if args.dataset == "folder" else None,
            output_dir=output_dir, resume=not args.no_resume, progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        report("eval", f"interrupted: {_images_done(output_dir)} image(s) scored so far, saved in "
                       f"{output_dir / STATE_FILE}; run the same command again to resume")
        return 130
    finally:
        if hasattr(model, "close"):
            model.close()
    return _print(results, output_dir)


def _score(args, dataset, output_dir):
    """``--predictions-dir``: score label maps that exist as files."""
    from ..evaluation.runner import score_predictions

    results = score_predictions(dataset, args.predictions_dir, protocol=args.protocol, limit=args.limit,
                                n_classes=args.n_classes if args.dataset == "folder" else None,
                                output_dir=output_dir, progress=not args.no_progress)
    return _print(results, output_dir)


def _print(results, output_dir):
    print(markdown_table(results))
    print(f"wrote {output_dir / RESULTS_JSON} and {output_dir / RESULTS_MD}")
    return 0


def _run_ray(args, dataset, settings, output_dir):
    """``diffseg eval --ray``: actors score images, the driver sums their counts (no resume)."""
    from ..distributed import evaluate_dataset, init_ray
    from ..sd.model import _resolve_bundle

    if args.model is None or _resolve_bundle(args.model) is None:
        raise UserError("--ray needs --model BUNDLE (an exported bundle file or folder readable by every worker)")
    if args.attention_dir is not None:
        raise UserError("--ray computes attention in its actors: leave out --attention-dir")
    init_ray(args.ray, quiet=args.no_progress)
    results = evaluate_dataset(
        dataset, args.model, settings, limit=args.limit, protocol=args.protocol,
        n_classes=args.n_classes if args.dataset == "folder" else None, output_dir=output_dir,
        actors=args.actors, num_gpus=args.gpus_per_actor or None, threads=args.threads or None)
    return _print(results, output_dir)


def _dataset_kind(text):
    import argparse

    from ..evaluation.datasets import dataset_kind

    try:
        return dataset_kind(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _images_done(output_dir):
    try:
        return len(json.loads((output_dir / STATE_FILE).read_text())["done"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def register_cli(subparsers):
    from ..settings import PRESETS

    p = subparsers.add_parser(
        "eval",
        help="evaluate on COCO-Stuff-27 / Cityscapes / a folder (Hungarian-matched ACC, mIoU)",
        description=(
            "Segment a dataset and report Hungarian-matched pixel accuracy and mIoU. "
            "--preset coco-stuff-27 / cityscapes runs the paper's evaluation. "
            "Attention comes from --model or --attention-dir (<id>.npz per image); --predictions-dir scores "
            "label maps you already have. Several --kl-threshold settings share one attention computation per "
            "image. Rerunning the same command resumes an interrupted run."),
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="the paper's evaluation of this dataset: its settings (threshold 1.1 / 0.9, grid 16, "
                        "timestep 300, 512 px, centre crop) and model (SD v1.4, unless --model or "
                        "--attention-dir); see docs/reproduce.md")
    p.add_argument("--dataset", type=_dataset_kind, metavar="NAME",
                   help="dataset layout: coco-stuff-27, cityscapes or folder")
    p.add_argument("--root", help="dataset root directory")
    p.add_argument("--image-list", help="COCO-Stuff: the curated list Coco164kFull_Stuff_Coarse_7.txt "
                   "(2175 ids), or 'all'")
    p.add_argument("--image-dir", help="images directory (COCO-Stuff / folder)")
    p.add_argument("--label-dir", help="label PNG directory (COCO-Stuff / folder)")
    p.add_argument("--split", default="val", help="Cityscapes split (default: val)")
    p.add_argument("--n-classes", type=positive_int, help="folder: number of classes (default: from the labels)")
    p.add_argument("--label-suffix", default=".png", help="folder: label file = <stem><suffix> (.png)")
    p.add_argument("--ignore-value", type=int, action="append",
                   help="folder: label value to ignore (repeatable; default 255)")
    p.add_argument("--size", type=_common._int_at_least(0), default=512,
                   help="label size after the centre crop (default 512; 320 with --protocol stego; 0 = crop only)")
    p.add_argument("--decoder", choices=("official", "accurate"), default="official",
                   help="how dataset JPEGs are decoded: official (default: as the official loader, TensorFlow's "
                        "fast integer IDCT) or accurate (Pillow)")
    p.add_argument("--attention-dir", help="precomputed attention, <id>.npz per image "
                   "(with --model: a cache, missing files are computed and saved)")
    p.add_argument("--predictions-dir", metavar="DIR",
                   help="score these label maps (<id>.png or <id>.labels.png, at the image's or the label's size) "
                        "instead of segmenting")
    add_model_arguments(p)
    add_settings_arguments(p, several=True, frame=False, default_threshold="1.1 COCO-Stuff, 0.9 Cityscapes")
    p.add_argument("--protocol", default="per-image", choices=["per-image", "per-dataset", "stego"],
                   help="per-image: one Hungarian matching per image (DiffSeg; default). per-dataset / stego: "
                        "one matching over the dataset, for --predictions-dir label maps with dataset-wide class "
                        "ids; stego also takes STEGO's frame (320 px, nearest resize, centre crop), as the "
                        "PiCIE/STEGO tables")
    p.add_argument("--limit", type=positive_int, metavar="N", help="only the first N images (a quick check)")
    p.add_argument("-o", "--output-dir", default="diffseg-eval",
                   help="results.json, results.md and the resume state (default: diffseg-eval)")
    p.add_argument("--no-resume", action="store_true", help="start over, ignoring a saved state")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_throughput_arguments(p, local=False)
    p.set_defaults(func=_run)
    return p
