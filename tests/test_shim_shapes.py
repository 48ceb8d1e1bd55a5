"""Shape-polymorphic bundles (issues 12 and 14): the generic shim call
(``diffseg._torch.Model.call``), non-square grids and batches through
``diffseg.Model``, compared with eager diffusers; and the whole-frame
preprocessing geometry (``diffseg.io.images.whole_frame_geometry``)."""
import numpy as np
import pytest

from diffseg.io.images import FrameGeometry, preprocess_image, whole_frame_geometry


# ---------------------------------------------------------------- whole-frame geometry (no torch)


@pytest.mark.parametrize("h, w, frame, resized, pad", [
    (512, 512, (512, 512), (512, 512), (0, 0, 0, 0)),
    (3000, 4000, (512, 704), (512, 683), (0, 0, 10, 11)),     # 4:3 landscape: 682.67 -> 683, +21 px
    (4000, 3000, (704, 512), (683, 512), (10, 11, 0, 0)),     # the same, portrait
    (427, 640, (512, 768), (512, 767), (0, 0, 0, 1)),         # 767.4 -> 767, +1 px (after)
    (512, 768, (512, 768), (512, 768), (0, 0, 0, 0)),         # already on the grid
    (100, 1000, (512, 5120), (512, 5120), (0, 0, 0, 0)),      # geometry has no cap (the model has)
    (1, 1, (512, 512), (512, 512), (0, 0, 0, 0)),
])
def test_whole_frame_geometry_examples(h, w, frame, resized, pad):
    g = whole_frame_geometry(h, w)
    assert isinstance(g, FrameGeometry)
    assert (g.frame_height, g.frame_width) == frame
    assert (g.resized_height, g.resized_width) == resized
    assert (g.top, g.bottom, g.left, g.right) == pad
    assert g.inner == (g.top, g.left) + resized
    assert g.scale == 512 / min(h, w)


