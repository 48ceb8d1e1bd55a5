"""diffseg.distributed (Ray Data) against serial runs: the same labels, files and counts."""
import json

import numpy as np
import pytest
from PIL import Image

import diffseg
from diffseg import cli

pytestmark = pytest.mark.reliability
ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from diffseg.distributed import evaluate_dataset, segment_dataset  # noqa: E402
from diffseg.evaluation.datasets import FolderDataset  # noqa: E402
from diffseg.evaluation.runner import evaluate  # noqa: E402

FINE = 0.3  # random tiny-SD attention: one segment at the default 1.1, many at 0.3

@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for k in range(5):
        img = np.random.default_rng(k).integers(0, 256, (128 + 16 * k, 128, 3), dtype=np.uint8)
        img[: 40 + 10 * k] //= 4  # some structure
        Image.fromarray(img).save(folder / f"im{k}.png")
    return folder


@pytest.fixture(scope="module")
def eval_dataset(image_dir, tmp_path_factory):
    labels = tmp_path_factory.mktemp("labels")
    for k, path in enumerate(sorted(image_dir.glob("*.png"))):
        h, w = Image.open(path).size[::-1]
        lab = np.zeros((h, w), np.uint8)
        lab[: 40 + 10 * k] = 1
        lab[:, : w // 3] = 2 + k % 2
        Image.fromarray(lab).save(labels / path.name)
    return FolderDataset(image_dir, labels, n_classes=4, size=64)


def test_segment_dataset_equals_serial(local_ray, tiny_bundle, tiny_model, image_dir):
    """By default one actor uses every core, as a serial run does: the labels
    are equal exactly (libtorch's sums depend on its thread count)."""
    paths = sorted(str(p) for p in image_dir.glob("*.png"))
    records = segment_dataset(paths, tiny_bundle, grid=8, kl_threshold=FINE, as_list=True)
    assert [r["path"] for r in records] == paths and [r["index"] for r in records] == list(range(5))
    for r, path in zip(records, paths):
        want = diffseg.segment(path, tiny_model, grid=8, kl_threshold=FINE)
        assert want.max() >= 2  # many segments: the comparison can fail
        np.testing.assert_array_equal(r["labels"], want)


def test_actors_share_the_cores(local_ray, tiny_bundle, tiny_model, image_dir):
    """Two actors on two cores: one thread each (Ray's OMP_NUM_THREADS=1 does
    not decide it); their labels equal a serial one-thread run's."""
    from diffseg.distributed import actor_threads

    assert actor_threads(None, 2) == 1 and actor_threads(None, 1) == 2 and actor_threads(None, (1, 4)) == 1
    assert actor_threads(3, 2) == 3
    paths = sorted(str(p) for p in image_dir.glob("*.png"))
    settings = diffseg.Settings(grid=8, kl_threshold=FINE)
    records = segment_dataset(paths, tiny_bundle, settings, actors=2, ray_batch_size=2, as_list=True)
    before = diffseg.get_num_threads()
    diffseg.set_num_threads(1)
    try:
        for r, path in zip(records, paths):
            np.testing.assert_array_equal(r["labels"], diffseg.segment(path, tiny_model, settings))
    finally:
        diffseg.set_num_threads(before)


def test_dataset_input_gets_index_and_stored_orientation(local_ray, tiny_bundle, tiny_model, image_dir):
    """A ray.data Dataset without an index column: records get their row
    numbers; read_images gives the images as stored (no EXIF rotation)."""
    ds = ray.data.read_images(str(image_dir), include_paths=True)
    records = segment_dataset(ds, tiny_bundle, grid=8, kl_threshold=FINE, as_list=True)
    assert [r["index"] for r in records] == list(range(5))
    for r in records:
        rgb = diffseg.load_image(r["path"], exif_transpose=False)
        want = diffseg.segment(rgb, tiny_model, grid=8, kl_threshold=FINE)
        assert want.max() >= 2
        np.testing.assert_array_equal(r["labels"], want)


def test_evaluate_dataset_equals_serial(local_ray, tiny_bundle, tiny_model, eval_dataset, tmp_path):
    thresholds = [1.1, FINE]
    serial = evaluate(eval_dataset, tiny_model, kl_threshold=thresholds, grid=8, progress=False)
    distributed = evaluate_dataset(eval_dataset, tiny_bundle, kl_threshold=thresholds, grid=8, actors=2,
                                   ray_batch_size=2, output_dir=tmp_path)
    assert distributed["images"] == serial["images"] == 5
    for got, want in zip(distributed["settings"], serial["settings"]):
        for key in ("tp", "fp", "fn", "images", "valid_pixels", "pixel_accuracy", "miou", "settings"):
            assert got[key] == want[key], key
    assert sum(serial["settings"][0]["tp"]) > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["settings"][0]["tp"] == serial["settings"][0]["tp"]
    assert saved["attention"]["bundle_metadata"]["model_id"] == tiny_model.metadata["model_id"]


FORMATS = "labels,overlay,json"


def test_cli_segment_ray_writes_the_serial_files(local_ray, tiny_bundle, image_dir, tmp_path):
    """Byte-identical files, with the defaults: one actor uses every core, as
    the serial run does."""
    assert cli.main(["segment", str(image_dir), "-o", str(tmp_path / "serial"), "--model", tiny_bundle,
                     "--grid", "8", "--kl-threshold", str(FINE), "-q", "--format", FORMATS]) == 0
    assert cli.main(["segment", str(image_dir), "-o", str(tmp_path / "ray"), "--model", tiny_bundle,
                     "--grid", "8", "--kl-threshold", str(FINE), "-q", "--format", FORMATS, "--ray"]) == 0
    serial = sorted(p.name for p in (tmp_path / "serial").iterdir())
    assert len(serial) == 15 and serial == sorted(p.name for p in (tmp_path / "ray").iterdir())
    for name in serial:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "serial" / name).read_bytes(), name


