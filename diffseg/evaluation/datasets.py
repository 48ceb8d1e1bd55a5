"""Evaluation datasets: COCO-Stuff-27, Cityscapes (27 classes) and a generic
folder of images + label PNGs.

Every dataset is a sequence of :class:`Sample` objects with

* ``id`` -- a string, the image file's stem (``000000000139``,
  ``frankfurt_000000_000294_leftImg8bit``); precomputed attention is looked up
  as ``<attention_dir>/<id>.npz``, the name ``diffseg attention`` gives it;
* ``label`` -- ``(size, size)`` int64 class map, ``-1`` = ignore, in the frame of
  the preprocessed image: centre crop to the short side, then nearest-exact
  resize to ``size`` (512), as the official benchmark (DESIGN.md "Evaluation
  protocol"). What the crop cuts off is not evaluated. ``size=None`` keeps the
  crop at its own resolution;
* ``image`` -- the **original** image as ``(H, W, 3)`` uint8 RGB in its stored
  orientation, read from disk on access (evaluating from precomputed attention
  never reads it), JPEGs decoded as the official loader decodes them
  (``decoder="official"``, :func:`diffseg.io.images.read_dataset_image`; or
  ``decoder="accurate"``: Pillow). The model applies the same centre crop and
  resize (``diffseg.io.images.preprocess_image``), so its output lines up with
  ``label``.

``preprocessing="stego"`` gives STEGO's evaluation frame instead (PiCIE/STEGO
tables; ``size`` 320): image and label have their short side resized to
``size`` with nearest neighbour and are centre-cropped
(:func:`diffseg.io.images.stego_resize_crop`); ``image`` is then that
``(size, size)`` crop.

``id, image, label = sample`` unpacks a sample.

Missing or misnamed files raise ``FileNotFoundError`` naming what was
expected, when the dataset is created.
"""
import os
import re
from pathlib import Path

import numpy as np

from ..io.images import DECODERS, IMAGE_SUFFIXES, preprocess_labels, read_dataset_image, stego_resize_crop

IGNORE = -1
PREPROCESSING = ("crop", "stego")
"""``"crop"``: DiffSeg's (centre crop, nearest-exact resize of labels to
``size``); ``"stego"``: STEGO's (:func:`diffseg.io.images.stego_resize_crop`)."""

# ---------------------------------------------------------------------------
# COCO-Stuff-27
#
# Source of the table: the COCO-Stuff category list (github.com/nightrome/
# cocostuff, labels.md / cocostuff-readme) -- things 1..91 with the 12 COCO
# "thing" supercategories of the COCO 2014 paper, stuff 92..182 with the 15
# COCO-Stuff "stuff" supercategories. The ``stuffthingmaps_trainval2017`` PNGs
# store category id - 1 (0 = person ... 181 = wood) and 255 = unlabeled.
# Coarse ids and their order are those of IIC / PiCIE / STEGO and of the
# ``fine_to_coarse_dict.pickle`` that google/diffseg ships: 0..11 things,
# 12..26 stuff. Ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 and 91 belong to
# the 91 categories of the COCO paper but have no annotations in COCO 2017;
# they are kept (with their supercategory) so the table equals that dict on
# all 182 fine ids. tests/test_datasets.py checks it against the literal dict.
# ---------------------------------------------------------------------------
COCO_STUFF_27_CLASSES = (
    # things
    "electronic", "appliance", "food", "furniture", "indoor", "kitchen",
    "accessory", "animal", "outdoor", "person", "sports", "vehicle",
    # stuff
    "ceiling", "floor", "food-stuff", "furniture-stuff", "raw-material", "textile",
    "wall", "window", "building", "ground", "plant", "sky", "solid", "structural",
    "water",
)

