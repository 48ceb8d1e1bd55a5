"""Semantic labels (diffseg.semantic, issue 10 part 2): aggregation of
cross-attention, word-token alignment, voting, nouns; and the cross-attention
of a bundle against eager diffusers."""
import numpy as np
import pytest

from diffseg import reference, semantic
from diffseg.semantic import (aggregate_cross_attention, extract_nouns, group_segments, name_segments,
                              vocabulary_prompt, word_token_indices)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _tokens(*toks, length=None):
    out = [BOS, *toks, EOS]
    if length:
        out += [EOS] * (length - len(out))
    return out


# ---------------------------------------------------------------- aggregation oracle
def _official_aggregate(cross, size, weights):
    """The official aggregate_x_weights order with torch: per resolution,
    bilinear upsampling (align_corners=False) of (h, w, T), divide by the sum
    over tokens, weight, sum."""
    torch = pytest.importorskip("torch")
    H, W = size
    out = torch.zeros(H, W, next(iter(cross.values())).shape[1], dtype=torch.float64)
    for key, a in cross.items():
        h, w = (key, key) if isinstance(key, int) else key
        x = torch.from_numpy(np.asarray(a, np.float32)).reshape(h, w, -1).permute(2, 0, 1)[None]
        up = torch.nn.functional.interpolate(x, size=(H, W), mode="bilinear", align_corners=False,
                                             antialias=False)[0].permute(1, 2, 0)
        up = up / up.sum(-1, keepdim=True)
        out += up.double() * weights[key]
    return out.numpy()


def _random_cross(rng, grids, T=77):
    cross = {}
    for key in grids:
        h, w = (key, key) if isinstance(key, int) else key
        logits = rng.normal(size=(h * w, T)) * 3
        p = np.exp(logits - logits.max(1, keepdims=True))
        cross[key] = (p / p.sum(1, keepdims=True)).astype(np.float32)
    return cross


@pytest.mark.parametrize("grids,size", [
    ((64, 32, 16, 8), (64, 64)),
    ((16, 8, 4, 2), (48, 80)),
    (((12, 8), (6, 4), (3, 2)), (30, 20)),
])
def test_aggregate_cross_attention_matches_official_order(grids, size):
    rng = np.random.default_rng(0)
    cross = _random_cross(rng, grids)
    got = aggregate_cross_attention(cross, size)
    assert got.shape == (*size, 77) and got.dtype == np.float32
    want = _official_aggregate(cross, size, {k: 1.0 for k in cross})
    assert np.max(np.abs(got - want) / np.abs(want)) < 1e-5
    # Each resolution sums to 1 over tokens: the sum of 4 unit weights is 4 (official demo).
    np.testing.assert_allclose(got.sum(-1), len(grids), rtol=1e-5)


def test_aggregate_cross_attention_weights_and_token_subset():
    rng = np.random.default_rng(1)
    cross = _random_cross(rng, (8, 4, 2), T=10)
    w = [0.5, 0.3, 0.2]
    full = aggregate_cross_attention(cross, 16, weights=w)
    np.testing.assert_allclose(full, _official_aggregate(cross, (16, 16), dict(zip((8, 4, 2), w))), rtol=1e-5)
    np.testing.assert_allclose(aggregate_cross_attention(cross, 16, weights={8: .5, 4: .3, 2: .2}), full)
    sub = aggregate_cross_attention(cross, 16, weights=w, tokens=[3, 1])
    np.testing.assert_allclose(sub, full[:, :, [3, 1]], rtol=1e-6)


@pytest.mark.parametrize("cross,size,kw,match", [
    ({}, 8, {}, "non-empty dict"),
    ({4: np.ones((16, 5), np.float32)}, 0, {}, "size must be positive"),
    ({4: np.ones((16, 5), np.float32)}, "x", {}, "size must be"),
    ({4: np.ones((15, 5), np.float32)}, 8, {}, "15 rows"),
    ({(4, 3): np.ones((16, 5), np.float32)}, 8, {}, "grid 4x3"),
    ({"a": np.ones((16, 5), np.float32)}, 8, {}, "key must be"),
    ({4: np.ones(16, np.float32)}, 8, {}, r"\(n, T\)"),
    ({4: np.ones((16, 5), np.float32), 2: np.ones((4, 6), np.float32)}, 8, {}, "same number of tokens"),
    ({4: np.full((16, 5), np.nan, np.float32)}, 8, {}, "NaN"),
    ({4: -np.ones((16, 5), np.float32)}, 8, {}, "negative"),
    ({4: np.zeros((16, 5), np.float32)}, 8, {}, "zero attention"),
    ({4: np.ones((16, 5), np.float32)}, 8, {"weights": [1, 2]}, "one entry per resolution"),
    ({4: np.ones((16, 5), np.float32)}, 8, {"weights": {2: 1}}, "keys of cross"),
    ({4: np.ones((16, 5), np.float32)}, 8, {"tokens": [5]}, "token indices"),
])
def test_aggregate_cross_attention_bad_inputs(cross, size, kw, match):
    with pytest.raises(ValueError, match=match):
        aggregate_cross_attention(cross, size, **kw)


def test_aggregate_cross_attention_int_dtype():
    with pytest.raises(TypeError, match="float"):
        aggregate_cross_attention({2: np.ones((4, 3), np.int64)}, 4)
    with pytest.raises(TypeError, match="weights must be a sequence"):
        aggregate_cross_attention({2: np.ones((4, 3), np.float32)}, 4, weights=1.0)


