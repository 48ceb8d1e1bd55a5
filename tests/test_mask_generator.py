"""diffseg.MaskGenerator and the seeds of merged proposals: SAM-style records
checked against the label map they come from and against hand-worked seeds."""
import numpy as np
import pytest

import diffseg
from diffseg.io.records import decode_rle
from diffseg.synthetic import planted_example
from planted_model import PlantedModel as _PlantedModel

R, GRID = 16, 4


class PlantedModel(_PlantedModel):
    """Stands in for a Stable Diffusion model (tests/planted_model.py): the
    same planted segments for any image; ``attn`` is the crop frame's."""

    def __init__(self, n_segments=4, seed=0):
        super().__init__(n_segments, seed)
        self.attn, self.truth = planted_example(R, n_segments, seed)


def anchor_rows():
    coords = diffseg.anchor_coords(R, GRID)
    return (coords[:, None] * R + coords[None, :]).ravel()


def test_seeds_without_merging_are_the_anchors():
    """A threshold below every distance but D(p, p) = 0 merges nothing: proposal
    k is anchor k's, so its seed is anchor k's row of A."""
    A = diffseg.aggregate(PlantedModel().attn)
    proposals, seeds = diffseg.merge(A, grid=GRID, kl_threshold=1e-12, return_seeds=True)
    assert proposals.shape[0] == GRID * GRID
    np.testing.assert_array_equal(seeds, anchor_rows())


def test_seeds_when_everything_merges():
    """A huge threshold merges everything into the first proposal's group: one
    proposal, seeded by the first anchor."""
    A = diffseg.aggregate(PlantedModel().attn)
    proposals, seeds = diffseg.merge(A, grid=GRID, kl_threshold=1e6, return_seeds=True)
    assert proposals.shape[0] == 1
    np.testing.assert_array_equal(seeds, anchor_rows()[:1])


def test_seeds_follow_the_greedy_order():
    """Seeds are anchor rows, distinct, in increasing anchor order (the greedy
    step visits proposals in index order), one per proposal."""
    A = diffseg.aggregate(PlantedModel(6, seed=3).attn)
    proposals, seeds = diffseg.merge(A, grid=GRID, return_seeds=True)
    rows = list(anchor_rows())
    assert len(seeds) == proposals.shape[0]
    positions = [rows.index(s) for s in seeds]
    assert positions == sorted(set(positions))


