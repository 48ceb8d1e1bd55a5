"""Whole-frame segmentation of non-square images (frame="whole"): the UNet
runs on a latent grid of the image's aspect ratio, and every pixel's label
comes from the proposals of that grid (not copied from a centre crop)."""
import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("diffseg._torch", reason="diffseg._torch not built (pip install --no-build-isolation)")

import diffseg  # noqa: E402
from diffseg import reference  # noqa: E402
from diffseg.cli import main  # noqa: E402
from diffseg.io.images import whole_frame_geometry  # noqa: E402
from diffseg.pipeline import result_records, segment_detailed  # noqa: E402

FINE = 0.3  # many segments on random tiny-SD attention (see test_segment_image.py)


def photo(height, width, seed=0):
    rng = np.random.RandomState(seed)
    img = rng.randint(0, 256, (height, width, 3), dtype=np.uint8)
    img[: height // 3] //= 4
    img[:, width // 2:] = 255 - img[:, width // 2:]
    return img


def expected_labels(attn, geometry, grid):
    """The whole-frame labels from the pure-NumPy reference: the stages on the
    frame's grid, labels drawn over the whole frame at the image's scale, the
    padding cut off, labels renumbered in order."""
    frame_h, frame_w, top, left = geometry.label_window()  # checked by hand in test_image_io.py::test_frame_geometry_by_hand
    labels = reference.segment_attention(attn, kl_threshold=FINE, grid=grid, size=(frame_h, frame_w))
    window = labels[top:top + geometry.height, left:left + geometry.width]
    _, compact = np.unique(window, return_inverse=True)
    return compact.reshape(window.shape).astype(np.int32)


@pytest.mark.parametrize("height, width", [(300, 420), (420, 300), (97, 251)])
def test_whole_frame_labels_come_from_a_non_square_grid(tiny_model, height, width):
    img = photo(height, width)
    result = segment_detailed(img, tiny_model, kl_threshold=FINE, grid=8)
    labels = result["labels"]
    assert labels.shape == (height, width) and labels.dtype == np.int32
    assert np.array_equal(np.unique(labels), np.arange(labels.max() + 1))
    g = whole_frame_geometry(height, width, tiny_model.image_size, tiny_model.multiple)
    assert result["geometry"] == g and result["frame"] == "whole"
    attn = tiny_model.attention(img, frame="whole")
    finest = next(iter(attn))
    # The attention is of the whole frame: a non-square grid with the image's orientation.
    assert isinstance(finest, tuple) and (finest[0] < finest[1]) == (height < width)
    assert result["proposals"].shape[1:] == finest
    np.testing.assert_array_equal(labels, expected_labels(attn, g, grid=8))


def test_whole_frame_differs_from_crop_outside_the_crop(tiny_model):
    img = photo(128, 256, seed=3)
    whole = diffseg.segment(img, tiny_model, kl_threshold=FINE, grid=8)
    crop = diffseg.segment(img, tiny_model, kl_threshold=FINE, grid=8, frame="crop")
    # In crop mode the 64 columns on each side repeat the crop's edge column; the
    # whole frame has its own labels there.
    assert np.array_equal(crop[:, :64], np.repeat(crop[:, 64:65], 64, axis=1))
    assert not np.array_equal(whole[:, :64], np.repeat(whole[:, 64:65], 64, axis=1))


def test_square_image_whole_equals_crop(tiny_model):
    img = photo(128, 128, seed=1)
    np.testing.assert_array_equal(diffseg.segment(img, tiny_model, kl_threshold=FINE),
                                  diffseg.segment(img, tiny_model, kl_threshold=FINE, frame="crop"))


def test_records_of_a_whole_frame(tiny_model):
    img = photo(300, 420, seed=2)
    result = segment_detailed(img, tiny_model, kl_threshold=FINE, grid=8)
    records = result_records(result, "binary_mask")
    assert len(records) == result["labels"].max() + 1
    rows, cols = diffseg.anchor_grid((16, 24), 8)  # the 128 x 192 frame's 16 x 24 grid
    for r in records:
        assert r["crop_box"] == [0, 0, 420, 300]
        # by hand: 300 x 420 -> 128 x 179 in a 128 x 192 frame, 6 px padding on the left
        i, j = divmod(int(result["seed"][r["proposal"]]), 24)
        x = ((j + 0.5) / 24 * 192 - 6) * 420 / 179
        y = (i + 0.5) / 16 * 128 * 300 / 128
        assert r["point_coords"] == [[pytest.approx(min(max(x, 0), 420)), pytest.approx(y)]]
        assert i in rows and j in cols
        assert np.array_equal(r["segmentation"], result["labels"] == r["id"])
        assert 0 < r["score"] <= 1


def test_mask_generator_whole_and_crop(tiny_model):
    img = photo(128, 256, seed=4)
    whole = diffseg.MaskGenerator(tiny_model, kl_threshold=FINE, grid=8).generate(img)
    crop = diffseg.MaskGenerator(tiny_model, kl_threshold=FINE, grid=8, frame="crop").generate(img)
    assert whole[0]["crop_box"] == [0, 0, 256, 128] and crop[0]["crop_box"] == [64, 0, 128, 128]
    with pytest.raises(ValueError, match="frame"):
        diffseg.MaskGenerator(tiny_model, frame="full")


def test_segment_many_whole_equals_segment(tiny_model):
    images = [photo(128, 256, seed=5), photo(200, 130, seed=6), photo(128, 128, seed=7)]
    got = dict(diffseg.segment_many(images, tiny_model, kl_threshold=FINE, grid=8))
    for i, img in enumerate(images):
        np.testing.assert_array_equal(got[i], diffseg.segment(img, tiny_model, kl_threshold=FINE, grid=8))


def test_bad_frame_and_too_wide(tiny_model):
    with pytest.raises(ValueError, match="frame"):
        diffseg.segment(photo(64, 64), tiny_model, frame="square")
    # Beyond the bound on grid positions (diffseg.sd.model.MAX_GRID_POSITIONS; 40:1
    # here, for the tiny 128 px bundle): refused with advice.
    with pytest.raises(ValueError, match="frame='crop'"):
        diffseg.segment(photo(32, 32 * 40), tiny_model)
    assert diffseg.segment(photo(32, 32 * 40), tiny_model, frame="crop").shape == (32, 1280)


def test_duck_typed_model_needs_crop():
    class Planted:
        def attention(self, image, timestep=None):
            return diffseg.synthetic.planted_example(16, 3)[0]

    img = photo(40, 60)
    with pytest.raises(TypeError, match="frame='crop'"):
        diffseg.segment(img, Planted())
    assert diffseg.segment(img, Planted(), frame="crop").shape == (40, 60)


def test_cli_whole_and_crop_outputs(tiny_bundle, tmp_path):
    from PIL import Image

    src = tmp_path / "wide.png"
    Image.fromarray(photo(96, 200, seed=8)).save(src)
    out = tmp_path / "out"
    assert main(["segment", str(src), "-o", str(out), "--model", str(tiny_bundle), "-q",
                 "--kl-threshold", str(FINE), "--grid", "8"]) == 0
    doc = json.loads((out / "wide.json").read_text())
    assert "crop" not in doc and doc["frame"]["width"] > doc["frame"]["height"]
    assert doc["made_with"]["settings"]["frame"] == "whole"
    labels = np.asarray(Image.open(out / "wide.labels.png"))
    assert labels.shape == (96, 200)
    # --skip-existing does not keep outputs of another frame
    assert main(["segment", str(src), "-o", str(out), "--model", str(tiny_bundle), "-q", "--skip-existing",
                 "--kl-threshold", str(FINE), "--grid", "8", "--frame", "crop"]) == 0
    doc = json.loads((out / "wide.json").read_text())
    assert doc["crop"] == {"top": 0, "left": 52, "size": 96} and doc["made_with"]["settings"]["frame"] == "crop"


def test_segment_many_batches_through_the_shim(tiny_model, monkeypatch):
    """batch_size=3: one UNet call per batch and size; labels as one image at a
    time up to the batched kernels' rounding (see diffseg.segment_many)."""
    images = [photo(128, 192, seed=s) for s in range(4)] + [photo(128, 128, seed=9)]
    serial = [diffseg.segment(img, tiny_model, kl_threshold=FINE, grid=8) for img in images]
    calls, batch = [], tiny_model.attention_batch
    monkeypatch.setattr(tiny_model, "attention_batch", lambda imgs, *a, **kw: calls.append(len(imgs)) or batch(imgs, *a, **kw))
    got = dict(diffseg.segment_many(images, tiny_model, kl_threshold=FINE, grid=8, batch_size=3))
    # batches [3 x 128x192], [128x192, 128x128]: the second runs as one call per size
    assert calls == [3, 1, 1]
    assert sorted(got) == list(range(5))
    for i, labels in got.items():
        assert labels.shape == serial[i].shape
        assert np.mean(labels == serial[i]) > 0.95
