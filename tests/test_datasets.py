"""diffseg.datasets on tiny synthetic datasets written to disk."""
import numpy as np
import pytest
from PIL import Image

from diffseg.evaluation.datasets import (
    CITYSCAPES_27_CLASSES,
    COCO_CURATED_LIST,
    COCO_FINE_TO_COARSE,
    COCO_STUFF_27_CLASSES,
    Cityscapes,
    CocoStuff27,
    FolderDataset,
    dataset_kind,
)
from diffseg.io.images import preprocess_labels

# fine_to_coarse of IIC / PiCIE / STEGO (and google/diffseg's
# fine_to_coarse_dict.pickle), fine ids 0..181 in order: an independent check
# of the table built from the COCO category hierarchy.
STEGO_FINE_TO_COARSE = [
    9, 11, 11, 11, 11, 11, 11, 11, 11, 8, 8, 8, 8, 8, 8, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 6, 6,
    6, 6, 6, 6, 6, 6, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 5, 5, 5, 5, 5, 5, 5, 5, 2, 2,
    2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1,
    1, 4, 4, 4, 4, 4, 4, 4, 4, 17, 17, 22, 20, 20, 22, 15, 25, 16, 13, 12, 12, 17, 17, 23,
    15, 15, 17, 15, 21, 15, 25, 13, 13, 13, 13, 13, 22, 26, 14, 14, 15, 22, 21, 21, 24, 20,
    22, 15, 17, 16, 15, 22, 24, 21, 17, 25, 16, 21, 17, 22, 16, 21, 21, 25, 21, 26, 21, 24,
    20, 17, 14, 21, 26, 15, 23, 20, 21, 24, 15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18, 18,
    18, 18, 18, 18, 18, 26, 26, 19, 19, 24,
]


def save_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array)).save(path)


