"""Make docs/frame.png: a 4:3 image segmented in the crop frame (the published
protocol) and in the whole frame.

No weights can be downloaded here, so the attention is planted
(diffseg.synthetic): a known partition of the image (Voronoi cells) is
sampled on the latent grid each frame would give a Stable Diffusion bundle at
512 px (64 x 64 for the centre crop; 64 x 88 for the padded whole frame of a
4:3 image), planted into self-attention at the four UNet resolutions, and run
through the same code as ``diffseg.segment`` (``finish_detailed``). The crop
frame copies the crop's edge labels outwards (streaks at the sides); the
whole frame segments every pixel.

    python docs/make_frame_figure.py [OUT.png]
"""
import sys
from pathlib import Path

import numpy as np

from diffseg import Settings, viz
from diffseg.evaluation.metrics import match_labels
from diffseg.io.images import center_crop_box, whole_frame_geometry
from diffseg.pipeline import finish_detailed
from diffseg.synthetic import planted_attention
from make_figure import painted_image  # a sibling script: one definition of the painted image

HEIGHT, WIDTH = 480, 640  # a 4:3 photo
SIZE, MULTIPLE = 512, 64  # an SD bundle: short side 512 px, sides multiples of 64 px
# Segment centres (x, y): four inside the centre crop, two in the strips
# beside it (x < 80 or x >= 560), which the crop frame cannot see.
CENTRES = [(200, 120), (420, 110), (260, 360), (450, 330), (35, 250), (610, 180)]


def voronoi(height, width, centres):
    """Label of the nearest centre for every pixel (the image's true segments)."""
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    d = [(xx - x) ** 2 + (yy - y) ** 2 for x, y in centres]
    return np.argmin(d, axis=0).astype(np.int32)


def sample(truth, ys, xs):
    """Truth labels at image points (rows ys, columns xs; clipped into the image)."""
    rows = np.clip(np.floor(ys).astype(int), 0, truth.shape[0] - 1)
    cols = np.clip(np.floor(xs).astype(int), 0, truth.shape[1] - 1)
    return truth[rows[:, None], cols[None, :]]


def grid_truth_whole(truth, g, h, w):
    """Truth at the cell centres of the whole frame's h x w latent grid
    (padding takes the nearest image pixel, as edge replication does)."""
    sy, sx = g.resized_height / g.height, g.resized_width / g.width
    ys = ((np.arange(h) + 0.5) * g.frame_height / h - g.top) / sy
    xs = ((np.arange(w) + 0.5) * g.frame_width / w - g.left) / sx
    return sample(truth, ys, xs)


def grid_truth_crop(truth, R):
    top, left, side = center_crop_box(*truth.shape)
    centres = (np.arange(R) + 0.5) * side / R
    return sample(truth, top + centres, left + centres)


def main(out=None):
    out = Path(out) if out else Path(__file__).with_name("frame.png")
    truth = voronoi(HEIGHT, WIDTH, CENTRES)
    image = painted_image(truth, (HEIGHT, WIDTH), seed=2)

    g = whole_frame_geometry(HEIGHT, WIDTH, SIZE, MULTIPLE)
    h, w = g.frame_height // 8, g.frame_width // 8
    whole_attn = planted_attention(grid_truth_whole(truth, g, h, w),
                                   resolutions=[(h // f, w // f) for f in (1, 2, 4, 8)], seed=2)
    crop_attn = planted_attention(grid_truth_crop(truth, 64), resolutions=(64, 32, 16, 8), seed=2)
    whole = finish_detailed(image, whole_attn, g, Settings(), scores=False)["labels"]
    crop = finish_detailed(image, crop_attn, None, Settings(frame="crop"), scores=False)["labels"]

    panels, titles = [image], [f"{WIDTH}x{HEIGHT} image (planted segments)"]
    for name, labels in (("crop", crop), ("whole", whole)):
        matched = match_labels(labels, truth)
        accuracy = float(np.mean(matched == truth))
        panels.append(viz.overlay(image, matched))
        titles.append(f'frame="{name}": {accuracy:.1%} of pixels right')
        print(f"{name}: {labels.max() + 1} segments, pixel accuracy {accuracy:.3f}")
    fig = viz.panel(panels, titles, size=3.6)
    fig.savefig(out, dpi=100)
    print(f"wrote {out} (whole frame {g.frame_width}x{g.frame_height} px, latent grid {w}x{h})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
