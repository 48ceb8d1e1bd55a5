"""Exporting a tiny random SD to a bundle: metadata, traced graph vs eager
diffusers, per-layer bundles, SD 2.x, the CLI, and failing fast without weights."""
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import diffseg  # noqa: E402
from diffseg.sd import checkpoint, export  # noqa: E402
from diffseg.sd.bundle import BUNDLE_FILE  # noqa: E402
from sd_tiny import build_tiny_sd, load_tiny_sd, reference_attention  # noqa: E402


def read_metadata(bundle):
    with zipfile.ZipFile(bundle) as z:
        name = next(n for n in z.namelist() if n.endswith("extra/diffseg.json"))
        return json.loads(z.read(name))


def rel_diff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def test_metadata(tiny_bundle, tiny_sd_dir):
    meta = read_metadata(tiny_bundle)
    assert meta["format"] == "diffseg-bundle" and meta["format_version"] == export.FORMAT_VERSION
    assert meta["torch_version"] == torch.__version__
    assert meta["model_id"] == os.path.realpath(tiny_sd_dir)
    assert meta["image_size"] == 128 and meta["latent_size"] == 16 and meta["latent_channels"] == 4
    assert meta["scaling_factor"] == pytest.approx(0.18215)
    assert meta["timestep"] == 300
    assert meta["dtype"] == "float32" and meta["device"] == "cpu"
    assert meta["layers"] == "per-resolution"
    assert meta["resolutions"] == [16, 8, 4, 2] == meta["output_resolutions"]
    assert meta["outputs"] == ["eps", "attn_16", "attn_8", "attn_4", "attn_2"]
    # 16 self-attention layers in execution order: 5 + 5 + 5 at the three
    # highest resolutions, 1 in the mid block.
    names, res = meta["layer_names"], meta["layer_resolutions"]
    assert len(names) == 16 and all(n.endswith("attn1") for n in names)
    assert res == [16, 16, 8, 8, 4, 4, 2, 4, 4, 4, 8, 8, 8, 16, 16, 16]
    assert names[6].startswith("mid_block")
    assert meta["input_multiple"] == 64 and "any batch size" in meta["grid"]
    side = json.loads(open(os.path.join(os.path.dirname(tiny_bundle), "metadata.json")).read())
    assert side == meta


def test_layout_attributes_for_the_shim(tiny_bundle, all_layers_bundle):
    """The shim reads the layout from the scripted module, not from the JSON."""
    from diffseg.sd.bundle import SHIM_ATTRIBUTES

    for path, res in [(tiny_bundle, [16, 8, 4, 2]),
                      (all_layers_bundle, [16, 16, 8, 8, 4, 4, 2, 4, 4, 4, 8, 8, 8, 16, 16, 16])]:
        module = torch.jit.load(path)
        got = {name: getattr(module, name) for name in SHIM_ATTRIBUTES}
        assert got == {"format_version": 2, "image_size": 128, "image_channels": 3, "latent_size": 16,
                       "latent_channels": 4, "default_timestep": 300, "map_resolutions": res,
                       "device_type": "cpu"}
        assert read_metadata(path)["output_resolutions"] == res


def test_script_bundle_checks_the_layout():
    with pytest.raises(ValueError, match="image_size"):
        export._script_bundle(None, None, {"format_version": 2})


def test_traced_bundle_equals_eager(tiny_bundle, tiny_pipe):
    """The TorchScript graph itself (loaded in Python) against diffusers' own
    explicit attention processor, for encode, denoise and forward."""
    rng = np.random.RandomState(7)
    image = rng.uniform(-1, 1, (3, 128, 128)).astype(np.float32)
    ref, _, ref_eps = reference_attention(tiny_pipe, image)
    bundle = torch.jit.load(tiny_bundle)
    x = torch.from_numpy(image)[None]
    t = torch.tensor([300])
    with torch.no_grad():
        out = bundle(x, t)
        latent = bundle.encode(x)
        out2 = bundle.denoise(latent, t)
        ref_latent = tiny_pipe.vae.encode(x).latent_dist.mean * 0.18215
    assert len(out) == 5
    assert torch.allclose(latent, ref_latent, rtol=1e-5, atol=1e-6)
    assert rel_diff(out[0][0].numpy(), ref_eps) <= 1e-3
    for s, o, o2 in zip([16, 8, 4, 2], out[1:], out2[1:]):
        assert o.shape == (1, s * s, s * s) and o.dtype == torch.float32
        assert rel_diff(o[0].numpy(), ref[s]) <= 1e-3
        assert torch.equal(o, o2)