# (COCO category id, name, supercategory). "*" marks ids unused in COCO 2017.
COCO_STUFF_CATEGORIES = (
    (1, "person", "person"),
    (2, "bicycle", "vehicle"), (3, "car", "vehicle"), (4, "motorcycle", "vehicle"),
    (5, "airplane", "vehicle"), (6, "bus", "vehicle"), (7, "train", "vehicle"),
    (8, "truck", "vehicle"), (9, "boat", "vehicle"),
    (10, "traffic light", "outdoor"), (11, "fire hydrant", "outdoor"),
    (12, "street sign*", "outdoor"), (13, "stop sign", "outdoor"),
    (14, "parking meter", "outdoor"), (15, "bench", "outdoor"),
    (16, "bird", "animal"), (17, "cat", "animal"), (18, "dog", "animal"),
    (19, "horse", "animal"), (20, "sheep", "animal"), (21, "cow", "animal"),
    (22, "elephant", "animal"), (23, "bear", "animal"), (24, "zebra", "animal"),
    (25, "giraffe", "animal"),
    (26, "hat*", "accessory"), (27, "backpack", "accessory"), (28, "umbrella", "accessory"),
    (29, "shoe*", "accessory"), (30, "eye glasses*", "accessory"),
    (31, "handbag", "accessory"), (32, "tie", "accessory"), (33, "suitcase", "accessory"),
    (34, "frisbee", "sports"), (35, "skis", "sports"), (36, "snowboard", "sports"),
    (37, "sports ball", "sports"), (38, "kite", "sports"), (39, "baseball bat", "sports"),
    (40, "baseball glove", "sports"), (41, "skateboard", "sports"),
    (42, "surfboard", "sports"), (43, "tennis racket", "sports"),
    (44, "bottle", "kitchen"), (45, "plate*", "kitchen"), (46, "wine glass", "kitchen"),
    (47, "cup", "kitchen"), (48, "fork", "kitchen"), (49, "knife", "kitchen"),
    (50, "spoon", "kitchen"), (51, "bowl", "kitchen"),
    (52, "banana", "food"), (53, "apple", "food"), (54, "sandwich", "food"),
    (55, "orange", "food"), (56, "broccoli", "food"), (57, "carrot", "food"),
    (58, "hot dog", "food"), (59, "pizza", "food"), (60, "donut", "food"), (61, "cake", "food"),
    (62, "chair", "furniture"), (63, "couch", "furniture"), (64, "potted plant", "furniture"),
    (65, "bed", "furniture"), (66, "mirror*", "furniture"), (67, "dining table", "furniture"),
    (68, "window*", "furniture"), (69, "desk*", "furniture"), (70, "toilet", "furniture"),
    (71, "door*", "furniture"),
    (72, "tv", "electronic"), (73, "laptop", "electronic"), (74, "mouse", "electronic"),
    (75, "remote", "electronic"), (76, "keyboard", "electronic"),
    (77, "cell phone", "electronic"),
    (78, "microwave", "appliance"), (79, "oven", "appliance"), (80, "toaster", "appliance"),
    (81, "sink", "appliance"), (82, "refrigerator", "appliance"), (83, "blender*", "appliance"),
    (84, "book", "indoor"), (85, "clock", "indoor"), (86, "vase", "indoor"),
    (87, "scissors", "indoor"), (88, "teddy bear", "indoor"), (89, "hair drier", "indoor"),
    (90, "toothbrush", "indoor"), (91, "hair brush*", "indoor"),
    # stuff
    (92, "banner", "textile"), (93, "blanket", "textile"), (94, "branch", "plant"),
    (95, "bridge", "building"), (96, "building-other", "building"), (97, "bush", "plant"),
    (98, "cabinet", "furniture-stuff"), (99, "cage", "structural"),
    (100, "cardboard", "raw-material"), (101, "carpet", "floor"),
    (102, "ceiling-other", "ceiling"), (103, "ceiling-tile", "ceiling"),
    (104, "cloth", "textile"), (105, "clothes", "textile"), (106, "clouds", "sky"),
    (107, "counter", "furniture-stuff"), (108, "cupboard", "furniture-stuff"),
    (109, "curtain", "textile"), (110, "desk-stuff", "furniture-stuff"),
    (111, "dirt", "ground"), (112, "door-stuff", "furniture-stuff"),
    (113, "fence", "structural"), (114, "floor-marble", "floor"),
    (115, "floor-other", "floor"), (116, "floor-stone", "floor"),
    (117, "floor-tile", "floor"), (118, "floor-wood", "floor"), (119, "flower", "plant"),
    (120, "fog", "water"), (121, "food-other", "food-stuff"), (122, "fruit", "food-stuff"),
    (123, "furniture-other", "furniture-stuff"), (124, "grass", "plant"),
    (125, "gravel", "ground"), (126, "ground-other", "ground"), (127, "hill", "solid"),
    (128, "house", "building"), (129, "leaves", "plant"), (130, "light", "furniture-stuff"),
    (131, "mat", "textile"), (132, "metal", "raw-material"),
    (133, "mirror-stuff", "furniture-stuff"), (134, "moss", "plant"),
    (135, "mountain", "solid"), (136, "mud", "ground"), (137, "napkin", "textile"),
    (138, "net", "structural"), (139, "paper", "raw-material"), (140, "pavement", "ground"),
    (141, "pillow", "textile"), (142, "plant-other", "plant"),
    (143, "plastic", "raw-material"), (144, "platform", "ground"),
    (145, "playingfield", "ground"), (146, "railing", "structural"),
    (147, "railroad", "ground"), (148, "river", "water"), (149, "road", "ground"),
    (150, "rock", "solid"), (151, "roof", "building"), (152, "rug", "textile"),
    (153, "salad", "food-stuff"), (154, "sand", "ground"), (155, "sea", "water"),
    (156, "shelf", "furniture-stuff"), (157, "sky-other", "sky"),
    (158, "skyscraper", "building"), (159, "snow", "ground"), (160, "solid-other", "solid"),
    (161, "stairs", "furniture-stuff"), (162, "stone", "solid"), (163, "straw", "plant"),
    (164, "structural-other", "structural"), (165, "table", "furniture-stuff"),
    (166, "tent", "building"), (167, "textile-other", "textile"), (168, "towel", "textile"),
    (169, "tree", "plant"), (170, "vegetable", "food-stuff"), (171, "wall-brick", "wall"),
    (172, "wall-concrete", "wall"), (173, "wall-other", "wall"), (174, "wall-panel", "wall"),
    (175, "wall-stone", "wall"), (176, "wall-tile", "wall"), (177, "wall-wood", "wall"),
    (178, "water-other", "water"), (179, "waterdrops", "water"),
    (180, "window-blind", "window"), (181, "window-other", "window"), (182, "wood", "solid"),
)


