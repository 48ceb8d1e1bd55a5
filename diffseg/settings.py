"""Every setting of a segmentation, in one validated, immutable object.

::

    settings = diffseg.Settings(kl_threshold=0.9, frame="crop")
    labels = diffseg.segment("photo.jpg", model, settings)
    labels = diffseg.segment("photo.jpg", model, settings, grid=8)   # one field overridden
    diffseg.Settings.from_dict(settings.to_dict()) == settings           # True

A :class:`Settings` is validated once, when it is made (a bad value raises
``ValueError`` or ``TypeError`` naming the field), and passed whole to
:func:`diffseg.segment`, :func:`diffseg.segment_detailed`,
:class:`diffseg.MaskGenerator`, :func:`diffseg.segment_many`,
:func:`diffseg.segment_attention`, :func:`diffseg.evaluate` and the Ray entry
points. Those also take the fields as keyword overrides, resolved by
:func:`resolve_settings` (the one place where keywords and a settings object
meet). Outputs record :meth:`Settings.to_dict`.

Settings change the result. How a call runs -- its threads (``workers``), GEMM
backend (``gemm``), images per UNet call (``batch_size``) -- does not change
the labels and is not a setting.
"""
import dataclasses
import math
import numbers
from collections.abc import Mapping

FRAMES = ("whole", "crop")
VOTING = ("mean", "majority")
OFFICIAL_ITERATIONS = 3
MAX_GRID = 64
"""Largest anchor grid: the latent grid of Stable Diffusion at 512 px is 64 x 64."""
MAX_TIMESTEP = 999  # SD's 1000 training timesteps

PRESETS = {
    # The paper's settings (SD v1.4, t = 300, grid 16, 512 px, centre crop):
    # 1.1 for COCO-Stuff-27, 0.9 for Cityscapes (the official notebook).
    "coco-stuff-27": {"kl_threshold": 1.1, "frame": "crop"},
    "cityscapes": {"kl_threshold": 0.9, "frame": "crop"},
}


def _number(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


def _integer(value, name, low, high):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high}, got {value}")
    return int(value)


def parse_thresholds(text, name="kl_threshold"):
    """``"1.1"`` or ``"0.9,1.0,1.1"`` (commas or blanks) -> a float or a tuple."""
    parts = text.replace(",", " ").split()
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(f"{name}: cannot read {text!r} as thresholds (a number, or one number per merge "
                         "iteration separated by commas)") from None
    if not values:
        raise ValueError(f"{name} is empty: give a number, or one number per merge iteration")
    return values[0] if len(values) == 1 else values


def _thresholds(value, iterations):
    """``kl_threshold`` -> a tuple of ``iterations`` floats, each finite and > 0."""
    if isinstance(value, str):
        value = parse_thresholds(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        values = (float(value),) * iterations
    else:
        if isinstance(value, (Mapping, bytes)) or not hasattr(value, "__iter__"):
            raise TypeError(f"kl_threshold must be a number or a sequence of numbers (one per merge iteration), "
                            f"got {type(value).__name__} {value!r}")
        values = tuple(_number(v, f"kl_threshold[{i}]") for i, v in enumerate(value))
        if len(values) != iterations:
            raise ValueError(f"kl_threshold has {len(values)} value(s) for {iterations} merge iterations: give one "
                             f"number, {iterations} values, or iterations={len(values) or 1} to run "
                             f"{len(values) or 1} (the official count is {OFFICIAL_ITERATIONS})")
    for i, t in enumerate(values):
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"kl_threshold[{i}] must be finite and > 0, got {t}")
    return values


