"""What storing attention as float16 (``save_attention(..., dtype="float16")``)
changes in the labels: the fraction of label pixels that differ from the
float32 labels after Hungarian matching (``match_labels``), on planted
attention (diffseg.synthetic) and on attention from a tiny random-weight SD
(tests/sd_tiny.py; export at --size px). Numbers go into docs/evaluation.md.

    python benchmarks/attention_float16.py [--size 512] [--images 4] [--tau 0.9 1.1]
"""
import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

import diffseg
from diffseg.evaluation.metrics import match_labels


def changed_fraction(attn, kl_threshold=1.1, size=512):
    """(fraction of pixels changed, segments float32, segments float16)."""
    half = {s: a.astype(np.float16).astype(np.float32) for s, a in attn.items()}
    a = diffseg.segment_attention(attn, kl_threshold=kl_threshold, size=(size, size))
    b = diffseg.segment_attention(half, kl_threshold=kl_threshold, size=(size, size))
    return float((match_labels(b, a) != a).mean()), int(a.max()) + 1, int(b.max()) + 1


def report(name, rows):
    """One line per threshold: changed pixels (mean, max), segment counts."""
    for t in sorted({r[0] for r in rows}):
        sel = [r[1:] for r in rows if r[0] == t]
        fr = np.array([r[0] for r in sel])
        same_k = sum(r[1] == r[2] for r in sel)
        print(f"{name}, tau {t:g}: {len(sel)} maps; changed pixels mean {100 * fr.mean():.4f} %, "
              f"max {100 * fr.max():.4f} %; same segment count in {same_k}/{len(sel)} "
              f"(float32 K: {sorted(r[1] for r in sel)})", flush=True)


def planted(n_cases, taus):
    rows = []
    for seed in range(n_cases):
        attn, _ = diffseg.synthetic.planted_example(64, 4 + seed % 8, seed)
        rows += [(t, *changed_fraction(attn, t)) for t in taus]
    report("planted (R=64, 4-11 segments)", rows)


def tiny_sd(size, n_images, taus):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from sd_tiny import build_tiny_sd

    from diffseg.sd.export import export_bundle

    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sd = build_tiny_sd(str(Path(tmp) / "sd"), sample_size=size)
        model = diffseg.load_model(export_bundle(sd, str(Path(tmp) / "bundle"), size=size))
        for k in range(n_images):
            # smooth random images (blocks of colour + noise): structure the UNet can attend to
            blocks = rng.integers(0, 256, (4, 4, 3)).repeat(size // 4, 0).repeat(size // 4, 1)
            image = np.clip(blocks + rng.normal(0, 20, blocks.shape), 0, 255).astype(np.uint8)
            attn = model.attention(image)
            rows += [(t, *changed_fraction(attn, t)) for t in taus]
        model.close()
    report(f"tiny random-weight SD ({size} px, maps {sorted(attn, reverse=True)})", rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="tiny SD export size (default 512)")
    ap.add_argument("--images", type=int, default=4, help="images through the tiny SD (default 4)")
    ap.add_argument("--planted", type=int, default=8, help="planted cases (default 8)")
    ap.add_argument("--tau", type=float, nargs="+", default=[0.9, 1.1], help="KL thresholds (default 0.9 1.1)")
    ap.add_argument("--tiny-tau", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1, 1.1],
                    help="KL thresholds for the tiny SD, whose random attention is near uniform "
                         "(small thresholds give several segments)")
    args = ap.parse_args()
    planted(args.planted, args.tau)
    tiny_sd(args.size, args.images, args.tiny_tau)


if __name__ == "__main__":
    main()
