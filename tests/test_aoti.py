"""The AOTInductor backend on the tiny random SD (real topology): a ``.pt2``
package through the same shim and Model as TorchScript bundles, equal to
eager diffusers and to the TorchScript bundle in both frames and in batches,
and its inputs checked (compiled code is unsafe on other shapes).

Slow: the package is compiled once per session (about 3 minutes on 2
cores): ``make test-aoti`` (marker ``aoti``), not ``make test``."""
import json
import os
import shutil
import subprocess
import zipfile

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
_torch = pytest.importorskip("diffseg._torch", reason="diffseg._torch not built (pip install --no-build-isolation)")

import diffseg  # noqa: E402
from diffseg.sd import hardware  # noqa: E402
from diffseg.sd.export import AOTI_MAX_BATCH  # noqa: E402
from sd_tiny import reference_attention  # noqa: E402


pytestmark = pytest.mark.aoti


@pytest.fixture(scope="session")
def tiny_aoti_bundle(tiny_sd_dir, tmp_path_factory):
    """The tiny SD exported at 128 px as an AOTInductor package."""
    from diffseg.sd.export import export_bundle

    return export_bundle(tiny_sd_dir, str(tmp_path_factory.mktemp("tiny_aoti")), size=128, backend="aoti",
                         progress=False)


@pytest.fixture(scope="module")
def aoti_model(tiny_aoti_bundle):
    with diffseg.load_model(tiny_aoti_bundle) as model:
        yield model


def rel_diff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def image(h, w, seed=0):
    return np.random.RandomState(seed).uniform(-1, 1, (3, h, w)).astype(np.float32)


def test_package_layout_and_metadata(tiny_aoti_bundle, aoti_model, tiny_model):
    assert tiny_aoti_bundle.endswith("diffseg_bundle.pt2")
    meta = aoti_model.metadata
    assert meta["backend"] == "aoti" and aoti_model.backend == "aoti" and tiny_model.backend == "torchscript"
    assert meta["aoti_compile_seconds"] > 0 and meta["aoti_peak_rss_gb"] > 0
    assert meta["aoti_cpu_isa"] and meta["aoti_max_batch"] == AOTI_MAX_BATCH
    assert aoti_model.info == tiny_model.info  # the shim reads the same layout from the package
    for key in ("layer_names", "layer_resolutions", "outputs", "resolutions"):
        assert meta[key] == tiny_model.metadata[key]
    side = json.loads(open(os.path.join(os.path.dirname(tiny_aoti_bundle), "metadata.json")).read())
    assert side == meta == json.loads(aoti_model._model.metadata())
    with zipfile.ZipFile(tiny_aoti_bundle) as z:  # two compiled models
        names = z.namelist()
    assert any("/aotinductor/encode/" in n for n in names) and any("/aotinductor/denoise/" in n for n in names)


@pytest.mark.parametrize("h, w", [(128, 128), (128, 192), (192, 128)])
def test_attention_equals_torchscript_and_eager(aoti_model, tiny_model, tiny_pipe, h, w):
    """Both frames: the square crop and whole frames of either orientation."""
    x = image(h, w, seed=h + w)
    got = aoti_model.attention(x)
    ts = tiny_model.attention(x)
    ref, _, _ = reference_attention(tiny_pipe, x)
    assert list(got) == list(ts) == list(ref)
    for key in got:
        assert rel_diff(got[key], ts[key]) <= 1e-4, key
        assert rel_diff(got[key], ref[key]) <= 1e-4, key
        np.testing.assert_allclose(got[key].sum(axis=1), 1.0, atol=1e-5)


def test_batches_equal_single_images(aoti_model, tiny_model):
    xs = [image(64, 256, seed=s) for s in range(3)]
    batch = aoti_model.attention_batch(xs)
    for x, got in zip(xs, batch):
        want = tiny_model.attention(x)
        for key in want:
            assert rel_diff(got[key], want[key]) <= 1e-4


def test_methods_encode_denoise_forward(aoti_model, tiny_model):
    x = image(128, 128)[None]
    t = np.full((1,), 300, np.int64)
    latent = aoti_model._model.call("encode", [x])[0]
    np.testing.assert_allclose(latent, tiny_model._model.call("encode", [x])[0], rtol=1e-4, atol=1e-5)
    split = aoti_model._model.call("denoise", [latent, t])
    whole = aoti_model._model.call("forward", [x, t])
    assert len(split) == len(whole) == 5
    for a, b in zip(split, whole):
        np.testing.assert_array_equal(a, b)  # forward is denoise(encode(image))
    with pytest.raises(ValueError, match="no such method.*encode, denoise, forward"):
        aoti_model._model.call("encode_text", [x])
    with pytest.raises(ValueError, match="takes 2 inputs, got 1"):
        aoti_model._model.call("forward", [x])


