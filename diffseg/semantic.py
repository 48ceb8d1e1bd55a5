"""Semantic labels: naming DiffSeg's segments with words, from the UNet's
cross-attention (the official demo's optional last step).

::

    cross, tokens = model.cross_attention(image, "cat, grass, sky")
    logits = diffseg.semantic.aggregate_cross_attention(cross, labels.shape)
    names = diffseg.name_segments(labels, logits, tokens, ["cat", "grass", "sky"])

What the official code does (google/diffseg, read, not copied): the demo
(``diffseg.ipynb``) captions the image with BLIP, passes the caption as the
prompt of the one UNet pass, keeps the caption's nouns (NLTK POS tags ``NN*``)
and their word positions; ``DiffSeg.aggregate_x_weights``
(``diffseg/segmentor.py``) upsamples each resolution's head-averaged
cross-attention ``(s*s, 77)`` bilinearly to 512x512, normalises it over the 77
tokens and sums the resolutions with weights [1, 1, 1, 1];
``DiffSeg.get_semantics`` takes each noun's token map (word position + 1 for
the BOS token), L2-normalises it over the image and names each segment by
``voting``: ``"mean"`` (the demo's choice) the argmax over nouns of the
segment's mean, ``"majority"`` the *median* of the per-pixel argmax indices.
Segments with the same noun are grouped (``label_to_mask``).

Differences, on purpose:

* Words are aligned to the tokenizer's tokens (:func:`word_token_indices`)
  instead of assuming one token per word (the official ``index + 1`` is wrong
  for any word the tokenizer splits, and for punctuation); a word of several
  tokens uses the mean of its tokens' maps, every occurrence of the word in
  the prompt included.
* Any label map size and any (also non-square) attention grid.

Pure NumPy; no torch.
"""
import re
from collections import OrderedDict

import numpy as np

from ._interp import resize_bilinear

VOTING = ("mean", "majority")
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"


# ---------------------------------------------------------------- aggregation
def _grid(key, n):
    """(h, w) of a cross-attention entry keyed ``key`` with ``n`` query rows."""
    if isinstance(key, tuple):
        if len(key) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in key):
            raise ValueError(f"cross: a key must be a side s or a grid (h, w) of positive integers, got {key!r}")
        h, w = int(key[0]), int(key[1])
    elif isinstance(key, (int, np.integer)) and not isinstance(key, bool) and key > 0:
        h = w = int(key)
    else:
        raise ValueError(f"cross: a key must be a side s or a grid (h, w) of positive integers, got {key!r}")
    if h * w != n:
        raise ValueError(f"cross[{key!r}] has {n} rows, but its grid {h}x{w} has {h * w} positions")
    return h, w


def _size(size):
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (size, size)
    try:
        H, W = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be an integer or (height, width), got {size!r}") from None
    if H < 1 or W < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return H, W


