"""Peak memory and time of naming the segments of a large photo.

Naming aggregates the cross-attention of the words' tokens on a working grid
and lets each segment vote. This compares, in one process, on the shapes of
Stable Diffusion at 512 px (77 tokens; a 4000 x 3000 photo runs on a 64 x 88
latent grid, a 512 x 704 working frame):

  full size:  the cross-attention aggregated at the photo's own size, then
              voted on (how naming worked before it moved to the model's frame;
              spelled out here with the public functions);
  model size: ``diffseg.semantic.name_from_cross`` on the model's frame, each
              photo pixel reading the cell it lies in (what ``Naming`` does).

Peak memory is NumPy's allocations above the labels' own (``tracemalloc``);
the names of the two agree where the working grid resolves the segments.

    python benchmarks/bench_naming.py [--height 3000 --width 4000] [--words 3]
"""
import argparse
import time
import tracemalloc

import numpy as np

from diffseg import semantic
from diffseg.io.images import whole_frame_geometry

WORDS = ["cat", "grass", "sky", "tree", "road", "car", "person", "building"]


def tokens_for(words):
    toks = ["<|startoftext|>"]
    for i, w in enumerate(words):
        toks.append(w + "</w>")
        if i < len(words) - 1:
            toks.append(",</w>")
    return toks + ["<|endoftext|>"] * (77 - len(toks))


def cross_attention(geometry, rng):
    """Random cross-attention on the four grids of the frame (rows sum to 1)."""
    cross = {}
    for r in (64, 32, 16, 8):
        h, w = geometry.frame_height * r // 512, geometry.frame_width * r // 512
        a = rng.random((h * w, 77)).astype(np.float32) ** 4
        cross[(h, w)] = a / a.sum(1, keepdims=True)
    return cross


def labels_for(height, width, rng, n=12):
    """Blocky segments at the photo's size."""
    small = rng.integers(0, n, (height // 100 + 1, width // 100 + 1)).astype(np.int32)
    return np.ascontiguousarray(np.repeat(np.repeat(small, 100, 0), 100, 1)[:height, :width])


def full_size(labels, cross, tokens, words, g):
    """Aggregate at the photo's scale over the whole frame, cut the photo out, vote."""
    frame_h, frame_w, top, left = g.label_window()
    positions = semantic.word_token_indices(tokens, words)
    sel = sorted({p for pos in positions for p in pos})
    logits = semantic.aggregate_cross_attention(cross, (frame_h, frame_w), tokens=sel)
    logits = logits[top:top + g.height, left:left + g.width]
    column = {p: i for i, p in enumerate(sel)}
    maps = semantic._normalised_maps(logits.reshape(-1, len(sel)), [[column[p] for p in pos] for pos in positions],
                                     words)
    return semantic._vote(labels, maps, words, "mean")


def model_size(labels, cross, tokens, words, g):
    return semantic.name_from_cross(labels, cross, tokens, words, size=(g.frame_height, g.frame_width),
                                    window=(g.top, g.left, g.resized_height, g.resized_width))


def measure(fn, *args):
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    names = fn(*args)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return names, peak, seconds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--height", type=int, default=3000)
    p.add_argument("--width", type=int, default=4000)
    p.add_argument("--words", type=int, default=3, choices=range(1, len(WORDS) + 1))
    args = p.parse_args()
    rng = np.random.default_rng(0)
    g = whole_frame_geometry(args.height, args.width, 512, 64)
    words = WORDS[:args.words]
    tokens, cross = tokens_for(words), cross_attention(g, rng)
    labels = labels_for(args.height, args.width, rng)
    print(f"photo {args.height} x {args.width}, frame {g.frame_height} x {g.frame_width}, {len(words)} words, "
          f"labels {labels.nbytes / 2**20:.0f} MiB")
    rows = [("model size", *measure(model_size, labels, cross, tokens, words, g)),
            ("full size", *measure(full_size, labels, cross, tokens, words, g))]
    print("| naming on | peak memory above the labels | time |")
    print("|---|---:|---:|")
    for name, _, peak, seconds in rows:
        print(f"| {name} | {peak / 2**20:,.0f} MiB | {seconds:.2f} s |")
    same = sum(a == b for a, b in zip(rows[0][1], rows[1][1]))
    print(f"names agree on {same} of {len(rows[0][1])} segments")


if __name__ == "__main__":
    main()
