"""Image loading and preprocessing (diffseg.image), attention files
(diffseg.attention_io): against PIL / torch as oracles, and bad input."""
import numpy as np
import pytest
from PIL import Image

import diffseg
from diffseg.io import images as image


def rgb(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_load_image_kinds_agree_with_pil(tmp_path):
    a = rgb(5, 7)
    path = tmp_path / "x.png"
    Image.fromarray(a).save(path)
    np.testing.assert_array_equal(image.load_image(path), a)
    np.testing.assert_array_equal(image.load_image(str(path)), a)
    np.testing.assert_array_equal(image.load_image(Image.fromarray(a)), a)
    np.testing.assert_array_equal(image.load_image(a), a)
    gray = a[:, :, 0]
    np.testing.assert_array_equal(image.load_image(gray), np.repeat(gray[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(image.load_image(gray[:, :, None]), image.load_image(gray))
    np.testing.assert_array_equal(image.load_image(Image.fromarray(gray)), image.load_image(gray))


def test_rgba_is_composited_on_black():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = [[255, 0], [128, 51]]
    out = image.load_image(rgba)
    expected = np.round(200 * np.array([[255, 0], [128, 51]]) / 255).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)
    pil = image.load_image(Image.fromarray(rgba, "RGBA"))
    assert np.abs(pil.astype(int) - out.astype(int)).max() <= 1


@pytest.mark.parametrize("bad, error, match", [
    (np.zeros((4, 4, 2), np.uint8), ValueError, "image must be"),
    (np.zeros((4, 4, 3), np.float32), TypeError, "uint8"),
    (np.zeros((0, 4, 3), np.uint8), ValueError, "empty"),
    (np.zeros(5, np.uint8), ValueError, "image must be"),
    ("/no/such/file.png", FileNotFoundError, "no such file"),
])
def test_load_image_bad_input(bad, error, match):
    with pytest.raises(error, match=match):
        image.load_image(bad)


def test_unreadable_file(tmp_path):
    path = tmp_path / "junk.jpg"
    path.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read"):
        image.load_image(path)


@pytest.mark.parametrize("h, w", [(10, 16), (16, 10), (9, 9), (1, 3)])
def test_center_crop_box(h, w):
    top, left, side = image.center_crop_box(h, w)
    assert side == min(h, w)
    assert top == (h - side) // 2 and left == (w - side) // 2


def test_frame_geometry_by_hand():
    """The padded whole frame and its window at the image's scale, computed by hand.

    A 100 x 150 photo for a 64 px model (multiple 64): the short side 100 -> 64
    (scale 0.64), the long side 150 * 0.64 = 96, padded to 128: 16 px left and
    right. At the photo's scale the frame is 128 / 0.64 = 200 px wide, its
    window starts 16 / 0.64 = 25 px in."""
    g = image.whole_frame_geometry(100, 150, 64, 64)
    assert (g.resized_height, g.resized_width, g.frame_height, g.frame_width) == (64, 96, 64, 128)
    assert (g.top, g.bottom, g.left, g.right, g.scale) == (0, 0, 16, 16, 0.64)
    assert g.label_window() == (100, 200, 0, 25)
    # the frame's corners and centre in photo pixels (padding clipped to the photo's edge)
    assert g.to_image(0.0, 0.0) == (0.0, 0.0)  # in the left padding
    assert g.to_image(0.5, 0.5) == (75.0, 50.0)  # (64 - 16) / 0.64 = 75
    assert g.to_image(1.0, 1.0) == (150.0, 100.0)  # in the right padding
    assert g.to_image(0.25, 0.25) == (25.0, 25.0)  # (32 - 16) / 0.64 = 25; 16 / 0.64 = 25
    # the tiny test model's frames (128 px): resize, padding and window rounded as the rule says
    for (h, w), window in {(300, 420): (300, 451, 0, 14), (420, 300): (451, 300, 14, 0),
                           (97, 251): (97, 291, 0, 20), (96, 160): (96, 192, 0, 16)}.items():
        assert image.whole_frame_geometry(h, w, 128, 64).label_window() == window
    # 300 x 420: 420 * 128 / 300 = 179.2 -> 179, padded to 192: 6 left, 7 right; 6 * 420 / 179 = 14.08 -> 14,
    # 192 * 420 / 179 = 450.5 -> 451; 97 x 251: 251 * 128 / 97 = 331.2 -> 331, frame 384, 26 left:
    # 26 * 251 / 331 = 19.7 -> 20, 384 * 251 / 331 = 291.2 -> 291; 96 x 160: 213.3 -> 213, frame 256, 21 left:
    # 21 * 160 / 213 = 15.8 -> 16, 256 * 160 / 213 = 192.3 -> 192


def test_preprocess_matches_torch_bilinear():
    torch = pytest.importorskip("torch")
    a = rgb(48, 80, seed=1)
    x = image.preprocess_image(a, size=32)
    crop = a[:, 16:64].astype(np.float32)
    t = torch.from_numpy(crop).permute(2, 0, 1)[None]
    want = torch.nn.functional.interpolate(t, size=(32, 32), mode="bilinear", align_corners=False,
                                           antialias=False)[0].numpy() / 127.5 - 1
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    np.testing.assert_allclose(x, want, atol=1e-5)
    assert -1 <= x.min() and x.max() <= 1


def test_labels_resize_is_nearest_exact():
    torch = pytest.importorskip("torch")
    labels = np.random.default_rng(2).integers(0, 27, (30, 50))
    got = image.preprocess_labels(labels, size=12)
    crop = torch.from_numpy(labels[:, 10:40].astype(np.float32))[None, None]
    want = torch.nn.functional.interpolate(crop, size=(12, 12), mode="nearest-exact")[0, 0]
    np.testing.assert_array_equal(got, want.numpy().astype(labels.dtype))


def test_attention_files_round_trip(tmp_path):
    attn = {8: np.random.default_rng(0).random((64, 64), dtype=np.float32),
            4: np.random.default_rng(1).random((16, 16), dtype=np.float32)}
    path = tmp_path / "img.npz"
    diffseg.save_attention(path, attn)
    back = diffseg.load_attention(path)
    assert list(back) == [8, 4]
    for s in attn:
        np.testing.assert_array_equal(back[s], attn[s])
    assert not list(tmp_path.glob("*.tmp*"))


def test_attention_file_without_maps(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, other=np.zeros(3))
    with pytest.raises(ValueError, match="no 'attn_<res>'"):
        diffseg.load_attention(path)


# ---------------------------------------------------------------- EXIF orientation
def _phone_jpeg(path, orientation=6):
    """Stored 600 wide x 400 high, left half white; displayed turned 90 degrees
    clockwise (Orientation=6): 400 wide x 600 high, white on top."""
    rgb = np.zeros((400, 600, 3), np.uint8)
    rgb[:, :300] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb).save(path, exif=exif.tobytes(), quality=95)
    return path


def test_exif_orientation_gives_the_image_as_displayed(tmp_path):
    path = _phone_jpeg(tmp_path / "phone.jpg")
    shown = image.load_image(path)
    assert shown.shape == (600, 400, 3)
    assert shown[:250].mean() > 200 and shown[350:].mean() < 50
    with Image.open(path) as im:
        assert image.load_image(im).shape == (600, 400, 3)
    stored = image.load_image(path, exif_transpose=False)  # what evaluation datasets use
    assert stored.shape == (400, 600, 3) and stored[:, :250].mean() > 200
    with pytest.raises(TypeError, match="exif_transpose"):
        image.load_image(path, exif_transpose="yes")


def test_segment_viz_and_cli_follow_exif(tmp_path, monkeypatch):
    import json

    from diffseg import cli
    from diffseg.cli import _common
    from diffseg.evaluation.datasets import Sample
    from diffseg.viz import overlay

    from planted_model import PlantedModel as Planted

    path = _phone_jpeg(tmp_path / "phone.jpg")
    labels = diffseg.segment(path, Planted())
    assert labels.shape == (600, 400)
    assert overlay(path, labels).shape == (600, 400, 3)
    monkeypatch.setattr(_common, "open_model", lambda args, **kw: Planted())
    assert cli.main(["segment", str(path), "-o", str(tmp_path / "out"), "-q"]) == 0
    with Image.open(tmp_path / "out" / "phone.labels.png") as im:
        assert im.size == (400, 600)  # (width, height) as displayed
    doc = json.loads((tmp_path / "out" / "phone.json").read_text())
    assert (doc["height"], doc["width"]) == (600, 400)
    assert Sample("phone", None, path).image.shape == (400, 600, 3)  # datasets: stored, like their labels


def test_attention_float16_files(tmp_path):
    attn = {4: np.random.default_rng(0).dirichlet(np.ones(16), 16).astype(np.float32)}
    diffseg.save_attention(tmp_path / "a.npz", attn)
    diffseg.save_attention(tmp_path / "h.npz", attn, dtype="float16")
    back = diffseg.load_attention(tmp_path / "h.npz")
    assert back[4].dtype == np.float32
    np.testing.assert_allclose(back[4], attn[4], rtol=1e-3)
    with np.load(tmp_path / "h.npz") as data:
        assert data["attn_4"].dtype == np.float16
    with pytest.raises(ValueError, match="dtype"):
        diffseg.save_attention(tmp_path / "b.npz", attn, dtype="int8")


def test_attention_cli_orientation_for_datasets(tmp_path, monkeypatch):
    """`diffseg attention` sees photos as displayed; --stored-orientation (for
    evaluation datasets) as stored, like their labels."""
    from diffseg import cli
    from diffseg.cli import _common

    shapes = []

    class Recorder:
        def attention(self, image, timestep=None):
            shapes.append(image.shape)
            return {2: np.full((4, 4), 0.25, np.float32)}

        def close(self):
            pass

    monkeypatch.setattr(_common, "open_model", lambda args, **kw: Recorder())
    path = _phone_jpeg(tmp_path / "phone.jpg")
    assert cli.main(["attention", str(path), "-o", str(tmp_path / "a")]) == 0
    assert cli.main(["attention", str(path), "-o", str(tmp_path / "b"), "--stored-orientation"]) == 0
    assert shapes == [(600, 400, 3), (400, 600, 3)]
    # each file records how its image was read; evaluation refuses the one that does not fit the dataset
    from diffseg.io.attention import file_sha256, read_attention_record

    turned, stored = read_attention_record(tmp_path / "a" / "phone.npz"), read_attention_record(tmp_path / "b" / "phone.npz")
    assert turned["image"] == {"sha256": file_sha256(path), "height": 600, "width": 400, "orientation": "exif-applied",
                               "exif_rotated": True, "decoder": "accurate"}
    assert stored["image"]["orientation"] == "stored" and not stored["image"]["exif_rotated"]
    assert (stored["image"]["height"], stored["image"]["width"]) == (400, 600)
    (tmp_path / "ds" / "images").mkdir(parents=True)
    (tmp_path / "ds" / "labels").mkdir()
    import shutil

    shutil.copy(path, tmp_path / "ds" / "images" / "phone.jpg")
    Image.fromarray(np.zeros((400, 600), np.uint8)).save(tmp_path / "ds" / "labels" / "phone.png")
    from diffseg.evaluation.datasets import FolderDataset

    ds = FolderDataset(tmp_path / "ds" / "images", tmp_path / "ds" / "labels", n_classes=2)
    with pytest.raises(ValueError, match="phone.npz does not match: its image was turned by its EXIF orientation"):
        diffseg.evaluate(ds, attention_dir=tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="phone.npz does not match: its JPEG was decoded with decoder='accurate'"):
        diffseg.evaluate(ds, attention_dir=tmp_path / "b", progress=False)
    assert cli.main(["attention", str(path), "-o", str(tmp_path / "c"), "--stored-orientation",
                     "--decoder", "official"]) == 0
    assert shapes[-1] == (400, 600, 3)
    assert diffseg.evaluate(ds, attention_dir=tmp_path / "c", progress=False, grid=1)["images"] == 1
    # --decoder official of a turned photo without --stored-orientation: refused per image
    assert cli.main(["attention", str(path), "-o", str(tmp_path / "d"), "--decoder", "official"]) == 1
