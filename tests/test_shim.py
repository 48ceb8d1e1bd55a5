"""The libtorch shim (diffseg._torch) on a tiny random SD bundle: attention
equals eager diffusers attention, errors are clean Python exceptions, and a
plain C program runs the shim and the core without Python."""
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
_torch = pytest.importorskip("diffseg._torch", reason="diffseg._torch not built (pip install --no-build-isolation)")

import diffseg  # noqa: E402

from diffseg import reference  # noqa: E402
from diffseg.io.images import preprocess_image  # noqa: E402
from diffseg.sd.bundle import FORMAT_VERSION  # noqa: E402
from sd_tiny import reference_attention  # noqa: E402



def example_image(size, seed=0):
    rng = np.random.RandomState(seed)
    return rng.uniform(-1, 1, (3, size, size)).astype(np.float32)


def rel_diff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def test_info(tiny_model):
    info = tiny_model.info
    assert info["image_size"] == 128 and info["image_channels"] == 3
    assert info["latent_size"] == 16 and info["latent_channels"] == 4
    assert info["map_resolutions"] == [16, 8, 4, 2]
    assert info["timestep"] == 300
    assert tiny_model.resolutions == [16, 8, 4, 2]
    assert tiny_model.metadata["format_version"] == _torch.FORMAT_VERSION == FORMAT_VERSION == 2
    assert info["format_version"] == 2
    assert json.loads(tiny_model._model.metadata()) == tiny_model.metadata  # the extra file, unparsed


def test_attention_equals_eager_diffusers(tiny_model, tiny_pipe):
    image = example_image(128)
    attn = tiny_model.attention(image)
    ref, layers, _ = reference_attention(tiny_pipe, image, timestep=300)
    assert len(layers) == 16
    assert list(attn) == [16, 8, 4, 2]
    for s, a in attn.items():
        assert a.dtype == np.float32 and a.shape == (s * s, s * s)
        assert a.flags.c_contiguous
        assert rel_diff(a, ref[s]) <= 1e-3, s
        np.testing.assert_allclose(a.sum(axis=1), 1.0, atol=1e-5)
    # The random attention is far from uniform (q/k weights are sharpened).
    assert attn[16].max(axis=1).mean() > 10 / 256


def test_eps_and_timestep(tiny_model, tiny_pipe):
    image = example_image(128, seed=1)
    maps, eps = tiny_model.run(image, 120, eps=True)
    ref, _, ref_eps = reference_attention(tiny_pipe, image, timestep=120)
    assert eps.shape == (4, 16, 16)
    assert rel_diff(eps, ref_eps) <= 1e-3
    assert rel_diff(maps[0], ref[16]) <= 1e-3
    maps300, eps300 = tiny_model.run(image, eps=True)  # bundle default: 300
    assert not np.allclose(eps300, eps)


def test_attention_of_uint8_image_uses_preprocessing(tiny_model):
    rng = np.random.RandomState(3)
    rgb = rng.randint(0, 256, (90, 130, 3), dtype=np.uint8)
    a = tiny_model.attention(rgb)
    b = tiny_model.attention(preprocess_image(rgb, size=128))
    for s in a:
        np.testing.assert_array_equal(a[s], b[s])