def _coco_fine_to_coarse():
    lut = np.full(256, IGNORE, np.int64)  # 255 (unlabeled) and anything unknown -> ignore
    for cat_id, _name, supercategory in COCO_STUFF_CATEGORIES:
        lut[cat_id - 1] = COCO_STUFF_27_CLASSES.index(supercategory)
    return lut


COCO_FINE_TO_COARSE = _coco_fine_to_coarse()
"""Lookup table: stuffthingmaps value (0..255) -> coarse class 0..26 or -1."""

COCO_CURATED_LIST = "Coco164kFull_Stuff_Coarse_7.txt"
COCO_LIST_HELP = (
    f"the curated 2175-image list {COCO_CURATED_LIST} (IIC / PiCIE / STEGO). Get it from "
    f"google/diffseg (data/coco/{COCO_CURATED_LIST}), PaulCouairon/DiffCut "
    f"(dataloader/coco/val2017/{COCO_CURATED_LIST}) or STEGO's cocostuff download "
    f"(curated/val2017/{COCO_CURATED_LIST}), and pass it as image_list= / --image-list, "
    f"or put it at <root>/curated/val2017/{COCO_CURATED_LIST}"
)

# ---------------------------------------------------------------------------
# Cityscapes: gtFine labelIds 7..33 -> 0..26 (the 27 "category ids >= 7" of
# cityscapesScripts' labels.py, as google/diffseg data/cityscapes); 0..6
# (unlabeled, ego vehicle, rectification border, out of roi, static, dynamic,
# ground) and anything else -> ignore.
# ---------------------------------------------------------------------------
CITYSCAPES_27_CLASSES = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence",
    "guard rail", "bridge", "tunnel", "pole", "polegroup", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle",
)
CITYSCAPES_LABEL_TO_27 = np.full(256, IGNORE, np.int64)
CITYSCAPES_LABEL_TO_27[7:34] = np.arange(27)


