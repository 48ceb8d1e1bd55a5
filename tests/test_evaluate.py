"""diffseg.evaluate (diffseg/evaluation.py) and `diffseg eval` on precomputed attention (no model)."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import diffseg
from diffseg import cli
from diffseg.io.attention import attention_record, read_attention_record, save_attention
from diffseg.evaluation.datasets import COCO_CURATED_LIST, CocoStuff27, Cityscapes, FolderDataset
from diffseg.evaluation.runner import evaluate, evaluation_settings, markdown_table, setting_label
from diffseg.evaluation.metrics import HungarianMetrics

R = 16          # latent side of the test attention (resolutions 16, 8, 4)
GRID = 4        # 16 anchors
LABEL = 32      # label maps after the crop: 32 x 32 (2 x R)
N_CLASSES = 5


def planted_attention(blocks, rng, noise=0.3, eps=0.05):
    """Row-stochastic attention at 16, 8 and 4 for a 4 x 4 block partition:
    each query attends to its own region (plus a floor eps), with
    multiplicative noise so that different KL thresholds disagree."""
    region16 = np.kron(blocks, np.ones((4, 4), int))
    attn = {}
    for s in (16, 8, 4):
        reg = region16[:: 16 // s, :: 16 // s].ravel()
        same = (reg[:, None] == reg[None, :]).astype(np.float64)
        rows = (1 - eps) * same / same.sum(1, keepdims=True) + eps / (s * s)
        rows *= rng.uniform(1 - noise, 1 + noise, rows.shape)
        attn[s] = (rows / rows.sum(1, keepdims=True)).astype(np.float32)
    return attn


def recorded(image_shape, image_path=None, **changes):
    """The record that diffseg writes with attention made from this image."""
    return {**attention_record(image_path=image_path, image_shape=image_shape, exif_applied=False, exif_rotated=False,
                               decoder=None, frame="crop", timestep=300), **changes}


def make_eval_folder(root, n_images=5, seed=0):
    """A folder dataset (40 x 32 label PNGs: the centre 32 x 32 is the crop) and
    one attention .npz per image."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "attn").mkdir()
    for k in range(n_images):
        stem = f"im{k:02d}"
        blocks = rng.integers(0, int(rng.integers(2, 5)), (4, 4))
        classes = rng.permutation(N_CLASSES)[blocks]          # region -> class
        lab = np.kron(classes, np.ones((8, 8), int)).astype(np.uint8)  # 32 x 32
        lab[rng.random(lab.shape) < 0.03] = 255                  # ignored pixels
        full = np.full((40, 32), 4, np.uint8)                    # rows cropped away
        full[4:36] = lab
        Image.fromarray(full).save(root / "labels" / f"{stem}.png")
        Image.fromarray(rng.integers(0, 256, (40, 32, 3), dtype=np.uint8)).save(root / "images" / f"{stem}.png")
        save_attention(root / "attn" / f"{stem}.npz", planted_attention(blocks, rng),
                       record=recorded((40, 32), root / "images" / f"{stem}.png"))
    return FolderDataset(root / "images", root / "labels", n_classes=N_CLASSES, size=LABEL)


@pytest.fixture
def folder(tmp_path):
    return make_eval_folder(tmp_path / "data")


# within a region the test attention has KL ~0.01, across regions ~3: thresholds
# near 0.01 split regions, larger ones do not
SETTINGS = [1.1, 0.011, (0.009, 1.1, 1.1)]


@pytest.fixture(autouse=True)
def _one_thread(one_core_thread):
    """Tiny matrices: threads only add overhead (and 2 CPUs are shared)."""


def by_hand(dataset, attn_dir, setting, limit=None):
    """The same evaluation, spelled out with the pure-NumPy reference stages."""
    m = HungarianMetrics(dataset.n_classes)
    for k, s in enumerate(dataset):
        if limit is not None and k == limit:
            break
        attn = diffseg.load_attention(attn_dir / f"{s.id}.npz")
        pred = diffseg.reference.segment_attention(attn, kl_threshold=setting, grid=GRID, size=s.label.shape)
        m.update(pred, s.label)
    return m.compute()


def strip_time(results):
    out = json.loads(json.dumps(results, default=str))
    for key in ("seconds_per_image", "attention_seconds_per_image"):
        out.pop(key, None)
    for row in out["settings"]:
        row.pop("seconds_per_image")
    return out