# ---------------------------------------------------------------- word <-> token alignment
def test_word_token_indices_single_and_multi_token():
    # "a tabby cat, grass" as a BPE tokenizer might split it: "tabby" = tab + by.
    tokens = _tokens("a</w>", "tab", "by</w>", "cat</w>", ",</w>", "grass</w>", length=12)
    assert word_token_indices(tokens, ["cat"]) == [[4]]  # official: noun position 2 + 1 = 3: wrong here
    assert word_token_indices(tokens, ["tabby", "grass"]) == [[2, 3], [6]]
    assert word_token_indices(tokens, ["Tabby Cat"]) == [[2, 3, 4]]  # a phrase: consecutive words
    # Every occurrence counts.
    assert word_token_indices(_tokens("cat</w>", "and</w>", "cat</w>"), ["cat"]) == [[1, 3]]


def test_word_token_indices_with_the_clip_tokenizer(tmp_path):
    """The tiny CLIP tokenizer (one token per character): words of several tokens."""
    transformers = pytest.importorskip("transformers")
    from sd_tiny import write_tokenizer_files

    vocab, merges, _ = write_tokenizer_files(str(tmp_path))
    tok = transformers.CLIPTokenizer(vocab, merges, model_max_length=77, pad_token=EOS)
    ids = tok("A cat, on grass!", padding="max_length", max_length=77, truncation=True).input_ids
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[:4] == [BOS, "a</w>", "c", "a"]
    assert word_token_indices(tokens, ["cat", "grass", "a"]) == [[2, 3, 4], [8, 9, 10, 11, 12], [1]]
    with pytest.raises(ValueError, match="'dog' is not in the prompt"):
        word_token_indices(tokens, ["dog"])
    with pytest.raises(ValueError, match="not in the prompt"):
        word_token_indices(tokens, ["ca"])  # part of a word is not a word


def test_word_token_indices_are_disjoint_longest_phrase_first():
    """A word inside a longer phrase of the vocabulary does not take the
    phrase's tokens: the phrase claims its occurrence first."""
    tokens = _tokens("light</w>", ",</w>", "traffic</w>", "light</w>", length=12)
    assert word_token_indices(tokens, ["light", "traffic light"]) == [[1], [3, 4]]
    assert word_token_indices(tokens, ["traffic light", "light"]) == [[3, 4], [1]]
    # every occurrence of "light" is inside "traffic light": it has no tokens of its own
    only = _tokens("traffic</w>", "light</w>", length=12)
    with pytest.raises(ValueError, match="'light' has no tokens of its own.*'traffic light'"):
        word_token_indices(only, ["light", "traffic light"])
    assert word_token_indices(only, ["light"]) == [[2]]  # alone it is a word of the prompt


def test_word_token_indices_names_the_token_limit():
    """A prompt longer than the text encoder's 77 tokens is cut: a word past the
    cut is refused for that reason, not as "not in the prompt"."""
    words = [f"w{i}" for i in range(40)]
    body = []
    for w in words:
        body += [w + "</w>", ",</w>"]
    tokens = [BOS] + body[:75] + [EOS]  # what the tokenizer gives: cut at 77 with the end token
    assert len(tokens) == 77
    assert word_token_indices(tokens, words[:37]) == [[1 + 2 * i] for i in range(37)]
    with pytest.raises(ValueError, match="'w38' does not fit in the prompt: the text encoder takes 77 tokens"):
        word_token_indices(tokens, words)
    with pytest.raises(ValueError, match="'dog' does not fit"):
        word_token_indices(tokens, ["dog"])  # with a cut prompt, any missing word may be past the cut
    padded = _tokens("cat</w>", length=77)
    with pytest.raises(ValueError, match="'dog' is not in the prompt"):
        word_token_indices(padded, ["dog"])


def test_word_token_indices_non_ascii():
    # Byte-level BPE spells "é" (UTF-8 c3 a9) as the characters for bytes 0xc3 0xa9.
    tokens = _tokens("caf", "Ã©</w>")
    assert word_token_indices(tokens, ["Café"]) == [[1, 2]]


@pytest.mark.parametrize("words,exc,match", [
    ([], ValueError, "words is empty"),
    ("cat", TypeError, "not one string"),
    ([" "], ValueError, "blank"),
    ([3], TypeError, r"words\[0\] must be a string"),
    (None, TypeError, "list of words"),
])
def test_word_token_indices_bad_words(words, exc, match):
    with pytest.raises(exc, match=match):
        word_token_indices(_tokens("cat</w>"), words)


# ---------------------------------------------------------------- voting
def _official_names(labels, logits, positions, words, voting):
    """get_semantics of google/diffseg, re-implemented plainly: per label a loop."""
    x = np.stack([logits.reshape(-1, logits.shape[-1])[:, p].astype(np.float64).mean(1) for p in positions], 1)
    x = x / np.linalg.norm(x, axis=0, keepdims=True)
    flat = labels.reshape(-1)
    names = []
    for k in range(flat.max() + 1):
        rows = x[flat == k]
        if not len(rows):
            names.append(None)
        elif voting == "majority":
            names.append(words[int(np.median(rows.argmax(-1)))])
        else:
            names.append(words[rows.mean(0).argmax(-1)])
    return names


def _hand_case():
    """One segment of 5 pixels and 3 one-token words, where the votes differ.

    Per-pixel values (before the L2 normalisation over the image):
        p0, p1: a=0.9 b=0.8 c=0.0   -> argmax a
        p2..p4: a=0.0 b=0.5 c=0.6   -> argmax c
    Column norms: a sqrt(1.62)=1.273, b sqrt(2.03)=1.425, c sqrt(1.08)=1.039;
    normalised means: a 0.283, b 0.435, c 0.346 -> "mean" says b;
    per-pixel argmax (unchanged by the scaling) [a, a, c, c, c], median c.
    """
    tokens = _tokens("a</w>", "b</w>", "c</w>")
    logits = np.zeros((1, 5, len(tokens)), np.float32)
    logits[0, :, 1:4] = [[.9, .8, 0], [.9, .8, 0], [0, .5, .6], [0, .5, .6], [0, .5, .6]]
    return np.zeros((1, 5), np.int32), logits, tokens