def aggregate_cross_attention(cross, size, weights=None, *, tokens=None):
    """Cross-attention of every resolution on one ``size`` grid, as the
    official ``aggregate_x_weights``: ``(H, W, T)`` float32 logits.

    Parameters
    ----------
    cross : dict
        ``{key: (n, T) array}``: per resolution, the head (and layer) mean of
        the cross-attention probabilities, row = query position (row-major),
        column = prompt token. ``key`` is the side ``s`` of an ``s x s`` grid
        or a tuple ``(h, w)``; ``n = h * w``. T = 77 for Stable Diffusion.
    size : int or (H, W)
        Output grid (the official code: 512).
    weights : sequence or dict, optional
        Per-resolution weights, in the order of the keys by decreasing grid
        area (or a dict keyed like ``cross``); default 1 for every resolution
        (what the official demo passes).
    tokens : sequence of int, optional
        Keep only these token columns (output ``(H, W, len(tokens))``); the
        normalisation still runs over all ``T`` tokens. Saves memory at large
        sizes.

    Each resolution is upsampled to ``size`` bilinearly (half-pixel centres,
    edge clamp, no antialias: TF ``UpSampling2D``/``resize``, torch
    ``align_corners=False``), divided by its sum over the T tokens at every
    pixel, multiplied by its weight, and the resolutions are summed. The sum
    over tokens is taken before upsampling (bilinear interpolation is linear,
    so this equals the official order up to float rounding).
    """
    if not isinstance(cross, dict) or not cross:
        raise ValueError("cross must be a non-empty dict {resolution: (n, T) array}")
    H, W = _size(size)
    arrays, grids = {}, {}
    T = None
    for key, value in cross.items():
        a = np.asarray(value)
        if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
            raise ValueError(f"cross[{key!r}] must be a non-empty (n, T) array, got shape {a.shape}")
        if not np.issubdtype(a.dtype, np.floating):
            raise TypeError(f"cross[{key!r}] must be a float array, got dtype {a.dtype}")
        if T is None:
            T = a.shape[1]
        elif a.shape[1] != T:
            raise ValueError(f"cross: every resolution must have the same number of tokens, got {T} and "
                             f"{a.shape[1]} (cross[{key!r}])")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"cross[{key!r}] contains NaN or Inf")
        if np.any(a < 0):
            raise ValueError(f"cross[{key!r}] has negative entries (attention probabilities are >= 0)")
        grids[key] = _grid(key, a.shape[0])
        arrays[key] = a.astype(np.float32, copy=False)
    keys = sorted(cross, key=lambda k: -grids[k][0] * grids[k][1])
    if weights is None:
        w = {k: 1.0 for k in keys}
    elif isinstance(weights, dict):
        if set(weights) != set(keys):
            raise ValueError(f"weights must have the keys of cross {keys}, got {sorted(weights, key=str)}")
        w = {k: float(weights[k]) for k in keys}
    else:
        try:
            weights = list(weights)
        except TypeError:
            raise TypeError(f"weights must be a sequence or a dict, got {type(weights).__name__}") from None
        if len(weights) != len(keys):
            raise ValueError(f"weights must have one entry per resolution ({len(keys)}), got {len(weights)}")
        w = {k: float(v) for k, v in zip(keys, weights)}
    if not all(np.isfinite(v) for v in w.values()):
        raise ValueError("weights must be finite")
    if tokens is None:
        sel = np.arange(T)
    else:
        sel = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if sel.size == 0 or sel.min() < 0 or sel.max() >= T:
            raise ValueError(f"tokens must be a non-empty list of token indices in [0, {T}), got {tokens!r}")

    out = np.zeros((H, W, sel.size), np.float32)
    for k in keys:
        h, wd = grids[k]
        a = arrays[k]
        x = resize_bilinear(a[:, sel].reshape(h, wd, sel.size), H, W, axes=(0, 1))
        total = resize_bilinear(a.sum(axis=1, dtype=np.float32).reshape(h, wd), H, W)
        if np.any(total <= 0):
            raise ValueError(f"cross[{k!r}]: a position has zero attention over all tokens (cannot normalise)")
        out += x * (np.float32(w[k]) / total)[:, :, None]
    return out