def test_several_settings_match_separate_runs(folder, tmp_path):
    attn_dir = tmp_path / "data" / "attn"
    res = evaluate(folder, kl_threshold=SETTINGS, attention_dir=attn_dir, grid=GRID, progress=False)
    assert res["images"] == 5 and res["protocol"] == "per-image"
    assert [r["label"] for r in res["settings"]] == ["1.1", "0.011", "0.009,1.1,1.1"]
    accs = set()
    for setting, row in zip(SETTINGS, res["settings"]):
        want = by_hand(folder, attn_dir, setting)
        assert row["pixel_accuracy"] == want["pixel_accuracy"]
        assert row["miou"] == want["miou"]
        assert (row["tp"], row["fp"], row["fn"]) == (want["tp"], want["fp"], want["fn"])
        assert list(row["iou"]) == [str(c) for c in range(N_CLASSES)]
        assert 0 <= row["pixel_accuracy"] <= 1 and 0 <= row["miou"] <= 1
        accs.add(row["pixel_accuracy"])
    assert len(accs) > 1  # the settings do differ on this data
    assert max(accs) > 0.9  # the planted regions are found


def test_limit_and_default_threshold(folder, tmp_path):
    import diffseg.evaluation.runner  # noqa: F401  (importing the module must not shadow the function)

    res = diffseg.evaluate(folder, attention_dir=tmp_path / "data" / "attn", grid=GRID, limit=2, progress=False)
    assert res["images"] == 2 and len(res["settings"]) == 1
    assert res["settings"][0]["settings"]["kl_threshold"] == [1.1, 1.1, 1.1]
    want = by_hand(folder, tmp_path / "data" / "attn", 1.1, limit=2)
    assert (res["settings"][0]["tp"], res["settings"][0]["fp"], res["settings"][0]["fn"]) == \
        (want["tp"], want["fp"], want["fn"])


def test_outputs_and_resume_after_interruption(folder, tmp_path):
    attn_dir = tmp_path / "data" / "attn"
    full = evaluate(folder, kl_threshold=SETTINGS, attention_dir=attn_dir, grid=GRID,
                    output_dir=tmp_path / "full", progress=False)

    class Interrupted:  # the dataset dies while reading item 3
        def __init__(self, ds):
            self.ds, self.ids, self.n_classes = ds, ds.ids, ds.n_classes
            self.class_names, self.describe = ds.class_names, ds.describe

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            if i == 3:
                raise KeyboardInterrupt
            return self.ds[i]

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        evaluate(Interrupted(folder), kl_threshold=SETTINGS, attention_dir=attn_dir, grid=GRID,
                 output_dir=out, progress=False)
    state = json.loads((out / "state.json").read_text())
    assert state["done"] == ["im00", "im01", "im02"]
    assert not (out / "results.json").exists()

    seen = []  # what the resumed run reads
    orig = folder.load_label
    folder.load_label = lambda i: seen.append(i) or orig(i)
    resumed = evaluate(folder, kl_threshold=SETTINGS, attention_dir=attn_dir, grid=GRID,
                       output_dir=out, progress=False)
    assert seen == [3, 4]  # done images are skipped
    assert strip_time(resumed) == strip_time(full)
    saved = json.loads((out / "results.json").read_text())
    assert strip_time(saved) == strip_time(json.loads((tmp_path / "full" / "results.json").read_text()))
    # a finished run resumes to the same numbers without work
    seen.clear()
    again = evaluate(folder, kl_threshold=SETTINGS, attention_dir=attn_dir, grid=GRID,
                     output_dir=out, progress=False)
    assert seen == [] and strip_time(again) == strip_time(full)
    # other settings: refused, unless starting over
    with pytest.raises(ValueError, match="different settings.*kl_threshold"):
        evaluate(folder, kl_threshold=0.7, attention_dir=attn_dir, grid=GRID, output_dir=out,
                 progress=False)
    fresh = evaluate(folder, kl_threshold=0.7, attention_dir=attn_dir, grid=GRID, output_dir=out,
                     resume=False, progress=False)
    assert fresh["images"] == 5

    md = (tmp_path / "full" / "results.md").read_text()
    assert "| KL threshold | grid | refine | ACC (%) | mIoU (%) | images | s / image |" in md
    acc = full["settings"][0]["pixel_accuracy"]
    assert f"| 1.1 | {GRID} | no | {100 * acc:.2f} |" in md
    assert "## Per-class IoU (%)" in md and "| 4 |" in md
    assert "per image" in md


def test_nan_iou_is_null_in_json(tmp_path):
    data = make_eval_folder(tmp_path / "data", n_images=1, seed=3)
    ds = FolderDataset(data.image_dir, data.label_dir, n_classes=8, size=LABEL)  # 5..7 never occur
    res = evaluate(ds, attention_dir=tmp_path / "data" / "attn", grid=GRID,
                   output_dir=tmp_path / "out", progress=False)
    assert np.isnan(res["settings"][0]["iou"]["7"])
    text = (tmp_path / "out" / "results.json").read_text()
    assert json.loads(text)["settings"][0]["iou"]["7"] is None  # strict JSON, no NaN
    assert "n/a" in markdown_table(res)