def test_wrong_image_shapes(tiny_model):
    """Python checks shapes (the generic shim call does not: tests/test_shim_shapes.py)."""
    with pytest.raises(ValueError, match=r"multiples of 64 for this bundle, got 96x128"):
        tiny_model.attention(np.zeros((3, 96, 128), np.float32))
    with pytest.raises(ValueError, match="shape"):
        tiny_model.attention(np.zeros((10, 10, 5), np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        tiny_model.attention(np.full((3, 128, 128), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"preprocessed to shape \(3, H, W\)"):
        tiny_model.attention(np.zeros((128, 128, 3), np.float32))
    with pytest.raises(ValueError, match="timestep"):
        tiny_model.run(example_image(128), timestep=-5)
    # 64x64 is a valid size for this bundle (multiples of 64): a 8x8 finest grid.
    assert list(tiny_model.attention(np.zeros((3, 64, 64), np.float32))) == [8, 4, 2, 1]


def test_missing_bundle(tmp_path):
    with pytest.raises(FileNotFoundError):
        diffseg.load_model(tmp_path / "nope" / "diffseg_bundle.pt")
    with pytest.raises(FileNotFoundError, match="diffseg export"):
        diffseg.Model(tmp_path)  # a folder without a bundle
    with pytest.raises(_torch.BundleError, match="no such file"):
        _torch.Model(str(tmp_path / "nope.pt"))


def test_corrupt_bundles(tiny_bundle, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(_torch.BundleError, match="not a readable zip archive"):
        diffseg.Model(junk)  # refused by Python, reading the metadata
    with pytest.raises(_torch.BundleError, match="not a readable TorchScript archive"):
        _torch.Model(str(junk))
    truncated = tmp_path / "truncated.pt"
    data = open(tiny_bundle, "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        diffseg.Model(truncated)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError):
        diffseg.Model(empty)


def test_torchscript_without_metadata(tmp_path):
    import torch

    path = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(ValueError, match="not a diffseg bundle"):
        diffseg.Model(path)
    with pytest.raises(_torch.BundleError, match="no 'format_version' attribute: not a diffseg bundle"):
        _torch.Model(str(path))


def rewrite_metadata(src, dst, edit):
    """Copy the bundle archive, replacing its extra/diffseg.json with edit(text)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("extra/diffseg.json"):
                data = edit(data.decode()).encode()
            zout.writestr(item, data)


@pytest.mark.parametrize("version", [1, 3, 99, "2", 2.0, True, None])
def test_other_format_version_is_refused_before_the_shim(tiny_bundle, tmp_path, monkeypatch, version):
    """A bundle of another format version (a version-1 bundle of an older
    diffseg, say): one BundleError that says to export again, raised before
    the shim opens the file."""
    def bump(text):
        meta = json.loads(text)
        if version is None:
            del meta["format_version"]
        else:
            meta["format_version"] = version
        return json.dumps(meta)

    dst = tmp_path / "other.pt"
    rewrite_metadata(tiny_bundle, dst, bump)

    def shim_must_not_open(*args):
        raise AssertionError("the shim was called")

    monkeypatch.setattr(_torch, "Model", shim_must_not_open)
    with pytest.raises(_torch.BundleError, match=rf"format version {version!r}, this diffseg reads version 2: "
                                                 r"export it again .*`diffseg export"):
        diffseg.Model(dst)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t[: len(t) // 2], "not valid JSON"),
    (lambda t: "[1, 2]", "not a JSON object"),
    (lambda t: json.dumps({**json.loads(t), "format": "other"}), "not a diffseg bundle"),
    (lambda t: json.dumps({k: v for k, v in json.loads(t).items() if k != "format"}), "not a diffseg bundle"),
])
def test_bad_metadata(tiny_bundle, tmp_path, edit, message):
    dst = tmp_path / "bad.pt"
    rewrite_metadata(tiny_bundle, dst, edit)
    with pytest.raises(_torch.BundleError, match=message):
        diffseg.Model(dst)


def test_sizes_come_from_the_module_not_the_json(tiny_bundle, tmp_path):
    """The shim parses no JSON: sizes in diffseg.json that contradict the
    graph (or are not sizes at all) change nothing."""
    dst = tmp_path / "lying.pt"
    rewrite_metadata(tiny_bundle, dst, lambda t: json.dumps(
        {**json.loads(t), "image_size": "big", "output_resolutions": [3], "latent_size": None, "device": "cuda"}))
    with diffseg.Model(dst) as model:
        assert model.info["image_size"] == 128 and model.info["map_resolutions"] == [16, 8, 4, 2]
        assert model.metadata["image_size"] == "big"
        maps, eps = model.run(example_image(128), eps=True)
    assert [m.shape for m in maps] == [(256, 256), (64, 64), (16, 16), (4, 4)] and eps.shape == (4, 16, 16)
    with diffseg.Model(tiny_bundle) as untouched:
        maps0, eps0 = untouched.run(example_image(128), eps=True)
    for m, m0 in zip(maps, maps0):  # the same graph, the same values
        np.testing.assert_array_equal(m, m0)
    np.testing.assert_array_equal(eps, eps0)


GOOD_LAYOUT = {"format_version": 2, "image_size": 64, "image_channels": 3, "latent_size": 8, "latent_channels": 4,
               "default_timestep": 300, "map_resolutions": [8, 4], "device_type": "cpu"}


def scripted_bundle(path, **changes):
    """A small scripted module with the layout attributes (a key set to
    None is left out) and valid v2 metadata; forward returns eps and maps of
    the shapes GOOD_LAYOUT promises."""
    import torch
    from typing import List

    layout = {k: v for k, v in {**GOOD_LAYOUT, **changes}.items() if v is not None}

    class Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for k, v in layout.items():
                setattr(self, k, v)

        def forward(self, image: torch.Tensor, t: torch.Tensor) -> List[torch.Tensor]:
            return [torch.zeros(1, 4, 8, 8), torch.full((1, 64, 64), 1 / 64), torch.full((1, 16, 16), 1 / 16)]

    meta = {"format": "diffseg-bundle", "format_version": 2, "model_id": "fake"}
    torch.jit.save(torch.jit.script(Fake()), str(path), _extra_files={"diffseg.json": json.dumps(meta)})
    return str(path)


def test_scripted_layout_is_what_the_shim_reads(tmp_path):
    path = scripted_bundle(tmp_path / "good.pt")
    with diffseg.Model(path) as model:
        assert model.info == {"format_version": 2, "image_size": 64, "image_channels": 3, "latent_size": 8,
                              "latent_channels": 4, "timestep": 300, "map_resolutions": [8, 4]}
        maps, eps = model.run(np.zeros((3, 64, 64), np.float32), eps=True)
        assert maps[1].shape == (16, 16) and np.all(maps[1] == np.float32(1 / 16))


@pytest.mark.parametrize("change, message", [
    ({"format_version": 1}, "format version 1 is not supported.*`diffseg export`"),
    ({"format_version": None}, "no 'format_version' attribute"),
    ({"image_size": "128"}, "'image_size' must be an integer in"),
    ({"image_size": 4}, "'image_size' must be an integer in"),
    ({"image_channels": 2 ** 40}, "'image_channels' must be an integer in"),
    ({"latent_size": None}, "no 'latent_size' attribute"),
    ({"latent_channels": -4}, "'latent_channels' must be an integer"),
    ({"default_timestep": 1.5}, "'default_timestep' must be an integer"),
    ({"map_resolutions": [8, "4"]}, "'map_resolutions'"),  # no list type: TorchScript drops the attribute
    ({"map_resolutions": [8, 0]}, "'map_resolutions' must be a list"),
    ({"map_resolutions": [2] * 65}, "'map_resolutions' must be a list"),
    ({"map_resolutions": 8}, "'map_resolutions' must be a list"),
    ({"device_type": None}, "no 'device_type' attribute"),
    ({"device_type": 0}, "'device_type' must be a string"),
])
def test_bad_layout_attributes(tmp_path, change, message):
    """The shim checks what it reads from the module: a bundle written by
    hand or damaged is a BundleError naming the attribute, never a crash."""
    path = scripted_bundle(tmp_path / "bad.pt", **change)
    with pytest.raises(_torch.BundleError, match=message):
        _torch.Model(path)


def test_layout_disagreeing_with_the_graph_fails_when_running(tmp_path):
    path = scripted_bundle(tmp_path / "wrong.pt", map_resolutions=[8, 2])
    with diffseg.Model(path) as model, pytest.raises(_torch.BundleError, match=r"map 1 has shape \[1, 16, 16\]"):
        model.run(np.zeros((3, 64, 64), np.float32))


def test_device_errors(tiny_bundle, tmp_path):
    """Devices that cannot run here are ValueErrors (exit 2 in the CLI),
    raised before any export or load."""
    for device in ("tpu", "cuda:x", ""):
        with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
            diffseg.Model(tiny_bundle, device=device)
    with pytest.raises(ValueError, match="device: expected 'cpu', 'cuda' or 'cuda:N', got 'tpu'"):
        _torch.Model(tiny_bundle, "tpu")
    # A bundle exported for CUDA, opened on the CPU.
    with pytest.raises(ValueError, match="exported for device 'cuda', not 'cpu'.*--device cpu"):
        _torch.Model(scripted_bundle(tmp_path / "cuda.pt", device_type="cuda"))


@pytest.mark.skipif(_torch.cuda_available(), reason="CUDA is available here")
def test_cuda_without_cuda(tiny_bundle, tmp_path):
    message = r"device 'cuda': CUDA is not available to libtorch .* use device 'cpu'"
    with pytest.raises(ValueError, match=message):
        diffseg.Model(tiny_bundle, device="cuda")
    with pytest.raises(ValueError, match=message):
        diffseg.load_model(tiny_bundle, device="cuda")
    # A hub id (not a bundle): refused before the (slow) export.
    with pytest.raises(ValueError, match=message.replace("'cuda'", "'cuda:1'")):
        diffseg.load_model("CompVis/stable-diffusion-v1-4", device="cuda:1")
    with pytest.raises(ValueError, match="CUDA is not available"):
        _torch.Model(tiny_bundle, "cuda")  # the shim checks too (C callers)
    image = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    r = subprocess.run([sys.executable, "-m", "diffseg", "segment", str(image), "--model", tiny_bundle,
                        "--device", "cuda", "-o", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and "CUDA is not available" in r.stderr, r.stderr
    assert r.stdout == ""


def test_closed_model(tiny_bundle):
    model = diffseg.load_model(tiny_bundle)
    model.close()
    model.close()  # idempotent
    assert model.closed
    with pytest.raises(ValueError, match="closed"):
        model.attention(example_image(128))
    with diffseg.load_model(tiny_bundle) as m:
        assert not m.closed
    assert m.closed


def test_threads_shared_with_core(tiny_model):
    before = _torch.get_num_threads()
    try:
        diffseg.set_num_threads(1)
        assert _torch.get_num_threads() == 1
        a = tiny_model.attention(example_image(128))
        diffseg.set_num_threads(2)
        assert _torch.get_num_threads() == 2
        b = tiny_model.attention(example_image(128))
        for s in a:
            np.testing.assert_allclose(a[s], b[s], rtol=1e-4, atol=1e-7)
    finally:
        diffseg.set_num_threads(before)


def test_concurrent_runs(tiny_model):
    from concurrent.futures import ThreadPoolExecutor

    image = example_image(128, seed=5)
    ref = tiny_model.attention(image)
    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda _: tiny_model.attention(image), range(3)))
    for out in outs:
        for s in ref:
            np.testing.assert_allclose(out[s], ref[s], rtol=1e-4, atol=1e-7)


@pytest.mark.reliability  # slow: `make test-reliability`
def test_c_example_program(c_example, tiny_bundle, tmp_path):
    """csrc/torch/example.c links the shim and the core without Python; its
    maps match the Python path and its labels are the reference pipeline's."""
    exe = c_example
    prefix = str(tmp_path / "out")
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    # kl 0.3: several segments on the tiny model (at 1.1 it gives one, which proves little)
    r = subprocess.run([exe, tiny_bundle, "1", prefix, "0.3"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 maps: 16 8 4 2" in r.stdout
    assert "call error: method 'no_such_method': the bundle has no such method" in r.stdout

    # The same synthetic image through Python.
    S = 128
    c, y, x = np.meshgrid(np.arange(3), np.arange(S), np.arange(S), indexing="ij")
    image = (((x * 7 + y * 13 + c * 29 + (x // 16) * (y // 16) * 5) % 64) / 32.0 - 1.0).astype(np.float32)
    with diffseg.load_model(tiny_bundle) as model:
        maps, _ = model.run(image)
    flat = np.fromfile(prefix + ".attn", dtype=np.float32)
    sizes = [m.size for m in maps]
    assert flat.size == sum(sizes)
    c_maps = np.split(flat, np.cumsum(sizes)[:-1])
    for c_map, py_map in zip(c_maps, maps):
        np.testing.assert_allclose(c_map.reshape(py_map.shape), py_map, rtol=1e-4, atol=1e-6)
    c_attn = {int(round(m.shape[0] ** 0.5)): c.reshape(m.shape) for c, m in zip(c_maps, maps)}
    labels = np.fromfile(prefix + ".labels", dtype=np.int32).reshape(S, S)
    grid = min(16, max(c_attn))
    expected = reference.segment_attention(c_attn, kl_threshold=[0.3] * 3, grid=grid, size=(S, S))
    assert len(np.unique(expected)) > 1
    np.testing.assert_array_equal(labels, expected)


def test_unknown_exceptions_become_error_codes(tiny_bundle):
    """An exception that is not a std::exception must not cross extern "C"
    (it would terminate the process): each entry catches (...). In a
    subprocess, so that a regression cannot take pytest down."""
    code = f"""
import numpy as np, diffseg._torch as t
t._test_inject(t.TEST_THROW_UNKNOWN)
try:
    t.Model({tiny_bundle!r})
except RuntimeError as e:
    print("caught:", e)
m = t.Model({tiny_bundle!r})
t._test_inject(t.TEST_THROW_UNKNOWN)
try:
    m.call("encode", [np.zeros((1, 3, 64, 64), np.float32)])
except RuntimeError as e:
    print("caught:", e)
print(m.call("encode", [np.zeros((1, 3, 64, 64), np.float32)])[0].shape)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("caught: unknown C++ exception") == 2, r.stdout
    assert "(1, 4, 8, 8)" in r.stdout  # the model still works


def test_message_that_cannot_be_built_falls_back_to_a_static_one(tmp_path):
    missing = str(tmp_path / "missing.pt")
    _torch._test_inject(_torch.TEST_MESSAGE_FAILS)
    with pytest.raises(_torch.BundleError, match=r"^out of memory \(while formatting an error message\)$"):
        _torch.Model(missing)  # the error code (EIO: BundleError) is kept
    with pytest.raises(_torch.BundleError, match="cannot open"):  # the next message is built again
        _torch.Model(missing)


def test_cpu_features_agree_with_torch():
    """The shim's cpuinfo against torch's own report (an independent path)."""
    import torch

    from diffseg.sd import hardware

    known = torch._C._cpu._get_cpu_capability()
    for name in hardware.FEATURES:
        assert _torch.cpu_feature(name) == known[name], name
    assert _torch.cpu_feature("no_such_feature") is None
    with pytest.raises(TypeError, match="name must be a str"):
        _torch.cpu_feature(3)
    assert hardware.cpu_features() == {name: known[name] for name in hardware.FEATURES}


def test_large_buffers_are_reused_across_runs(tiny_model):
    """A 512 px pass of the tiny model allocates 64 MiB attention buffers:
    after the first pass, later ones take no new memory from the system and
    page-fault next to nothing."""
    import resource

    image = example_image(512, seed=3)
    tiny_model.attention(image)
    first = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tiny_model.attention(image)
    first = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - first
    obtained = _torch.memory_stats()["obtained"]
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(2):
        tiny_model.attention(image)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    stats = _torch.memory_stats()
    assert stats["obtained"] == obtained and stats["kept"] > 64 << 20
    assert stats["kept"] <= 2 * stats["peak"]
    # 64 MiB of fresh pages alone would be 16384 faults
    assert faults < 4000, (faults, first)


def test_memory_is_returned_when_off_and_at_the_last_close(tiny_bundle):
    code = f"""
import numpy as np, diffseg, diffseg._torch as t
x = np.random.RandomState(0).uniform(-1, 1, (3, 512, 512)).astype(np.float32)
m = diffseg.load_model({tiny_bundle!r})
m.attention(x)
print("kept", t.memory_stats()["kept"] > 0)
t.set_memory_reuse(False)
print("off", t.memory_stats()["kept"])
t.set_memory_reuse(True)
m.attention(x)
kept = t.memory_stats()["kept"]
t.set_memory_reuse("paused")  # neither keeps nor hands out; what is kept stays
m.attention(x)
print("paused", t.memory_stats()["kept"] == kept > 0)
t.set_memory_reuse(True)
m.close()
print("closed", t.memory_stats()["kept"], t.memory_stats()["in_use"] < (64 << 20))
try:
    t.set_memory_reuse(1)
except TypeError as e:
    print("refused", e)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "kept True" in r.stdout and "off 0" in r.stdout and "closed 0 True" in r.stdout, r.stdout
    assert "paused True" in r.stdout and "refused set_memory_reuse takes True, False or 'paused'" in r.stdout


def test_reuse_can_be_turned_off_by_the_environment(tiny_bundle):
    code = f"""
import numpy as np, diffseg, diffseg._torch as t
m = diffseg.load_model({tiny_bundle!r})
m.attention(np.zeros((3, 512, 512), np.float32))
print("kept", t.memory_stats()["kept"])
"""
    env = dict(os.environ, DIFFSEG_REUSE_MEMORY="0")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "kept 0" in r.stdout
