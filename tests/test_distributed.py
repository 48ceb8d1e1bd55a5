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
    paths = sorted(str(p) for p in image_dir.glob("*.png"))
    records = segment_dataset(paths, tiny_bundle, concurrency=2, batch_size=2, grid=8, as_list=True)
    assert [r["path"] for r in records] == paths
    for r, path in zip(records, paths):
        np.testing.assert_array_equal(r["labels"], diffseg.segment(path, tiny_model, grid=8))


def test_evaluate_dataset_equals_serial(local_ray, tiny_bundle, tiny_model, eval_dataset, tmp_path):
    settings = [1.1, 0.5]
    serial = evaluate(eval_dataset, tiny_model, kl_threshold=settings, grid=8, progress=False)
    distributed = evaluate_dataset(eval_dataset, tiny_bundle, kl_threshold=settings, grid=8, concurrency=2,
                                   batch_size=2, output_dir=tmp_path)
    assert distributed["images"] == serial["images"] == 5
    for got, want in zip(distributed["settings"], serial["settings"]):
        for key in ("tp", "fp", "fn", "images", "valid_pixels", "pixel_accuracy", "miou", "kl_threshold"):
            assert got[key] == want[key], key
    assert sum(serial["settings"][0]["tp"]) > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["settings"][0]["tp"] == serial["settings"][0]["tp"]


FORMATS = "labels,overlay,json"


def test_cli_segment_ray_writes_the_serial_files(local_ray, tiny_bundle, image_dir, tmp_path):
    """Byte-identical files. libtorch's sums depend on its thread count (Ray
    actors default to one thread), so both runs use --threads 1; the C core's
    results do not depend on it."""
    assert cli.main(["segment", str(image_dir), "-o", str(tmp_path / "serial"), "--model", tiny_bundle,
                     "--grid", "8", "-q", "--format", FORMATS, "--threads", "1"]) == 0
    assert cli.main(["segment", str(image_dir), "-o", str(tmp_path / "ray"), "--model", tiny_bundle,
                     "--grid", "8", "-q", "--format", FORMATS, "--threads", "1", "--ray", "--actors", "2"]) == 0
    serial = sorted(p.name for p in (tmp_path / "serial").iterdir())
    assert len(serial) == 15 and serial == sorted(p.name for p in (tmp_path / "ray").iterdir())
    for name in serial:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "serial" / name).read_bytes(), name


def test_cli_eval_ray_equals_serial(local_ray, tiny_bundle, eval_dataset, tmp_path):
    common = ["eval", "--dataset", "folder", "--image-dir", str(eval_dataset.image_dir), "--label-dir",
              str(eval_dataset.label_dir), "--n-classes", "4", "--size", "64", "--model", tiny_bundle,
              "--grid", "8", "--no-progress"]
    assert cli.main(common + ["-o", str(tmp_path / "serial")]) == 0
    assert cli.main(common + ["-o", str(tmp_path / "ray"), "--ray", "--actors", "2"]) == 0
    serial = json.loads((tmp_path / "serial" / "results.json").read_text())
    distributed = json.loads((tmp_path / "ray" / "results.json").read_text())
    for key in ("tp", "fp", "fn", "pixel_accuracy", "miou", "iou"):
        assert distributed["settings"][0][key] == serial["settings"][0][key], key


def test_bad_arguments(local_ray, tiny_bundle, tmp_path):
    with pytest.raises(ValueError, match="concurrency"):
        segment_dataset(["a.png"], tiny_bundle, concurrency=0)
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