def test_fake_model_and_attention_cache(folder, tmp_path):
    attn_dir = tmp_path / "data" / "attn"

    class FakeModel:
        name = "fake"

        def __init__(self):
            self.calls = 0

        def attention(self, image, timestep=None):
            assert image.dtype == np.uint8 and image.shape == (40, 32, 3)
            self.calls += 1
            return diffseg.load_attention(attn_dir / f"im{self.calls - 1:02d}.npz")

    want = evaluate(folder, kl_threshold=SETTINGS, attention_dir=attn_dir, grid=GRID, progress=False)
    model = FakeModel()
    got = evaluate(folder, model, kl_threshold=SETTINGS, grid=GRID, progress=False)
    assert model.calls == 5  # one attention computation per image for all settings
    assert strip_time(got)["settings"] == strip_time(want)["settings"]
    cache = tmp_path / "cache"
    model = FakeModel()
    evaluate(folder, model, attention_dir=cache, grid=GRID, limit=2, progress=False)
    assert sorted(p.name for p in cache.glob("*.npz")) == ["im00.npz", "im01.npz"]
    model = FakeModel()
    evaluate(folder, model, attention_dir=cache, grid=GRID, limit=2, progress=False)
    assert model.calls == 0  # read back from the cache


def test_tuple_dataset(folder, tmp_path):
    attn_dir = tmp_path / "data" / "attn"
    items = [(s.id, None, s.label) for s in folder]
    got = evaluate(items, attention_dir=attn_dir, grid=GRID, n_classes=N_CLASSES, progress=False)
    want = evaluate(folder, attention_dir=attn_dir, grid=GRID, progress=False)
    assert strip_time(got)["settings"] == strip_time(want)["settings"]


def test_bad_arguments(folder, tmp_path):
    attn_dir = tmp_path / "data" / "attn"
    with pytest.raises(ValueError, match="model or attention_dir"):
        evaluate(folder)
    with pytest.raises(FileNotFoundError, match="attention_dir"):
        evaluate(folder, attention_dir=tmp_path / "nope")
    (attn_dir / "im03.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 5 attention files(.|\n)*im03\.npz"):
        evaluate(folder, attention_dir=attn_dir, grid=GRID, progress=False)
    with pytest.raises(ValueError, match="given twice"):
        evaluate(folder, attention_dir=attn_dir, kl_threshold=[1.1, (1.1, 1.1, 1.1)], limit=1)
    with pytest.raises(ValueError, match="protocol"):
        evaluate(folder, attention_dir=attn_dir, protocol="per-pixel", limit=1)
    with pytest.raises(ValueError, match="limit"):
        evaluate(folder, attention_dir=attn_dir, limit=0)
    with pytest.raises(TypeError, match="attention"):
        evaluate(folder, object(), limit=1)
    # per-dataset needs dataset-wide ids; DiffSeg's per-image segments have more
    with pytest.raises(ValueError, match="per-dataset"):
        evaluate(folder, attention_dir=attn_dir, grid=GRID, protocol="per-dataset",
                 kl_threshold=0.001, limit=1, progress=False)


def test_evaluation_settings():
    from diffseg import Settings

    crop = Settings(frame="crop")
    assert evaluation_settings(dataset=None) == [crop]  # no dataset: COCO-Stuff's 1.1 on the crop
    assert evaluation_settings(kl_threshold=[0.9, 1.1]) == [crop.replace(kl_threshold=0.9), crop]
    assert evaluation_settings(kl_threshold=["0.9,1,1.1", 1.2]) == [crop.replace(kl_threshold=(0.9, 1, 1.1)),
                                                                   crop.replace(kl_threshold=1.2)]
    two = evaluation_settings(kl_threshold=[(0.5, 0.5)], iterations=2)[0]
    assert two.kl_threshold == (0.5, 0.5) and two.iterations == 2
    # several Settings: they may differ in threshold, iterations, grid and refinement
    several = [crop, crop.replace(grid=8), crop.replace(refine=True)]
    assert evaluation_settings(several) == several
    assert [setting_label(s, several) for s in several] == ["1.1 grid 16 no refine", "1.1 grid 8 no refine",
                                                              "1.1 grid 16 refine"]
    assert setting_label(crop.replace(kl_threshold=(0.9, 1.0, 1.1))) == "0.9,1,1.1"
    assert setting_label(crop.replace(kl_threshold=0.9, iterations=2)) == "0.9 x2"
    with pytest.raises(ValueError, match="same timestep"):
        evaluation_settings([crop, crop.replace(timestep=200)])
    with pytest.raises(ValueError, match="frame='crop'"):
        evaluation_settings(Settings())  # the whole frame is not the published protocol
    with pytest.raises(ValueError, match="does not name segments"):
        evaluation_settings(crop.replace(vocabulary=["cat"]))
    with pytest.raises(ValueError, match="twice"):
        evaluation_settings([crop, crop])
    for bad in ([], ["x"], [-1.0], [(1.0, float("nan"), 1.0)], [(1.0, 1.0)]):
        with pytest.raises((ValueError, TypeError), match="kl_threshold"):
            evaluation_settings(kl_threshold=bad)