def test_voting_hand_computed():
    labels, logits, tokens = _hand_case()
    assert name_segments(labels, logits, tokens, ["a", "b", "c"], voting="mean") == ["b"]
    assert name_segments(labels, logits, tokens, ["a", "b", "c"], voting="majority") == ["c"]
    # The median is of word *indices*: with 2 pixels for a and 2 for c it is 1,
    # a word that wins no pixel (the official rule, kept).
    assert name_segments(labels[:, :4], logits[:, :4], tokens, ["a", "b", "c"], voting="majority") == ["b"]
    # ... and so it depends on the order of the words.
    assert name_segments(labels, logits, tokens, ["c", "b", "a"], voting="majority") == ["c"]


@pytest.mark.parametrize("voting", ["mean", "majority"])
@pytest.mark.parametrize("seed", range(4))
def test_voting_matches_official_rules(voting, seed):
    rng = np.random.default_rng(seed)
    tokens = _tokens("ca", "t</w>", "a</w>", "gr", "a", "ss</w>", "sky</w>", length=20)
    words = ["cat", "grass", "sky", "a"]
    labels = rng.integers(0, 7, size=(12, 9)).astype(np.int32)
    labels[labels == 5] = 6  # label 5 has no pixel -> None
    logits = rng.random((12, 9, 20)).astype(np.float32)
    positions = word_token_indices(tokens, words)
    got = name_segments(labels, logits, tokens, words, voting=voting)
    assert got == _official_names(labels, logits, positions, words, voting)
    assert got[5] is None


def test_name_segments_ignores_negative_labels():
    labels, logits, tokens = _hand_case()
    labels = np.concatenate([labels, -np.ones_like(labels)], axis=1)
    logits = np.concatenate([logits, logits], axis=1)
    assert name_segments(labels, logits, tokens, ["a", "b", "c"]) == ["b"]


def test_group_segments_and_prompt():
    assert group_segments(["sky", "cat", "sky", None, "cat"]) == {"sky": [0, 2], "cat": [1, 4]}
    assert vocabulary_prompt(["cat", " grass", "sky"]) == "cat, grass, sky"