def test_cli_ray_quiet_and_one_prefix_per_error(tiny_bundle, image_dir, tmp_path):
    """-q silences Ray's own log lines; a failed image is one line with one prefix."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    env = {**os.environ, "PYTHONPATH": str(Path(diffseg.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "diffseg", "segment", str(image_dir / "im0.png"), str(broken),
                           "-o", str(tmp_path / "out"), "--model", tiny_bundle, "--grid", "8", "-q", "--ray"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 1, proc.stderr
    # Ray's C++ core logs one notice of its own at actor creation (actors that may restart keep their
    # arguments in the object store); nothing else of Ray's: no progress, no INFO lines
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "core_worker.cc" not in line]
    assert len(lines) == 2, lines  # the failure and the summary (-q keeps it when something failed)
    assert lines[0].startswith("diffseg segment: skipped") and "broken.png" in lines[0]
    assert lines[1].startswith("diffseg segment: 1 image(s) segmented") and lines[1].endswith("1 failed")
    assert all(line.count("diffseg segment:") == 1 for line in lines)


def test_cli_eval_ray_equals_serial(local_ray, tiny_bundle, eval_dataset, tmp_path):
    common = ["eval", "--dataset", "folder", "--image-dir", str(eval_dataset.image_dir), "--label-dir",
              str(eval_dataset.label_dir), "--n-classes", "4", "--size", "64", "--model", tiny_bundle,
              "--grid", "8", "--kl-threshold", str(FINE), "--no-progress"]
    assert cli.main(common + ["-o", str(tmp_path / "serial")]) == 0
    assert cli.main(common + ["-o", str(tmp_path / "ray"), "--ray", "--actors", "2"]) == 0
    serial = json.loads((tmp_path / "serial" / "results.json").read_text())
    distributed = json.loads((tmp_path / "ray" / "results.json").read_text())
    for key in ("tp", "fp", "fn", "pixel_accuracy", "miou", "iou"):
        assert distributed["settings"][0][key] == serial["settings"][0][key], key


def test_bad_arguments(local_ray, tiny_bundle, tmp_path):
    with pytest.raises(ValueError, match="actors"):
        segment_dataset(["a.png"], tiny_bundle, actors=0)
    with pytest.raises(ValueError, match="actors"):
        segment_dataset(["a.png"], tiny_bundle, actors=(3, 2))
    with pytest.raises(ValueError, match="ray_batch_size"):
        segment_dataset(["a.png"], tiny_bundle, ray_batch_size=0)
    with pytest.raises(ValueError, match="grid"):
        segment_dataset(["a.png"], tiny_bundle, grid=100)
    with pytest.raises(ValueError, match="num_cpus"):
        segment_dataset(["a.png"], tiny_bundle, num_cpus=0)
    with pytest.raises(ValueError, match="batch_size"):
        segment_dataset(["a.png"], tiny_bundle, batch_size=0)
    with pytest.raises(TypeError, match="model"):
        segment_dataset(["a.png"], object())
    with pytest.raises(FileNotFoundError, match="model"):
        segment_dataset(["a.png"], tmp_path / "missing.pt")
    with pytest.raises(TypeError, match="data"):
        segment_dataset("a.png", tiny_bundle)