def test_traced_graphs_are_shape_polymorphic(tiny_bundle, tiny_pipe):
    """Traced at (1, 3, 128, 128), the encoder and the UNet run on other
    batch sizes and non-square sizes and equal eager diffusers there."""
    bundle = torch.jit.load(tiny_bundle)
    rng = np.random.RandomState(8)
    for shape in [(2, 3, 128, 128), (1, 3, 192, 128), (3, 3, 64, 256)]:
        x = torch.from_numpy(rng.uniform(-1, 1, shape).astype(np.float32))
        with torch.no_grad():
            latent = bundle.encode(x)
            ref_latent = tiny_pipe.vae.encode(x).latent_dist.mean * 0.18215
            out = bundle.denoise(latent, torch.tensor([300]))
        assert latent.shape == (shape[0], 4, shape[2] // 8, shape[3] // 8)
        assert torch.allclose(latent, ref_latent, rtol=1e-5, atol=1e-6)
        for f, o in zip([1, 2, 4, 8], out[1:]):
            n = (shape[2] // 8 // f) * (shape[3] // 8 // f)
            assert o.shape == (shape[0], n, n)
        for b in range(shape[0]):
            ref, _, ref_eps = reference_attention(tiny_pipe, x[b].numpy())
            assert rel_diff(out[0][b].numpy(), ref_eps) <= 1e-3
            for o, r in zip(out[1:], ref.values()):
                assert rel_diff(o[b].numpy(), r) <= 1e-3


def test_capture_processor_matches_reference_eagerly(tiny_sd_dir):
    """The capturing processor (no tracing) against diffusers' AttnProcessor."""
    from diffseg.sd.export import install_capture

    pipe = load_tiny_sd(tiny_sd_dir)
    image = np.random.RandomState(2).uniform(-1, 1, (3, 64, 64)).astype(np.float32)
    ref, ref_layers, ref_eps = reference_attention(pipe, image)
    sink = install_capture(pipe.unet, "all")
    sink.record_names = True
    with torch.no_grad():
        x = torch.from_numpy(image)[None]
        latent = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        emb, _ = pipe.encode_prompt("", "cpu", 1, False)
        eps = pipe.unet(latent, 300, encoder_hidden_states=emb, return_dict=False)[0]
    assert len(sink.layers) == 16
    assert [n for n, _ in sink.names] == [n.rsplit(".processor", 1)[0] for n, _ in ref_layers]
    for got, (_, want) in zip(sink.layers, ref_layers):
        assert rel_diff(got[0].numpy(), want) <= 1e-4
    assert rel_diff(eps[0].numpy(), ref_eps) <= 1e-4


@pytest.fixture(scope="module")
def all_layers_bundle(tiny_sd_dir, tmp_path_factory):
    """Exported through the CLI, with all 16 per-layer maps."""
    from diffseg.cli import main

    out = tmp_path_factory.mktemp("all_layers")
    rc = main(["export", tiny_sd_dir, str(out), "--size", "128", "--layers", "all"])
    assert rc == 0
    return str(out / BUNDLE_FILE)


def test_layers_all(all_layers_bundle, tiny_pipe):
    pytest.importorskip("diffseg._torch")
    meta = read_metadata(all_layers_bundle)
    assert meta["layers"] == "all" and len(meta["outputs"]) == 17
    assert meta["output_resolutions"] == meta["layer_resolutions"]
    image = np.random.RandomState(4).uniform(-1, 1, (3, 128, 128)).astype(np.float32)
    ref, ref_layers, _ = reference_attention(tiny_pipe, image)
    with diffseg.load_model(os.path.dirname(all_layers_bundle)) as model:
        layers = model.layer_attention(image)
        assert len(layers) == 16
        for (name, got), (ref_name, want) in zip(layers, ref_layers):
            assert ref_name.startswith(name)
            assert rel_diff(got, want) <= 1e-3
            np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
        attn = model.attention(image)  # averaged per resolution in Python
        for s in attn:
            assert rel_diff(attn[s], ref[s]) <= 1e-3


def test_per_resolution_bundle_refuses_layer_attention(tiny_model):
    with pytest.raises(ValueError, match="layers='all'"):
        tiny_model.layer_attention(np.zeros((3, 128, 128), np.float32))


@pytest.mark.reliability  # slow: `make test-reliability`
def test_sd2_topology(tmp_path):
    """SD 2.x options (linear projections, per-block heads, upcast attention,
    v-prediction) export and match eager diffusers."""
    pytest.importorskip("diffseg._torch")
    folder = build_tiny_sd(str(tmp_path / "sd2"), sample_size=64, sd2=True, cross_dim=32, seed=1)
    path = export.export_bundle(folder, tmp_path / "b2", size=64)
    meta = read_metadata(path)
    assert meta["prediction_type"] == "v_prediction"
    assert meta["resolutions"] == [8, 4, 2, 1] and len(meta["layer_names"]) == 16
    pipe = load_tiny_sd(folder)
    image = np.random.RandomState(9).uniform(-1, 1, (3, 64, 64)).astype(np.float32)
    ref, _, _ = reference_attention(pipe, image)
    with diffseg.load_model(path) as model:
        attn = model.attention(image)
    for s in attn:
        assert rel_diff(attn[s], ref[s]) <= 1e-3


def test_bad_arguments(tiny_sd_dir, tmp_path):
    with pytest.raises(ValueError, match="multiple of 64"):
        export.export_bundle(tiny_sd_dir, tmp_path, size=100)
    with pytest.raises(ValueError, match="layers"):
        export.export_bundle(tiny_sd_dir, tmp_path, layers="some")
    with pytest.raises(ValueError, match="dtype"):
        export.export_bundle(tiny_sd_dir, tmp_path, dtype="int8")
    with pytest.raises(ValueError, match="device"):
        export.export_bundle(tiny_sd_dir, tmp_path, device="tpu")
    with pytest.raises(FileNotFoundError):
        export.export_bundle(str(tmp_path / "missing.safetensors"), tmp_path)
    with pytest.raises(FileNotFoundError):
        export.export_bundle(str(tmp_path / "no" / "such" / "folder"), tmp_path)
    not_a_pipeline = tmp_path / "empty_folder"
    not_a_pipeline.mkdir()
    with pytest.raises(ValueError, match="model_index.json"):
        export.export_bundle(not_a_pipeline, tmp_path)
    xl = tmp_path / "xl"
    xl.mkdir()
    (xl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ValueError, match="not supported"):
        export.export_bundle(xl, tmp_path)
    assert not (tmp_path / BUNDLE_FILE).exists()


def _no_probe(timeout=5.0):
    raise AssertionError("offline: the hub must not be probed")


def test_offline_without_weights_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    # fast = no probe of the hub, whose retries take half a minute (no wall clock: machines get busy)
    monkeypatch.setattr(checkpoint, "_hub_reachable", _no_probe)
    with pytest.raises(checkpoint.WeightsUnavailableError) as info:
        export.export_bundle("CompVis/stable-diffusion-v1-4", tmp_path / "out")
    message = str(info.value)
    assert "local diffusers folder" in message and ".safetensors" in message
    assert isinstance(info.value, FileNotFoundError)  # the CLI prints it without a traceback


def test_unreachable_hub_fails_fast(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(checkpoint, "_hub_reachable", lambda timeout=5.0: False)
    with pytest.raises(checkpoint.WeightsUnavailableError, match="not available offline"):
        export.export_bundle("someone/some-model", tmp_path / "out")


def test_cli_export_error_message(tmp_path, monkeypatch, capsys):
    from diffseg.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    assert main(["export", "CompVis/stable-diffusion-v1-4", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "diffseg export: error:" in err and "not available offline" in err


def test_light_imports():
    """`import diffseg`, diffseg.sd.export, diffseg.sd.model, diffseg.pipeline and
    their CLI parsers do not import torch or diffusers."""
    code = ("import argparse, sys, diffseg, diffseg.sd.export, diffseg.sd.model, diffseg.pipeline; "
            "import diffseg.cli.export, diffseg.cli.attention; "
            "sub = argparse.ArgumentParser().add_subparsers(); "
            "diffseg.cli.export.register_cli(sub); diffseg.cli.attention.register_cli(sub); "
            "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
            "sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_shim_built_when_torch_installed():
    """torch is importable here, so the build should have produced the shim;
    a missing diffseg._torch means diffseg was built without torch visible
    (build isolation): the shim tests would otherwise be skipped silently."""
    import importlib

    try:
        importlib.import_module("diffseg._torch")
    except ImportError as e:
        pytest.fail(f"diffseg._torch is not built although torch {torch.__version__} is installed ({e}); "
                    "rebuild with `pip install --no-build-isolation -e .`")


def test_layer_levels_come_from_the_unet_structure():
    from diffseg.sd.capture import layer_level

    assert layer_level("down_blocks.0.attentions.1.transformer_blocks.0.attn1", 4) == 0
    assert layer_level("mid_block.attentions.0.transformer_blocks.0.attn1", 4) == 3
    assert layer_level("up_blocks.1.attentions.2.transformer_blocks.0.attn1", 4) == 2
    assert layer_level("up_blocks.3.attentions.0.transformer_blocks.0.attn1", 4) == 0
    with pytest.raises(ValueError, match="in no down, mid or up block"):
        layer_level("attn1", 4)


def test_capture_keys_nothing_by_tensor_sizes(tiny_sd_dir):
    """Each processor knows its level, resolution and head chunk statically
    (torch.export with dynamic sizes cannot key a dictionary by a size)."""
    from diffseg.sd.capture import CaptureAttnProcessor, install_capture

    pipe = load_tiny_sd(tiny_sd_dir)
    install_capture(pipe.unet, latent_size=16)
    procs = [p for p in pipe.unet.attn_processors.values() if isinstance(p, CaptureAttnProcessor)]
    assert len(procs) == 16
    assert sorted({(p.level, p.resolution) for p in procs}) == [(0, 16), (1, 8), (2, 4), (3, 2)]
    assert all(1 <= p.chunk <= 2 for p in procs)


def test_bundle_is_flushed_before_the_rename(tiny_sd_dir, tmp_path, monkeypatch):
    """A crash after the rename must not leave a truncated bundle under the
    final name: the file is fsynced before os.replace, the folder after."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(str(dst))))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "flushed"
    export.export_bundle(tiny_sd_dir, out, size=64)
    i = events.index(("replace", BUNDLE_FILE))
    assert events[i - 1][0] == "fsync" and events[i - 1][1].endswith(".pt")  # the temporary file
    assert events[i + 1] == ("fsync", "flushed")  # the folder


@pytest.fixture(scope="module")
def soft_sd_dir(tmp_path_factory):
    """The tiny SD without sharpened attention: the test model's sharpened
    random attention magnifies bfloat16 rounding tenfold (max relative
    differences of 0.15-0.5 against float32, docs/performance.md)."""
    return build_tiny_sd(str(tmp_path_factory.mktemp("soft_sd")), sample_size=128, sharpen=1.0)


@pytest.fixture(scope="module")
def bf16_bundles(soft_sd_dir, tmp_path_factory):
    """(float32, bfloat16) bundles of the soft tiny SD."""
    from diffseg.sd.hardware import native_bfloat16

    f32 = export.export_bundle(soft_sd_dir, tmp_path_factory.mktemp("f32"), size=128)
    out = tmp_path_factory.mktemp("bf16")
    if native_bfloat16():
        return f32, export.export_bundle(soft_sd_dir, out, size=128, dtype="bfloat16")
    with pytest.warns(diffseg.sd.hardware.PrecisionWarning, match="no native bfloat16"):
        return f32, export.export_bundle(soft_sd_dir, out, size=128, dtype="bfloat16")


def _eager_bfloat16_attention(tiny_sd_dir, image):
    """Eager diffusers in bfloat16, its own attention processor with
    ``upcast_attention`` (scores and softmax in float32, as the bundle's
    capture): the oracle of a bfloat16 bundle."""
    from sd_tiny import ReferenceCapture

    pipe = load_tiny_sd(tiny_sd_dir).to(dtype=torch.bfloat16)
    for name, module in pipe.unet.named_modules():
        if name.endswith("attn1"):
            module.upcast_attention = module.upcast_softmax = True
    capture = ReferenceCapture(pipe.unet)
    with torch.no_grad():
        x = torch.from_numpy(image)[None].to(torch.bfloat16)
        latent = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        emb, _ = pipe.encode_prompt("", "cpu", 1, False)
        pipe.unet(latent, 300, encoder_hidden_states=emb, return_dict=False)
    groups = {}
    for _, m in capture.maps:
        groups.setdefault(int(round(m.shape[-1] ** 0.5)), []).append(m[0].double().numpy())
    return {s: np.mean(v, axis=0) for s, v in groups.items()}


def test_bfloat16_bundle_equals_eager_bfloat16(bf16_bundles, soft_sd_dir):
    """bfloat16 weights and activations, attention probabilities computed and
    returned in float32: within 2e-2 of eager diffusers in bfloat16 (with
    float32 attention: the two round differently) and 5e-2 of the float32
    bundle. On a CPU without native bfloat16 it runs emulated, with a warning
    when opened."""
    import warnings

    pytest.importorskip("diffseg._torch")
    f32_bundle, bf16_bundle = bf16_bundles
    assert read_metadata(bf16_bundle)["dtype"] == "bfloat16"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = diffseg.load_model(bf16_bundle)
    native = diffseg.sd.hardware.native_bfloat16()
    assert any(issubclass(w.category, diffseg.sd.hardware.PrecisionWarning) for w in caught) == (not native)
    with model, diffseg.load_model(f32_bundle) as f32_model:
        for seed in range(2):
            image = np.random.RandomState(seed).uniform(-1, 1, (3, 128, 128)).astype(np.float32)
            got = model.attention(image)
            ref = _eager_bfloat16_attention(soft_sd_dir, image)
            f32 = f32_model.attention(image)
            for s in got:
                assert got[s].dtype == np.float32
                np.testing.assert_allclose(got[s].sum(axis=1), 1.0, atol=1e-5)
                assert rel_diff(got[s], ref[s]) <= 2e-2, s
                assert rel_diff(got[s], f32[s]) <= 5e-2, s
        # methods take and return float32 whatever the dtype: encode feeds denoise
        x, t = image[None], np.full((1,), 300, np.int64)
        latent = model._model.call("encode", [x])[0]
        assert latent.dtype == np.float32
        maps = model._model.call("denoise", [latent, t])[1:]
        for m, s in zip(maps, got):
            np.testing.assert_allclose(m[0], got[s], rtol=0, atol=1e-6)


def test_dtype_auto_follows_the_machine(monkeypatch):
    from diffseg.sd import hardware

    monkeypatch.setattr(hardware, "cpu_features", lambda: {"amx_bf16": True, "avx512_bf16": False})
    assert hardware.resolve_dtype("auto") == "bfloat16"
    assert hardware.resolve_dtype("auto", "cuda:0") == "float16"
    assert hardware.resolve_dtype("float32") == "float32"
    monkeypatch.setattr(hardware, "cpu_features", lambda: {"avx512_bf16": False, "amx_bf16": False})
    assert hardware.resolve_dtype("auto") == "float32"
    with pytest.warns(hardware.PrecisionWarning, match="no native bfloat16"):
        hardware.warn_if_slow("bfloat16", "cpu")