def _missing_error(what, missing, total, hint=""):
    shown = "\n  ".join(str(p) for p in missing[:10])
    more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
    msg = f"{len(missing)} of {total} {what} not found; expected:\n  {shown}{more}"
    return FileNotFoundError(msg + (f"\n{hint}" if hint else ""))


def read_label_png(path, channel0=False):
    """A label PNG -> ``(H, W)`` integer array of its raw values.

    Palette PNGs give their indices. A 3-channel PNG is accepted when its
    channels are equal, or with ``channel0=True`` (channel 0 is used, as the
    official COCO loader does); otherwise it is a colour-coded label image
    and raises ``ValueError``.
    """
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"label: no such file: {path}") from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"label: cannot read {path}: {e}") from None
    if arr.ndim == 3:
        if arr.shape[2] in (3, 4) and (
            channel0 or (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]))
        ):
            arr = arr[..., 0]
        else:
            raise ValueError(
                f"label: {path} is a colour image (shape {arr.shape}); label PNGs must hold "
                f"class ids (grayscale, 16-bit or palette)"
            )
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    return arr


class Sample:
    """One evaluation item: ``id``, ``label`` and a lazily loaded ``image``
    (``image_path`` and ``label_path`` name its files)."""

    __slots__ = ("id", "label", "image_path", "label_path", "_read")

    def __init__(self, id, label, image_path=None, label_path=None, read=None):
        self.id = id
        self.label = label
        self.image_path = image_path
        self.label_path = label_path
        self._read = read or read_dataset_image

    @property
    def image(self):
        """The image, ``(H, W, 3)`` uint8 RGB in its stored orientation (EXIF
        Orientation ignored, like the label map; read on each access)."""
        if self.image_path is None:
            raise FileNotFoundError(f"sample {self.id!r} has no image file")
        return self._read(self.image_path)

    def __iter__(self):
        return iter((self.id, self.image, self.label))

    def __repr__(self):
        return f"Sample(id={self.id!r}, label shape={self.label.shape})"