@pytest.mark.parametrize("frame, crop_box", [("crop", [15, 0, 60, 60]), ("whole", [0, 0, 90, 60])])
@pytest.mark.parametrize("mode", ["binary_mask", "uncompressed_rle", "coco_rle"])
def test_generate_records(mode, frame, crop_box):
    height, width = 60, 90
    image = np.zeros((height, width, 3), np.uint8)
    generator = diffseg.MaskGenerator(PlantedModel(), grid=GRID, output_mode=mode, frame=frame)
    masks = generator.generate(image)
    assert len(masks) >= 2
    covered = np.zeros((height, width), int)
    for m in masks:
        mask = m["segmentation"] if mode == "binary_mask" else decode_rle(m["segmentation"])
        assert mask.shape == (height, width) and mask.dtype == bool
        covered += mask
        assert m["area"] == mask.sum()
        ys, xs = np.nonzero(mask)
        assert m["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert m["crop_box"] == crop_box  # the centred square crop or the whole image, XYWH
        (x, y), = m["point_coords"]
        left, top, w, h = crop_box
        assert left <= x < left + w and top <= y < top + h
        assert 0 < m["score"] <= 1 and m["mean_kl"] >= 0
    assert (covered == 1).all()  # DiffSeg's masks partition the image
    # the partition is the reference pipeline's, record by record
    model = PlantedModel()
    if frame == "crop":
        crop = diffseg.reference.segment_attention(model.attention(image), grid=GRID, size=(60, 60))
        want = crop[:, np.clip(np.arange(width) - 15, 0, 59)]  # edge columns repeated outside the crop
    else:  # 60 x 90 at 128 px: a 128 x 192 frame, no padding
        want = diffseg.reference.segment_attention(model.attention(image, frame="whole"), grid=GRID,
                                                   size=(height, width))
    got = np.full((height, width), -1)
    for m in masks:
        got[m["segmentation"] if mode == "binary_mask" else decode_rle(m["segmentation"])] = m["id"]
    np.testing.assert_array_equal(got, want)


def test_point_coords_are_anchor_pixels():
    """Without merging, the record of proposal k points at anchor k's latent
    cell centre, mapped to image pixels."""
    side = 64
    generator = diffseg.MaskGenerator(PlantedModel(), grid=GRID, kl_threshold=1e-12)
    coords = diffseg.anchor_coords(R, GRID)
    for m in generator.generate(np.zeros((side, side, 3), np.uint8)):
        i, j = divmod(m["proposal"], GRID)
        assert m["point_coords"] == [[(coords[j] + 0.5) * side / R, (coords[i] + 0.5) * side / R]]


def test_point_coords_in_a_whole_frame():
    """Whole frame of a 64x96 image: a 16x24 grid (128x192 px frame, no
    padding); anchor (i, j) of anchor_grid maps to image pixels by the
    frame's scale."""
    model = PlantedModel()
    generator = diffseg.MaskGenerator(model, grid=GRID, kl_threshold=1e-12)
    rows, cols = diffseg.anchor_grid((16, 24), GRID)
    masks = generator.generate(np.zeros((64, 96, 3), np.uint8))
    assert {m["proposal"] for m in masks} <= set(range(rows.size * cols.size))
    for m in masks:
        i, j = divmod(m["proposal"], cols.size)
        assert m["point_coords"] == [[(cols[j] + 0.5) * 96 / 24, (rows[i] + 0.5) * 64 / 16]]


def test_cli_records_use_the_same_keys(tmp_path, monkeypatch):
    """`diffseg segment` writes the records of diffseg.pipeline.result_records."""
    import json

    from PIL import Image

    from diffseg.cli import _common, main
    from diffseg.pipeline import result_records, segment_detailed

    image = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    monkeypatch.setattr(_common, "open_model", lambda args, **kw: PlantedModel())
    assert main(["segment", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--grid", str(GRID), "-q",
                 "--format", "json"]) == 0
    written = json.loads((tmp_path / "out" / "a.json").read_text())["annotations"]
    records = result_records(segment_detailed(image, PlantedModel(), grid=GRID), "coco_rle")
    assert [set(r) for r in written] == [set(r) for r in records]
    assert {"segmentation", "area", "bbox", "point_coords", "crop_box", "score"} <= set(written[0])
    assert [(r["id"], r["area"], r["bbox"], r["segmentation"]) for r in written] == \
        [(r["id"], r["area"], r["bbox"], r["segmentation"]) for r in records]


@pytest.mark.parametrize("kwargs, match", [
    ({"output_mode": "polygon"}, "output_mode"),
    ({"grid": 0}, "grid"),
    ({"kl_threshold": -1}, "kl_threshold"),
    ({"kl_threshold": float("nan")}, "kl_threshold"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        diffseg.MaskGenerator(PlantedModel(), **kwargs)


@pytest.mark.parametrize("n_segments, seed, tau", [(4, 0, 1.1), (7, 2, 0.9), (3, 5, (1.1, 0.5, 2.0))])
def test_seeds_equal_the_reference(n_segments, seed, tau):
    A = diffseg.aggregate(planted_example(R, n_segments, seed)[0])
    got, seeds = diffseg.merge(A, grid=GRID, kl_threshold=tau, return_seeds=True)
    want, want_seeds = diffseg.reference.merge(A, grid=GRID, kl_threshold=tau, return_seeds=True)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(seeds, want_seeds)


def test_seeds_after_refine_follow_the_kept_clusters():
    """After refinement each proposal keeps the seed of the merged proposal
    whose cluster it is; clusters that end empty drop out with their seeds
    (scikit-learn's KMeans is the oracle of which clusters survive)."""
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    attn = PlantedModel(5, seed=1).attn
    plain = diffseg.core.run_stages(attn, grid=GRID, size=32)
    stages = diffseg.core.run_stages(attn, grid=GRID, size=32, refine=True)
    A = plain["A"].astype(np.float64)
    init = plain["proposals"].reshape(len(plain["proposals"]), -1).astype(np.float64)
    labels = sklearn_cluster.KMeans(n_clusters=len(init), init=init, n_init=1).fit(A).labels_
    np.testing.assert_array_equal(stages["seed"], plain["seed"][np.unique(labels)])
    assert len(stages["seed"]) == len(stages["proposals"])


@pytest.mark.parametrize("workers, gemm", [(1, "builtin"), (2, "blas"), (None, None)])
def test_segment_per_call_settings(workers, gemm):
    """segment()/segment_detailed() take workers= and gemm= for their
    post-processing; the labels do not depend on them."""
    from diffseg.pipeline import segment_detailed

    image = np.zeros((40, 40, 3), np.uint8)
    base = diffseg.segment(image, PlantedModel(), grid=GRID)
    got = diffseg.segment(image, PlantedModel(), grid=GRID, workers=workers, gemm=gemm)
    np.testing.assert_array_equal(got, base)
    detailed = segment_detailed(image, PlantedModel(), grid=GRID, workers=workers, gemm=gemm)
    np.testing.assert_array_equal(detailed["labels"], base)


def test_segment_bad_settings_name_the_argument():
    image = np.zeros((40, 40, 3), np.uint8)
    with pytest.raises(ValueError, match="workers"):
        diffseg.segment(image, PlantedModel(), grid=GRID, workers=0)
    with pytest.raises(ValueError, match="gemm"):
        diffseg.segment(image, PlantedModel(), grid=GRID, gemm="cublas")


def test_set_num_threads_reaches_a_shim_loaded_later():
    """set_num_threads before the libtorch shim is imported applies to it
    when a model is opened (fresh process: the shim is not loaded yet)."""
    pytest.importorskip("diffseg._torch")
    from run_in_subprocess import run_python

    out = run_python(
        "import sys, diffseg\n"
        "diffseg.set_num_threads(1)\n"
        "assert 'diffseg._torch' not in sys.modules\n"
        "from diffseg.sd.model import _shim\n"
        "print(_shim().get_num_threads())\n")
    assert out.strip().splitlines()[-1] == "1"
