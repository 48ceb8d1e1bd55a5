"""diffseg.segment_many / diffseg.batch.pipelined: overlapped UNet and post-processing."""
import threading

import numpy as np
import pytest

import diffseg
from diffseg.batch import pipelined, segment_many
from diffseg.synthetic import planted_example
from planted_model import PlantedModel as _PlantedModel


class PlantedModel(_PlantedModel):
    """Planted attention (tests/planted_model.py) with a seed given by the
    image's first pixel, so each image gets its own segments."""

    def __init__(self, fail_on=()):
        super().__init__()
        self.fail_on, self.threads = set(fail_on), set()

    def planted(self, image):
        seed = int(np.asarray(image)[0, 0, 0])
        return 3 + seed % 4, seed

    def attention(self, image, timestep=300, frame="crop"):
        self.threads.add(threading.current_thread().name)
        if self.planted(image)[1] in self.fail_on:
            raise RuntimeError(f"planted failure {self.planted(image)[1]}")
        return super().attention(image, timestep, frame)


def images(n, shape=(40, 32, 3)):
    out = []
    for k in range(n):
        img = np.random.default_rng(k).integers(0, 256, shape, dtype=np.uint8)
        img[0, 0, 0] = k
        out.append(img)
    return out


@pytest.fixture(autouse=True)
def _one_thread(one_core_thread):
    """Tiny matrices: threads only add overhead (and 2 CPUs are shared)."""


@pytest.mark.parametrize("workers", [1, 3])
def test_planted_equals_one_at_a_time(workers):
    model = PlantedModel()
    imgs = images(7)
    want = [diffseg.segment(im, model, kl_threshold=0.9, grid=4) for im in imgs]
    got = list(segment_many(imgs, model, pool_size=workers, kl_threshold=0.9, grid=4))
    assert [i for i, _ in got] == list(range(7))
    for (_, labels), w in zip(got, want):
        assert labels.dtype == w.dtype and labels.shape == (40, 32)
        np.testing.assert_array_equal(labels, w)
    assert len({int(w.max()) for w in want}) > 1  # the images really differ
    assert model.threads == {"MainThread", "diffseg-producer"}  # the UNet ran in the producer


@pytest.mark.parametrize("frame, border", [("crop", -1), ("whole", "nearest")])
def test_detailed_equals_segment_detailed(frame, border):
    model = PlantedModel()
    imgs = images(3)
    for (i, got), im in zip(segment_many(imgs, model, detailed=True, grid=4, frame=frame, border=border), imgs):
        want = diffseg.segment_detailed(im, model, grid=4, frame=frame, border=border)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)


def test_unordered_yields_every_image_once():
    model = PlantedModel()
    got = dict(segment_many(images(6), model, pool_size=3, ordered=False, grid=4))
    assert sorted(got) == list(range(6))
    for i, img in enumerate(images(6)):
        np.testing.assert_array_equal(got[i], diffseg.segment(img, PlantedModel(), grid=4))


def test_errors_per_image():
    model = PlantedModel(fail_on={2})
    imgs = images(5)
    imgs[3] = "no-such-image.png"
    out = list(segment_many(imgs, model, grid=4, return_exceptions=True))
    assert [i for i, _ in out] == list(range(5))
    assert isinstance(out[2][1], RuntimeError) and "planted failure 2" in str(out[2][1])
    assert isinstance(out[3][1], (OSError, ValueError))
    np.testing.assert_array_equal(out[4][1], diffseg.segment(imgs[4], model, grid=4))
    # without return_exceptions: raised in order, after the images before it
    seen = []
    with pytest.raises(RuntimeError, match="planted failure 2"):
        for i, _ in segment_many(imgs, model, grid=4):
            seen.append(i)
    assert seen == [0, 1]


def test_memory_bound_and_early_close():
    """At most max_pending images are in flight; closing the generator stops the producer."""
    started, yielded = [], []
    lock = threading.Lock()
    in_flight = {"now": 0, "max": 0}

    def produce(x):
        with lock:
            started.append(x)
            in_flight["now"] += 1
            in_flight["max"] = max(in_flight["max"], in_flight["now"])
        return x

    gen = pipelined(range(100), produce, lambda x: x * 2, pool_size=2, max_pending=3)
    for i, value in gen:
        assert value == 2 * i
        yielded.append(i)
        with lock:
            in_flight["now"] -= 1
        if i == 9:
            break
    gen.close()
    assert yielded == list(range(10))
    assert in_flight["max"] <= 3
    assert len(started) <= 10 + 3  # the producer stopped, it did not read all 100
    assert not any(t.name == "diffseg-producer" for t in threading.enumerate())


def test_interrupt_in_items_ends_after_earlier_items():
    def items():
        yield from range(3)
        raise KeyboardInterrupt

    seen = []
    with pytest.raises(KeyboardInterrupt):
        for i, value in pipelined(items(), lambda x: x + 1):
            seen.append((i, value))
    assert seen == [(0, 1), (1, 2), (2, 3)]
    assert not any(t.name == "diffseg-producer" for t in threading.enumerate())