class SegmentationDataset:
    """Base class: a list of ``(id, image_path, label_path)`` and a label
    mapping. Subclasses set ``name``, ``class_names`` and ``kl_threshold``
    (the official per-dataset default)."""

    name = "dataset"
    class_names = ()
    kl_threshold = 1.1

    def __init__(self, items, size=512, *, decoder="official", preprocessing="crop"):
        if size is not None and (isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1):
            raise ValueError(f"size must be a positive integer or None, got {size!r}")
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(map(repr, DECODERS))}, got {decoder!r}")
        if preprocessing not in PREPROCESSING:
            raise ValueError(f"preprocessing must be one of {', '.join(map(repr, PREPROCESSING))}, "
                             f"got {preprocessing!r}")
        if preprocessing == "stego" and size is None:
            raise ValueError("preprocessing='stego' needs a size (STEGO's tables: 320)")
        self.size = None if size is None else int(size)
        self.decoder, self.preprocessing = decoder, preprocessing
        self._items = list(items)
        if not self._items:
            raise ValueError(f"{self.name}: no images found")

    @property
    def n_classes(self):
        return len(self.class_names)

    @property
    def ids(self):
        return [item[0] for item in self._items]

    def __len__(self):
        return len(self._items)

    def map_labels(self, raw):
        """Raw label values -> class ids (``-1`` = ignore). Subclasses override."""
        return np.asarray(raw, dtype=np.int64)

    def _read_raw_label(self, path):
        return read_label_png(path)

    def load_label(self, index):
        _, _, label_path = self._items[index]
        label = self.map_labels(self._read_raw_label(label_path))
        if self.preprocessing == "stego":
            return stego_resize_crop(label, self.size)
        if self.size is None:
            from ..io.images import center_crop

            return np.ascontiguousarray(center_crop(label))
        return np.ascontiguousarray(preprocess_labels(label, self.size))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = range(len(self))[index]  # IndexError, negative indices
        sample_id, image_path, label_path = self._items[index]
        return Sample(sample_id, self.load_label(index), image_path, label_path, self.read_image)

    def read_image(self, path):
        """An image file of this dataset as the model gets it (see the module docstring)."""
        image = read_dataset_image(path, self.decoder)
        return stego_resize_crop(image, self.size) if self.preprocessing == "stego" else image

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def check_sizes(self, limit=None):
        """Refuse image and label files of different sizes (each would be
        centre-cropped on its own and scored against the wrong pixels): a
        ValueError naming the files and both sizes. Reads the files' headers
        only; items without an image are skipped."""
        from PIL import Image

        bad = []
        for sample_id, image_path, label_path in self._items[:limit]:
            if image_path is None:
                continue
            try:
                with Image.open(image_path) as im, Image.open(label_path) as lab:
                    sizes = im.size, lab.size
            except (OSError, SyntaxError) as e:
                raise ValueError(f"{self.name}: cannot read {image_path} or {label_path}: {e}") from None
            if sizes[0] != sizes[1]:
                bad.append(f"{image_path} is {sizes[0][0]}x{sizes[0][1]}, its label map {label_path} "
                           f"{sizes[1][0]}x{sizes[1][1]}")
        if bad:
            more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
            raise ValueError(f"{self.name}: {len(bad)} image(s) and label map(s) differ in size (width x height), "
                             f"so their pixels do not line up: {'; '.join(bad[:3])}{more}")

    def describe(self):
        """Short JSON-able description (written into evaluation results)."""
        first, last = self._items[0][2], self._items[-1][2]
        labels = os.path.commonpath([os.path.abspath(first), os.path.abspath(last)])
        return {"name": self.name, "n_classes": self.n_classes, "images": len(self),
                "size": self.size, "labels": labels, "decoder": self.decoder, "preprocessing": self.preprocessing}

    def __repr__(self):
        return f"{type(self).__name__}({len(self)} images, {self.n_classes} classes, size={self.size})"


def _first_existing(candidates):
    for c in candidates:
        if c.exists():
            return c
    return None


