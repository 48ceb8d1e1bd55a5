"""diffseg.segment(image) end to end on a tiny random SD bundle: label maps at
the input's size (non-square images included), the border outside the centre
crop (frame="crop"; the whole frame: tests/test_whole_frame.py), image kinds,
the model cache, and `diffseg attention`."""
import os

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("diffseg._torch", reason="diffseg._torch not built (pip install --no-build-isolation)")

import diffseg  # noqa: E402
from diffseg import reference  # noqa: E402
from diffseg.io.attention import load_attention  # noqa: E402
from diffseg.io.images import center_crop, center_crop_box  # noqa: E402

# Random tiny-SD attention is unstructured: at the default threshold (1.1)
# everything merges into one segment; 0.3 gives many (a sharper test of the
# label geometry).
FINE = 0.3


def test_image(height, width, seed=0):
    rng = np.random.RandomState(seed)
    img = rng.randint(0, 256, (height, width, 3), dtype=np.uint8)
    img[: height // 2] //= 4  # some structure
    return img


test_image.__test__ = False


def check_labels(labels, height, width):
    assert labels.dtype == np.int32 and labels.shape == (height, width)
    values = np.unique(labels)
    assert values[0] == 0 and np.array_equal(values, np.arange(values.size))  # 0..K-1, all used


@pytest.mark.parametrize("height, width", [(96, 160), (150, 70), (128, 128), (40, 41)])
def test_segment_non_square_crop_frame(tiny_model, height, width):
    img = test_image(height, width)
    labels = diffseg.segment(img, tiny_model, kl_threshold=FINE, frame="crop")
    check_labels(labels, height, width)
    top, left, side = center_crop_box(height, width)
    crop = labels[top:top + side, left:left + side]
    # The crop's labels are DiffSeg on the centre crop, at the crop's size.
    attn = tiny_model.attention(center_crop(img))
    expected = reference.segment_attention(attn, kl_threshold=FINE, size=(side, side))
    assert expected.max() >= 2
    np.testing.assert_array_equal(crop, expected)
    # Outside the crop: the nearest crop pixel's label.
    if width > side:
        np.testing.assert_array_equal(labels[:, :left], np.repeat(crop[:, :1], left, axis=1))
        np.testing.assert_array_equal(labels[:, left + side:], np.repeat(crop[:, -1:], width - left - side, axis=1))
    if height > side:
        np.testing.assert_array_equal(labels[:top], np.repeat(crop[:1], top, axis=0))
        np.testing.assert_array_equal(labels[top + side:], np.repeat(crop[-1:], height - top - side, axis=0))


def test_segment_border_value(tiny_model):
    img = test_image(80, 120, seed=1)
    labels = diffseg.segment(img, tiny_model, kl_threshold=FINE, frame="crop", border=-1)
    top, left, side = center_crop_box(80, 120)
    assert labels.shape == (80, 120)
    assert (labels[:, :left] == -1).all() and (labels[:, left + side:] == -1).all()
    assert (labels[:, left:left + side] >= 0).all()
    nearest = diffseg.segment(img, tiny_model, kl_threshold=FINE, frame="crop")
    np.testing.assert_array_equal(labels[:, left:left + side], nearest[:, left:left + side])
    with pytest.raises(ValueError, match="border"):
        diffseg.segment(img, tiny_model, frame="crop", border="wrap")
    with pytest.raises(ValueError, match="border.*crop"):  # the whole frame has no border
        diffseg.segment(img, tiny_model, border=-1)


def test_segment_defaults_and_parameters(tiny_model):
    img = test_image(100, 100, seed=2)
    attn = tiny_model.attention(img, frame="whole")  # the default frame (antialiased resize)
    labels = diffseg.segment(img, tiny_model)  # official defaults
    check_labels(labels, 100, 100)
    np.testing.assert_array_equal(labels, reference.segment_attention(attn, size=(100, 100)))
    fine = diffseg.segment(img, tiny_model, kl_threshold=(FINE, FINE, FINE), grid=8)
    check_labels(fine, 100, 100)
    np.testing.assert_array_equal(fine, reference.segment_attention(attn, kl_threshold=FINE, grid=8, size=(100, 100)))
    assert fine.max() >= 2
    # the timestep reaches the UNet: other attention, other labels
    other_t = diffseg.segment(img, tiny_model, kl_threshold=FINE, timestep=50)
    attn_50 = tiny_model.attention(img, timestep=50, frame="whole")
    np.testing.assert_array_equal(other_t, reference.segment_attention(attn_50, kl_threshold=FINE, size=(100, 100)))
    assert not np.array_equal(other_t, diffseg.segment(img, tiny_model, kl_threshold=FINE))
    with pytest.raises(ValueError):
        diffseg.segment(img, tiny_model, grid=17)  # more anchors than the 16x16 latent
    with pytest.raises(ValueError):
        diffseg.segment(img, tiny_model, kl_threshold=-1)


def test_image_kinds(tiny_model, tmp_path):
    from PIL import Image

    rgb = test_image(60, 90, seed=3)
    ref = diffseg.segment(rgb, tiny_model, kl_threshold=FINE)
    path = tmp_path / "img.png"
    Image.fromarray(rgb).save(path)
    np.testing.assert_array_equal(diffseg.segment(str(path), tiny_model, kl_threshold=FINE), ref)
    np.testing.assert_array_equal(diffseg.segment(path, tiny_model, kl_threshold=FINE), ref)
    np.testing.assert_array_equal(diffseg.segment(Image.fromarray(rgb), tiny_model, kl_threshold=FINE), ref)
    assert ref.max() >= 2
    gray = rgb[:, :, 0]
    gray_ref = diffseg.segment(np.dstack([gray] * 3), tiny_model, kl_threshold=FINE)  # replicated to RGB
    np.testing.assert_array_equal(diffseg.segment(gray, tiny_model, kl_threshold=FINE), gray_ref)
    np.testing.assert_array_equal(diffseg.segment(Image.fromarray(gray), tiny_model, kl_threshold=FINE), gray_ref)
    rgba = np.dstack([rgb, np.full((60, 90), 255, np.uint8)])
    np.testing.assert_array_equal(diffseg.segment(rgba, tiny_model, kl_threshold=FINE), ref)
    with pytest.raises(TypeError):
        diffseg.segment(rgb.astype(np.float32), tiny_model)
    with pytest.raises(FileNotFoundError):
        diffseg.segment(tmp_path / "missing.png", tiny_model)
    with pytest.raises(ValueError):
        diffseg.segment(np.zeros((5, 5, 2), np.uint8), tiny_model)


def test_segment_with_bundle_path(tiny_bundle, tiny_model):
    img = test_image(70, 50, seed=4)
    labels = diffseg.segment(img, tiny_bundle, kl_threshold=FINE)
    check_labels(labels, 70, 50)
    np.testing.assert_array_equal(labels, diffseg.segment(img, tiny_model, kl_threshold=FINE))
    assert labels.max() >= 2


def test_load_model_exports_once_into_cache(tiny_sd_dir, tmp_path, monkeypatch):
    from diffseg.sd import export

    monkeypatch.setenv("DIFFSEG_CACHE", str(tmp_path / "cache"))
    calls = []
    real = export.export_bundle

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(export, "export_bundle", counting)
    m1 = diffseg.load_model(tiny_sd_dir, size=128)
    m1.close()
    m2 = diffseg.load_model(tiny_sd_dir, size=128)
    assert len(calls) == 1
    folder = os.path.dirname(m2.path)
    assert folder.startswith(str(tmp_path / "cache"))
    name = os.path.basename(folder)
    import torch

    assert torch.__version__ in name and "cpu" in name and "128" in name
    assert m2.metadata["model_id"] == os.path.realpath(tiny_sd_dir)
    m2.close()


def test_default_model_offline_fails_fast(tmp_path, monkeypatch):
    from diffseg import pipeline
    from diffseg.sd import checkpoint

    monkeypatch.setenv("DIFFSEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(pipeline, "_default_model", None)

    def no_probe(timeout=5.0):  # fast = no hub probe (no wall clock: machines get busy)
        raise AssertionError("offline: the hub must not be probed")

    monkeypatch.setattr(checkpoint, "_hub_reachable", no_probe)
    with pytest.raises(checkpoint.WeightsUnavailableError, match="diffusers folder"):
        diffseg.segment(test_image(32, 32))
    assert not list((tmp_path / "cache").glob("*/diffseg_bundle.pt"))


def test_cli_attention(tiny_bundle, tiny_model, tmp_path):
    from PIL import Image

    from diffseg.cli import main

    paths = []
    for i, (h, w) in enumerate([(64, 100), (90, 90)]):
        p = tmp_path / f"im{i}.png"
        Image.fromarray(test_image(h, w, seed=10 + i)).save(p)
        paths.append(str(p))
    out = tmp_path / "attn"
    assert main(["attention", *paths, "-o", str(out), "-m", tiny_bundle]) == 0
    for p in paths:
        attn = load_attention(out / (os.path.splitext(os.path.basename(p))[0] + ".npz"))
        ref = tiny_model.attention(p)
        assert list(attn) == list(ref) == [16, 8, 4, 2]
        for s in ref:
            np.testing.assert_array_equal(attn[s], ref[s])
    # --frame whole: non-square grids, keyed (h, w) after a round trip through the file
    whole = tmp_path / "whole"
    assert main(["attention", paths[0], "-o", str(whole), "-m", tiny_bundle, "--frame", "whole"]) == 0
    attn = load_attention(whole / "im0.npz")
    ref = tiny_model.attention(paths[0], frame="whole")
    assert list(attn) == list(ref) == [(16, 32), (8, 16), (4, 8), (2, 4)]  # 64x100 -> 128x200 -> 128x256 px
    for key in ref:
        np.testing.assert_array_equal(attn[key], ref[key])
    assert main(["attention", str(tmp_path / "nope.png"), "-o", str(out), "-m", tiny_bundle]) == 2