def test_bad_arguments():
    model = PlantedModel()
    with pytest.raises(TypeError, match="images"):
        segment_many("photo.png", model)
    with pytest.raises(TypeError, match="images"):
        segment_many(images(1)[0], model)
    with pytest.raises(ValueError, match="workers"):
        segment_many(images(1), model, workers=0)  # the C core's threads
    with pytest.raises(ValueError, match="pool_size"):
        segment_many(images(1), model, pool_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        segment_many(images(1), model, batch_size=0)
    with pytest.raises(TypeError, match="unknown setting.*pool"):
        segment_many(images(1), model, pool=2)
    with pytest.raises(ValueError, match="max_pending"):
        segment_many(images(1), model, max_pending=0)
    with pytest.raises(ValueError, match="grid"):
        segment_many(images(1), model, grid=0)
    with pytest.raises(ValueError, match="kl_threshold"):
        segment_many(images(1), model, kl_threshold=-1)
    with pytest.raises(ValueError, match="timestep"):
        segment_many(images(1), model, timestep=-3)
    with pytest.raises(TypeError, match="model"):
        segment_many(images(1), object())
    with pytest.raises(TypeError, match="produce"):
        pipelined([1], None)


def test_tiny_model_equals_one_at_a_time(tiny_model):
    imgs = [np.random.default_rng(k).integers(0, 256, (160 + 16 * k, 128, 3), dtype=np.uint8) for k in range(4)]
    want = [diffseg.segment(im, tiny_model, grid=8, kl_threshold=0.3) for im in imgs]
    assert min(w.max() for w in want) >= 2  # many segments: the comparison can fail
    got = list(segment_many(imgs, tiny_model, grid=8, kl_threshold=0.3, pool_size=2))
    assert [i for i, _ in got] == list(range(4))
    for (_, labels), w in zip(got, want):
        np.testing.assert_array_equal(labels, w)


def test_evaluate_overlaps_attention_with_scoring_and_matches_serial(tmp_path, monkeypatch):
    """evaluate(): the attention of image i+1 is computed while image i is
    scored (scoring of i waits for it), and the numbers equal the stages run
    one image at a time."""
    from diffseg.evaluation import runner
    from diffseg.evaluation.metrics import HungarianMetrics

    n = 4
    started = [threading.Event() for _ in range(n)]

    class Model:
        name = "planted"

        def attention(self, image, timestep=None):
            k = int(image[0, 0, 0])
            started[k].set()
            return planted_example(R=16, n_segments=3 + k, seed=k)[0]

    truth = [np.kron(planted_example(R=16, n_segments=3 + k, seed=k)[1], np.ones((2, 2), int)) for k in range(n)]
    dataset = [(f"im{k}", images(n, (32, 32, 3))[k], truth[k]) for k in range(n)]
    scored = []
    real_run_stages = runner.run_stages

    def run_stages(**kw):
        k = len(scored)
        if k + 1 < n:  # serial code would never start image k+1 here: this would time out
            assert started[k + 1].wait(timeout=120), "attention of the next image did not overlap"
        scored.append(k)
        return real_run_stages(**kw)

    monkeypatch.setattr(runner, "run_stages", run_stages)
    got = runner.evaluate(dataset, Model(), grid=4, n_classes=6, progress=False, output_dir=tmp_path)
    want = HungarianMetrics(6)
    for k in range(n):
        attn = planted_example(R=16, n_segments=3 + k, seed=k)[0]
        want.update(diffseg.segment_attention(attn, grid=4, size=(32, 32)), truth[k])
    want = want.compute()
    assert scored == list(range(n))
    for key in ("tp", "fp", "fn", "pixel_accuracy", "miou"):
        assert got["settings"][0][key] == want[key], key
    assert want["pixel_accuracy"] > 0.5


def test_interrupt_in_produce_ends_after_earlier_items():
    def produce(x):
        if x == 2:
            raise KeyboardInterrupt
        return x

    seen = []
    with pytest.raises(KeyboardInterrupt):
        for i, value in pipelined(range(5), produce):
            seen.append(value)
    assert seen == [0, 1]


class BatchedPlantedModel(PlantedModel):
    """Also has ``attention_batch`` (one call for images of one preprocessed size), recording its calls."""

    def __init__(self, fail_on=()):
        super().__init__(fail_on)
        self.batches = []

    def attention_batch(self, images, timestep=None, frame="crop"):
        self.batches.append([self.grid(image, frame) for image in images])
        assert len(set(self.batches[-1])) == 1, "one call, one grid"
        return [self.attention(image, timestep, frame) for image in images]


@pytest.mark.parametrize("frame", ["crop", "whole"])
def test_batches_equal_one_at_a_time(frame):
    """batch_size=3: one attention_batch call per batch and preprocessed size;
    results and order as one image at a time; errors stay with their image."""
    imgs = images(7, (40, 32, 3))
    imgs[2] = images(3, (32, 64, 3))[2]  # another aspect ratio: its own call in the whole frame
    imgs[5] = "no-such-image.png"
    model = BatchedPlantedModel(fail_on={6})
    got = list(segment_many(imgs, model, batch_size=3, grid=4, frame=frame, return_exceptions=True))
    assert [i for i, _ in got] == list(range(7))
    sizes = [len(b) for b in model.batches]
    assert sizes == ([3, 2, 1] if frame == "crop" else [2, 1, 2, 1])  # image 5 never reaches the model
    for i, result in got:
        if i == 5:
            assert isinstance(result, (OSError, ValueError))
        elif i == 6:
            assert isinstance(result, RuntimeError)
        else:
            np.testing.assert_array_equal(result, diffseg.segment(imgs[i], PlantedModel(), grid=4, frame=frame))
    with pytest.raises(ValueError, match="batch_size"):
        list(segment_many(imgs, model, batch_size=0))


def test_batches_raise_in_order():
    imgs = images(5)
    imgs[3] = "no-such-image.png"
    seen = []
    with pytest.raises((OSError, ValueError)):
        for i, _ in segment_many(imgs, BatchedPlantedModel(), batch_size=2, grid=4, frame="crop"):
            seen.append(i)
    assert seen == [0, 1, 2]