def _read_id_list(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image_list: no such file: {path}")
    ids, seen = [], set()
    for line in path.read_text().splitlines():
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        token = Path(token.split()[0]).name
        stem = re.sub(r"\.(jpe?g|png)$", "", token, flags=re.IGNORECASE)
        if stem not in seen:  # duplicate lines are read once
            seen.add(stem)
            ids.append(stem)
    if not ids:
        raise ValueError(f"image_list: {path} lists no image ids")
    return ids


class CocoStuff27(SegmentationDataset):
    """COCO-Stuff-27: COCO val2017 images + stuffthingmaps labels, 182 fine
    classes -> 27 coarse (``COCO_FINE_TO_COARSE``), 255 -> ignore.

    Parameters
    ----------
    root : directory
        Searched for the layouts (first match wins, or pass the directories):
        images ``<root>/images/val2017``, ``<root>/val2017``,
        ``<root>/coco/val2017``; labels ``<root>/annotations/val2017``,
        ``<root>/stuffthingmaps_trainval2017/val2017``,
        ``<root>/stuffthingmaps/val2017``, ``<root>/annotation_val2017``.
    image_list : path, or ``"all"``
        The curated list (one id per line, ``000000000139`` or with ``.jpg``;
        duplicates read once). Default: ``<root>/curated/val2017/
        Coco164kFull_Stuff_Coarse_7.txt`` or ``<root>/Coco164kFull_Stuff_Coarse_7.txt``.
        ``"all"``: every label PNG in the label directory (5000 for val2017;
        not the benchmark).
    image_dir, label_dir : directories overriding the search.
    size : int or None
        Label size after the centre crop (512).
    require_images : bool
        Check that every image exists (turn off to evaluate from precomputed
        attention without the images).
    """

    name = "coco-stuff-27"
    class_names = COCO_STUFF_27_CLASSES
    kl_threshold = 1.1

    def __init__(self, root=None, image_list=None, *, image_dir=None, label_dir=None,
                 size=512, require_images=True, decoder="official", preprocessing="crop"):
        root = Path(root) if root is not None else None
        if root is not None and not root.is_dir():
            raise FileNotFoundError(f"root: no such directory: {root}")

        def pick(given, subpaths, what):
            if given is not None:
                given = Path(given)
                if not given.is_dir():
                    raise FileNotFoundError(f"{what}: no such directory: {given}")
                return given
            if root is None:
                raise ValueError(f"give root or {what}")
            cands = [root / s for s in subpaths]
            found = _first_existing(cands)
            if found is None:
                tried = "\n  ".join(str(c) for c in cands)
                raise FileNotFoundError(f"COCO-Stuff {what}: none of these directories exists:\n  {tried}")
            return found

        label_dir = pick(label_dir, ["annotations/val2017", "stuffthingmaps_trainval2017/val2017",
                                     "stuffthingmaps/val2017", "annotation_val2017"], "label_dir")
        if require_images:
            image_dir = pick(image_dir, ["images/val2017", "val2017", "coco/val2017"], "image_dir")
        elif image_dir is not None or root is not None:
            try:
                image_dir = pick(image_dir, ["images/val2017", "val2017", "coco/val2017"], "image_dir")
            except FileNotFoundError:
                image_dir = None

        if isinstance(image_list, str) and image_list == "all":
            ids = sorted(p.stem for p in label_dir.glob("*.png"))
            if not ids:
                raise FileNotFoundError(f"label_dir: no .png label maps in {label_dir}")
            self.image_list = "all"
        else:
            if image_list is None:
                cands = [] if root is None else [root / "curated" / "val2017" / COCO_CURATED_LIST,
                                                 root / COCO_CURATED_LIST]
                image_list = _first_existing(cands)
                if image_list is None:
                    tried = "".join(f"\n  {c}" for c in cands)
                    raise FileNotFoundError(
                        f"COCO-Stuff-27 needs {COCO_LIST_HELP}. Looked for:{tried or ' (no root)'}")
            ids = _read_id_list(image_list)
            self.image_list = str(image_list)

        labels = [label_dir / f"{i}.png" for i in ids]
        missing = [p for p in labels if not p.is_file()]
        if missing:
            raise _missing_error("label maps", missing, len(ids),
                                 "(stuffthingmaps_trainval2017 from github.com/nightrome/cocostuff; "
                                 "one <id>.png per image id)")
        images = [None] * len(ids)
        if image_dir is not None:
            images = [image_dir / f"{i}.jpg" for i in ids]
            missing = [p for p in images if not p.is_file()]
            if missing:
                if require_images:
                    raise _missing_error("images", missing, len(ids), "(COCO val2017 <id>.jpg)")
                images = [p if p.is_file() else None for p in images]
        self.image_dir, self.label_dir = image_dir, label_dir
        super().__init__(zip(ids, images, labels), size=size, decoder=decoder, preprocessing=preprocessing)

    def _read_raw_label(self, path):
        return read_label_png(path, channel0=True)  # official: decode 3 channels, use channel 0

    def map_labels(self, raw):
        raw = np.asarray(raw)
        if raw.min() < 0 or raw.max() > 255:
            raise ValueError(f"COCO-Stuff label values must be 0..255, got {raw.min()}..{raw.max()}")
        return COCO_FINE_TO_COARSE[raw.astype(np.int64)]

    def describe(self):
        return {**super().describe(), "image_list": self.image_list}


class Cityscapes(SegmentationDataset):
    """Cityscapes, 27 classes: ``leftImg8bit/<split>/<city>/<id>_leftImg8bit.png``
    with ``gtFine/<split>/<city>/<id>_gtFine_labelIds.png``; labelIds 7..33 ->
    0..26, everything else ignored. The sample id is the image file's stem,
    ``<city>_<seq>_<frame>_leftImg8bit`` (what ``diffseg attention`` names the
    .npz of that image). The val split has 500 images (1024 x 2048: the centre
    1024 x 1024 is used)."""

    name = "cityscapes"
    class_names = CITYSCAPES_27_CLASSES
    kl_threshold = 0.9  # the official benchmark notebook's comment

    IMAGE_SUFFIX = "_leftImg8bit.png"
    LABEL_SUFFIX = "_gtFine_labelIds.png"

    def __init__(self, root, split="val", *, size=512, require_images=True, decoder="official",
                 preprocessing="crop"):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"root: no such directory: {root}")
        image_root = root / "leftImg8bit" / split
        label_root = root / "gtFine" / split
        if not label_root.is_dir():
            raise FileNotFoundError(
                f"Cityscapes labels: no directory {label_root} (expected "
                f"<root>/gtFine/{split}/<city>/<city>_<seq>_<frame>{self.LABEL_SUFFIX}, "
                f"from gtFine_trainvaltest.zip)")
        if image_root.is_dir():
            image_files = sorted(image_root.glob(f"*/*{self.IMAGE_SUFFIX}"))
            bases = [p.name[: -len(self.IMAGE_SUFFIX)] for p in image_files]
            cities = [p.parent.name for p in image_files]
        elif require_images:
            raise FileNotFoundError(
                f"Cityscapes images: no directory {image_root} (expected "
                f"<root>/leftImg8bit/{split}/<city>/<city>_<seq>_<frame>{self.IMAGE_SUFFIX}, "
                f"from leftImg8bit_trainvaltest.zip)")
        else:
            image_files = None
            label_files = sorted(label_root.glob(f"*/*{self.LABEL_SUFFIX}"))
            bases = [p.name[: -len(self.LABEL_SUFFIX)] for p in label_files]
            cities = [p.parent.name for p in label_files]
        if not bases:
            where = image_root if image_files is not None else label_root
            suffix = self.IMAGE_SUFFIX if image_files is not None else self.LABEL_SUFFIX
            raise FileNotFoundError(f"Cityscapes: no files matching {where}/<city>/*{suffix}")
        labels = [label_root / c / f"{b}{self.LABEL_SUFFIX}" for c, b in zip(cities, bases)]
        missing = [p for p in labels if not p.is_file()]
        if missing:
            raise _missing_error("label maps", missing, len(bases))
        if image_files is None:
            image_files = [image_root / c / f"{b}{self.IMAGE_SUFFIX}" for c, b in zip(cities, bases)]
            image_files = [p if p.is_file() else None for p in image_files]
        ids = [f"{b}{Path(self.IMAGE_SUFFIX).stem}" for b in bases]  # = the image file's stem
        self.root, self.split = root, split
        super().__init__(zip(ids, image_files, labels), size=size, decoder=decoder, preprocessing=preprocessing)

    def map_labels(self, raw):
        raw = np.asarray(raw).astype(np.int64)
        out = np.full(raw.shape, IGNORE, np.int64)
        ok = (raw >= 0) & (raw <= 255)
        out[ok] = CITYSCAPES_LABEL_TO_27[raw[ok]]
        return out

    def describe(self):
        return {**super().describe(), "split": self.split}


