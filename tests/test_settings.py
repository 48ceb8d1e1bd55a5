"""diffseg.Settings: validated once, recorded whole, and taken by every entry
point with the same result as the equivalent keywords."""
import dataclasses
import json

import numpy as np
import pytest

import diffseg
from diffseg import Settings
from diffseg.settings import FIELDS, resolve_settings
from planted_model import PlantedModel


class TimestepModel(PlantedModel):
    """Planted attention that records the timesteps it was asked for."""

    def __init__(self):
        super().__init__(n_segments=5, seed=2)
        self.timesteps = []

    def attention(self, image, timestep=None, frame="crop"):
        self.timesteps.append(timestep)
        return super().attention(image, timestep, frame)


def photo(height=60, width=90, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ---------------------------------------------------------------- the object
def test_defaults_are_the_official_settings():
    s = Settings()
    assert s.kl_threshold == (1.1, 1.1, 1.1) and s.iterations == 3 and s.grid == 16 and s.timestep == 300
    assert s.weights is None and s.frame == "whole" and s.border == "nearest" and s.refine is False
    assert s.vocabulary is None and s.prompt is None and s.voting == "mean" and not s.names_segments
    assert Settings.preset("coco-stuff-27") == Settings(kl_threshold=1.1, frame="crop")
    assert Settings.preset("cityscapes").kl_threshold == (0.9, 0.9, 0.9)
    assert Settings.preset("cityscapes", grid=8).grid == 8
    with pytest.raises(ValueError, match="preset"):
        Settings.preset("ade20k")


def test_thresholds_and_iterations():
    assert Settings(kl_threshold=0.9).kl_threshold == (0.9, 0.9, 0.9)
    assert Settings(kl_threshold="0.9,1.0,1.1").kl_threshold == (0.9, 1.0, 1.1)
    assert Settings(kl_threshold=np.float32(0.5)).kl_threshold == (0.5, 0.5, 0.5)
    # another iteration count only when asked for
    with pytest.raises(ValueError, match="2 value.*3 merge iterations.*iterations=2"):
        Settings(kl_threshold=(0.9, 1.0))
    with pytest.raises(ValueError, match="4 value.*iterations=4"):
        Settings(kl_threshold="0.9 1.0 1.1 1.2")
    two = Settings(kl_threshold=(0.9, 1.0), iterations=2)
    assert two.kl_threshold == (0.9, 1.0) and two.iterations == 2
    assert Settings(kl_threshold=0.7, iterations=5).kl_threshold == (0.7,) * 5
    # changing the count keeps one threshold for all; a per-iteration sequence must be restated
    assert Settings().replace(iterations=2).kl_threshold == (1.1, 1.1)
    with pytest.raises(ValueError, match="3 value.*2 merge iterations"):
        Settings(kl_threshold=(0.9, 1.0, 1.1)).replace(iterations=2)


@pytest.mark.parametrize("field, value, exc", [
    ("grid", 100, ValueError), ("grid", 0, ValueError), ("grid", 2.0, TypeError), ("grid", True, TypeError),
    ("iterations", 0, ValueError), ("iterations", 11, ValueError),
    ("timestep", -1, ValueError), ("timestep", 1000, ValueError), ("timestep", "300", TypeError),
    ("kl_threshold", -1.0, ValueError), ("kl_threshold", float("nan"), ValueError),
    ("kl_threshold", float("inf"), ValueError), ("kl_threshold", "x", ValueError), ("kl_threshold", None, TypeError),
    ("kl_threshold", {1: 2}, TypeError), ("kl_threshold", (1.0, "a", 1.0), TypeError),
    ("weights", (1, -1, 1, 1), ValueError), ("weights", (0, 0), ValueError), ("weights", (), ValueError),
    ("weights", (1, float("nan")), ValueError), ("weights", "8421", TypeError), ("weights", {64: "x"}, TypeError),
    ("frame", "both", ValueError), ("frame", None, ValueError),
    ("border", "far", ValueError), ("border", 1.5, ValueError),
    ("refine", 1, TypeError), ("refine", "yes", TypeError),
    ("vocabulary", "cat", TypeError), ("vocabulary", [], ValueError), ("vocabulary", ["cat", " "], ValueError),
    ("vocabulary", ["cat", 3], TypeError), ("vocabulary", ["Cat", "cat"], ValueError),
    ("prompt", "", ValueError), ("prompt", 3, ValueError),
    ("voting", "median", ValueError),
])
def test_a_bad_value_names_its_field(field, value, exc):
    extra = {"frame": "crop"} if field == "border" else {}
    with pytest.raises(exc, match=field):
        Settings(**{field: value}, **extra)


def test_border_only_on_the_crop():
    assert Settings(frame="crop", border=-1).border == -1
    with pytest.raises(ValueError, match="frame='crop' only"):
        Settings(border=-1)  # the whole frame labels every pixel


def test_immutable_hashable_and_recorded_whole():
    s = Settings(kl_threshold=(0.9, 1.0), iterations=2, grid=8, weights={64: 4, 32: 2, 16: 1, 8: 1},
                 frame="crop", border=-1, refine=True, vocabulary=["cat", "traffic  light"], prompt="a cat",
                 voting="majority")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.grid = 4
    assert hash(s) == hash(Settings.from_dict(s.to_dict()))
    record = json.loads(json.dumps(s.to_dict()))  # plain JSON
    assert set(record) == set(FIELDS)
    assert Settings.from_dict(record) == s
    assert s.vocabulary == ("cat", "traffic light")  # blanks collapsed
    assert record["weights"] == {"64": 4.0, "32": 2.0, "16": 1.0, "8": 1.0}
    assert Settings.from_dict({}) == Settings()  # missing fields take their defaults
    with pytest.raises(ValueError, match="unknown field.*colour"):
        Settings.from_dict({"colour": "red"})
    with pytest.raises(TypeError, match="dict"):
        Settings.from_dict([("grid", 4)])


def test_weights_for_the_grids_of_either_frame():
    assert Settings().weights_for([64, 32, 16, 8]) is None
    assert Settings(weights=(4, 2, 1, 1)).weights_for([64, 32, 16, 8]) == [4.0, 2.0, 1.0, 1.0]
    by_res = Settings(weights={8: 1, 64: 8, 32: 4, 16: 2})
    assert by_res.weights == ((64, 8.0), (32, 4.0), (16, 2.0), (8, 1.0))  # highest first
    assert by_res.weights_for([(64, 96), (32, 48), (16, 24), (8, 12)]) == {(64, 96): 8.0, (32, 48): 4.0,
                                                                            (16, 24): 2.0, (8, 12): 1.0}
    with pytest.raises(ValueError, match=r"no entry for resolution\(s\) \[4\]"):
        by_res.weights_for([64, 4])


def test_resolve_settings_is_the_one_place_keywords_meet_settings():
    s = Settings(grid=8)
    assert resolve_settings(s) is s
    assert resolve_settings(None, grid=8) == s
    assert resolve_settings(s, kl_threshold=0.9) == Settings(grid=8, kl_threshold=0.9)
    assert resolve_settings({"grid": 8}) == s
    with pytest.raises(TypeError, match="unknown setting.*kl_treshold.*the settings are: kl_threshold"):
        resolve_settings(s, kl_treshold=0.9)
    with pytest.raises(TypeError, match="settings must be"):
        resolve_settings("grid=8")


# ---------------------------------------------------------------- every entry point
SET = Settings(kl_threshold=0.5, grid=6, timestep=123, weights=(4, 2, 1, 1), frame="crop", border=-1)
KEYWORDS = {"kl_threshold": 0.5, "grid": 6, "timestep": 123, "weights": (4, 2, 1, 1), "frame": "crop", "border": -1}


def test_segment_takes_settings_like_keywords():
    img = photo()
    model = TimestepModel()
    with_settings = diffseg.segment(img, model, SET)
    with_keywords = diffseg.segment(img, model, **KEYWORDS)
    np.testing.assert_array_equal(with_settings, with_keywords)
    assert model.timesteps == [123, 123]
    assert (with_settings[:, :15] == -1).all()  # border=-1 reached the crop
    # the settings and the keywords are not the defaults: the default gives other labels
    assert not np.array_equal(with_settings, diffseg.segment(img, model, frame="crop"))
    # overrides on top of settings
    np.testing.assert_array_equal(diffseg.segment(img, model, SET, grid=4),
                                  diffseg.segment(img, model, **{**KEYWORDS, "grid": 4}))
    with pytest.raises(TypeError, match="unknown setting.*grids"):
        diffseg.segment(img, model, grids=4)


def test_segment_detailed_and_mask_generator_take_settings():
    img = photo(seed=1)
    model = TimestepModel()
    detailed = diffseg.segment_detailed(img, model, SET)
    assert detailed["settings"] == SET
    np.testing.assert_array_equal(detailed["labels"], diffseg.segment_detailed(img, model, **KEYWORDS)["labels"])
    generator = diffseg.MaskGenerator(model, SET, output_mode="coco_rle")
    assert generator.settings == SET
    by_keywords = diffseg.MaskGenerator(model, output_mode="coco_rle", **KEYWORDS)
    assert generator.generate(img) == by_keywords.generate(img)
    with pytest.raises(ValueError, match="grid"):
        diffseg.MaskGenerator(model, grid=100)


def test_segment_many_and_segment_attention_take_settings():
    imgs = [photo(seed=k) for k in range(3)]
    model = TimestepModel()
    got = dict(diffseg.segment_many(imgs, model, SET))
    for k, img in enumerate(imgs):
        np.testing.assert_array_equal(got[k], diffseg.segment(img, model, **KEYWORDS))
    attn = model.attention(imgs[0])
    one = Settings(kl_threshold=0.5, grid=6, weights=(4, 2, 1, 1))
    np.testing.assert_array_equal(diffseg.segment_attention(attn, one),
                                  diffseg.segment_attention(attn, kl_threshold=0.5, grid=6, weights=(4, 2, 1, 1)))
    with pytest.raises(ValueError, match="iterations"):
        list(diffseg.segment_many(imgs, model, kl_threshold=(0.5, 0.6)))  # refused before any work
    assert len(model.timesteps) == 2 * 3 + 1


def test_evaluate_takes_settings_like_keywords(tmp_path):
    from test_evaluate import GRID, make_eval_folder

    folder = make_eval_folder(tmp_path / "data")
    attn = tmp_path / "data" / "attn"
    several = [Settings.preset("coco-stuff-27", grid=GRID, kl_threshold=t) for t in (1.1, 0.011)]
    a = diffseg.evaluate(folder, attention_dir=attn, settings=several, progress=False)
    b = diffseg.evaluate(folder, attention_dir=attn, kl_threshold=[1.1, 0.011], grid=GRID, progress=False)
    assert [r["tp"] for r in a["settings"]] == [r["tp"] for r in b["settings"]]
    assert [r["settings"] for r in a["settings"]] == [s.to_dict() for s in several]
    assert a["settings"][0]["tp"] != a["settings"][1]["tp"]
