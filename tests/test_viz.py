"""diffseg.viz: arrays exactly, figures by structure."""
import numpy as np
import pytest

import diffseg

pytest.importorskip("matplotlib")
from diffseg import viz  # noqa: E402
from diffseg.synthetic import planted_example  # noqa: E402


@pytest.fixture(scope="module")
def planted():
    attn, truth = planted_example(R=16, n_segments=4, seed=1)
    A = diffseg.aggregate(attn)
    return attn, A, truth


def test_palette():
    p = viz.palette(50)
    assert p.shape == (50, 3) and p.dtype == np.uint8
    assert np.array_equal(p, viz.palette(50))
    assert np.array_equal(viz.palette(10), p[:10])
    assert len({tuple(c) for c in p}) == 50
    # neighbouring ids clearly differ
    assert np.all(np.abs(p[1:].astype(int) - p[:-1]).sum(axis=1) > 60)


def test_colorize():
    labels = np.array([[0, 1], [-1, 2]])
    c = viz.colorize(labels, background=(1, 2, 3))
    assert c.shape == (2, 2, 3) and c.dtype == np.uint8
    assert c[1, 0].tolist() == [1, 2, 3]
    assert np.array_equal(c[0, 1], viz.palette(3)[1])


def test_boundaries():
    labels = np.zeros((4, 6), int)
    labels[:, 3:] = 1
    edge = viz.boundaries(labels)
    expected = np.zeros((4, 6), bool)
    expected[:, 2:4] = True
    assert np.array_equal(edge, expected)
    assert not viz.boundaries(np.zeros((3, 3), int)).any()


def test_overlay():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    labels = np.zeros((20, 30), int)
    labels[:, 15:] = 1
    assert np.array_equal(viz.overlay(image, labels, alpha=0.0, boundary_color=None), image)
    full = viz.overlay(image, labels, alpha=1.0, boundary_color=None)
    assert np.array_equal(full, viz.colorize(labels))
    out = viz.overlay(image, labels)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.all(out[viz.boundaries(labels)] == 255)
    # labels of another size are resized to the image; negative labels stay uncoloured
    small = np.array([[0, -1]])
    o = viz.overlay(image, small, alpha=1.0, boundary_color=None)
    assert np.array_equal(o[:, 15:], image[:, 15:])
    assert viz.overlay(None, labels).shape == (20, 30, 3)
    with pytest.raises(ValueError, match="alpha"):
        viz.overlay(image, labels, alpha=2)


def test_panel_and_array():
    from matplotlib.figure import Figure

    img = np.zeros((10, 10, 3), np.uint8)
    fig = viz.panel([img, np.eye(10, dtype=int), np.eye(10)], ["a", "b", "c"], ncols=2)
    assert isinstance(fig, Figure)
    assert len([ax for ax in fig.axes if ax.images]) == 3
    arr = viz.figure_to_array(fig)
    assert arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8
    with pytest.raises(ValueError):
        viz.panel([])
    with pytest.raises(ValueError, match="titles"):
        viz.panel([img], ["a", "b"])


def test_merge_stages(planted):
    _, A, _ = planted
    stages = viz.merge_stages(A, grid=8, kl_threshold=(1.1, 1.0, 0.9))
    assert len(stages) == 3
    for i, want in enumerate([(1.1,), (1.1, 1.0), (1.1, 1.0, 0.9)]):  # the pure-NumPy reference
        np.testing.assert_allclose(stages[i], diffseg.reference.merge(A, grid=8, kl_threshold=want),
                                   rtol=1e-5, atol=1e-9)
    assert len(stages[0]) == 64 and len(stages[2]) < len(stages[0])


def test_stage_figures(planted, tmp_path):
    attn, A, truth = planted
    image = viz.colorize(diffseg.io.images.resize_nearest(truth, 48, 64))  # non-square: the crop is shown
    fig = viz.stages_figure(image, attn)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 5  # anchors, 3 iterations, labels
    assert "256 proposals" in shown[1].get_title()
    assert shown[0].images[0].get_array().shape[:2] == (48, 48)
    fig.savefig(tmp_path / "stages.png")
    assert (tmp_path / "stages.png").stat().st_size > 0
    fig = viz.anchor_figure(image, R=16, grid=4)
    assert len(fig.axes[0].collections[0].get_offsets()) == 16
    fig = viz.proposals_figure(diffseg.merge(A), max_n=3, title="t")
    assert len([ax for ax in fig.axes if ax.images]) == 3
    fig = viz.labels_figure(image, diffseg.nms(diffseg.merge(A), (48, 64)))
    assert len([ax for ax in fig.axes if ax.images]) == 3
    with pytest.raises(ValueError, match="attn"):
        viz.stages_figure(image)


def test_palette_neighbours_are_distinct():
    from itertools import combinations

    from diffseg.viz import palette

    p = palette(256).astype(float)
    dist = lambda i, j: np.linalg.norm(p[i] - p[j])  # noqa: E731
    assert min(dist(i, i + k) for i in range(250) for k in (1, 2)) > 100
    assert min(dist(i, j) for i, j in combinations(range(16), 2)) > 50
    np.testing.assert_array_equal(palette(8), palette(256)[:8])  # the same colours for any n


def test_demo_colours_match_across_labels_and_truth(tmp_path):
    from PIL import Image

    from diffseg import cli
    from diffseg.viz import palette

    assert cli.main(["demo", "-o", str(tmp_path), "--resolution", "32", "--size", "64"]) == 0
    labels = np.asarray(Image.open(tmp_path / "labels.png"))
    truth = np.asarray(Image.open(tmp_path / "truth.png"))
    colours = {tuple(c) for c in palette(64)}
    assert {tuple(c) for c in labels.reshape(-1, 3)} <= colours
    same = (labels == truth).all(axis=2).mean()
    assert same > 0.9, same  # a found segment has the colour of the planted one it matches


def test_match_labels():
    from diffseg.evaluation.metrics import match_labels

    truth = np.array([[0, 0, 1, 1], [2, 2, 1, 1]])
    pred = np.array([[5, 5, 0, 0], [3, 3, 0, 4]])
    np.testing.assert_array_equal(match_labels(pred, truth), [[0, 0, 1, 1], [2, 2, 1, 3]])
    with pytest.raises(ValueError, match="same shape"):
        match_labels(pred, truth[:1])