def test_name_segments_bad_inputs():
    labels, logits, tokens = _hand_case()
    words = ["a", "b", "c"]
    with pytest.raises(ValueError, match="voting must be one of"):
        name_segments(labels, logits, tokens, words, voting="median")
    with pytest.raises(ValueError, match=r"labels.shape \(1, 4\)"):
        name_segments(labels[:, :4], logits, tokens, words)
    with pytest.raises(ValueError, match="labels must be"):
        name_segments(labels[0], logits, tokens, words)
    with pytest.raises(TypeError, match="integer"):
        name_segments(labels.astype(np.float32), logits, tokens, words)
    with pytest.raises(ValueError, match="token columns"):
        name_segments(labels, logits[..., :4], tokens, words)
    with pytest.raises(ValueError, match="words is empty"):
        name_segments(labels, logits, tokens, [])
    with pytest.raises(ValueError, match="'d' is not in the prompt"):
        name_segments(labels, logits, tokens, ["a", "d"])
    bad = logits.copy()
    bad[0, 0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        name_segments(labels, bad, tokens, words)
    zero = logits.copy()
    zero[..., 1] = 0
    with pytest.raises(ValueError, match="zero everywhere"):
        name_segments(labels, zero, tokens, words)
    with pytest.raises(TypeError, match="float"):
        name_segments(labels, logits.astype(np.int32), tokens, words)


# ---------------------------------------------------------------- nouns
@pytest.mark.parametrize("caption,nouns", [
    ("a cat sitting on the grass under a blue sky", ["cat", "grass", "sky"]),
    ("there is a dog that is laying on the bed", ["dog", "bed"]),
    ("arafed man riding a horse next to a building", ["man", "horse", "building"]),
    ("Two cats and a dog on a couch, cats sleeping", ["cats", "dog", "couch"]),
    ("a red car parked in front of a tall building", ["car", "building"]),
    ("", []),
])
def test_extract_nouns_fallback(caption, nouns):
    assert extract_nouns(caption, use_nltk=False) == nouns


def test_extract_nouns_fallback_limits_are_as_documented():
    assert extract_nouns("a dog chases a ball", use_nltk=False) == ["dog", "chases", "ball"]


def test_extract_nouns_default_uses_nltk_when_usable(monkeypatch):
    monkeypatch.setattr(semantic, "_nltk_nouns", lambda caption: ["from-nltk"])
    assert extract_nouns("a cat", use_nltk=None) == ["from-nltk"]
    monkeypatch.setattr(semantic, "_nltk_nouns", lambda caption: None)  # NLTK or its data missing
    assert extract_nouns("a cat", use_nltk=None) == ["cat"]


def test_extract_nouns_bad_input():
    with pytest.raises(TypeError, match="caption must be a string"):
        extract_nouns(None)


# ---------------------------------------------------------------- pipeline with a planted model
class PlantedModel:
    """A model whose attention is planted (diffseg.synthetic) and whose
    cross-attention puts region r on the tokens of ``region_words[r]``; the
    prompt is tokenized one token per character, as the tiny CLIP tokenizer."""

    def __init__(self, truth, region_words):
        from diffseg.synthetic import planted_attention

        self.truth, self.region_words = truth, region_words
        self.attn = planted_attention(truth, resolutions=(16, 8, 4, 2), seed=1)
        self.prompts = []

    def tokenize(self, prompt):
        tokens = [BOS]
        for word in prompt.lower().replace(",", " , ").split():
            tokens += list(word[:-1]) + [word[-1] + "</w>"]
        tokens = (tokens + [EOS] * 77)[:77]
        return np.zeros((1, 77), np.int64), tokens

    def attention(self, rgb, timestep=None):
        return self.attn

    def prompt_attention(self, rgb, prompt, timestep=None):
        from diffseg.io.images import resize_nearest

        self.prompts.append(prompt)
        tokens = self.tokenize(prompt)[1]
        rng = np.random.default_rng(0)
        cross = {}
        for s in (16, 8, 4, 2):
            seg = resize_nearest(self.truth, s, s).ravel()
            logits = 0.3 * rng.standard_normal((s * s, 77))
            logits[:, 0] += 4
            for region, word in enumerate(self.region_words):
                if word in prompt.split(", ") or word in prompt.split():
                    logits[np.ix_(np.flatnonzero(seg == region), word_token_indices(tokens, [word])[0])] += 3
            p = np.exp(logits)
            cross[s] = (p / p.sum(1, keepdims=True)).astype(np.float32)
        return self.attn, cross, tokens


@pytest.fixture
def planted_model():
    truth = np.zeros((16, 16), np.int32)
    truth[:, 8:] = 1
    truth[10:, :] = 2
    return PlantedModel(truth, ["sky", "tree", "grass"])


def _image():
    return np.full((64, 64, 3), 128, np.uint8)


def test_segment_with_vocabulary_names_planted_regions(planted_model):
    import diffseg
    from diffseg.pipeline import result_records, segment_detailed

    labels, names = diffseg.segment(_image(), planted_model, vocabulary=["sky", "tree", "grass"], grid=8, frame="crop")
    assert planted_model.prompts == ["sky, tree, grass"]
    assert labels.shape == (64, 64) and len(names) == labels.max() + 1
    truth = np.kron(planted_model.truth, np.ones((4, 4), np.int32))
    for k, name in enumerate(names):  # each segment named after the region most of it covers
        region = np.bincount(truth[labels == k]).argmax()
        assert name == planted_model.region_words[region]
    result = segment_detailed(_image(), planted_model, vocabulary=["sky", "tree", "grass"], grid=8, frame="crop")
    assert result["names"] == names and result["prompt"] == "sky, tree, grass" and result["caption"] is None
    assert [r["name"] for r in result_records(result)] == [names[r["id"]] for r in result_records(result)]
    # Without a vocabulary: plain labels, records without names.
    plain = segment_detailed(_image(), planted_model, grid=8, frame="crop")
    assert "names" not in plain and "name" not in result_records(plain)[0]


def test_segment_with_prompt_and_captioner(planted_model):
    import diffseg

    labels, names = diffseg.segment(_image(), planted_model, prompt="a sky over a tree and grass", grid=8,
                                    frame="crop")
    truth = np.kron(planted_model.truth, np.ones((4, 4), np.int32))
    assert len(names) >= 2
    for k, name in enumerate(names):  # each segment named after the region most of it covers
        assert name == planted_model.region_words[np.bincount(truth[labels == k]).argmax()]
    seen = []

    def captioner(rgb):
        seen.append(rgb.shape)
        return "a tree next to the grass under a blue sky"

    _, names2 = diffseg.segment(_image(), planted_model, captioner=captioner, grid=8, frame="crop")
    assert seen == [(64, 64, 3)] and names2 == names
    assert planted_model.prompts[-1] == "a tree next to the grass under a blue sky"
    # A vocabulary word must be in an explicit prompt: refused before the UNet pass.
    n = len(planted_model.prompts)
    with pytest.raises(ValueError, match="'car' is not in the prompt"):
        diffseg.segment(_image(), planted_model, prompt="a tree", vocabulary=["tree", "car"], frame="crop")
    assert len(planted_model.prompts) == n


def test_segment_many_with_vocabulary(planted_model):
    import diffseg
    from diffseg.batch import segment_many

    want = diffseg.segment(_image(), planted_model, vocabulary=["sky", "tree", "grass"], grid=8, frame="crop")
    got = list(segment_many([_image(), _image()], planted_model, vocabulary=["sky", "tree", "grass"], grid=8,
                           frame="crop"))
    assert [i for i, _ in got] == [0, 1]
    for _, (labels, names) in got:
        np.testing.assert_array_equal(labels, want[0])
        assert names == want[1]


def test_segment_naming_bad_inputs(planted_model):
    import diffseg

    with pytest.raises(ValueError, match="voting must be one of"):
        diffseg.segment(_image(), planted_model, vocabulary=["sky"], voting="best")
    with pytest.raises(ValueError, match="voting must be one of"):
        diffseg.segment(_image(), planted_model, voting="best")
    with pytest.raises(ValueError, match="vocabulary is empty"):
        diffseg.segment(_image(), planted_model, vocabulary=[])
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        diffseg.segment(_image(), planted_model, prompt="  ")
    with pytest.raises(TypeError, match="captioner must be callable"):
        diffseg.segment(_image(), planted_model, captioner="blip")
    with pytest.raises(TypeError, match="frame='whole' needs a model with .image_size"):
        diffseg.segment(_image(), planted_model, vocabulary=["sky"])  # frame="whole" by default
    with pytest.raises(ValueError, match="frame must be one of"):
        diffseg.segment(_image(), planted_model, vocabulary=["sky"], frame="both")
    with pytest.raises(ValueError, match="no nouns"):
        diffseg.segment(_image(), planted_model, prompt="the of and", frame="crop")
    with pytest.raises(ValueError, match="captioner must return a non-empty string"):
        diffseg.segment(_image(), planted_model, captioner=lambda rgb: None, frame="crop")


def test_named_overlay_groups_names_and_draws_a_legend():
    from diffseg import viz

    labels = np.zeros((60, 90), np.int32)
    labels[:, 30:] = 1
    labels[:, 60:] = 2
    names = ["cat", "grass", "cat"]
    img = np.full((60, 90, 3), 100, np.uint8)
    plain = viz.named_overlay(img, labels, names, legend=False)
    # Labels 0 and 2 share a name, hence a colour; label 1 another.
    assert (plain[5, 80] == plain[5, 10]).all() and not (plain[5, 45] == plain[5, 10]).all()
    assert (plain == viz.overlay(img, np.array([0, 1, 0])[labels])).all()
    with_legend = viz.named_overlay(img, labels, names)
    assert with_legend.shape == (60, 90, 3)
    changed = np.any(with_legend != plain, axis=2)
    assert changed[:5, :5].all() and not changed[40:, :].any()  # the legend box is in the top-left corner
    with pytest.raises(ValueError, match="names has 2 entries"):
        viz.named_overlay(img, labels, ["cat", "grass"])
    with pytest.raises(ValueError, match=r"labels must be \(H, W\)"):
        viz.named_overlay(img, labels[0], names)


def test_cli_segment_vocabulary_writes_names(planted_model, monkeypatch, tmp_path):
    import json

    from PIL import Image

    from diffseg.cli import _common, main

    planted_model.metadata, planted_model.path = {"model_id": "planted"}, "planted"
    planted_model.close = lambda: None
    monkeypatch.setattr(_common, "open_model", lambda args, **kw: planted_model)
    Image.fromarray(_image()).save(tmp_path / "a.png")
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "a.png"), "-o", str(out), "--grid", "8", "-q", "--frame", "crop",
                 "--vocabulary", "sky, tree,grass", "--voting", "majority"]) == 0
    doc = json.loads((out / "a.json").read_text())
    assert doc["prompt"] == "sky, tree, grass" and doc["words"] == ["sky", "tree", "grass"]
    assert doc["made_with"]["settings"]["vocabulary"] == ["sky", "tree", "grass"] and doc["made_with"]["settings"]["voting"] == "majority"
    names = [r["name"] for r in doc["annotations"]]
    assert len(names) == doc["n_segments"] >= 2
    from diffseg.io.records import records_to_labels

    labels = records_to_labels(doc["annotations"])
    truth = np.kron(planted_model.truth, np.ones((4, 4), np.int32))
    for r in doc["annotations"]:  # named after the planted region most of the segment covers
        assert r["name"] == planted_model.region_words[np.bincount(truth[labels == r["id"]]).argmax()]
    from diffseg.viz import named_overlay

    overlay = np.asarray(Image.open(out / "a.overlay.png"))
    np.testing.assert_array_equal(overlay, named_overlay(_image(), labels, names))
    # --prompt alone: its nouns; --skip-existing redoes outputs made with other words.
    assert main(["segment", str(tmp_path / "a.png"), "-o", str(out), "--grid", "8", "-q", "--skip-existing",
                 "--frame", "crop", "--prompt", "grass and sky"]) == 0
    doc = json.loads((out / "a.json").read_text())
    assert doc["words"] == ["grass", "sky"] and doc["made_with"]["settings"]["prompt"] == "grass and sky"
    assert main(["segment", str(tmp_path / "a.png"), "-o", str(out), "--vocabulary", " , "]) == 2