@pytest.mark.parametrize("shape, message", [
    ((1, 3, 100, 128), "dimension 2 is 100.*multiples of 64"),
    ((1, 3, 128, 64 * 129), "dimension 3 is 8256"),
    ((AOTI_MAX_BATCH + 1, 3, 64, 64), f"dimension 0 is {AOTI_MAX_BATCH + 1}"),
    ((1, 4, 128, 128), "dimension 1 is 4, this bundle takes 3"),
    ((3, 128, 128), "must have 4 dimensions"),
])
def test_inputs_outside_the_compiled_shapes_are_refused(aoti_model, shape, message):
    """Compiled code reads out of bounds on shapes it was not compiled for:
    the shim refuses them with a ValueError, never a crash."""
    x = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match=message):
        aoti_model._model.call("forward", [x, np.full((1,), 300, np.int64)])


def test_wrong_dtypes_are_refused(aoti_model):
    x = np.zeros((1, 3, 128, 128), np.float32)
    with pytest.raises(ValueError, match="input 1: dtype must be Long"):
        aoti_model._model.call("forward", [x, np.full((1,), 300.0, np.float32)])
    with pytest.raises(ValueError, match="input 1: dimension 0 is 2"):
        aoti_model._model.call("forward", [x, np.full((2,), 300, np.int64)])


def test_package_for_other_cpu_instructions_is_refused(tiny_aoti_bundle, monkeypatch):
    """A package compiled for AVX-512 on a CPU without it would die of an
    illegal instruction: refused when opened, with the way out."""
    monkeypatch.setattr(hardware, "cpu_features", lambda: {"avx2": True, "fma3": True})
    with pytest.raises(_torch.BundleError, match="compiled .AOTInductor. for .*lacks"):
        diffseg.load_model(tiny_aoti_bundle)


def test_damaged_packages(tiny_aoti_bundle, tmp_path):
    truncated = tmp_path / "cut" / "diffseg_bundle.pt2"
    truncated.parent.mkdir()
    data = open(tiny_aoti_bundle, "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(_torch.BundleError):
        diffseg.load_model(truncated)
    # metadata intact, models gone: the shim's own error
    stripped = tmp_path / "stripped" / "diffseg_bundle.pt2"
    stripped.parent.mkdir()
    with zipfile.ZipFile(tiny_aoti_bundle) as src, zipfile.ZipFile(stripped, "w") as dst:
        for info in src.infolist():
            if "/aotinductor/denoise/" not in info.filename:
                dst.writestr(info, src.read(info))
    with pytest.raises(_torch.BundleError, match="not a readable AOTInductor package"):
        diffseg.load_model(stripped)


def test_folder_with_a_package_opens_it(tiny_aoti_bundle, tmp_path):
    folder = tmp_path / "only_pt2"
    folder.mkdir()
    shutil.copy(tiny_aoti_bundle, folder / "diffseg_bundle.pt2")
    with diffseg.load_model(folder) as model:
        assert model.backend == "aoti"


def test_c_program_runs_the_package(c_example, tiny_aoti_bundle, tiny_bundle, tmp_path):
    """csrc/torch/example.c, unchanged, segments with the package as with the
    TorchScript bundle: the C API is the same for both backends."""
    exe = c_example
    outputs = {}
    for name, bundle in (("aoti", tiny_aoti_bundle), ("ts", tiny_bundle)):
        prefix = str(tmp_path / name)
        r = subprocess.run([exe, bundle, "1", prefix], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "4 maps: 16 8 4 2" in r.stdout
        outputs[name] = np.fromfile(prefix + ".attn", dtype=np.float32)
    assert rel_diff(outputs["aoti"], outputs["ts"]) <= 1e-4


def test_export_refuses_cross_attention(tiny_sd_dir, tmp_path):
    from diffseg.sd.export import export_bundle

    with pytest.raises(ValueError, match="cross_attention needs backend='torchscript'"):
        export_bundle(tiny_sd_dir, tmp_path, backend="aoti", cross_attention=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        export_bundle(tiny_sd_dir, tmp_path, backend="onnx")


def test_reuse_memory_has_no_effect_on_results(aoti_model):
    x = image(128, 128, seed=5)
    before = aoti_model.attention(x)
    _torch.set_memory_reuse(False)
    try:
        off = aoti_model.attention(x)
    finally:
        _torch.set_memory_reuse(True)
    for key in before:
        np.testing.assert_array_equal(before[key], off[key])
