"""Make docs/figure.png: DiffSeg's stages on planted self-attention.

No model or weights needed: a known partition of the 64x64 latent grid is
planted into synthetic attention at 64, 32, 16 and 8 (diffseg.synthetic), and
an "image" is painted from the same partition. The figure shows the anchor
grid, the proposals after each merge iteration (each pixel coloured by its
strongest proposal) and the final labels over the image.

    python docs/make_figure.py [OUT.png]
"""
import sys
from pathlib import Path

import numpy as np

import diffseg
from diffseg import viz
from diffseg.io.images import resize_nearest
from diffseg.synthetic import planted_attention, planted_partition


def painted_image(truth, size, seed=0):
    """Flat muted colours per region, a soft light gradient and grain;
    ``size``: a side or ``(height, width)``."""
    rng = np.random.default_rng(seed)
    colours = np.array([[96, 140, 190], [120, 160, 80], [200, 170, 110], [150, 90, 70],
                        [90, 110, 100], [220, 210, 190], [70, 80, 120], [170, 150, 160]], np.float64)
    height, width = (size, size) if np.isscalar(size) else size
    big = resize_nearest(truth, height, width)
    img = colours[big % len(colours)]
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    img *= (0.8 + 0.3 * (1 - yy) * (0.6 + 0.4 * xx))[:, :, None]
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def main(out=None):
    out = Path(out) if out else Path(__file__).with_name("figure.png")
    truth = planted_partition(64, n_segments=7, seed=4)
    attn = planted_attention(truth, resolutions=(64, 32, 16, 8), seed=4)
    image = painted_image(truth, 384)
    A = diffseg.aggregate(attn)
    stages = viz.merge_stages(A, grid=16, kl_threshold=1.1)
    fig = viz.stages_figure(image, stages=stages, size=2.6)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}: proposals per iteration {[len(p) for p in stages]}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
