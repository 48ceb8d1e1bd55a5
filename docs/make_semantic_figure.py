"""Make docs/semantic.png: segments named from cross-attention, on planted data.

No model or weights needed. A known partition of the 64x64 latent grid is
planted into synthetic self-attention (diffseg.synthetic) and segmented as
usual; the cross-attention of a prompt is *constructed*: every latent cell
attends mostly to the begin token (as Stable Diffusion's does) and, with a
planted margin plus noise, to the tokens of the word its region was given.
The words are spelled as the tiny test tokenizer spells them (one token per
character, ``</w>`` on the last), so most words are several tokens. Two
regions share a word, so the legend groups them.

The names are right because the cross-attention was built to say so: the
figure shows the mechanics (aggregation, word alignment, voting, grouping),
not the quality of a real model.

    python docs/make_semantic_figure.py [OUT.png]
"""
import sys
from pathlib import Path

import numpy as np

import diffseg
from diffseg import semantic, viz
from diffseg.io.images import resize_nearest
from diffseg.synthetic import planted_attention, planted_partition

WORDS = ["sky", "tree", "grass", "road", "car", "house"]
REGION_WORD = [0, 1, 2, 3, 4, 5, 1]  # region -> word; regions 1 and 6 are both "tree"


def char_tokens(words, length=77):
    """The prompt "w1, w2, ..." as the tiny CLIP tokenizer of the tests splits it."""
    tokens = [semantic.BOS]
    for i, word in enumerate(words):
        tokens += list(word[:-1]) + [word[-1] + semantic.END_OF_WORD]
        if i < len(words) - 1:
            tokens.append("," + semantic.END_OF_WORD)
    tokens.append(semantic.EOS)
    return tokens + [semantic.EOS] * (length - len(tokens))


def planted_cross(truth, tokens, resolutions=(64, 32, 16, 8), seed=0):
    """``{s: (s*s, T)}``: softmax of logits 4 for the begin token, 2.5 for the
    tokens of the region's word, Gaussian noise of std 0.6 everywhere."""
    rng = np.random.default_rng(seed)
    positions = semantic.word_token_indices(tokens, WORDS)
    cross = {}
    for s in resolutions:
        seg = resize_nearest(truth, s, s).ravel()
        logits = 0.6 * rng.standard_normal((s * s, len(tokens)))
        logits[:, 0] += 4.0
        for region, word in enumerate(REGION_WORD):
            rows = np.flatnonzero(seg == region)
            logits[np.ix_(rows, positions[word])] += 2.5
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        cross[s] = (p / p.sum(axis=1, keepdims=True)).astype(np.float32)
    return cross


def painted_image(truth, size, seed=0):
    """A colour per word (sky blue, tree green...), a light gradient and grain."""
    rng = np.random.default_rng(seed)
    colours = np.array([[120, 170, 225], [50, 110, 60], [110, 170, 80], [110, 110, 115], [190, 60, 50],
                        [200, 170, 130]], np.float64)
    big = resize_nearest(truth, size, size)
    img = colours[np.asarray(REGION_WORD)[big]]
    yy = np.mgrid[0:size, 0:size][0] / size
    img *= (0.85 + 0.2 * (1 - yy))[:, :, None]
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def main(out=None):
    out = Path(out) if out else Path(__file__).with_name("semantic.png")
    truth = planted_partition(64, n_segments=len(REGION_WORD), seed=4)
    attn = planted_attention(truth, resolutions=(64, 32, 16, 8), seed=4)
    tokens = char_tokens(WORDS)
    cross = planted_cross(truth, tokens, seed=4)
    size = 384
    image = painted_image(truth, size)
    labels = diffseg.segment_attention(attn, kl_threshold=1.1, size=(size, size))
    names = semantic.name_from_cross(labels, cross, tokens, WORDS, voting="mean")
    logits = semantic.aggregate_cross_attention(cross, size, tokens=semantic.word_token_indices(tokens, ["car"])[0])
    fig = viz.panel([image, viz.overlay(image, labels), logits.mean(axis=2), viz.named_overlay(image, labels, names, alpha=0.75)],
                    ["image (planted)", f"{len(names)} segments", 'cross-attention of "car" (3 tokens)',
                     "named segments"], size=2.6)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}: names {names}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