class FolderDataset(SegmentationDataset):
    """Images and label PNGs matched by file stem.

    ``image_dir/<stem>.<jpg|png|...>`` pairs with ``label_dir/<stem><label_suffix>``
    (default ``.png``). Label values are class ids; ``ignore_values`` (default
    255) and negative values become ``-1``; ``label_map`` (dict or lookup
    array) maps raw values to class ids first (unmapped values -> ignore).

    ``n_classes``: default = 1 + the largest class id over all labels
    (read once, on first use).
    """

    name = "folder"
    kl_threshold = 1.1

    def __init__(self, image_dir, label_dir, *, n_classes=None, class_names=None,
                 label_suffix=".png", ignore_values=(255,), label_map=None, size=512,
                 require_images=True, decoder="official", preprocessing="crop"):
        label_dir = Path(label_dir)
        if not label_dir.is_dir():
            raise FileNotFoundError(f"label_dir: no such directory: {label_dir}")
        image_dir = Path(image_dir) if image_dir is not None else None
        if image_dir is not None and not image_dir.is_dir():
            if require_images:
                raise FileNotFoundError(f"image_dir: no such directory: {image_dir}")
            image_dir = None
        if image_dir is None and require_images:
            raise ValueError("image_dir is required (or pass require_images=False)")

        labels = {p.name[: -len(label_suffix)]: p for p in label_dir.iterdir()
                  if p.is_file() and p.name.endswith(label_suffix) and len(p.name) > len(label_suffix)}
        if image_dir is not None:
            images = {}
            for p in sorted(image_dir.iterdir()):
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                    if p.stem in images:
                        raise ValueError(f"image_dir: two images with stem {p.stem!r}: "
                                         f"{images[p.stem].name}, {p.name}")
                    images[p.stem] = p
            if not images:
                raise FileNotFoundError(
                    f"image_dir: no images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}")
            stems = sorted(images)
            missing = [label_dir / f"{s}{label_suffix}" for s in stems if s not in labels]
            if missing:
                raise _missing_error("label maps", missing, len(stems),
                                     f"(each image <stem>.* needs {label_dir}/<stem>{label_suffix})")
            items = [(s, images[s], labels[s]) for s in stems]
        else:
            if not labels:
                raise FileNotFoundError(f"label_dir: no *{label_suffix} files in {label_dir}")
            items = [(s, None, labels[s]) for s in sorted(labels)]

        if label_map is not None:
            if isinstance(label_map, dict):
                top = max(int(k) for k in label_map)
                lut = np.full(max(top + 1, 256), IGNORE, np.int64)
                for k, v in label_map.items():
                    lut[int(k)] = int(v)
            else:
                lut = np.asarray(label_map, dtype=np.int64)
            self._lut = lut
        else:
            self._lut = None
        self._ignore = tuple(int(v) for v in (ignore_values or ()))
        self._n_classes = None if n_classes is None else int(n_classes)
        if self._n_classes is not None and self._n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        self._class_names = tuple(class_names) if class_names is not None else None
        if self._class_names is not None and self._n_classes is not None \
                and len(self._class_names) != self._n_classes:
            raise ValueError(f"class_names has {len(self._class_names)} names for "
                             f"n_classes={self._n_classes}")
        self.image_dir, self.label_dir = image_dir, label_dir
        super().__init__(items, size=size, decoder=decoder, preprocessing=preprocessing)

    def map_labels(self, raw):
        raw = np.asarray(raw).astype(np.int64)
        if self._lut is not None:
            out = np.full(raw.shape, IGNORE, np.int64)
            ok = (raw >= 0) & (raw < len(self._lut))
            out[ok] = self._lut[raw[ok]]
        else:
            out = raw.copy()
        for v in self._ignore:
            out[raw == v] = IGNORE
        out[out < 0] = IGNORE
        if self._n_classes is not None:
            out[out >= self._n_classes] = IGNORE
        return out

    @property
    def n_classes(self):
        if self._n_classes is None:
            if self._class_names is not None:
                self._n_classes = len(self._class_names)
            else:
                top = -1
                for _, _, path in self._items:
                    top = max(top, int(self.map_labels(read_label_png(path)).max()))
                if top < 0:
                    raise ValueError(f"{self.label_dir}: every label pixel is ignored; give n_classes")
                self._n_classes = top + 1
        return self._n_classes

    @property
    def class_names(self):
        if self._class_names is not None:
            return self._class_names
        return tuple(str(i) for i in range(self.n_classes))


DATASETS = {
    "coco-stuff-27": CocoStuff27,
    "cityscapes": Cityscapes,
    "folder": FolderDataset,
}
_ALIASES = {"coco": "coco-stuff-27", "cocostuff27": "coco-stuff-27", "coco-stuff": "coco-stuff-27",
            "cocostuff": "coco-stuff-27", "coco_stuff_27": "coco-stuff-27"}


def dataset_kind(name):
    key = str(name).lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}")
    return key