# ---------------------------------------------------------------- bundles with cross-attention
@pytest.fixture(scope="module")
def cross_bundle(tiny_sd_dir, tmp_path_factory):
    """The tiny SD exported at 128 px with cross_attention=True."""
    from diffseg.sd.export import export_bundle

    return export_bundle(tiny_sd_dir, str(tmp_path_factory.mktemp("cross_bundle")), size=128, cross_attention=True)


def eager_prompt_attention(pipe, images, prompt, timestep=300):
    """Eager diffusers, conditioned on ``prompt``: diffusers' own ``AttnProcessor``
    (``Attention.get_attention_scores``) on every attention layer, recording
    the head mean of attn1 and attn2 probabilities; per resolution the mean
    over layers. Returns ``(self {n: (B, n, n)}, cross {n: (B, n, 77)}, eps)``
    as float64 arrays."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor

    recorded = {"attn1": {}, "attn2": {}}

    class Recording(AttnProcessor):
        def __init__(self, kind):
            super().__init__()
            self.kind = kind

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                     *args, **kwargs):
            original = attn.get_attention_scores

            def scores(query, key, mask=None):
                probs = original(query, key, mask)
                b = probs.shape[0] // attn.heads
                mean = probs.reshape(b, attn.heads, *probs.shape[1:]).double().mean(1)
                recorded[self.kind].setdefault(mean.shape[1], []).append(mean)
                return probs

            attn.get_attention_scores = scores
            try:
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
            finally:
                del attn.get_attention_scores

    pipe.unet.set_attn_processor({name: Recording(name.split(".")[-2]) for name in pipe.unet.attn_processors})
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(images)).float()
        latent = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        context, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
        eps = pipe.unet(latent, 300 if timestep is None else timestep,
                        encoder_hidden_states=context.expand(len(images), -1, -1), return_dict=False)[0]
    mean = {kind: {n: torch.stack(v).mean(0).numpy() for n, v in maps.items()} for kind, maps in recorded.items()}
    return mean["attn1"], mean["attn2"], eps.double().numpy()


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def test_traced_prompt_methods_equal_eager_diffusers(cross_bundle, tiny_sd_dir):
    """The TorchScript methods (torch.jit.load, no shim) against eager
    diffusers, on a non-square batch of 2 (the trace was made at 1 x 128 x 128)."""
    torch = pytest.importorskip("torch")
    from sd_tiny import load_tiny_sd

    from diffseg.sd.cross import load_tokenizer, tokenize

    pipe = load_tiny_sd(tiny_sd_dir)
    bundle = torch.jit.load(cross_bundle)
    prompt = "a cat, on the grass!"
    ids, tokens = tokenize(load_tokenizer(cross_bundle), prompt)
    np.testing.assert_array_equal(ids[0], pipe.tokenizer(prompt, padding="max_length", max_length=77).input_ids)
    with torch.no_grad():
        context = bundle.encode_text(torch.from_numpy(ids))
        want_context, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    assert _rel(context.numpy(), want_context.double().numpy()) < 1e-5

    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 3, 192, 128)).astype(np.float32)
    with torch.no_grad():
        out = bundle.forward_prompt(torch.from_numpy(images), torch.tensor([300]), torch.from_numpy(ids).repeat(2, 1))
    self_ref, cross_ref, eps_ref = eager_prompt_attention(pipe, images, prompt)
    sizes = sorted(self_ref, reverse=True)
    assert len(out) == 1 + 2 * len(sizes) and sizes == [384, 96, 24, 6]
    assert _rel(out[0].numpy(), eps_ref) < 1e-4
    for i, n in enumerate(sizes):
        assert tuple(out[1 + i].shape) == (2, n, n)
        assert _rel(out[1 + i].numpy(), self_ref[n]) < 1e-4
        assert tuple(out[1 + len(sizes) + i].shape) == (2, n, 77)
        assert _rel(out[1 + len(sizes) + i].numpy(), cross_ref[n]) < 1e-4


def test_bundle_with_and_without_cross_attention(cross_bundle, tiny_bundle):
    """The option adds methods, tokenizer files and metadata; without it the
    bundle has none of them (the plain bundle's size and speed)."""
    torch = pytest.importorskip("torch")
    import zipfile

    from diffseg.sd.bundle import read_metadata

    def extras(path):
        return sorted(i.filename.split("/extra/", 1)[1] for i in zipfile.ZipFile(path).infolist()
                      if "/extra/" in i.filename)

    assert extras(tiny_bundle) == ["diffseg.json"]
    meta = read_metadata(cross_bundle)
    assert extras(cross_bundle) == sorted(["diffseg.json", *meta["tokenizer_files"]])
    assert meta["cross_attention"] is True and meta["cross_resolutions"] == [16, 8, 4, 2]
    assert meta["text_tokens"] == 77 and meta["context_dim"] == 24
    assert read_metadata(tiny_bundle).get("cross_attention", False) is False
    plain, cross = torch.jit.load(tiny_bundle), torch.jit.load(cross_bundle)
    for method in ("encode_text", "denoise_prompt", "forward_prompt"):
        assert hasattr(cross, method) and not hasattr(plain, method)
    # The weights are shared between the plain and the prompt graphs: the
    # difference is the text encoder (and the graphs' code).
    def data_bytes(path):
        return sum(i.file_size for i in zipfile.ZipFile(path).infolist() if "/data/" in i.filename)

    text_params = sum(p.numel() * 4 for p in cross.text_encoder.parameters())
    assert data_bytes(cross_bundle) - data_bytes(tiny_bundle) <= text_params + 4096
    image = torch.from_numpy(np.random.default_rng(1).uniform(-1, 1, (1, 3, 128, 128)).astype(np.float32))
    with torch.no_grad():
        for a, b in zip(plain.forward(image, torch.tensor([300])), cross.forward(image, torch.tensor([300]))):
            assert torch.equal(a, b)  # the plain pass of a cross-attention bundle is the plain bundle's


@pytest.mark.parametrize("voting", ["mean", "majority"])
def test_name_from_cross_equals_name_segments_on_full_logits(voting):
    rng = np.random.default_rng(5)
    tokens = _tokens("ca", "t</w>", ",</w>", "gr", "a", "ss</w>", ",</w>", "sky</w>", length=77)
    cross = _random_cross(rng, ((8, 6), (4, 3), (2, 2)))
    labels = rng.integers(0, 5, size=(40, 40)).astype(np.int32)
    words = ["cat", "grass", "sky"]
    full = aggregate_cross_attention(cross, labels.shape)
    assert semantic.name_from_cross(labels, cross, tokens, words, voting) == \
        name_segments(labels, full, tokens, words, voting)
    with pytest.raises(ValueError, match="76 entries"):
        semantic.name_from_cross(labels, cross, tokens[:76], words, voting)
    # A window of a larger working grid, one label pixel per cell: the grid's logits, cut.
    big = aggregate_cross_attention(cross, (50, 60))[3:43, 12:52]
    assert semantic.name_from_cross(labels, cross, tokens, words, voting, size=(50, 60), window=(3, 12, 40, 40)) == \
        name_segments(labels, big, tokens, words, voting)
    with pytest.raises(ValueError, match="does not lie in the working grid"):
        semantic.name_from_cross(labels, cross, tokens, words, voting, size=(50, 60), window=(20, 12, 40, 40))


@pytest.mark.parametrize("voting", ["mean", "majority"])
def test_name_from_cross_on_a_coarser_working_grid(voting):
    """Labels 4x finer than the working grid (a large photo named at the model's
    size): each label pixel reads its cell, as if the grid's logits were
    repeated 4 x 4 (the oracle), without ever making the full-size logits."""
    rng = np.random.default_rng(6)
    tokens = _tokens("ca", "t</w>", ",</w>", "gr", "a", "ss</w>", ",</w>", "sky</w>", length=77)
    cross = _random_cross(rng, ((8, 6), (4, 3), (2, 2)))
    labels = np.repeat(np.repeat(rng.integers(0, 6, size=(25, 20)), 8, 0), 8, 1).astype(np.int32)
    labels[rng.random(labels.shape) < 0.2] = 3  # not aligned with the cells
    words = ["cat", "grass", "sky"]
    cells = aggregate_cross_attention(cross, (50, 40))
    oracle = np.repeat(np.repeat(cells, 4, axis=0), 4, axis=1)
    assert semantic.name_from_cross(labels, cross, tokens, words, voting, size=(50, 40)) == \
        name_segments(labels, oracle, tokens, words, voting)
    # the same with the labels in a padded window: rows 5..45 of a 60-row grid
    padded = aggregate_cross_attention(cross, (60, 40))
    oracle = np.repeat(np.repeat(padded[5:55], 4, axis=0), 4, axis=1)
    assert semantic.name_from_cross(labels, cross, tokens, words, voting, size=(60, 40), window=(5, 0, 50, 40)) \
        == name_segments(labels, oracle, tokens, words, voting)


# ---------------------------------------------------------------- through the libtorch shim
@pytest.fixture(scope="module")
def cross_model(cross_bundle):
    pytest.importorskip("diffseg._torch", reason="diffseg._torch not built (pip install --no-build-isolation)")
    import diffseg

    model = diffseg.load_model(cross_bundle)
    yield model
    model.close()


ORACLE = {}  # largest relative differences seen, printed by the last shim test (-s)


@pytest.mark.parametrize("frame,shape", [("crop", (96, 160)), ("whole", (128, 192))])
def test_shim_cross_attention_equals_eager_diffusers(cross_model, tiny_sd_dir, frame, shape):
    """Model.prompt_attention / cross_attention through the shim against
    eager diffusers' own attention on attn1 and attn2 (rel. diff <= 1e-3)."""
    from sd_tiny import load_tiny_sd

    pipe = load_tiny_sd(tiny_sd_dir)
    rgb = np.random.default_rng(2).integers(0, 256, (*shape, 3), dtype=np.uint8)
    prompt = "a tabby cat, on green grass"
    attn, cross, tokens = cross_model.prompt_attention(rgb, prompt, frame=frame)
    x = cross_model.preprocess(rgb, frame=frame)
    self_ref, cross_ref, _ = eager_prompt_attention(pipe, x[None], prompt)
    H, W = x.shape[1:]
    grids = [(H * r // 128, W * r // 128) for r in (16, 8, 4, 2)]
    keys = [g[0] if g[0] == g[1] else g for g in grids]
    assert list(cross) == keys and list(attn) == keys
    for key, (h, w) in zip(keys, grids):
        assert cross[key].shape == (h * w, 77) and cross[key].dtype == np.float32
        np.testing.assert_allclose(cross[key].sum(axis=1), 1, rtol=1e-5)
        rel_cross = _rel(cross[key], cross_ref[h * w][0])
        rel_self = _rel(attn[key], self_ref[h * w][0])
        ORACLE[(frame, key)] = (rel_cross, rel_self)
        assert rel_cross <= 1e-3 and rel_self <= 1e-3
    assert tokens[:3] == [BOS, "a</w>", "t"] and len(tokens) == 77
    cross2, tokens2 = cross_model.cross_attention(rgb, prompt, frame=frame)
    assert tokens2 == tokens
    for key in cross:
        np.testing.assert_array_equal(cross2[key], cross[key])
    print("\nmax rel. diff vs eager diffusers (cross, self):",
          {str(k): tuple(f"{v:.1e}" for v in vals) for k, vals in ORACLE.items()})


def test_names_from_the_shim_model(cross_model):
    """segment(..., vocabulary=) with the tiny bundle: the names equal
    name_segments on the model's own cross-attention and labels (random
    weights: which names win is arbitrary)."""
    import diffseg
    from diffseg.pipeline import segment_detailed

    rgb = np.random.default_rng(3).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    words = ["tabby cat", "grass", "sky"]
    result = segment_detailed(rgb, cross_model, vocabulary=words, grid=8, kl_threshold=0.3, frame="crop")
    assert result["prompt"] == "tabby cat, grass, sky"
    attn, cross, tokens = cross_model.prompt_attention(rgb, "tabby cat, grass, sky")
    want = reference.segment_attention(attn, grid=8, kl_threshold=0.3, size=(128, 128))
    assert want.max() >= 2  # several segments to name
    np.testing.assert_array_equal(result["crop_labels"], want)
    logits = diffseg.semantic.aggregate_cross_attention(cross, (128, 128))
    assert result["names"] == diffseg.name_segments(result["crop_labels"], logits, tokens, words)
    assert set(result["names"]) <= set(words)


def test_names_from_the_shim_model_whole_frame(cross_model):
    """frame="whole" on a non-square image: the cross-attention is aggregated
    on the padded working frame and cut to the image, as the labels are."""
    import diffseg
    from diffseg.io.images import resize_nearest
    from diffseg.pipeline import segment_detailed

    rgb = np.random.default_rng(4).integers(0, 256, (96, 160, 3), dtype=np.uint8)
    words = ["cat", "grass"]
    result = segment_detailed(rgb, cross_model, vocabulary=words, grid=8, kl_threshold=0.3, frame="whole")
    assert result["labels"].shape == (96, 160) and len(result["names"]) == result["labels"].max() + 1
    assert result["labels"].max() >= 2
    _, cross, tokens = cross_model.prompt_attention(rgb, "cat, grass", frame="whole")
    # tiny model (128 px): 96x160 -> resized 128x213, padded to a 128x256 frame, 21 px left, 22 right
    g = result["geometry"]
    assert (g.frame_height, g.frame_width, g.resized_width, g.left) == (128, 256, 213, 21)
    cells = diffseg.semantic.aggregate_cross_attention(cross, (128, 256))[:, 21:21 + 213]
    # each image pixel reads the frame cell its centre falls in
    logits = np.stack([resize_nearest(cells[:, :, k], 96, 160) for k in range(cells.shape[2])], axis=2)
    assert result["names"] == diffseg.name_segments(result["labels"], logits, tokens, words)
    labels, names = diffseg.segment(rgb, cross_model, vocabulary=words, grid=8, kl_threshold=0.3)  # whole frame
    np.testing.assert_array_equal(labels, result["labels"])
    assert names == result["names"]


def test_bundle_without_cross_attention_refuses_prompts(tiny_model):
    rgb = np.zeros((64, 64, 3), np.uint8)
    assert not tiny_model.has_cross_attention
    for call in (lambda: tiny_model.cross_attention(rgb, "a cat"), lambda: tiny_model.prompt_attention(rgb, "a cat"),
                 lambda: tiny_model.tokenize("a cat")):
        with pytest.raises(ValueError, match="export it again with --cross-attention"):
            call()
    import diffseg

    with pytest.raises(ValueError, match="--cross-attention"):
        diffseg.segment(rgb, tiny_model, vocabulary=["cat"])


def test_prompt_bad_inputs(cross_model):
    rgb = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(TypeError, match="prompt must be a string"):
        cross_model.cross_attention(rgb, None)
    with pytest.raises(ValueError, match="timestep"):
        cross_model.cross_attention(rgb, "a cat", timestep=-1)
    with pytest.raises(ValueError, match="frame must be one of"):
        cross_model.cross_attention(rgb, "a cat", frame="middle")


def test_cli_segment_vocabulary_with_the_tiny_bundle(cross_bundle, tiny_bundle, tmp_path):
    import json

    from PIL import Image

    from diffseg.cli import main

    Image.fromarray(np.random.default_rng(6).integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "a.png"), "-o", str(out), "--model", cross_bundle, "--grid", "8", "-q",
                 "--vocabulary", "cat,grass"]) == 0
    doc = json.loads((out / "a.json").read_text())
    assert doc["prompt"] == "cat, grass" and {r["name"] for r in doc["annotations"]} <= {"cat", "grass"}
    assert np.asarray(Image.open(out / "a.overlay.png")).shape == (96, 128, 3)
    # A bundle without cross-attention: a usage error before any image.
    assert main(["segment", str(tmp_path / "a.png"), "-o", str(tmp_path / "out2"), "--model", tiny_bundle, "-q",
                 "--vocabulary", "cat"]) == 2
    assert not (tmp_path / "out2").exists()


def test_naming_refuses_words_before_any_pass(planted_model):
    """Words that the prompt cannot hold, or that have no tokens of their own,
    fail before any UNet pass (one error, not one per image)."""
    import diffseg

    words = [f"w{i}" for i in range(40)]  # "w0, w1, ..., w39": past the 77 tokens
    with pytest.raises(ValueError, match="does not fit in the prompt"):
        diffseg.segment(_image(), planted_model, vocabulary=words, frame="crop")
    with pytest.raises(ValueError, match="'tree' has no tokens of its own"):
        list(diffseg.segment_many([_image()] * 3, planted_model, vocabulary=["tree", "palm tree"],
                                  prompt="a palm tree", frame="crop"))
    assert planted_model.prompts == []  # no pass ran


def test_default_model_for_naming_has_cross_attention(monkeypatch):
    """diffseg.segment(img, vocabulary=...) with the default model loads (exports)
    it with cross-attention; that model then also serves plain calls."""
    import diffseg
    import diffseg.sd.model
    from diffseg import pipeline

    loaded = []

    class Fake(PlantedModel):
        closed = False

        def __init__(self, cross_attention):
            truth = np.zeros((16, 16), np.int32)
            truth[:, 8:] = 1
            super().__init__(truth, ["sky", "tree"])
            self.has_cross_attention = cross_attention

    def fake_load_model(path_or_id=None, *, cross_attention=False, **kw):
        loaded.append((path_or_id, cross_attention))
        return Fake(cross_attention)

    monkeypatch.setattr(diffseg.sd.model, "load_model", fake_load_model)
    monkeypatch.setattr(pipeline, "_default_model", None)
    diffseg.segment(_image(), frame="crop")
    assert loaded == [(None, False)]
    _, names = diffseg.segment(_image(), vocabulary=["sky", "tree"], frame="crop", grid=8)
    assert loaded == [(None, False), (None, True)] and set(names) <= {"sky", "tree"}
    diffseg.segment(_image(), frame="crop")  # the cross-attention model runs plain passes too
    diffseg.segment(_image(), vocabulary=["sky"], frame="crop")
    assert len(loaded) == 2


def test_a_model_path_is_opened_once(tmp_path, monkeypatch):
    """segment(img, "bundle-dir") opens the bundle on the first call only;
    a bundle rewritten since (other size or mtime) is opened again."""
    import os

    import diffseg
    import diffseg.sd.model
    from diffseg import pipeline

    opened = []

    def fake_load_model(path_or_id=None, *, cross_attention=False, **kw):
        truth = np.zeros((16, 16), np.int32)
        truth[8:] = 1
        model = PlantedModel(truth, ["sky"])
        model.closed = False
        opened.append(path_or_id)
        return model

    monkeypatch.setattr(diffseg.sd.model, "load_model", fake_load_model)
    monkeypatch.setattr(pipeline, "_opened", {})
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "diffseg_bundle.pt").write_bytes(b"x" * 10)
    first = diffseg.segment(_image(), str(bundle), frame="crop")
    diffseg.segment(_image(), bundle, frame="crop")  # a Path to the same folder
    diffseg.segment(_image(), str(bundle / "diffseg_bundle.pt"), frame="crop")  # the file itself
    assert len(opened) == 1
    st = os.stat(bundle / "diffseg_bundle.pt")
    os.utime(bundle / "diffseg_bundle.pt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten
    np.testing.assert_array_equal(diffseg.segment(_image(), str(bundle), frame="crop"), first)
    assert len(opened) == 2
    pipeline.release_models()
    assert pipeline._opened == {}
