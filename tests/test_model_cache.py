"""load_model before any export: the bundle cache's key and lock, and the
checks that must fail at once (a mistyped path, a photo given as the model,
a core-only install). No torch needed: the export and the shim are replaced
by fakes."""
import importlib.util
import json
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import diffseg
from diffseg import pipeline
from diffseg.sd import export as export_mod
from diffseg.sd import model as model_mod
from diffseg.sd.bundle import BUNDLE_FILE, FORMAT, FORMAT_VERSION


def write_fake_bundle(path):
    """A zip with the metadata of a bundle of this format version (what the
    cache checks without torch)."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/extra/diffseg.json", json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION}))


@pytest.fixture
def fake_export(tmp_path, monkeypatch):
    """Cache in tmp; export writes a dummy bundle (slowly, so that concurrent
    callers overlap); Model just returns the bundle folder."""
    monkeypatch.setenv("DIFFSEG_CACHE", str(tmp_path / "cache"))
    exports = []

    def export_bundle(source, folder, **kw):
        exports.append(source)
        time.sleep(0.5)
        Path(folder).mkdir(parents=True, exist_ok=True)
        write_fake_bundle(Path(folder) / BUNDLE_FILE)

    monkeypatch.setattr(export_mod, "export_bundle", export_bundle)
    monkeypatch.setattr(model_mod, "Model", lambda path, **kw: Path(path))
    monkeypatch.setattr(model_mod, "_shim", lambda: None)
    monkeypatch.setattr(model_mod, "_check_can_export", lambda source: None, raising=False)
    return exports


@pytest.fixture
def checkpoint(tmp_path):
    ckpt = tmp_path / "sd"
    (ckpt / "unet").mkdir(parents=True)
    (ckpt / "model_index.json").write_text("{}")
    (ckpt / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"a" * 10)
    return ckpt


def test_rebuilt_checkpoint_is_exported_again(fake_export, checkpoint, capsys):
    first = diffseg.load_model(checkpoint)
    assert "exporting" in capsys.readouterr().err
    assert diffseg.load_model(checkpoint) == first and len(fake_export) == 1
    assert f"using the cached bundle {first}" in capsys.readouterr().err
    (checkpoint / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"b" * 11)  # rebuilt in place
    rebuilt = diffseg.load_model(checkpoint)
    assert rebuilt != first and len(fake_export) == 2
    assert "exporting" in capsys.readouterr().err


def test_concurrent_loads_export_once(fake_export, checkpoint):
    start = threading.Barrier(2)
    got = []

    def load():
        start.wait()
        got.append(diffseg.load_model(checkpoint))

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert len(got) == 2 and got[0] == got[1]
    assert len(fake_export) == 1  # the second waited on the lock, then reused the bundle


def test_missing_path_fails_at_once(fake_export, capsys):
    for typo in ("nonexist_bundle", "./models/sd15", "~/nope/x.safetensors", "bundle.pt"):
        with pytest.raises(FileNotFoundError, match="no such"):
            diffseg.load_model(typo)
    assert fake_export == [] and "exporting" not in capsys.readouterr().err
    assert model_mod._looks_like_hub_id("CompVis/stable-diffusion-v1-4")


def _jpeg(path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    return path


def test_core_only_install_fails_before_exporting(tmp_path, monkeypatch, capsys):
    """Without the shim, segment() says what to install instead of announcing an export."""
    monkeypatch.setenv("DIFFSEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pipeline, "_default_model", None)

    def no_shim():
        raise ImportError("diffseg was built without its libtorch shim (diffseg._torch): install torch==2.13.0")

    monkeypatch.setattr(model_mod, "_shim", no_shim)
    with pytest.raises(ImportError, match="install torch"):
        diffseg.segment(_jpeg(tmp_path / "x.jpg"))
    assert "exporting" not in capsys.readouterr().err


def test_missing_torch_for_export_is_said_first(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFSEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(model_mod, "_shim", lambda: None)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    with pytest.raises(ImportError, match=r"needs (\w+, )*diffusers(, \w+)*, not installed here.*pip install"):
        diffseg.load_model("owner/model")
    assert "exporting" not in capsys.readouterr().err
    assert not list((tmp_path / "cache").glob("*.lock"))


def test_a_photo_as_the_model_fails_before_exporting(fake_export, tmp_path, capsys):
    """`-m photo.jpg`: refused before any announcement, lock or export."""
    photo = _jpeg(tmp_path / "photo.jpg")
    with pytest.raises(ValueError, match="photo.jpg is neither a bundle"):
        diffseg.load_model(photo)
    folder = tmp_path / "not_a_pipeline"
    folder.mkdir()
    with pytest.raises(ValueError, match="model_index.json"):
        diffseg.load_model(folder)
    assert fake_export == [] and "exporting" not in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_failed_export_leaves_no_lock(tmp_path, monkeypatch, checkpoint):
    monkeypatch.setenv("DIFFSEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(model_mod, "_shim", lambda: None)
    monkeypatch.setattr(model_mod, "_check_can_export", lambda source: None)

    def failing_export(source, folder, **kw):
        raise ValueError("cannot load the checkpoint")

    monkeypatch.setattr(export_mod, "export_bundle", failing_export)
    with pytest.raises(ValueError, match="cannot load"):
        diffseg.load_model(checkpoint)
    assert list((tmp_path / "cache").iterdir()) == []  # no lock file, no half-made entry


def test_lock_files_are_removed_after_exports(fake_export, checkpoint, tmp_path):
    diffseg.load_model(checkpoint)
    diffseg.load_model(checkpoint)
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and entries[0].is_dir()  # the bundle folder, no lock file


def test_damaged_cached_bundle_is_exported_again(fake_export, checkpoint, capsys):
    first = diffseg.load_model(checkpoint)
    (first / BUNDLE_FILE).write_bytes(b"PK\x03\x04 cut short")  # an export cut short by a crash
    capsys.readouterr()
    assert diffseg.load_model(checkpoint) == first and len(fake_export) == 2
    err = capsys.readouterr().err
    assert "is damaged" in err and "exporting" in err and "using the cached bundle" not in err


def test_bad_image_fails_before_the_model(tmp_path, monkeypatch):
    def no_model(*a, **kw):
        raise AssertionError("the model must not be opened for a missing image")

    import diffseg.sd.model

    monkeypatch.setattr(pipeline, "_default_model", None)
    monkeypatch.setattr(diffseg.sd.model, "load_model", no_model)
    with pytest.raises(FileNotFoundError, match="x.jpg"):
        diffseg.segment(tmp_path / "x.jpg")
    with pytest.raises(ValueError, match="grid"):
        diffseg.segment(tmp_path / "x.jpg", grid=100)  # bad settings fail first


def test_cli_export_without_torch_says_what_to_install(tmp_path, monkeypatch, capsys):
    """A core-only install: `diffseg export` gives the install advice of
    `diffseg segment` (torch, then a rebuild), not "No module named 'torch'"."""
    from diffseg.cli import main

    for name in ("torch", "diffusers", "transformers"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails, find_spec says missing
    assert main(["export", "owner/model", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "diffseg export: error:" in err and "No module named" not in err and "halted" not in err
    assert "pip install torch==2.13.0" in err and "--no-build-isolation" in err
    assert not (tmp_path / "out").exists()