# ---------------------------------------------------------------- tokens and words
def _bytes_to_unicode():
    """The byte -> printable character table of byte-level BPE (GPT-2, CLIP):
    printable Latin-1 bytes map to themselves, the others to code points 256+."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_CHARS = _bytes_to_unicode()


def _token_words(tokens):
    """Words of a CLIP token sequence: ``[(text, [positions])]`` in order.

    A word ends at a token with the end-of-word mark ``</w>``; tokenization
    stops at the first end token; the begin token (position 0) is skipped.
    """
    words, text, positions = [], "", []
    for i, tok in enumerate(tokens):
        if not isinstance(tok, str):
            raise TypeError(f"tokens must be token strings, got {type(tok).__name__} at position {i}")
        if tok == BOS and i == 0:
            continue
        if tok == EOS:
            break
        if tok.endswith(END_OF_WORD):
            words.append((text + tok[: -len(END_OF_WORD)], positions + [i]))
            text, positions = "", []
        else:
            text += tok
            positions.append(i)
    if positions:  # truncated mid-word (prompt longer than the tokenizer's limit)
        words.append((text, positions))
    return words


def _normal_word(word):
    """A requested word as the tokenizer spells it: lowercase, blanks
    removed, UTF-8 bytes mapped to byte-level BPE characters."""
    if not isinstance(word, str):
        raise TypeError(f"words must be strings, got {type(word).__name__}")
    w = re.sub(r"\s+", "", word.lower())
    if not w:
        raise ValueError(f"words must not be empty or blank, got {word!r}")
    return "".join(_BYTE_CHARS[b] for b in w.encode("utf-8"))


def _occurrences(spans, target):
    """Start/end span indices of every run of consecutive words of ``spans``
    that spells ``target``."""
    texts = [t for t, _ in spans]
    found = []
    for start in range(len(spans)):
        text, end = "", start
        while end < len(spans) and len(text) < len(target):
            text += texts[end]
            end += 1
        if text == target:
            found.append((start, end))
    return found


TEXT_TOKENS = 77
"""Tokens the text encoder of Stable Diffusion takes (begin and end included)."""


def _truncated(tokens):
    """Whether a tokenized prompt filled the text encoder's window (no
    padding after its end token), i.e. it may have been cut."""
    return len(tokens) >= TEXT_TOKENS and EOS not in tokens[:-1]


def word_token_indices(tokens, words):
    """Token positions of each word in a tokenized prompt, disjoint.

    ``tokens``: the prompt's tokens as strings, as the CLIP tokenizer gives
    them (``tokenizer.convert_ids_to_tokens``; what
    :meth:`diffseg.Model.cross_attention` returns): ``<|startoftext|>`` at
    position 0, words ending with ``</w>``, then ``<|endoftext|>`` and
    padding. ``words``: words (or phrases such as ``"traffic light"``) of
    the prompt, matched case-insensitively, ignoring blanks, to whole words of
    the prompt (consecutive ones for a phrase).

    Returns one list of positions per word: every token of every occurrence
    that is its own. Each token belongs to one word at most: the longest
    phrases claim their occurrences first, so with ``["light", "traffic
    light"]`` the "light" of "traffic light" is the phrase's, and "light"
    gets only its other occurrences. Positions count the begin token, so the
    official code's ``+1`` is built in.

    Raises ValueError for a word that is not in the prompt, that is cut off
    by the text encoder's token limit (77 tokens for Stable Diffusion,
    begin and end tokens included), or whose every occurrence is part of a
    longer word of ``words``.
    """
    words = _word_list(words)
    spans = _token_words(tokens)
    claimed = set()
    result = [None] * len(words)
    targets = [_normal_word(w) for w in words]
    for i in sorted(range(len(words)), key=lambda i: -len(targets[i])):  # stable: ties in the given order
        occurrences = _occurrences(spans, targets[i])
        free = [(a, b) for a, b in occurrences if not claimed & set(range(a, b))]
        if not free:
            raise ValueError(_missing_word_message(words[i], tokens, spans, occurrences, words, targets))
        for a, b in free:
            claimed.update(range(a, b))
        result[i] = sorted({p for a, b in free for _, pos in spans[a:b] for p in pos})
    return result


def _missing_word_message(word, tokens, spans, occurrences, words, targets):
    prompt = " ".join(t for t, _ in spans)
    if occurrences:
        longer = [w for w, t in zip(words, targets) if len(t) > len(_normal_word(word)) and _normal_word(word) in t]
        return (f"word {word!r} has no tokens of its own: every occurrence of it in the prompt is part of "
                f"{', '.join(map(repr, longer)) or 'a longer word'}; put it in the prompt separately too")
    if _truncated(tokens):
        return (f"word {word!r} does not fit in the prompt: the text encoder takes {len(tokens)} tokens (begin "
                f"and end included) and the prompt is longer; use fewer or shorter words")
    return (f"word {word!r} is not in the prompt (its words: {prompt!r}); every word to name segments with "
            "must appear in the prompt")


def _word_list(words, name="words"):
    """``words`` as a list of non-blank strings; errors name the argument ``name``."""
    if isinstance(words, str):
        raise TypeError(f"{name} must be a list of words, not one string (e.g. ['cat', 'grass', 'sky'])")
    try:
        words = list(words)
    except TypeError:
        raise TypeError(f"{name} must be a list of words, got {type(words).__name__}") from None
    if not words:
        raise ValueError(f"{name} is empty: give at least one word")
    for i, w in enumerate(words):
        if not isinstance(w, str):
            raise TypeError(f"{name}[{i}] must be a string, got {type(w).__name__}")
        if not w.strip():
            raise ValueError(f"{name}[{i}] is blank")
    return words


# ---------------------------------------------------------------- naming
def _word_maps(flat, positions):
    """``(P, N)`` float64: per word the mean of its columns of ``flat`` (P, T')."""
    maps = np.stack([flat[:, p].astype(np.float64).mean(axis=1) for p in positions], axis=1)
    if not np.all(np.isfinite(maps)):
        raise ValueError("cross_logits contains NaN or Inf")
    return maps


def _normalise(maps, norm, words):
    """``maps / norm`` per word; a word whose map is zero everywhere cannot be normalised."""
    if np.any(norm == 0):
        bad = [w for w, n in zip(words, norm) if n == 0]
        raise ValueError(f"cross_logits: the map of {bad!r} is zero everywhere (cannot normalise)")
    return maps / norm


def _normalised_maps(flat, positions, words):
    """:func:`_word_maps` L2-normalised over the P pixels (the official
    ``get_semantics``; with the normalisation, the mean of a word's tokens
    equals their sum)."""
    maps = _word_maps(flat, positions)
    return _normalise(maps, np.linalg.norm(maps, axis=0), words)


def _check_labels(labels):
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be an integer array, got dtype {labels.dtype}")
    return labels


def _vote(labels, maps, words, voting):
    """Names of labels 0..K-1 from the normalised word maps ``(H*W, N)``."""
    flat = labels.reshape(-1).astype(np.int64)
    inside = flat >= 0
    K = int(flat.max()) + 1 if inside.any() else 0
    lab = flat[inside]
    maps = maps[inside]
    counts = np.bincount(lab, minlength=K)
    N = len(words)
    sums = hist = None
    if voting == "mean":  # per-label sums of every word map
        sums = np.stack([np.bincount(lab, weights=maps[:, j], minlength=K) for j in range(N)], axis=1)
    else:  # per-label histogram of the per-pixel argmax word
        hist = np.bincount(lab * N + np.argmax(maps, axis=1), minlength=K * N).reshape(K, N)
    return _choose(sums, hist, counts, words, voting)


def _choose(sums, hist, counts, words, voting):
    """``"mean"``: argmax of the mean (``sums / counts``); ``"majority"``:
    the median of the per-pixel argmax indices from their histogram per
    label -- the middle element (odd count) or the mean of the two middle
    ones, floored (``int()`` of a non-negative median)."""
    K = counts.size
    if K == 0:
        return []
    if voting == "mean":
        choice = np.argmax(sums / np.maximum(counts, 1)[:, None], axis=1)
    else:
        cum = np.cumsum(hist, axis=1)
        lo = np.argmax(cum > (counts[:, None] - 1) // 2, axis=1)
        hi = np.argmax(cum > counts[:, None] // 2, axis=1)
        choice = (lo + hi) // 2
    return [str(words[choice[k]]) if counts[k] else None for k in range(K)]


def name_segments(labels, cross_logits, tokens, words, voting="mean"):
    """Name each segment with one of ``words``: a list of names for labels
    ``0..K-1`` (K = ``labels.max() + 1``; None for a label with no pixel).

    Parameters
    ----------
    labels : (H, W) integer array
        Segment labels; negative labels (e.g. ``border=-1``) are ignored.
    cross_logits : (H, W, T) float array
        :func:`aggregate_cross_attention` at the labels' size.
    tokens : list of str
        The prompt's T tokens (see :func:`word_token_indices`).
    words : list of str
        Candidate names; each must be in the prompt.
    voting : ``"mean"`` or ``"majority"``
        As the official ``get_semantics``: each word's map (the mean of its
        tokens' maps) is L2-normalised over the image; ``"mean"`` (the
        official demo's choice) names a segment by the argmax over words of
        the segment's mean; ``"majority"`` by the median (truncated to an
        integer, as ``int(np.median(...))``) of the per-pixel argmax word
        indices -- a median of indices, so it depends on the order of
        ``words`` and may pick a word that wins no pixel, exactly as the
        official code. Ties go to the first word.
    """
    if voting not in VOTING:
        raise ValueError(f"voting must be one of {VOTING}, got {voting!r}")
    labels = _check_labels(labels)
    logits = np.asarray(cross_logits)
    if logits.ndim != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(f"cross_logits must be (H, W, T) with (H, W) = labels.shape {labels.shape}, "
                         f"got shape {logits.shape}")
    if not np.issubdtype(logits.dtype, np.floating):
        raise TypeError(f"cross_logits must be a float array, got dtype {logits.dtype}")
    if logits.shape[2] != len(tokens):
        raise ValueError(f"cross_logits has {logits.shape[2]} token columns but tokens has {len(tokens)} entries")
    words = _word_list(words)
    positions = word_token_indices(tokens, words)
    maps = _normalised_maps(logits.reshape(-1, logits.shape[2]), positions, words)
    return _vote(labels, maps, words, voting)


def name_from_cross(labels, cross, tokens, words, voting="mean", weights=None, *, size=None, window=None):
    """:func:`name_segments` straight from the per-resolution cross-attention
    (:meth:`diffseg.Model.cross_attention`), aggregated on a working grid of
    ``size`` for the words' tokens only.

    ``size``: the working grid ``(height, width)`` the cross-attention is
    aggregated on (default: the labels' size). ``window``: ``(top, left,
    height, width)``, where the label map lies on that grid (default: all of
    it); for the padded whole frame, the image inside its padding. Each
    label pixel reads the working cell its centre falls in.

    The official code aggregates at 512 x 512, the size of its labels:
    :class:`Naming` works on the model's own frame (512 px on the short side
    for SD), whatever the image's size, so memory does not grow with it.
    Each word's map is L2-normalised over the label pixels (each reading
    its cell), so the names equal ``name_segments(labels, logits, ...)``
    with ``logits`` the working grid's logits read at each label pixel (a
    nearest-neighbour resize); with ``size`` and ``window`` left out, the
    logits of ``aggregate_cross_attention(cross, labels.shape)``.
    """
    if voting not in VOTING:
        raise ValueError(f"voting must be one of {VOTING}, got {voting!r}")
    labels = _check_labels(labels)
    words = _word_list(words)
    if isinstance(cross, dict) and cross:
        T = np.shape(next(iter(cross.values())))[-1]
        if T != len(tokens):
            raise ValueError(f"cross has {T} token columns but tokens has {len(tokens)} entries")
    Hs, Ws = labels.shape if size is None else _size(size)
    top, left, height, width = _window(window, Hs, Ws)
    positions = word_token_indices(tokens, words)
    sel = sorted({p for pos in positions for p in pos})
    column = {p: i for i, p in enumerate(sel)}
    logits = aggregate_cross_attention(cross, (Hs, Ws), weights, tokens=sel).reshape(Hs * Ws, len(sel))
    maps = _word_maps(logits, [[column[p] for p in pos] for pos in positions])
    H, W = labels.shape
    rows = np.clip(np.floor(top + (np.arange(H) + 0.5) * (height / H)).astype(np.int64), 0, Hs - 1)
    cols = np.clip(np.floor(left + (np.arange(W) + 0.5) * (width / W)).astype(np.int64), 0, Ws - 1)
    # L2 norm over the label pixels, each reading its cell: cells weighted by how many pixels read them
    weight = np.outer(np.bincount(rows, minlength=Hs), np.bincount(cols, minlength=Ws)).reshape(-1)
    maps = _normalise(maps, np.sqrt(weight @ (maps * maps)), words)
    return _vote_cells(labels, maps.reshape(Hs, Ws, -1), rows, cols, words, voting)


def _window(window, Hs, Ws):
    if window is None:
        return 0.0, 0.0, float(Hs), float(Ws)
    try:
        top, left, height, width = (float(v) for v in window)
    except (TypeError, ValueError):
        raise ValueError(f"window must be (top, left, height, width), got {window!r}") from None
    if not (top >= 0 and left >= 0 and height > 0 and width > 0 and top + height <= Hs + 1e-9
            and left + width <= Ws + 1e-9):
        raise ValueError(f"window {window!r} does not lie in the working grid {Hs}x{Ws}")
    return top, left, height, width


ROWS_PER_BLOCK = 256  # label rows handled at once: memory stays O(256 x width) whatever the image's size


def _vote_cells(labels, maps, rows, cols, words, voting):
    """:func:`_vote` with each label pixel ``(y, x)`` reading the map cell
    ``(rows[y], cols[x])``, in blocks of label rows."""
    N = len(words)
    K = int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0
    counts = np.zeros(K, dtype=np.int64)
    sums = np.zeros((K, N))
    hist = np.zeros((K, N), dtype=np.int64)
    flat_maps = maps.reshape(-1, N)
    best = np.argmax(flat_maps, axis=1)
    Ws = maps.shape[1]
    for y0 in range(0, labels.shape[0], ROWS_PER_BLOCK):
        lab = labels[y0:y0 + ROWS_PER_BLOCK].reshape(-1).astype(np.int64)
        cell = (rows[y0:y0 + ROWS_PER_BLOCK, None] * Ws + cols[None, :]).reshape(-1)
        keep = lab >= 0
        lab, cell = lab[keep], cell[keep]
        counts += np.bincount(lab, minlength=K)
        if voting == "mean":
            for j in range(N):
                sums[:, j] += np.bincount(lab, weights=flat_maps[cell, j], minlength=K)
        else:
            hist += np.bincount(lab * N + best[cell], minlength=K * N).reshape(K, N)
    return _choose(sums, hist, counts, words, voting)


def group_segments(names):
    """Labels grouped by name, as the official ``label_to_mask``:
    ``{name: [label, ...]}`` in order of first appearance (None skipped)."""
    groups = OrderedDict()
    for label, name in enumerate(names):
        if name is not None:
            groups.setdefault(name, []).append(label)
    return dict(groups)


def vocabulary_prompt(words):
    """The prompt for a vocabulary: the words joined by ``", "`` (e.g.
    ``"cat, grass, sky"``)."""
    words = _word_list(words)
    return ", ".join(str(w).strip() for w in words)


# ---------------------------------------------------------------- nouns
# Words the fallback noun extractor drops: function words, frequent verbs and
# adjectives of image captions (BLIP's in particular, including its artefact
# "arafed"/"araffe"), numbers.
_STOPWORDS = frozenset("""
a an the this that these those there here it its it's they them their he him his she her hers we us our you your
i me my mine and or but nor so yet of in on at to from by with without into onto over under above below near
next beside behind between among through across along around up down out off about against for as than then
while during before after is are was were be been being am do does did doing have has had having will would can
could should may might must shall what which who whom whose where when why how all any both each few more most
other some such no not only own same too very just also up one two three four five six seven eight nine ten
many several lot lots
sitting standing laying lying walking running holding looking playing riding eating wearing flying jumping
swimming sleeping talking smiling waiting parked parking driving covered filled made made dressed stacked
posing hanging hangs sits stands looks holds shows showing taken taking using
big small large little tall short long old young new red green blue yellow white black brown gray grey orange
pink purple colorful different various front back top bottom left right side middle close closeup view
image picture photo photograph background foreground
arafed araffe arafe araffed
""".split())
# Nouns ending in "-ing" (other -ing words are taken for verbs).
_ING_NOUNS = frozenset("""
building buildings ceiling ceilings clothing painting paintings railing railings ring rings king kings thing
things string strings wing wings swing swings spring morning evening wedding pudding icing sibling siblings
duckling ducklings stocking stockings lighting awning awnings pudding dumpling dumplings sapling seedling
""".split())


def _fallback_nouns(caption):
    out = []
    for w in re.findall(r"[a-z]+(?:['-][a-z]+)*", caption.lower()):
        if w in _STOPWORDS or len(w) < 2:
            continue
        if w.endswith("ing") and w not in _ING_NOUNS:
            continue
        out.append(w)
    return out


def _nltk_nouns(caption):
    """Nouns by NLTK's POS tagger (``NN*``, the official demo's rule); None
    when NLTK or its tokenizer/tagger data is missing."""
    try:
        import nltk
    except ImportError:
        return None
    try:
        tagged = nltk.pos_tag(nltk.word_tokenize(caption))
    except LookupError:  # data not downloaded (nltk.download(...))
        return None
    return [w.lower() for w, pos in tagged if pos.startswith("NN") and re.search(r"[A-Za-z]", w)]


def extract_nouns(caption, *, use_nltk=None):
    """The nouns of a caption, lowercase, each once, in order of appearance.

    ``use_nltk``: None (default) uses NLTK's POS tagger when NLTK and its data
    (``punkt``/``punkt_tab``, ``averaged_perceptron_tagger``/``_eng``) are
    installed -- the official demo's rule, tags ``NN*`` -- and the fallback
    otherwise; True requires NLTK (ImportError/LookupError if missing); False
    always uses the fallback.

    The fallback needs no NLP package: the lowercase words of the caption
    minus a fixed list of function words, frequent caption verbs and
    adjectives (colours, sizes, positions) and words ending in "-ing" (except
    a few "-ing" nouns such as "building"). Its limits: it is not a tagger;
    verbs and adjectives not on its lists are kept as nouns ("a dog chases a
    ball" keeps "chases"), nouns on them are dropped ("a tall orange" loses
    "orange"), and compound nouns are split into words.
    """
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a string, got {type(caption).__name__}")
    nouns = None
    if use_nltk is None or use_nltk:
        nouns = _nltk_nouns(caption)
        if nouns is None and use_nltk:
            import nltk  # ImportError when absent

            nltk.pos_tag(nltk.word_tokenize(caption))  # LookupError naming the missing data
    if nouns is None:
        nouns = _fallback_nouns(caption)
    return list(OrderedDict.fromkeys(nouns))


# ---------------------------------------------------------------- a naming request
class Naming:
    """What to name segments with, for :func:`diffseg.segment` and friends:
    the prompt of the UNet pass and the candidate words.

    * ``vocabulary=[...]``: the words; the prompt is ``prompt`` if given
      (every word must be in it), else the words joined by ``", "``
      (:func:`vocabulary_prompt`, e.g. ``"cat, grass, sky"``).
    * ``prompt="..."`` alone: the words are its nouns (:func:`extract_nouns`).
    * ``captioner``: a callable ``captioner(rgb) -> str`` taking the image as
      an ``(H, W, 3)`` uint8 array; its caption is the prompt and its nouns
      the words (the official demo, with BLIP). Used when neither
      ``vocabulary`` nor ``prompt`` is given.

    As the official demo, the self-attention that is segmented comes from the
    same conditional pass as the cross-attention (the prompt changes the
    segments a little, not only their names).

    A captioner with BLIP, when its weights are at hand (transformers; not
    a dependency of diffseg)::

        from transformers import BlipForConditionalGeneration, BlipProcessor

        processor = BlipProcessor.from_pretrained("Salesforce/blip-image-captioning-base")
        blip = BlipForConditionalGeneration.from_pretrained("Salesforce/blip-image-captioning-base")

        def captioner(rgb):
            inputs = processor(images=rgb, return_tensors="pt")
            return processor.decode(blip.generate(**inputs)[0], skip_special_tokens=True)

        labels, names = diffseg.segment("photo.jpg", model, captioner=captioner)
    """

    def __init__(self, vocabulary=None, prompt=None, voting="mean", captioner=None, use_nltk=None):
        if voting not in VOTING:
            raise ValueError(f"voting must be one of {VOTING}, got {voting!r}")
        if vocabulary is None and prompt is None and captioner is None:
            raise ValueError("naming needs a vocabulary, a prompt or a captioner")
        if vocabulary is not None:
            vocabulary = [str(w).strip() for w in _word_list(vocabulary)]
        if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        if captioner is not None and not callable(captioner):
            raise TypeError(f"captioner must be callable (image -> caption), got {type(captioner).__name__}")
        self.vocabulary, self.prompt, self.voting = vocabulary, prompt, voting
        self.captioner, self.use_nltk = captioner, use_nltk

    def prompt_and_words(self, rgb):
        """``(prompt, words, caption or None)`` for one image (``rgb`` is
        only read by the captioner)."""
        caption = None
        if self.vocabulary is not None:
            return self.prompt or vocabulary_prompt(self.vocabulary), list(self.vocabulary), None
        if self.prompt is not None:
            prompt = self.prompt
        else:
            caption = self.captioner(rgb)
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"the captioner must return a non-empty string, got {caption!r}")
            prompt = caption
        words = extract_nouns(prompt, use_nltk=self.use_nltk)
        if not words:
            raise ValueError(f"no nouns found in the prompt {prompt!r}: pass vocabulary=[...]")
        return prompt, words, caption

    @property
    def fixed_words(self):
        """Whether prompt and words are known before seeing an image (no captioner)."""
        return self.vocabulary is not None or self.prompt is not None

    def check_model(self, model):
        """Refuse, before any UNet pass, a model that cannot name segments
        and (when the words are fixed) words that have no tokens of their own
        in the prompt or do not fit the text encoder's token limit."""
        if getattr(model, "has_cross_attention", True) is False:
            raise ValueError(f"naming segments needs a bundle exported with cross-attention; "
                             f"{getattr(model, 'path', 'this model')} has none: export it again with "
                             "`diffseg export SOURCE DIR --cross-attention` (or export_bundle(..., "
                             "cross_attention=True)); a model id or checkpoint is exported with it for you")
        if self.fixed_words and callable(getattr(model, "tokenize", None)):
            prompt, words, _ = self.prompt_and_words(None)
            word_token_indices(model.tokenize(prompt)[1], words)

    def attention(self, model, rgb, timestep=None, frame="crop"):
        """One conditional UNet pass (``model.prompt_attention``) in
        ``frame``: ``(self-attention, info)``; ``info`` holds what
        :meth:`name` needs. Words without tokens of their own fail before the
        pass when the model can tokenize."""
        prompt, words, caption = self.prompt_and_words(rgb)
        if not self.fixed_words and callable(getattr(model, "tokenize", None)):
            word_token_indices(model.tokenize(prompt)[1], words)
        attn, cross, tokens = (model.prompt_attention(rgb, prompt, timestep) if frame == "crop"
                               else model.prompt_attention(rgb, prompt, timestep, frame=frame))
        size = getattr(model, "image_size", None)
        info = {"cross": cross, "tokens": tokens, "words": words, "prompt": prompt, "caption": caption,
                "image_size": size}
        return attn, info

    def name(self, result, info):
        """Add ``names`` (one per label of ``result["labels"]``), ``words``,
        ``prompt`` and ``caption`` to a segmentation result of
        :func:`diffseg.pipeline.finish_detailed`.

        The cross-attention is aggregated on the model's own frame, as the
        official code at 512 x 512: the centre crop at the model's image size,
        or the padded whole frame (e.g. 512 x 704 for a 4:3 photo); each
        pixel of the labels reads the cell of that frame it lies in."""
        g = result.get("geometry")
        if g is not None:
            names = name_from_cross(result["labels"], info["cross"], info["tokens"], info["words"], self.voting,
                                    size=(g.frame_height, g.frame_width),
                                    window=(g.top, g.left, g.resized_height, g.resized_width))
        else:
            labels = result["crop_labels"]
            side = info.get("image_size") or labels.shape[0]
            names = name_from_cross(labels, info["cross"], info["tokens"], info["words"], self.voting,
                                    size=(side, side))
        result.update(names=names, words=info["words"], prompt=info["prompt"], caption=info["caption"])
        return result


def naming(settings, captioner=None):
    """A :class:`Naming` for :class:`diffseg.Settings` (its ``vocabulary``,
    ``prompt`` and ``voting``) and an optional ``captioner``; None when
    nothing asks for names."""
    if not settings.names_segments and captioner is None:
        return None
    return Naming(None if settings.vocabulary is None else list(settings.vocabulary), settings.prompt,
                  settings.voting, captioner)
