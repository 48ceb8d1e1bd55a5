"""`diffseg segment`: in-process with a planted-attention model; one subprocess run
with the tiny random-weight bundle."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import diffseg
from diffseg.cli import _common
from diffseg.io.images import save_label_png
from diffseg.cli import main
from diffseg.io.records import records_to_labels
from planted_model import PlantedModel


@pytest.fixture
def fake_model(monkeypatch):
    model = PlantedModel()
    monkeypatch.setattr(_common, "open_model", lambda args, **kw: model)
    return model


def _image(path, h, w, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def photos(tmp_path):
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    _image(d / "wide.png", 40, 70)
    _image(d / "tall.jpg", 50, 30, 1)
    _image(d / "sub" / "deep.png", 32, 32, 2)
    (d / "notes.txt").write_text("not an image")  # not picked up from a folder
    return d


def _read(out, name):
    labels = np.asarray(Image.open(out / f"{name}.labels.png"))
    doc = json.loads((out / f"{name}.json").read_text())
    return labels, doc


def test_folder(fake_model, photos, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["segment", str(photos), "-o", str(out), "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "tall.json", "tall.labels.png", "tall.overlay.png", "wide.json", "wide.labels.png", "wide.overlay.png"]
    assert fake_model.calls == 2 and fake_model.closed
    labels, doc = _read(out, "wide")
    assert labels.shape == (40, 70) and labels.dtype == np.uint8
    assert labels.max() >= 2  # planted segments found
    np.testing.assert_array_equal(labels, diffseg.segment(photos / "wide.png", PlantedModel()))
    assert doc["height"] == 40 and doc["width"] == 70
    # the whole frame: short side 40 -> 128 px, long 70 -> 224 px padded to 256 (16 px each side)
    assert "crop" not in doc and doc["made_with"]["settings"]["frame"] == "whole"
    assert doc["frame"] == {"height": 128, "width": 256, "grid": [16, 32], "scale": 3.2,
                            "padding": {"top": 0, "bottom": 0, "left": 16, "right": 16}}
    assert doc["made_with"]["settings"]["kl_threshold"] == [1.1, 1.1, 1.1]
    assert doc["n_segments"] == len(doc["annotations"]) == labels.max() + 1
    assert np.array_equal(records_to_labels(doc["annotations"]), labels)
    for r in doc["annotations"]:
        assert set(r) == {"id", "area", "bbox", "segmentation", "point_coords", "crop_box", "score", "mean_kl",
                          "proposal"}
        assert 0 < r["score"] <= 1 and r["score"] == pytest.approx(np.exp(-r["mean_kl"]))
        assert isinstance(r["segmentation"]["counts"], str)
    from diffseg.viz import overlay as draw_overlay

    overlay = np.asarray(Image.open(out / "wide.overlay.png"))
    np.testing.assert_array_equal(overlay, draw_overlay(diffseg.load_image(photos / "wide.png"), labels))
    assert capsys.readouterr().err == ""


def test_recursive_names_and_collisions(fake_model, photos, tmp_path):
    out = tmp_path / "out"
    other = tmp_path / "other"
    other.mkdir()
    _image(other / "wide.png", 20, 20)
    code = main(["segment", str(photos), str(other / "wide.png"), "-r", "-o", str(out), "-q",
                 "--format", "labels"])
    assert code == 0
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert names == ["sub/deep.labels.png", "tall.labels.png", "wide.labels.png", "wide_2.labels.png"]
    assert np.asarray(Image.open(out / "wide_2.labels.png")).shape == (20, 20)


def test_unreadable_files_are_counted(fake_model, photos, tmp_path, capsys):
    bad = photos / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    out = tmp_path / "out"
    code = main(["segment", str(photos), str(tmp_path / "missing.jpg"), "-o", str(out), "-q"])
    assert code == 1
    err = capsys.readouterr().err
    assert "broken.png" in err and "missing.jpg" in err
    assert "2 failed" in err and "Traceback" not in err
    assert all(line.count("diffseg segment:") == 1 for line in err.splitlines())  # one prefix per line
    assert (out / "wide.json").is_file() and not (out / "broken.json").exists()


def test_glob_and_formats(fake_model, photos, tmp_path):
    out = tmp_path / "out"
    pattern = str(photos / "*.png")
    assert main(["segment", pattern, "-o", str(out), "-q", "--format", "json", "--output-mode", "uncompressed_rle"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["wide.json"]
    doc = json.loads((out / "wide.json").read_text())
    assert all(isinstance(r["segmentation"]["counts"], list) for r in doc["annotations"])
    out2 = tmp_path / "out2"
    assert main(["segment", pattern, "-o", str(out2), "-q", "--format", "json,labels", "--output-mode", "binary_mask"]) == 0
    labels, doc = _read(out2, "wide")
    assert np.array_equal(records_to_labels(doc["annotations"]), labels)
    assert not (out2 / "wide.overlay.png").exists()


def test_skip_existing_and_output_inside_input(fake_model, photos):
    out = photos / "seg"  # inside the input folder: its PNGs must not become inputs
    assert main(["segment", str(photos), "-r", "-o", str(out), "-q"]) == 0
    assert fake_model.calls == 3
    assert main(["segment", str(photos), "-r", "-o", str(out), "-q", "--skip-existing"]) == 0
    assert fake_model.calls == 3
    # outputs made with other settings are redone, not kept
    assert main(["segment", str(photos), "-r", "-o", str(out), "-q", "--skip-existing",
                 "--kl-threshold", "0.9"]) == 0
    assert fake_model.calls == 6
    assert main(["segment", str(photos), "-r", "-o", str(out), "-q", "--skip-existing",
                 "--kl-threshold", "0.9,0.9,0.9"]) == 0
    assert fake_model.calls == 6  # the same setting, spelled per iteration


def test_knobs_reach_the_pipeline(fake_model, photos, tmp_path):
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    assert main(["segment", str(photos / "wide.png"), "-o", str(out_a), "-q", "--kl-threshold", "0.05"]) == 0
    assert main(["segment", str(photos / "wide.png"), "-o", str(out_b), "-q", "--kl-threshold", "1.1,1.1,1.1",
                 "--grid", "4"]) == 0
    la, da = _read(out_a, "wide")
    lb, db = _read(out_b, "wide")
    np.testing.assert_array_equal(la, diffseg.segment(photos / "wide.png", PlantedModel(), kl_threshold=0.05))
    np.testing.assert_array_equal(lb, diffseg.segment(photos / "wide.png", PlantedModel(), grid=4))
    assert da["made_with"]["settings"]["kl_threshold"] == [0.05] * 3 and db["made_with"]["settings"]["grid"] == 4
    assert la.max() > lb.max()


@pytest.mark.parametrize("argv, message", [
    (["segment", "nothing-here.png"], "no images to segment"),
    (["segment", "{photos}", "--format", "labels,mesh"], "unknown output"),
    (["segment", "{photos}", "--kl-threshold", "big"], "--kl-threshold"),
    (["segment", "{photos}", "--kl-threshold", "-1"], "--kl-threshold"),
    (["segment", "{photos}", "--grid", "0"], "--grid"),
])
def test_user_errors(fake_model, photos, tmp_path, capsys, argv, message):
    argv = [a.format(photos=photos) for a in argv] + ["-o", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert fake_model.calls == 0


def test_bad_bundle_is_a_user_error(photos, tmp_path, capsys):
    pytest.importorskip("diffseg._torch")
    fake = tmp_path / "model.pt"
    fake.write_bytes(b"not a bundle")
    assert main(["segment", str(photos), "-o", str(tmp_path / "out"), "--model", str(fake)]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err


def test_label_png_depth(tmp_path):
    from diffseg.evaluation.datasets import read_label_png

    labels = np.arange(600, dtype=np.int32).reshape(20, 30)
    save_label_png(tmp_path / "big.png", labels)
    im = Image.open(tmp_path / "big.png")
    assert im.mode.startswith("I")  # 16-bit
    assert np.array_equal(np.asarray(im), labels)
    assert np.array_equal(read_label_png(tmp_path / "big.png"), labels)
    save_label_png(tmp_path / "small.png", labels % 256)
    assert Image.open(tmp_path / "small.png").mode == "L"
    with pytest.raises(ValueError):
        save_label_png(tmp_path / "neg.png", labels - 1)


def test_subprocess_with_tiny_bundle(tiny_bundle, photos, tmp_path):
    pytest.importorskip("diffseg._torch")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(diffseg.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "diffseg", "segment", str(photos / "wide.png"),
                           str(photos / "tall.jpg"), "-o", str(out), "--model", str(tiny_bundle)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "2 image(s) segmented" in proc.stderr
    labels, doc = _read(out, "tall")
    assert labels.shape == (50, 30)
    assert doc["made_with"]["settings"]["timestep"] == 300
    assert np.array_equal(records_to_labels(doc["annotations"]), labels)


def test_refine_flag(fake_model, photos, tmp_path):
    out = tmp_path / "out"
    assert main(["segment", str(photos / "wide.png"), "-o", str(out), "-q"]) == 0
    assert main(["segment", str(photos / "wide.png"), "-o", str(out), "-q", "--skip-existing",
                 "--refine"]) == 0
    assert fake_model.calls == 2  # outputs made without refinement are redone
    assert main(["segment", str(photos / "wide.png"), "-o", str(out), "-q", "--skip-existing",
                 "--refine"]) == 0
    assert fake_model.calls == 2  # kept
    labels, doc = _read(out, "wide")
    assert doc["made_with"]["settings"]["refine"] is True
    np.testing.assert_array_equal(labels, diffseg.segment(photos / "wide.png", fake_model, refine=True))
    # outputs that do not record what made them (older diffseg) are made again
    del doc["made_with"]
    (out / "wide.json").write_text(json.dumps(doc))
    calls = fake_model.calls
    assert main(["segment", str(photos / "wide.png"), "-o", str(out), "-q", "--skip-existing", "--refine"]) == 0
    assert fake_model.calls == calls + 1


def test_skip_existing_without_json_reads_the_png_records(fake_model, photos, tmp_path):
    """Label maps alone record their settings (a PNG text chunk): other settings redo them."""
    out = tmp_path / "out"
    wide = str(photos / "wide.png")
    assert main(["segment", wide, "-o", str(out), "-q", "--format", "labels", "--kl-threshold", "0.7"]) == 0
    first = np.asarray(Image.open(out / "wide.labels.png"))
    assert json.loads(Image.open(out / "wide.labels.png").text["diffseg"])["settings"]["kl_threshold"] == [0.7] * 3
    assert main(["segment", wide, "-o", str(out), "-q", "--format", "labels", "--kl-threshold", "0.7",
                 "--skip-existing"]) == 0
    assert fake_model.calls == 1  # same settings: kept
    assert main(["segment", wide, "-o", str(out), "-q", "--format", "labels", "--kl-threshold", "0.05",
                 "--skip-existing"]) == 0
    assert fake_model.calls == 2  # other settings: made again, not kept
    assert not np.array_equal(np.asarray(Image.open(out / "wide.labels.png")), first)
    # the overlay records them too
    assert main(["segment", wide, "-o", str(out), "-q", "--format", "overlay"]) == 0
    assert json.loads(Image.open(out / "wide.overlay.png").text["diffseg"])["settings"]["kl_threshold"] == [1.1] * 3