def _weights(value):
    """None, a sequence (highest resolution first), or ``{resolution: weight}``
    -> None, a tuple of floats, or a tuple of ``(resolution, weight)`` pairs
    (highest resolution first)."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        pairs = []
        for key, w in value.items():
            key = int(key) if isinstance(key, str) and key.isdigit() else key  # from JSON
            pairs.append((_integer(key, "weights key (a resolution)", 1, 1 << 16), _number(w, f"weights[{key}]")))
        pairs.sort(reverse=True)
        weights = tuple(w for _, w in pairs)
        result = tuple(pairs)
    else:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise TypeError(f"weights must be None, a sequence of numbers (highest resolution first) or "
                            f"{{resolution: weight}}, got {type(value).__name__} {value!r}")
        weights = tuple(_number(w, f"weights[{i}]") for i, w in enumerate(value))
        result = weights
    if not weights:
        raise ValueError("weights is empty: give one weight per resolution, or None for the default 8:4:2:1")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all zero, got {value!r}")
    return result


def _vocabulary(value):
    from .semantic import _word_list

    if value is None:
        return None
    out = [" ".join(w.split()) for w in _word_list(value, "vocabulary")]
    seen = set()
    for w in out:
        if w.lower() in seen:
            raise ValueError(f"vocabulary: {w!r} is given twice")
        seen.add(w.lower())
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The settings of a DiffSeg segmentation (defaults: the official ones,
    COCO-Stuff-27's threshold, the whole frame).

    Parameters
    ----------
    kl_threshold : number or sequence of numbers
        Merge threshold ``tau`` per merge iteration (strict ``D < tau``): a
        number is used for every iteration; a sequence gives one value per
        iteration and must have ``iterations`` values. A string ``"0.9,1.0,1.1"``
        is read as a sequence. Stored as a tuple. 1.1 is the official
        COCO-Stuff-27 value, 0.9 the Cityscapes one.
    iterations : int
        Merge iterations, 1..10; the official code runs 3. Another count is
        only taken when given here explicitly.
    grid : int
        Anchors along the short side of the latent grid, 1..64 (16: 256
        anchors on a square image, the official grid).
    timestep : int
        UNet timestep of the one pass, 0..999 (300, as the official code).
    weights : None, sequence, or ``{resolution: weight}``
        Relative weights of the attention resolutions in the aggregation
        (None: proportional to the resolution, 8:4:2:1 for 64/32/16/8, as the
        official code). A sequence is highest resolution first; a mapping is
        keyed by the resolution at the bundle's size (64, 32, 16, 8 for SD),
        which also names the grids of a non-square frame by their short side.
    frame : ``"whole"`` or ``"crop"``
        Segment the whole image on a latent grid of its aspect ratio
        (default), or the centred square crop as the published protocol.
    border : ``"nearest"`` or int
        ``frame="crop"`` only: the label of pixels outside the crop (the
        nearest crop pixel's label, or this integer, e.g. -1).
    refine : bool
        The official k-means refinement after the merge (off in the
        official benchmarks).
    vocabulary : list of str, optional
        Name each segment with one of these words or phrases (semantic
        labels from the cross-attention of a pass conditioned on ``prompt``).
    prompt : str, optional
        The prompt of the UNet pass: alone, segments are named with its
        nouns; with ``vocabulary``, every word must be in it (default: the
        words joined by ``", "``).
    voting : ``"mean"`` or ``"majority"``
        How a segment picks its name (the official demo: ``"mean"``).
    """

    kl_threshold: tuple = 1.1
    iterations: int = OFFICIAL_ITERATIONS
    grid: int = 16
    timestep: int = 300
    weights: tuple = None
    frame: str = "whole"
    border: object = "nearest"
    refine: bool = False
    vocabulary: tuple = None
    prompt: str = None
    voting: str = "mean"

    def __post_init__(self):
        fix = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 -- frozen
        fix("iterations", _integer(self.iterations, "iterations", 1, 10))
        fix("kl_threshold", _thresholds(self.kl_threshold, self.iterations))
        fix("grid", _integer(self.grid, "grid", 1, MAX_GRID))
        fix("timestep", _integer(self.timestep, "timestep", 0, MAX_TIMESTEP))
        fix("weights", _weights(self.weights))
        if self.frame not in FRAMES:
            raise ValueError(f"frame must be one of {', '.join(map(repr, FRAMES))}, got {self.frame!r}")
        if self.border != "nearest":
            if isinstance(self.border, bool) or not isinstance(self.border, numbers.Integral):
                raise ValueError(f"border must be 'nearest' or an integer label, got {self.border!r}")
            if self.frame == "whole":
                raise ValueError("border labels the pixels outside the centre crop: it applies to frame='crop' "
                                 "only (the whole frame labels every pixel)")
            fix("border", int(self.border))
        if not isinstance(self.refine, bool):
            raise TypeError(f"refine must be True or False, got {self.refine!r}")
        fix("vocabulary", _vocabulary(self.vocabulary))
        if self.prompt is not None and (not isinstance(self.prompt, str) or not self.prompt.strip()):
            raise ValueError(f"prompt must be a non-empty string or None, got {self.prompt!r}")
        if self.voting not in VOTING:
            raise ValueError(f"voting must be one of {', '.join(map(repr, VOTING))}, got {self.voting!r}")

    # -- derived ---------------------------------------------------------
    @property
    def names_segments(self):
        """Whether the settings ask for semantic labels (a vocabulary or a prompt)."""
        return self.vocabulary is not None or self.prompt is not None

    def weights_for(self, keys):
        """The aggregation's ``weights`` for attention keyed by ``keys`` (``s``
        or ``(h, w)``, highest first): None, the sequence, or a mapping onto
        the keys by their short side."""
        if self.weights is None or not isinstance(self.weights[0], tuple):
            return None if self.weights is None else list(self.weights)
        by_resolution = dict(self.weights)
        side = lambda k: min(k) if isinstance(k, tuple) else k  # noqa: E731
        missing = [k for k in keys if side(k) not in by_resolution]
        if missing:
            raise ValueError(f"weights has no entry for resolution(s) {[side(k) for k in missing]} "
                             f"(it has {sorted(by_resolution, reverse=True)})")
        return {k: by_resolution[side(k)] for k in keys}

    # -- records ---------------------------------------------------------
    def to_dict(self):
        """Plain JSON-ready dict of every field (lists for tuples; weights
        keyed by resolution as strings)."""
        weights = self.weights
        if weights is not None:
            weights = ({str(r): w for r, w in weights} if isinstance(weights[0], tuple) else list(weights))
        return {
            "kl_threshold": list(self.kl_threshold), "iterations": self.iterations, "grid": self.grid,
            "timestep": self.timestep, "weights": weights, "frame": self.frame, "border": self.border,
            "refine": self.refine, "vocabulary": None if self.vocabulary is None else list(self.vocabulary),
            "prompt": self.prompt, "voting": self.voting,
        }

    @classmethod
    def from_dict(cls, data):
        """The inverse of :meth:`to_dict`; missing fields take their
        defaults, unknown ones raise ``ValueError``."""
        if not isinstance(data, Mapping):
            raise TypeError(f"settings must be a dict, got {type(data).__name__}")
        unknown = sorted(set(data) - set(FIELDS))
        if unknown:
            raise ValueError(f"settings: unknown field(s) {', '.join(unknown)} (known: {', '.join(FIELDS)})")
        return cls(**data)

    def replace(self, **changes):
        """A copy with some fields changed (validated again)."""
        return resolve_settings(self, **changes)

    @classmethod
    def preset(cls, name, **changes):
        """The paper's settings for a benchmark: ``"coco-stuff-27"``
        (threshold 1.1) or ``"cityscapes"`` (0.9); both t = 300, grid 16,
        the centre crop."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {name!r}")
        return cls(**{**PRESETS[name], **changes})


FIELDS = tuple(f.name for f in dataclasses.fields(Settings))


def resolve_settings(settings=None, **overrides):
    """The settings of a call: ``settings`` (a :class:`Settings`, a dict of
    fields, or None for the defaults) with ``overrides`` (field keywords)
    applied on top, validated. Changing ``kl_threshold`` to a sequence of
    another length needs ``iterations`` too."""
    if settings is None:
        base = {}
    elif isinstance(settings, Settings):
        base = {name: getattr(settings, name) for name in FIELDS}
    elif isinstance(settings, Mapping):
        base = dict(Settings.from_dict(settings).to_dict())
    else:
        raise TypeError(f"settings must be a diffseg.Settings, a dict of its fields or None, "
                        f"got {type(settings).__name__}")
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise TypeError(f"unknown setting(s) {', '.join(unknown)}; the settings are: {', '.join(FIELDS)}")
    if not overrides and isinstance(settings, Settings):
        return settings
    kept = base.get("kl_threshold")
    if "iterations" in overrides and "kl_threshold" not in overrides and kept is not None and len(set(kept)) == 1:
        base["kl_threshold"] = kept[0]  # one threshold for every iteration, whatever their count
    return Settings(**{**base, **overrides})