def test_whole_frame_geometry_rule_exhaustively():
    """Against the stated rule, computed independently in exact fractions,
    for every long side from 1 to 3 x short side, at two sizes."""
    from fractions import Fraction

    for size, multiple in ((512, 64), (128, 64), (64, 8)):
        for short in (1, 7, 300, 512, 999):
            for long in range(short, 3 * short + 1, max(1, short // 97)):
                exact = Fraction(long * size, short)
                resized = int(exact + Fraction(1, 2))  # round half up
                framed = -(-resized // multiple) * multiple
                g = whole_frame_geometry(short, long, size, multiple)
                assert (g.frame_height, g.frame_width) == (size, framed)
                assert (g.resized_height, g.resized_width) == (size, resized)
                assert 0 <= g.left <= g.right <= g.left + 1 and g.left + g.right == framed - resized < multiple
                assert abs(g.resized_width - long * g.scale) <= 0.5
                t = whole_frame_geometry(long, short, size, multiple)  # portrait: transposed
                assert (t.frame_height, t.frame_width, t.top, t.bottom) == (framed, size, g.left, g.right)


@pytest.mark.parametrize("args, message", [
    ((0, 10), "height must be a positive integer"),
    ((10, -1), "width must be a positive integer"),
    ((10.0, 10), "height must be a positive integer"),
    ((True, 10), "height must be a positive integer"),
    ((10, 10, 500), "size must be a multiple of multiple=64"),
    ((10, 10, 512, 0), "multiple must be a positive integer"),
])
def test_whole_frame_geometry_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        whole_frame_geometry(*args)


def test_preprocess_whole_frame():
    rng = np.random.RandomState(0)
    rgb = rng.randint(0, 256, (300, 420, 3), dtype=np.uint8)
    x = preprocess_image(rgb, 128, frame="whole")
    g = whole_frame_geometry(300, 420, 128, 64)
    assert x.shape == (3, g.frame_height, g.frame_width) == (3, 128, 192)
    assert x.dtype == np.float32 and x.flags.c_contiguous
    top, left, rh, rw = g.inner
    assert (rh, rw) == (128, 179)
    # Inside: Pillow's Lanczos resize (antialiased), to [-1, 1].
    from PIL import Image

    ref = np.asarray(Image.fromarray(rgb).resize((rw, rh), Image.LANCZOS)).astype(np.float32) / np.float32(127.5) - 1
    np.testing.assert_array_equal(x[:, top:top + rh, left:left + rw], ref.transpose(2, 0, 1))
    # Padding: edge replication on both sides of the long axis.
    np.testing.assert_array_equal(x[:, :, :left], np.repeat(x[:, :, left:left + 1], left, axis=2))
    right = g.right
    np.testing.assert_array_equal(x[:, :, -right:], np.repeat(x[:, :, -right - 1:-right], right, axis=2))
    # Without antialiasing: the bilinear filter of the crop path, then the same padding.
    from diffseg._interp import resize_bilinear

    plain = preprocess_image(rgb, 128, frame="whole", antialias=False)
    ref = resize_bilinear(rgb.astype(np.float32), rh, rw, axes=(0, 1)) / np.float32(127.5) - 1
    np.testing.assert_array_equal(plain[:, :, left:left + rw], ref.transpose(2, 0, 1))


def test_preprocess_crop_is_unchanged():
    """frame="crop" (the default) is the published path, byte for byte:
    centre crop, bilinear without antialias."""
    from diffseg._interp import resize_bilinear
    from diffseg.io.images import center_crop

    rng = np.random.RandomState(1)
    rgb = rng.randint(0, 256, (90, 130, 3), dtype=np.uint8)
    ref = resize_bilinear(center_crop(rgb).astype(np.float32), 128, 128, axes=(0, 1))
    ref = np.ascontiguousarray((ref / np.float32(127.5) - 1).transpose(2, 0, 1))
    np.testing.assert_array_equal(preprocess_image(rgb, 128), ref)
    np.testing.assert_array_equal(preprocess_image(rgb, 128, frame="crop"), ref)
    # A square image: both frames see the same pixels (the filters differ).
    sq = rng.randint(0, 256, (128, 128, 3), dtype=np.uint8)
    np.testing.assert_array_equal(preprocess_image(sq, 128, frame="whole", antialias=False), preprocess_image(sq, 128))


def test_preprocess_bad_arguments():
    rgb = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(ValueError, match="frame must be one of"):
        preprocess_image(rgb, 128, frame="full")
    with pytest.raises(TypeError, match="antialias must be"):
        preprocess_image(rgb, 128, antialias="yes")


# ---------------------------------------------------------------- through the shim

# The fixtures (tiny_model, tiny_pipe) skip these tests without torch, diffusers or the shim.
import diffseg  # noqa: E402
from diffseg.sd.model import MAX_GRID_POSITIONS  # noqa: E402
from sd_tiny import reference_attention  # noqa: E402



def random_image(h, w, seed=0):
    return np.random.RandomState(seed).uniform(-1, 1, (3, h, w)).astype(np.float32)


def rel_diff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("h, w", [(128, 192), (192, 128), (512, 768)])
def test_non_square_attention_equals_eager_diffusers(tiny_model, tiny_pipe, h, w):
    """The bundle (traced at 128x128) on non-square grids: maps of (h*w, h*w)
    per resolution, equal to diffusers' own AttnProcessor probabilities.
    512x768 is the issue's 64x96 latent."""
    image = random_image(h, w, seed=h + w)
    attn = tiny_model.attention(image)
    ref, _, _ = reference_attention(tiny_pipe, image, timestep=300)
    L = (h // 8, w // 8)
    keys = [(L[0] // f, L[1] // f) for f in (1, 2, 4, 8)]
    assert list(attn) == keys == list(ref)
    for (gh, gw), a in attn.items():
        assert a.shape == (gh * gw, gh * gw) and a.dtype == np.float32 and a.flags.c_contiguous
        assert rel_diff(a, ref[gh, gw]) <= 1e-3, (gh, gw)
        np.testing.assert_allclose(a.sum(axis=1), 1.0, atol=1e-5)
    assert tiny_model.grids(h, w) == keys


def test_eps_on_a_non_square_grid(tiny_model, tiny_pipe):
    image = random_image(192, 128, seed=7)
    maps, eps = tiny_model.run(image, 120, eps=True)
    _, _, ref_eps = reference_attention(tiny_pipe, image, timestep=120)
    assert eps.shape == (4, 24, 16)
    assert rel_diff(eps, ref_eps) <= 1e-3
    assert [m.shape for m in maps] == [(384, 384), (96, 96), (24, 24), (6, 6)]


def test_attention_batch_equals_single_calls(tiny_model):
    """Equal up to float rounding, not bit for bit: libtorch's CPU convolutions
    sum in another order for another batch size (eager diffusers differs by
    ~2e-6 in eps between a batch of 3 and single images too). Measured here:
    max |batch - single| / max |single| = 4e-5 (1e-5 absolute)."""
    images = [random_image(128, 192, seed=s) for s in range(3)]
    batch = tiny_model.attention_batch(images)
    assert len(batch) == 3
    worst = 0.0
    for image, got in zip(images, batch):
        single = tiny_model.attention(image)
        assert list(got) == list(single)
        for k in single:
            assert got[k].shape == single[k].shape and got[k].dtype == np.float32
            worst = max(worst, rel_diff(got[k], single[k]))
    print(f"batch of 3 vs single calls: max relative difference {worst:.3g}")
    assert worst <= 2e-4
    # A batch of one is the single call, bit for bit; square keys as before.
    x = random_image(128, 128, seed=9)
    one = tiny_model.attention_batch([x])[0]
    single = tiny_model.attention(x)
    assert list(one) == [16, 8, 4, 2]
    for k in single:
        np.testing.assert_array_equal(one[k], single[k])


def test_attention_batch_of_files_whole_frame(tiny_model, tmp_path):
    from PIL import Image

    rng = np.random.RandomState(4)
    paths = []
    for i, (h, w) in enumerate([(300, 420), (150, 210)]):  # one aspect ratio: one 128x192 frame
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    batch = tiny_model.attention_batch(paths, frame="whole")
    for p, got in zip(paths, batch):
        assert list(got) == [(16, 24), (8, 12), (4, 6), (2, 3)]
        single = tiny_model.attention(p, frame="whole")
        for k in single:
            assert rel_diff(got[k], single[k]) <= 2e-4


def test_layers_all_on_a_non_square_grid(tmp_path_factory, tiny_sd_dir, tiny_pipe):
    from diffseg.sd.export import export_bundle

    path = export_bundle(tiny_sd_dir, str(tmp_path_factory.mktemp("all_nonsq")), size=128, layers="all")
    image = random_image(128, 192, seed=3)
    _, ref_layers, _ = reference_attention(tiny_pipe, image, timestep=300)
    with diffseg.Model(path) as model:
        layers = model.layer_attention(image)
        attn = model.attention(image)
        batch = model.attention_batch([image, image])
    assert [n for n, _ in layers] == [n.rsplit(".processor", 1)[0] for n, _ in ref_layers]
    for (_, a), (_, r) in zip(layers, ref_layers):
        assert rel_diff(a, r) <= 1e-3
    assert list(attn) == [(16, 24), (8, 12), (4, 6), (2, 3)]
    for k in attn:
        assert rel_diff(batch[1][k], attn[k]) <= 2e-4


def test_bad_sizes_and_batches(tiny_model, monkeypatch):
    M = tiny_model.multiple
    assert M == 64
    for shape in [(3, 96, 128), (3, 128, 100), (3, 0, 128)]:
        with pytest.raises(ValueError, match="multiples of 64"):
            tiny_model.attention(np.zeros(shape, np.float32))
    # Above MAX_GRID_POSITIONS (64x128 at the finest grid: 512x1024 here, 1:2; for SD at 512 px
    # the finest grid is 64x64, so whole frames of aspect up to 2:1; this bundle has 16x16 at 128 px).
    assert tiny_model.grids(512, 1024) == [(64, 128), (32, 64), (16, 32), (8, 16)]  # at the bound: accepted
    with pytest.raises(ValueError, match=r"gives a 64x136 attention grid, above the bound of 8192 positions"
                                         r".*use frame='crop'.*at most 32:1 with frame='whole'"):
        tiny_model.attention(np.zeros((3, 512, 1088), np.float32))
    assert MAX_GRID_POSITIONS == 8192
    wide = np.zeros((4, 200, 3), np.uint8)  # 50:1 in frame="whole": refused before any run
    with pytest.raises(ValueError, match="use frame='crop'"):
        tiny_model.attention(wide, frame="whole")
    with monkeypatch.context() as m:  # a 1:5000 image is refused before a 128x640000 resize
        m.setattr("diffseg.sd.model.preprocess_image", lambda *a, **k: pytest.fail("resized before the size check"))
        with pytest.raises(ValueError, match="above the bound"):
            tiny_model.attention(np.zeros((1, 5000, 3), np.uint8), frame="whole")
    assert list(tiny_model.attention(wide)) == [16, 8, 4, 2]  # the crop is fine
    with pytest.raises(ValueError, match=r"image: a float image must be preprocessed to shape \(3, H, W\)"):
        tiny_model.attention(np.zeros((4, 128, 128), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        tiny_model.attention(np.full((3, 128, 192), np.nan, np.float32))
    with pytest.raises(ValueError, match="frame must be one of"):
        tiny_model.attention(np.zeros((3, 128, 128), np.float32), frame="full")
    with pytest.raises(ValueError, match="images must not be empty"):
        tiny_model.attention_batch([])
    with pytest.raises(TypeError, match="images must be a sequence"):
        tiny_model.attention_batch("photo.jpg")
    with pytest.raises(ValueError, match=r"image 1 preprocesses to 128x192, image 0 to 128x128.*group the images"):
        tiny_model.attention_batch([np.zeros((3, 128, 128), np.float32), np.zeros((3, 128, 192), np.float32)])


def test_generic_call(tiny_model, tiny_pipe):
    """The raw shim API: named methods, host tensors in, a list of arrays out."""
    import torch

    raw = tiny_model._model
    x = random_image(128, 192, seed=11)[None]
    t = np.full((1,), 300, np.int64)
    latent = raw.call("encode", [x])
    assert len(latent) == 1 and latent[0].shape == (1, 4, 16, 24) and latent[0].dtype == np.float32
    with torch.no_grad():
        ref = tiny_pipe.vae.encode(torch.from_numpy(x)).latent_dist.mean * tiny_pipe.vae.config.scaling_factor
    assert rel_diff(latent[0], ref.numpy()) <= 1e-4
    denoised = raw.call("denoise", [latent[0], t])
    forward = raw.call("forward", [x, t])
    assert [o.shape for o in forward] == [(1, 4, 16, 24), (1, 384, 384), (1, 96, 96), (1, 24, 24), (1, 6, 6)]
    for a, b in zip(forward, denoised):
        np.testing.assert_array_equal(a, b)
    two = raw.call("forward", [np.concatenate([x, x]), t])
    assert two[1].shape == (2, 384, 384)
    # The outputs are writable arrays that own their memory through the shim's result.
    forward[1][0, 0, 0] = 5.0
    assert forward[1].base is not None and forward[1].flags.writeable


def test_generic_call_bad_inputs(tiny_model):
    raw = tiny_model._model
    x = random_image(128, 128)[None]
    t = np.full((1,), 300, np.int64)
    with pytest.raises(ValueError, match=r"^method 'nope': the bundle has no such method \(it has: .*encode"):
        raw.call("nope", [x, t])
    with pytest.raises(ValueError, match=r"^method 'forward' takes 2 inputs, got 1$"):
        raw.call("forward", [x])
    with pytest.raises(TypeError, match=r"inputs\[0\] must be float32 or int64, got .*float64"):
        raw.call("forward", [x.astype(np.float64), t])
    with pytest.raises(TypeError, match=r"inputs\[1\] must be a numpy array, got int"):
        raw.call("forward", [x, 300])
    with pytest.raises(TypeError, match="inputs must be a list or tuple"):
        raw.call("forward", x)
    with pytest.raises(ValueError, match=r"inputs\[0\] must be C-contiguous"):  # checked before the graph
        raw.call("forward", [np.zeros((1, 3, 128, 256), np.float32)[..., ::2], t])
    with pytest.raises(ValueError, match=r"inputs\[0\] must have at most 8 dimensions"):
        raw.call("forward", [np.zeros((1,) * 9, np.float32), t])
    with pytest.raises(ValueError, match=r"^input 0 must be finite \(NaN or Inf at flat index 5\)$"):
        bad = x.copy()
        bad.flat[5] = np.inf
        raw.call("forward", [bad, t])
    # Wrong types or shapes for the graph: one-line RuntimeErrors from the interpreter.
    for inputs, message in [([np.ascontiguousarray(x[:, :2]), t], "to have 3 channels, but got 2"),
                            ([np.ascontiguousarray(x[:, :, :100]), t], "Sizes of tensors must match"),
                            ([x[0], t], "Expected 4-dimensional input")]:
        with pytest.raises(RuntimeError, match=r"^method 'forward' failed: .*" + message) as e:
            raw.call("forward", inputs)
        assert "\n" not in str(e.value), str(e.value)
    # The model still works afterwards.
    assert len(raw.call("forward", [x, t])) == 5


def test_nan_output_is_refused(tmp_path):
    """The shim's output check: NaN/Inf in any returned tensor is a
    RuntimeError naming the output (corrupt weights, fp16 overflow)."""
    import json
    from typing import List

    torch = pytest.importorskip("torch")
    _torch = pytest.importorskip("diffseg._torch", reason="diffseg._torch not built")

    class Fake(torch.nn.Module):
        map_resolutions: List[int]

        def __init__(self):
            super().__init__()
            layout = {"format_version": 2, "image_size": 64, "image_channels": 3, "latent_size": 8,
                      "latent_channels": 4, "default_timestep": 300, "map_resolutions": [8], "device_type": "cpu"}
            for k, v in layout.items():
                setattr(self, k, v)

        def forward(self, image: torch.Tensor, t: torch.Tensor) -> List[torch.Tensor]:
            return [image.sum() * 0 + torch.zeros(1), image / 0.0]

        @torch.jit.export
        def ints(self, image: torch.Tensor) -> List[torch.Tensor]:
            return [torch.arange(6).view(2, 3), (image > 0)]

    path = str(tmp_path / "nan.pt")
    torch.jit.save(torch.jit.script(Fake()), path,
                   _extra_files={"diffseg.json": json.dumps({"format": "diffseg-bundle", "format_version": 2})})
    raw = _torch.Model(path)
    x = np.zeros((1, 3, 64, 64), np.float32)
    with pytest.raises(RuntimeError, match=r"bundle output 1 holds NaN or Inf \(flat index 0\): the bundle's "
                                           r"weights may be corrupt"):
        raw.call("forward", [x, np.zeros(1, np.int64)])
    ints = raw.call("ints", [x + 1])
    assert ints[0].dtype == np.int64 and ints[0].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert ints[1].dtype == np.int64 and ints[1].shape == (1, 3, 64, 64) and ints[1].min() == 1
    raw.close()