# -- command line --------------------------------------------------------------------
def test_cli_folder_end_to_end(folder, tmp_path, capsys):
    data = tmp_path / "data"
    out = tmp_path / "out"
    argv = ["eval", "--dataset", "folder", "--root", str(data), "--attention-dir", str(data / "attn"),
            "--n-classes", str(N_CLASSES), "--size", str(LABEL), "--grid", str(GRID),
            "--kl-threshold", "1.1", "--kl-threshold", "0.011,0.011,0.011", "--kl-threshold", "0.009,1.1,1.1",
            "-o", str(out), "--no-progress", "--threads", "1"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| KL threshold |" in printed and "results.json" in printed
    res = json.loads((out / "results.json").read_text())
    api = evaluate(folder, kl_threshold=SETTINGS, attention_dir=data / "attn", grid=GRID, progress=False)
    assert strip_time(res)["settings"] == strip_time(api)["settings"]
    assert (out / "results.md").is_file() and (out / "state.json").is_file()
    # a user error: printed, no traceback, exit code 2
    assert cli.main(["eval", "--dataset", "folder", "--root", str(data), "-o", str(out)]) == 2
    assert "--attention-dir" in capsys.readouterr().err
    assert cli.main(["eval", "--dataset", "pascal", "--root", str(data),
                     "--attention-dir", str(data / "attn")]) == 2
    assert "dataset must be one of" in capsys.readouterr().err


def write_coco_with_attention(root, n=3):
    rng = np.random.default_rng(11)
    ids = [f"{k:012d}" for k in (139, 285, 632)][:n]
    lab_dir = root / "annotations" / "val2017"
    lab_dir.mkdir(parents=True)
    (root / "attn").mkdir()
    fine_ids = np.array([0, 2, 15, 105, 148, 168])  # person, car, bird, clouds, road, tree
    for i in ids:
        blocks = rng.integers(0, 3, (4, 4))
        fine = fine_ids[rng.permutation(len(fine_ids))[:3]][blocks]
        lab = np.kron(fine, np.ones((8, 8), int)).astype(np.uint8)
        lab[0] = 255
        full = np.zeros((32, 48), np.uint8)
        full[:, 8:40] = lab
        Image.fromarray(full).save(lab_dir / f"{i}.png")
        save_attention(root / "attn" / f"{i}.npz", planted_attention(blocks, rng, noise=0.1), record=recorded((32, 48)))
    lst = root / "curated" / "val2017" / COCO_CURATED_LIST
    lst.parent.mkdir(parents=True)
    lst.write_text("\n".join(ids) + "\n")
    return ids


def test_cli_coco_stuff_subprocess(tmp_path):
    """`python -m diffseg eval` on a COCO-Stuff layout without images."""
    write_coco_with_attention(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "diffseg", "eval", "--dataset", "coco-stuff-27",
           "--root", str(tmp_path), "--attention-dir", str(tmp_path / "attn"), "--size", "32",
           "--grid", str(GRID), "-o", str(out), "--no-progress"]
    # cwd away from the source tree: the installed package runs, not the unbuilt sources
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"]["name"] == "coco-stuff-27" and res["images"] == 3
    row = res["settings"][0]
    assert row["settings"]["kl_threshold"] == [1.1, 1.1, 1.1]
    assert set(row["iou"]) == set(CocoStuff27.class_names)
    assert row["pixel_accuracy"] > 0.9
    assert row["iou"]["water"] is None  # never occurs
    # same numbers through the API
    ds = CocoStuff27(tmp_path, size=32, require_images=False)
    api = evaluate(ds, attention_dir=tmp_path / "attn", grid=GRID, progress=False)
    assert api["settings"][0]["tp"] == row["tp"]


def test_cityscapes_from_attention(tmp_path):
    rng = np.random.default_rng(2)
    lab_dir = tmp_path / "gtFine" / "val" / "lindau"
    lab_dir.mkdir(parents=True)
    (tmp_path / "attn").mkdir()
    for k in range(2):
        i = f"lindau_000000_{k:06d}"
        # no images: the ids (image stems) come from the label names
        blocks = rng.integers(0, 3, (4, 4))
        ids = np.array([7, 11, 26])[blocks]  # road, building, car
        lab = np.zeros((32, 64), np.uint8)  # labelId 0: ignored, and cropped anyway
        lab[:, 16:48] = np.kron(ids, np.ones((8, 8), int))
        Image.fromarray(lab).save(lab_dir / f"{i}_gtFine_labelIds.png")
        save_attention(tmp_path / "attn" / f"{i}_leftImg8bit.npz", planted_attention(blocks, rng, noise=0.1),
                       record=recorded((32, 64)))
    ds = Cityscapes(tmp_path, size=32, require_images=False)
    assert ds.ids == ["lindau_000000_000000_leftImg8bit", "lindau_000000_000001_leftImg8bit"]
    res = evaluate(ds, attention_dir=tmp_path / "attn", grid=GRID, progress=False)
    row = res["settings"][0]
    assert row["settings"]["kl_threshold"] == [0.9, 0.9, 0.9]  # the Cityscapes default
    assert row["pixel_accuracy"] > 0.9
    assert row["iou"]["road"] > 0.8 and row["iou"]["sky"] is not None and np.isnan(row["iou"]["sky"])


def test_cli_with_model(folder, tmp_path, monkeypatch, capsys):
    """--model goes through diffseg.sd.model.load_model (replaced by a fake here);
    --attention-dir is then a cache."""
    model_mod = pytest.importorskip("diffseg.sd.model")
    data = tmp_path / "data"
    calls = []

    class FakeModel:
        def attention(self, image, timestep=None):
            calls.append(image.shape)
            return diffseg.load_attention(data / "attn" / f"im{len(calls) - 1:02d}.npz")

    def fake_load_model(path, **kw):
        assert path == "bundle.pt" and kw["device"] == "cpu"
        return FakeModel()

    monkeypatch.setattr(model_mod, "load_model", fake_load_model)
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["eval", "--dataset", "folder", "--root", str(data), "--model", "bundle.pt",
            "--device", "cpu", "--attention-dir", str(cache), "--n-classes", str(N_CLASSES),
            "--size", str(LABEL), "--grid", str(GRID), "--limit", "3", "-o", str(out), "--no-progress"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert calls == [(40, 32, 3)] * 3  # the original images, once each
    assert sorted(p.name for p in cache.glob("*.npz")) == ["im00.npz", "im01.npz", "im02.npz"]
    res = json.loads((out / "results.json").read_text())
    api = evaluate(folder, attention_dir=data / "attn", grid=GRID, limit=3, progress=False)
    assert strip_time(res)["settings"] == strip_time(api)["settings"]


def test_resume_refuses_other_attention_source(folder, tmp_path):
    """A results folder made from one attention folder is not resumed from
    another (it used to report the new source with the old numbers)."""
    coco = tmp_path / "data" / "attn"
    gt = tmp_path / "gt"
    gt.mkdir()
    rng = np.random.default_rng(7)
    for s in folder:
        save_attention(gt / f"{s.id}.npz", planted_attention(rng.integers(0, 2, (4, 4)), rng),
                       record=recorded((40, 32), s.image_path))
    out = tmp_path / "out"
    first = evaluate(folder, attention_dir=coco, grid=GRID, output_dir=out, progress=False)
    with pytest.raises(ValueError, match=r"attention: saved .*attn.*, now .*gt"):
        evaluate(folder, attention_dir=gt, grid=GRID, output_dir=out, progress=False)
    fresh = evaluate(folder, attention_dir=gt, grid=GRID, output_dir=out, resume=False, progress=False)
    assert fresh["settings"][0]["tp"] != first["settings"][0]["tp"]
    # the CLI: one line, exit 2, nothing overwritten
    argv = ["eval", "--dataset", "folder", "--root", str(tmp_path / "data"), "--n-classes", str(N_CLASSES),
            "--size", str(LABEL), "--grid", str(GRID), "--attention-dir", str(coco), "-o", str(out),
            "--no-progress"]
    assert cli.main(argv) == 2


def test_resume_refuses_rewritten_attention_file(folder, tmp_path):
    attn_dir = tmp_path / "data" / "attn"
    out = tmp_path / "out"
    evaluate(folder, attention_dir=attn_dir, grid=GRID, output_dir=out, progress=False, limit=2)
    first = sorted(attn_dir.glob("*.npz"))[0]
    rng = np.random.default_rng(3)
    save_attention(first, planted_attention(rng.integers(0, 3, (4, 4)), rng),  # regenerated in place
                   record=read_attention_record(first))
    with pytest.raises(ValueError, match=f"{first.name}.*rewritten"):
        evaluate(folder, attention_dir=attn_dir, grid=GRID, output_dir=out, progress=False)


def test_resume_is_keyed_on_the_model_bundle(folder, tmp_path):
    """A model's identity (bundle path, size, mtime, export stamp) is part of the saved settings."""
    class Bundle:
        def __init__(self, path, created):
            self.path, self.metadata = path, {"model_id": "m", "created": created}
            self.attn = {s.id: diffseg.load_attention(tmp_path / "data" / "attn" / f"{s.id}.npz")
                         for s in folder}

        def attention(self, image, timestep=None):
            return next(iter(self.attn.values()))

    bundle = tmp_path / "b.pt"
    bundle.write_bytes(b"x")
    out = tmp_path / "out"
    evaluate(folder, Bundle(bundle, "2026-01-01"), grid=GRID, output_dir=out, progress=False, limit=2)
    evaluate(folder, Bundle(bundle, "2026-01-01"), grid=GRID, output_dir=out, progress=False, limit=3)
    with pytest.raises(ValueError, match="attention: saved .*2026-01-01.*now .*2026-02-02"):
        evaluate(folder, Bundle(bundle, "2026-02-02"), grid=GRID, output_dir=out, progress=False)


def test_attention_cache_belongs_to_one_model(folder, tmp_path):
    """A cache filled by one model is not read for another (it used to be, silently)."""
    (tmp_path / "b.pt").write_bytes(b"x")

    class Bundle:
        def __init__(self, created):
            self.path, self.metadata = tmp_path / "b.pt", {"model_id": "m", "created": created}
            self.attn = diffseg.load_attention(tmp_path / "data" / "attn" / "im00.npz")

        def attention(self, image, timestep=None):
            return self.attn

    cache = tmp_path / "cache"
    evaluate(folder, Bundle("2026-01-01"), attention_dir=cache, grid=GRID, limit=2, progress=False)
    evaluate(folder, Bundle("2026-01-01"), attention_dir=cache, grid=GRID, limit=3, progress=False)
    with pytest.raises(ValueError, match="caches the attention of another model"):
        evaluate(folder, Bundle("2026-02-02"), attention_dir=cache, grid=GRID, limit=2, progress=False)


def test_refine_matches_by_hand_and_keys_the_resume(folder, tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    res = evaluate(folder, kl_threshold=0.011, attention_dir=data / "attn", grid=GRID, refine=True,
                   output_dir=out, progress=False)
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    m = HungarianMetrics(folder.n_classes)
    for s in folder:  # the oracle: the reference merge, scikit-learn's k-means (the official refine), the reference NMS
        attn = diffseg.load_attention(data / "attn" / f"{s.id}.npz")
        A = diffseg.reference.aggregate(attn).astype(np.float64)
        init = diffseg.reference.merge(A, grid=GRID, kl_threshold=0.011).reshape(-1, R * R).astype(np.float64)
        labels = sklearn_cluster.KMeans(n_clusters=len(init), init=init, n_init=1).fit(A).labels_
        means = np.stack([A[labels == j].mean(0) for j in np.unique(labels)]).reshape(-1, R, R)
        m.update(diffseg.reference.nms(means, s.label.shape), s.label)
    want = m.compute()
    row = res["settings"][0]
    assert (row["tp"], row["fp"], row["fn"]) == (want["tp"], want["fp"], want["fn"])
    # a refined run is not resumed without refinement, nor the other way round
    with pytest.raises(ValueError, match="refine"):
        evaluate(folder, kl_threshold=0.011, attention_dir=data / "attn", grid=GRID, output_dir=out,
                 progress=False)
    plain = tmp_path / "plain"
    evaluate(folder, kl_threshold=0.011, attention_dir=data / "attn", grid=GRID, output_dir=plain,
             progress=False)
    with pytest.raises(ValueError, match="refine"):
        evaluate(folder, kl_threshold=0.011, attention_dir=data / "attn", grid=GRID, refine=True,
                 output_dir=plain, progress=False)
    # the CLI flag reaches evaluate
    argv = ["eval", "--dataset", "folder", "--root", str(data), "--attention-dir", str(data / "attn"),
            "--n-classes", str(N_CLASSES), "--size", str(LABEL), "--grid", str(GRID),
            "--kl-threshold", "0.011", "--refine", "-o", str(tmp_path / "cli"), "--no-progress"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    cli_res = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert strip_time(cli_res)["settings"] == strip_time(res)["settings"]


def test_image_and_label_of_other_sizes_are_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """A 64 x 64 image with a 45 x 30 label map would be cropped on its own and
    scored against the wrong pixels: refused, naming the file and both sizes."""
    import diffseg.sd.model as model_mod

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for stem, label_shape in (("a_ok", (64, 64)), ("bad", (30, 45))):
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "images" / f"{stem}.png")
        Image.fromarray(np.zeros(label_shape, np.uint8)).save(root / "labels" / f"{stem}.png")

    def no_model(*a, **kw):
        raise AssertionError("the model must not be opened")

    monkeypatch.setattr(model_mod, "load_model", no_model)
    assert cli.main(["eval", "--dataset", "folder", "--root", str(root), "--n-classes", "2", "--model", "m.pt",
                     "-o", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "1 image(s) and label map(s) differ in size" in err
    assert "bad.png is 64x64, its label map" in err and "45x30" in err and "a_ok.png" not in err
    ds = FolderDataset(root / "images", root / "labels", n_classes=2)

    class Model:
        def attention(self, image, timestep=None):
            raise AssertionError("no UNet pass before the check")

    with pytest.raises(ValueError, match="bad.png is 64x64"):
        evaluate(ds, Model(), progress=False)
    ds.check_sizes(limit=1)  # only "a_ok", which fits


def _one_file(folder, tmp_path, **record_changes):
    """The folder's attention copied, with the first file's record changed."""
    import shutil

    src = tmp_path / "data" / "attn"
    dst = tmp_path / "attn2"
    shutil.copytree(src, dst)
    # the last file: without a model, the first file's bundle is the one the others must share
    first = sorted(dst.glob("*.npz"))[-1 if "bundle" in record_changes else 0]
    record = read_attention_record(first)
    for key, value in record_changes.items():
        if key in record["image"]:
            record["image"][key] = value
        else:
            record[key] = value
    save_attention(first, diffseg.load_attention(first), record=record)
    return dst, first


@pytest.mark.parametrize("change, why", [
    ({"exif_rotated": True}, "turned by its EXIF orientation"),
    ({"height": 32, "width": 40}, "made from a 40x32 image, the dataset's is 32x40"),
    ({"sha256": "0" * 64}, "made from another image"),
    ({"timestep": 200}, "made at timestep 200, the settings say 300"),
    ({"frame": "whole"}, "attention of the whole frame"),
    ({"decoder": "accurate"}, "decoder='accurate', the dataset's is 'official'"),
    ({"bundle": {"model_id": "other"}}, "made by another bundle"),
])
def test_attention_files_that_do_not_match_are_refused(folder, tmp_path, capsys, change, why):
    attn, first = _one_file(folder, tmp_path, **change)
    with pytest.raises(ValueError, match=f"attention file .*{first.name} does not match: .*{why}"):
        evaluate(folder, attention_dir=attn, grid=GRID, progress=False)
    argv = ["eval", "--dataset", "folder", "--root", str(tmp_path / "data"), "--n-classes", str(N_CLASSES),
            "--size", str(LABEL), "--grid", str(GRID), "--attention-dir", str(attn), "-o", str(tmp_path / "out"),
            "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert first.name in err and len(err.strip().splitlines()) == 1


def test_attention_files_of_another_model_are_refused(folder, tmp_path):
    """With a model, the cache's files must come from its bundle."""
    class Model:
        metadata = {"model_id": "mine", "created": "2026-01-01"}

        def attention(self, image, timestep=None):
            raise AssertionError("every file exists")

    with pytest.raises(ValueError, match="made by another bundle"):
        evaluate(folder, Model(), attention_dir=tmp_path / "data" / "attn", grid=GRID, progress=False)


def test_attention_files_without_a_record_are_scored_with_a_warning(folder, tmp_path):
    attn = tmp_path / "data" / "attn"
    for f in attn.glob("*.npz"):
        save_attention(f, diffseg.load_attention(f))  # as an older diffseg wrote them
    with pytest.warns(RuntimeWarning, match="5 attention file.*record nothing"):
        res = evaluate(folder, attention_dir=attn, grid=GRID, progress=False)
    assert res["images"] == 5


def test_cache_files_record_their_source(folder, tmp_path):
    """Attention computed by a model into the cache records the image and the bundle."""
    from diffseg.io.attention import file_sha256

    class Model:
        metadata = {"model_id": "mine", "created": "2026-01-01"}

        def attention(self, image, timestep=None):
            return planted_attention(np.zeros((4, 4), int), np.random.default_rng(0))

    cache = tmp_path / "cache"
    evaluate(folder, Model(), attention_dir=cache, grid=GRID, limit=1, progress=False)
    record = read_attention_record(cache / "im00.npz")
    assert record["image"] == {"sha256": file_sha256(folder[0].image_path), "height": 40, "width": 32,
                               "orientation": "stored", "exif_rotated": False, "decoder": None}
    assert record["bundle"] == {"model_id": "mine", "created": "2026-01-01"}
    assert record["frame"] == "crop" and record["timestep"] == 300


def _stego_folder(root):
    """Three 4 x 4 images; labels: 2 classes; predictions: dataset-wide cluster ids."""
    label_a = np.array([[0, 0, 1, 1]] * 4)
    halves = np.array([[0] * 4] * 2 + [[1] * 4] * 2)
    pred_a = np.array([[1, 1, 0, 0]] * 3 + [[1, 1, 1, 1]])
    pred_b = 1 - halves
    pred_b[3, 3] = 1
    pred_c = halves.copy()  # the clusters the other way round
    for d in ("images", "labels", "preds"):
        (root / d).mkdir(parents=True)
    for name, label, pred in (("a", label_a, pred_a), ("b", halves, pred_b), ("c", halves, pred_c)):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "images" / f"{name}.png")
        Image.fromarray(label.astype(np.uint8)).save(root / "labels" / f"{name}.png")
        Image.fromarray(pred.astype(np.uint8)).save(root / "preds" / f"{name}.png")


def test_stego_protocol_by_hand(tmp_path, capsys):
    """One matching over the dataset. Confusion (rows: classes 0, 1; columns:
    clusters 0, 1) summed over a, b, c = [[8, 16], [13, 11]]: the matching pairs
    class 0 with cluster 1 (16) and class 1 with cluster 0 (13), 29 of 48 pixels.
    TP (16, 13); FP: cluster 1's other 11, cluster 0's other 8; FN: 8, 11."""
    from diffseg.evaluation.runner import score_predictions

    _stego_folder(tmp_path)
    ds = FolderDataset(tmp_path / "images", tmp_path / "labels", n_classes=2, size=4, preprocessing="stego")
    res = score_predictions(ds, tmp_path / "preds", protocol="stego", progress=False, output_dir=tmp_path / "out")
    row = res["settings"][0]
    assert (row["tp"], row["fp"], row["fn"]) == ([16, 13], [11, 8], [8, 11])
    assert row["pixel_accuracy"] == 29 / 48
    assert row["miou"] == pytest.approx((16 / 35 + 13 / 32) / 2)
    # per image, c is matched on its own: 29 + 16 of 48
    crop = FolderDataset(tmp_path / "images", tmp_path / "labels", n_classes=2, size=4)
    assert score_predictions(crop, tmp_path / "preds", progress=False)["settings"][0]["pixel_accuracy"] == 45 / 48
    assert "STEGO's frame" in (tmp_path / "out" / "results.md").read_text()
    # the command line: the same numbers
    assert cli.main(["eval", "--dataset", "folder", "--root", str(tmp_path), "--n-classes", "2", "--size", "4",
                     "--protocol", "stego", "--predictions-dir", str(tmp_path / "preds"), "-o", str(tmp_path / "cli"),
                     "--no-progress"]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "cli" / "results.json").read_text())["settings"][0]["tp"] == [16, 13]
    # STEGO's protocol on DiffSeg's frame, DiffSeg's per-image segments with a dataset-wide matching: refused
    with pytest.raises(ValueError, match="STEGO's frame"):
        score_predictions(crop, tmp_path / "preds", protocol="stego", progress=False)
    with pytest.raises(ValueError, match="numbers its segments per image"):
        evaluate(crop, attention_dir=tmp_path, protocol="stego", progress=False)
    assert cli.main(["eval", "--dataset", "folder", "--root", str(tmp_path), "--n-classes", "2", "--protocol", "stego",
                     "--attention-dir", str(tmp_path), "-o", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "--predictions-dir" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_predictions_at_the_image_size_get_the_label_preprocessing(tmp_path):
    """`diffseg segment` writes labels at the image's size: scored after the labels' crop and resize."""
    from diffseg.evaluation.runner import score_predictions

    folder = make_eval_folder(tmp_path / "data")
    (tmp_path / "preds").mkdir()
    for s in folder:  # the truth itself, at the image's 40 x 32, as <id>.labels.png
        Image.open(s.label_path).save(tmp_path / "preds" / f"{s.id}.labels.png")
    row = score_predictions(folder, tmp_path / "preds", progress=False)["settings"][0]
    assert row["pixel_accuracy"] == 1.0 and row["fp"] == [0] * N_CLASSES
    Image.fromarray(np.zeros((7, 9), np.uint8)).save(tmp_path / "preds" / "im00.labels.png")
    with pytest.raises(ValueError, match="im00.labels.png: a 9x7 prediction fits neither"):
        score_predictions(folder, tmp_path / "preds", progress=False)


def test_results_record_the_bundle(folder, tmp_path):
    """results.json / results.md name the bundle and its metadata, not "model Model"."""
    bundle = tmp_path / "b" / "diffseg_bundle.pt"
    bundle.parent.mkdir()
    bundle.write_bytes(b"x")

    class Model:
        path = str(bundle)
        metadata = {"model_id": "CompVis/stable-diffusion-v1-4", "dtype": "float32", "created": "2026-12-01",
                    "sd_version": "1.x", "unrelated": "not recorded"}

        def attention(self, image, timestep=None):
            return planted_attention(np.zeros((4, 4), int), np.random.default_rng(0))

    res = evaluate(folder, Model(), limit=1, grid=GRID, output_dir=tmp_path / "out", progress=False)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())["attention"]
    assert saved["model"]["path"] == str(bundle.resolve())
    assert saved["bundle_metadata"] == {"model_id": "CompVis/stable-diffusion-v1-4", "dtype": "float32",
                                        "created": "2026-12-01", "sd_version": "1.x"}
    md = (tmp_path / "out" / "results.md").read_text()
    assert f"| source | bundle {bundle.resolve()} (CompVis/stable-diffusion-v1-4, float32) |" in md
    assert res["attention"] == saved
