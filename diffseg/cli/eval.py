"""``diffseg eval``: evaluate on COCO-Stuff-27, Cityscapes or a folder."""
from pathlib import Path

from ..evaluation.runner import RESULTS_JSON, RESULTS_MD, evaluate, markdown_table


def _open_dataset(args, need_images):
    from ..evaluation.datasets import CocoStuff27, Cityscapes, FolderDataset, dataset_kind

    kind = dataset_kind(args.dataset)
    size = None if args.size == 0 else args.size
    if kind == "coco-stuff-27":
        if args.root is None and (args.label_dir is None):
            raise ValueError("--dataset coco-stuff-27 needs --root (or --label-dir and --image-list)")
        return CocoStuff27(args.root, args.image_list, image_dir=args.image_dir,
                           label_dir=args.label_dir, size=size, require_images=need_images)
    if kind == "cityscapes":
        if args.root is None:
            raise ValueError("--dataset cityscapes needs --root (the folder holding leftImg8bit/ and gtFine/)")
        return Cityscapes(args.root, args.split, size=size, require_images=need_images)
    image_dir, label_dir = args.image_dir, args.label_dir
    if args.root is not None:
        image_dir = image_dir or Path(args.root) / "images"
        label_dir = label_dir or Path(args.root) / "labels"
    if label_dir is None:
        raise ValueError("--dataset folder needs --label-dir (and --image-dir), or --root with "
                         "images/ and labels/")
    return FolderDataset(image_dir, label_dir, n_classes=args.n_classes,
                         label_suffix=args.label_suffix,
                         ignore_values=tuple(args.ignore_value or (255,)), size=size,
                         require_images=need_images)


def _run(args):
    if args.threads is not None:
        from ..core import set_num_threads

        set_num_threads(args.threads)
    if args.model is None and args.attention_dir is None:
        raise ValueError("give --attention-dir (precomputed attention) or --model (a bundle)")
    dataset = _open_dataset(args, need_images=args.model is not None)
    kl = args.kl_threshold
    if kl is not None:
        kl = list(kl)
    model = None
    if args.model is not None:
        from ..sd.model import load_model  # lazy: torch

        model = load_model(args.model, **({"device": args.device} if args.device else {}))
    results = evaluate(
        dataset, model, kl_threshold=kl, attention_dir=args.attention_dir,
        limit=args.limit, protocol=args.protocol, grid=args.grid,
        n_classes=args.n_classes if args.dataset == "folder" else None,
        output_dir=args.output_dir, resume=not args.no_resume, progress=not args.no_progress,
    )
    print(markdown_table(results))
    print(f"wrote {Path(args.output_dir) / RESULTS_JSON} and {Path(args.output_dir) / RESULTS_MD}")
    return 0


def register_cli(subparsers):
    p = subparsers.add_parser(
        "eval",
        help="evaluate on COCO-Stuff-27 / Cityscapes / a folder (Hungarian-matched ACC, mIoU)",
        description=(
            "Segment a dataset and report Hungarian-matched pixel accuracy and mIoU. "
            "Attention comes from --attention-dir (<id>.npz per image) or --model. "
            "Several --kl-threshold settings share one attention computation per image. "
            "Rerunning the same command resumes an interrupted run."),
    )
    p.add_argument("--dataset", required=True,
                   help="coco-stuff-27 | cityscapes | folder")
    p.add_argument("--root", help="dataset root directory")
    p.add_argument("--image-list", help="COCO-Stuff: the curated list Coco164kFull_Stuff_Coarse_7.txt "
                   "(2175 ids), or 'all'")
    p.add_argument("--image-dir", help="images directory (COCO-Stuff / folder)")
    p.add_argument("--label-dir", help="label PNG directory (COCO-Stuff / folder)")
    p.add_argument("--split", default="val", help="Cityscapes split (default: val)")
    p.add_argument("--n-classes", type=int, help="folder: number of classes (default: from the labels)")
    p.add_argument("--label-suffix", default=".png", help="folder: label file = <stem><suffix> (.png)")
    p.add_argument("--ignore-value", type=int, action="append",
                   help="folder: label value to ignore (repeatable; default 255)")
    p.add_argument("--size", type=int, default=512,
                   help="label size after the centre crop (default 512; 0 = crop only)")
    p.add_argument("--attention-dir", help="precomputed attention, <id>.npz per image "
                   "(with --model: a cache, missing files are computed and saved)")
    p.add_argument("--model", help="model bundle or checkpoint for diffseg.load_model (needs torch)")
    p.add_argument("--device", help="with --model: cpu or cuda (default: load_model's)")
    p.add_argument("--kl-threshold", nargs="+", action="extend", metavar="T",
                   help="KL threshold setting(s): each T is a number or per-iteration values "
                        "'0.9,1.0,1.1'; several settings are evaluated from one attention pass "
                        "(default: 1.1 COCO-Stuff, 0.9 Cityscapes)")
    p.add_argument("--grid", type=int, default=16, help="anchor grid per axis (default 16)")
    p.add_argument("--protocol", default="per-image", choices=["per-image", "per-dataset"],
                   help="Hungarian matching per image (DiffSeg; default) or over the dataset")
    p.add_argument("--limit", type=int, help="only the first N images")
    p.add_argument("-o", "--output-dir", default="diffseg-eval",
                   help="results.json, results.md and the resume state (default: diffseg-eval)")
    p.add_argument("--no-resume", action="store_true", help="start over, ignoring a saved state")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, help="threads for the C core (default: all)")
    p.set_defaults(func=_run)
    return p