def save_jpg(path, h, w, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


# -- COCO-Stuff-27 -------------------------------------------------------------------
def test_coco_fine_to_coarse_table():
    assert len(COCO_STUFF_27_CLASSES) == 27
    assert COCO_FINE_TO_COARSE[:182].tolist() == STEGO_FINE_TO_COARSE
    assert (COCO_FINE_TO_COARSE[182:] == -1).all()  # 255 = unlabeled, others unknown
    things, stuff = COCO_FINE_TO_COARSE[:91], COCO_FINE_TO_COARSE[91:182]
    assert set(things.tolist()) == set(range(12)) and set(stuff.tolist()) == set(range(12, 27))
    # spot checks by name: stuffthingmaps value = COCO id - 1
    names = COCO_STUFF_27_CLASSES
    assert names[COCO_FINE_TO_COARSE[0]] == "person"           # id 1
    assert names[COCO_FINE_TO_COARSE[71]] == "electronic"      # id 72 tv
    assert names[COCO_FINE_TO_COARSE[105]] == "sky"            # id 106 clouds
    assert names[COCO_FINE_TO_COARSE[156]] == "sky"            # id 157 sky-other
    assert names[COCO_FINE_TO_COARSE[148]] == "ground"         # id 149 road
    assert names[COCO_FINE_TO_COARSE[181]] == "solid"          # id 182 wood


def make_coco(root, ids=("000000000139", "000000000285", "000000000632"), layout="stego",
              with_list=True, shape=(12, 18)):
    rng = np.random.default_rng(3)
    if layout == "stego":
        img_dir, lab_dir = root / "images" / "val2017", root / "annotations" / "val2017"
        list_path = root / "curated" / "val2017" / COCO_CURATED_LIST
    else:  # the official google/diffseg layout (val2017 + stuffthingmaps)
        img_dir, lab_dir = root / "val2017", root / "stuffthingmaps_trainval2017" / "val2017"
        list_path = root / COCO_CURATED_LIST
    fine = {}
    for k, i in enumerate(ids):
        save_jpg(img_dir / f"{i}.jpg", *shape, seed=k)
        lab = rng.choice(np.r_[np.arange(182), 255], size=shape).astype(np.uint8)
        lab[shape[0] // 2, ::2] = 255  # unlabeled pixels, some inside the crop
        fine[i] = lab
        save_png(lab_dir / f"{i}.png", lab)
    # an extra image that is not in the list
    save_jpg(img_dir / "000000999999.jpg", *shape)
    save_png(lab_dir / "000000999999.png", np.zeros(shape, np.uint8))
    if with_list:
        list_path.parent.mkdir(parents=True, exist_ok=True)
        # with and without extension, a duplicate, a blank line
        lines = [ids[0], f"{ids[1]}.jpg", "", *ids[2:], ids[0]]
        list_path.write_text("\n".join(lines) + "\n")
    return fine


@pytest.mark.parametrize("layout", ["stego", "official"])
def test_coco_stuff_layouts_and_labels(tmp_path, layout):
    fine = make_coco(tmp_path, layout=layout)
    ds = CocoStuff27(tmp_path, size=None)
    assert ds.ids == list(fine)  # list order, duplicates read once, extra image left out
    assert len(ds) == 3 and ds.n_classes == 27 and ds.kl_threshold == 1.1
    s = ds[0]
    raw = fine[s.id]
    # centre crop of 12 x 18 -> columns 3..15
    crop = raw[:, 3:15].astype(int)
    want = np.where(crop == 255, -1, np.array(STEGO_FINE_TO_COARSE + [0] * 74)[crop])
    assert s.label.dtype == np.int64
    np.testing.assert_array_equal(s.label, want)
    assert (s.label == -1).any()
    img = s.image
    assert img.shape == (12, 18, 3) and img.dtype == np.uint8  # the original image
    sid, image, label = ds[1]
    assert sid == ds.ids[1] and image.shape == (12, 18, 3) and label.shape == (12, 12)


def test_coco_stuff_resized_labels(tmp_path):
    fine = make_coco(tmp_path)
    ds = CocoStuff27(tmp_path, size=8)
    s = ds[2]
    coarse = np.where(fine[s.id] == 255, -1, COCO_FINE_TO_COARSE[fine[s.id]])
    np.testing.assert_array_equal(s.label, preprocess_labels(coarse, 8))
    assert s.label.shape == (8, 8)
    assert [x.id for x in ds] == ds.ids and len(ds[0:2]) == 2


def test_coco_stuff_explicit_list_and_all(tmp_path):
    make_coco(tmp_path, with_list=False)
    with pytest.raises(FileNotFoundError, match=COCO_CURATED_LIST + r"(.|\n)*google/diffseg"):
        CocoStuff27(tmp_path)
    lst = tmp_path / "mylist.txt"
    lst.write_text("000000000285\n")
    assert CocoStuff27(tmp_path, lst).ids == ["000000000285"]
    assert len(CocoStuff27(tmp_path, "all")) == 4


def test_coco_stuff_missing_files(tmp_path):
    make_coco(tmp_path)
    (tmp_path / "annotations" / "val2017" / "000000000285.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 3 label maps(.|\n)*000000000285\.png"):
        CocoStuff27(tmp_path)
    make_coco(tmp_path)
    (tmp_path / "images" / "val2017" / "000000000632.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 3 images(.|\n)*000000000632\.jpg"):
        CocoStuff27(tmp_path)
    # without images (evaluation from precomputed attention) it is fine
    ds = CocoStuff27(tmp_path, require_images=False)
    assert len(ds) == 3
    with pytest.raises(FileNotFoundError, match="no image"):
        ds[2].image
    with pytest.raises(FileNotFoundError, match=r"annotations/val2017(.|\n)*stuffthingmaps"):
        CocoStuff27(tmp_path / "images")
    with pytest.raises(FileNotFoundError, match="root"):
        CocoStuff27(tmp_path / "nope")


# -- Cityscapes -------------------------------------------------------------------------
def make_cityscapes(root, shape=(8, 16)):
    rng = np.random.default_rng(5)
    raw = {}
    for city, names in {"frankfurt": ["000000_000294", "000001_000019"], "lindau": ["000000_000019"]}.items():
        for n in names:
            i = f"{city}_{n}"
            save_png(root / "leftImg8bit" / "val" / city / f"{i}_leftImg8bit.png",
                     rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
            lab = rng.integers(0, 34, shape, dtype=np.uint8)
            raw[f"{i}_leftImg8bit"] = lab  # sample id = the image file's stem
            save_png(root / "gtFine" / "val" / city / f"{i}_gtFine_labelIds.png", lab)
    return raw


def test_cityscapes(tmp_path):
    raw = make_cityscapes(tmp_path)
    ds = Cityscapes(tmp_path, size=None)
    assert ds.ids == sorted(raw) and ds.n_classes == 27 and ds.kl_threshold == 0.9
    assert len(CITYSCAPES_27_CLASSES) == 27
    s = ds[0]
    crop = raw[s.id][:, 4:12].astype(int)  # centre 8 x 8 of 8 x 16
    np.testing.assert_array_equal(s.label, np.where(crop >= 7, crop - 7, -1))
    assert s.image.shape == (8, 16, 3)
    assert Cityscapes(tmp_path, size=4)[1].label.shape == (4, 4)


def test_cityscapes_missing(tmp_path):
    raw = make_cityscapes(tmp_path)
    missing = sorted(raw)[1][: -len("_leftImg8bit")]
    city = missing.split("_")[0]
    (tmp_path / "gtFine" / "val" / city / f"{missing}_gtFine_labelIds.png").unlink()
    with pytest.raises(FileNotFoundError, match=rf"1 of 3 label maps(.|\n)*{missing}_gtFine_labelIds"):
        Cityscapes(tmp_path)
    with pytest.raises(FileNotFoundError, match="gtFine/test"):
        Cityscapes(tmp_path, split="test")
    import shutil

    shutil.rmtree(tmp_path / "leftImg8bit")
    with pytest.raises(FileNotFoundError, match="leftImg8bit"):
        Cityscapes(tmp_path)
    ds = Cityscapes(tmp_path, require_images=False)
    assert ds.ids == [i for i in sorted(raw) if not i.startswith(missing)]


# -- folder ------------------------------------------------------------------------
def make_folder(root, n=3, shape=(10, 6)):
    rng = np.random.default_rng(7)
    labels = {}
    for k in range(n):
        stem = f"img{k}"
        save_png(root / "images" / f"{stem}.png", rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
        lab = rng.integers(0, 5, shape, dtype=np.uint8)
        lab[0, 0] = 255
        labels[stem] = lab
        save_png(root / "labels" / f"{stem}.png", lab)
    return labels


def test_folder_dataset(tmp_path):
    labels = make_folder(tmp_path)
    ds = FolderDataset(tmp_path / "images", tmp_path / "labels", size=None)
    assert ds.ids == ["img0", "img1", "img2"]
    assert ds.n_classes == 5 and ds.class_names == ("0", "1", "2", "3", "4")
    s = ds[1]
    want = labels["img1"][2:8].astype(int)
    want[want == 255] = -1
    np.testing.assert_array_equal(s.label, want)
    assert s.image.shape == (10, 6, 3)
    ds = FolderDataset(tmp_path / "images", tmp_path / "labels", n_classes=3, size=12)
    crop = labels["img0"][2:8].astype(int)  # centre 6 x 6 of 10 x 6
    want = np.where(crop < 3, crop, -1)  # classes 3, 4 and 255 are outside n_classes=3: ignored
    assert ds.n_classes == 3
    np.testing.assert_array_equal(ds[0].label, np.kron(want, np.ones((2, 2), int)))  # 6 -> 12: each pixel twice
    mapped = FolderDataset(tmp_path / "images", tmp_path / "labels", label_map={1: 0, 2: 1}, size=None)
    np.testing.assert_array_equal(mapped[0].label, np.select([crop == 1, crop == 2], [0, 1], -1))
    assert mapped.n_classes == 2


def test_folder_dataset_errors(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "labels" / "img2.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 3 label maps(.|\n)*labels/img2\.png"):
        FolderDataset(tmp_path / "images", tmp_path / "labels")
    with pytest.raises(FileNotFoundError, match="label_dir"):
        FolderDataset(tmp_path / "images", tmp_path / "nope")
    assert len(FolderDataset(None, tmp_path / "labels", require_images=False)) == 2
    save_png(tmp_path / "labels" / "img2.png", np.random.default_rng(0).integers(0, 256, (10, 6, 3), dtype=np.uint8))
    ds = FolderDataset(tmp_path / "images", tmp_path / "labels", n_classes=5)
    with pytest.raises(ValueError, match="colour"):
        ds[2]


def test_dataset_kind():
    assert dataset_kind("COCO") == "coco-stuff-27"
    assert dataset_kind("cityscapes") == "cityscapes"
    with pytest.raises(ValueError, match="dataset must be one of"):
        dataset_kind("pascal")


# -- decoding as the official loader -------------------------------------------------
def _photo(h, w, seed):
    """Smooth colours with edges: JPEG's IDCT choices show on such content."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([(x * 255 / max(w - 1, 1)), (y * 255 / max(h - 1, 1)), ((x + y) % 64) * 4], axis=-1)
    rgb = rgb + rng.normal(0, 18, rgb.shape)
    rgb[h // 3: h // 2, w // 4: w // 2] = [250, 20, 30]
    return np.clip(rgb, 0, 255).astype(np.uint8)


JPEG_KINDS = {  # Pillow's writer: baseline or progressive, chroma 4:2:0 (subsampling=2) or 4:4:4 (0)
    "baseline 4:2:0": {"subsampling": 2},
    "baseline 4:4:4": {"subsampling": 0},
    "progressive 4:2:0": {"subsampling": 2, "progressive": True},
    "progressive 4:4:4": {"subsampling": 0, "progressive": True, "quality": 60},
    "grayscale": None,
}


@pytest.mark.parametrize("kind", list(JPEG_KINDS))
@pytest.mark.parametrize("shape", [(37, 53), (64, 64), (101, 67)])
def test_dataset_jpegs_decode_as_the_official_loader(tmp_path, kind, shape):
    """CocoStuff27(...)[i].image equals libjpeg-turbo's fast integer IDCT with
    fancy upsampling (TensorFlow's decode_jpeg defaults, via simplejpeg), byte
    for byte; decoder="accurate" equals Pillow."""
    simplejpeg = pytest.importorskip("simplejpeg")
    make_coco(tmp_path, shape=shape)
    ds = CocoStuff27(tmp_path, size=None)
    path = ds[0].image_path
    rgb = _photo(*shape, seed=len(kind))
    if JPEG_KINDS[kind] is None:
        Image.fromarray(rgb[:, :, 0]).save(path, quality=85)
    else:
        options = {"quality": 85, **JPEG_KINDS[kind]}
        Image.fromarray(rgb).save(path, **options)
    data = path.read_bytes()
    official = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=False)
    got = ds[0].image
    assert got.dtype == np.uint8 and got.shape == (*shape, 3)
    np.testing.assert_array_equal(got, official)
    pillow = np.asarray(Image.open(path).convert("RGB"))
    accurate = CocoStuff27(tmp_path, size=None, decoder="accurate")[0].image
    np.testing.assert_array_equal(accurate, pillow)
    if JPEG_KINDS[kind] is not None:  # colour: the two IDCTs differ somewhere
        assert not np.array_equal(official, pillow)
        assert np.abs(official.astype(int) - pillow).max() <= 16


def test_dataset_png_images_are_the_same_for_both_decoders(tmp_path):
    raw = make_cityscapes(tmp_path)
    a, b = Cityscapes(tmp_path)[0].image, Cityscapes(tmp_path, decoder="accurate")[0].image
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="decoder"):
        Cityscapes(tmp_path, decoder="tensorflow")
    assert len(raw) == 3


# -- STEGO's frame --------------------------------------------------------------------
def test_stego_preprocessing_by_hand(tmp_path):
    """STEGO's frame on a 6 x 9 label and image, size 4: the short side 6 -> 4, the
    long side int(4 * 9 / 6) = 6, nearest neighbour (rows 0, 2, 3, 5; columns
    0, 2, 3, 5, 6, 8), then the centre 4 x 4: columns from round((6 - 4) / 2) = 1."""
    from diffseg.io.images import stego_resize_crop

    raw = np.arange(54).reshape(6, 9)
    want = raw[np.ix_([0, 2, 3, 5], [2, 3, 5, 6])]
    np.testing.assert_array_equal(stego_resize_crop(raw, 4), want)
    rgb = np.stack([raw, raw + 100, raw + 200], axis=-1).astype(np.uint8)
    np.testing.assert_array_equal(stego_resize_crop(rgb, 4)[:, :, 1], want + 100)
    np.testing.assert_array_equal(stego_resize_crop(raw.T, 4), want.T)  # portrait: the same on the rows
    # torchvision's crop offset rounds half to even: 427 wide at 320 high -> (427 - 320) / 2 = 53.5 -> 54
    wide = np.tile(np.arange(427), (320, 1))
    assert stego_resize_crop(wide, 320)[0, 0] == 54
    # a folder dataset in STEGO's frame: labels and images through the same resize and crop
    root = tmp_path / "ds"
    save_png(root / "images" / "a.png", np.stack([raw.astype(np.uint8)] * 3, axis=-1))
    save_png(root / "labels" / "a.png", (raw % 5).astype(np.uint8))
    ds = FolderDataset(root / "images", root / "labels", n_classes=5, size=4, preprocessing="stego")
    np.testing.assert_array_equal(ds[0].label, want % 5)
    np.testing.assert_array_equal(ds[0].image[:, :, 0], want)
    with pytest.raises(ValueError, match="preprocessing"):
        FolderDataset(root / "images", root / "labels", preprocessing="stego", size=None)
