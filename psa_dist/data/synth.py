"""The embedded synthetic dataset: a small benchmark that poses the problem AffinityNet solves.

Why it looks the way it does (the measured history is in docs/benchmark.md, after the first
prototype's BENCHMARK-NOTES.md):

* **Objects are large and elongated** (a rotated capsule spanning 45-85 % of the image, its width
  ``object_width`` of the image), so at stride 8 an object covers 10-20 feature cells and a CAM blob
  around one end cannot cover it. The demo uses 1-2 objects 22-32 % wide (3.5-5 cells at 128 px):
  thinner objects are nearly all boundary cells at stride 8 (docs/benchmark.md).
* **Each object has one smooth, saturated colour of its own** (random hue per object, never tied to
  the class), with soft cylinder shading. Its surface is coherent and distinct from the clutter,
  which is what a learned affinity can follow; since colour says nothing about the class, the
  classifier cannot use it.
* **The class is told by a texture pattern** (bars, stripes, checks, dots, diagonals, rings, ...)
  drawn *strongly* on a small end part of the object (``part_fraction`` of its length: the
  discriminative part) and only *faintly* over the rest of the body (``body_pattern``). A
  classifier then fires strongly on the part and weakly, but not zero, on the body: the CAM of a
  real network on a real image (head of a person, wheels of a car). BENCHMARK-NOTES.md measured
  that the walk gains only in this regime: body CAM around 0.2-0.3 of the peak. With the colour
  mark at 128 px, ``body_pattern`` 0.3 gives part-shown bodies a CAM median of 0.12 and 0.4 gives
  0.30 (docs/benchmark.md, variants A and B).
* **The part is sometimes hidden** (probability ``1 - part_prob``): then only the faint body mark
  tells the class, so the classifier must learn it too and its CAM stays weak but non-zero over
  bodies, as on real images where the most discriminative part is not always in view.
* **Backgrounds are cluttered**: a smooth low-frequency colour field, many short muted strokes and
  blobs, and per-pixel colour noise (``clutter_noise``). Clutter colours are desaturated so that
  the objects' surfaces stand out without giving away their class.
* **Occlusion**: objects are painted in order; a later object may cover part of an earlier one, and
  the ground-truth mask holds only visible pixels. A placement that would hide most of an earlier
  object is retried.

The knobs that give the data the shape of a real dataset (``configs/voc_rehearsal.yaml``,
``configs/coco_rehearsal.yaml``); at their defaults nothing is drawn for them, so the demo's
images are the same bytes as before they existed:

* ``image_size``: the long side in pixels of every image, unless ``size_range`` ``[min, max]``
  draws it per image (uniform integers). ``aspect_range`` ``[lo, hi]``: width / height drawn
  log-uniformly per image (portrait and landscape alike: VOC about ``[0.5, 2]``), the short side
  rounded from it. Objects are sized on the short side, so they fit whatever the aspect.
* ``num_classes``: up to 8 classes have a pattern each (bars, stripes, ...); beyond that, classes
  share a pattern and differ by the ink's hue (class ``c`` draws pattern ``c % 8`` in hue
  ``c / num_classes``: classes of one pattern are ``8 / num_classes`` of the hue circle apart,
  36 degrees at 80), so 20 (VOC) and 80 (COCO) classes work with ``mark: colour``. ``texture``
  (luminance only) has no hue, so it takes at most 8.
* ``min_objects`` / ``max_objects``: objects per image. ``classes_per_image`` ``[lo, hi]``: that
  many distinct classes are drawn for the image (at most its objects), every one given to an
  object and the other objects drawn among them, so several classes share an image and some
  repeat, as in VOC and COCO. Occlusion may still hide an object, and the label lists only
  visible classes.
* ``object_width`` (a share of the short side) and ``object_scale`` ``[lo, hi]``: every object's
  length and width times a factor drawn log-uniformly per object, so one image holds objects of
  very different sizes: ``[0.1, 1.0]`` gives objects from a tenth of the default size (a few
  stride-8 cells, under 32x32 pixels at VOC's size: COCO's "small") to the full size.

Everything is a deterministic function of (seed, split, index): generation in parallel worker
processes gives the same bytes as a serial run. Ground-truth masks are written for evaluation only;
the weakly supervised pipeline reads only the image-level labels.
"""
from __future__ import annotations

import colorsys
import dataclasses
import math

import numpy as np
from PIL import Image, ImageDraw

from ..config import ConfigError, SynthConfig
from .dataset_writer import build_dataset
from .shards import encode_image, encode_json, encode_mask

# Pattern per class, in the object's own frame (u along the axis, v across). Values in [-1, 1].
PATTERNS = ["bars", "stripes", "checks", "dots", "diagonal", "rings", "antidiagonal", "grid"]
PERIOD = 7.0        # pixels per pattern cycle
PART_STRENGTH = 0.55
SPLIT_IDS = {"train": 1, "val": 2, "test": 3}
MAX_CLASSES = 254   # masks are uint8 with 0 background and 255 ignore


def _range(cfg: SynthConfig, key: str, low: float, integer: bool = False) -> None:
    """Check that ``synth.<key>`` is a [lo, hi] pair with low <= lo <= hi (ConfigError naming it)."""
    value = getattr(cfg, key)
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and (not integer or v == int(v))
        for v in value)
    if not ok or not low <= value[0] <= value[1]:
        kind = "integers" if integer else "numbers"
        raise ConfigError(f"synth.{key}: expected [lo, hi], {kind} with {low} <= lo <= hi, got "
                          f"{value!r}")


def check(cfg: SynthConfig) -> None:
    """Refuse settings the generator cannot honour, naming the key (before any image is drawn)."""
    if cfg.mark not in ("colour", "texture"):
        raise ConfigError(f"synth.mark: must be colour or texture, got {cfg.mark!r}")
    top = MAX_CLASSES if cfg.mark == "colour" else len(PATTERNS)  # texture: no hue to tell more
    if not 1 <= cfg.num_classes <= top:
        raise ConfigError(f"synth.num_classes must be in 1..{top} with mark {cfg.mark}, got "
                          f"{cfg.num_classes}")
    if cfg.image_size < 8:
        raise ConfigError(f"synth.image_size: must be at least 8 pixels, got {cfg.image_size}")
    if cfg.size_range is not None:
        _range(cfg, "size_range", 8, integer=True)
    _range(cfg, "aspect_range", 1e-3)
    _range(cfg, "object_width", 1e-3)
    _range(cfg, "object_scale", 1e-3)
    if cfg.classes_per_image is not None:
        _range(cfg, "classes_per_image", 1, integer=True)
    if not 0 <= cfg.min_objects <= cfg.max_objects:
        raise ConfigError(f"synth.max_objects: must be at least synth.min_objects "
                          f"({cfg.min_objects}) and min_objects at least 0, got {cfg.max_objects}")


def class_names(cfg: SynthConfig) -> list[str]:
    """The pattern's name for the first 8 classes, then ``<pattern>-<n>`` for the n-th class of
    that pattern (``bars-2`` is class 9)."""
    check(cfg)
    return [PATTERNS[c % len(PATTERNS)] + (f"-{c // len(PATTERNS) + 1}" if c >= len(PATTERNS)
                                           else "") for c in range(cfg.num_classes)]


def palette(num_classes: int) -> list[list[int]]:
    """VOC-style colour palette: index 0 background black, then distinct colours."""
    out = [[0, 0, 0]]
    for c in range(num_classes):
        r, g, b = colorsys.hsv_to_rgb(c / max(num_classes, 1), 0.85, 0.95)
        out.append([int(r * 255), int(g * 255), int(b * 255)])
    return out


def _pattern(name: str, u: np.ndarray, v: np.ndarray, phase: float) -> np.ndarray:
    w = 2 * math.pi / PERIOD
    if name == "bars":
        return np.sign(np.sin(w * u + phase))
    if name == "stripes":
        return np.sign(np.sin(w * v + phase))
    if name == "checks":
        return np.sign(np.sin(w * u + phase) * np.sin(w * v + phase))
    if name == "dots":
        du = np.mod(u + phase, PERIOD) - PERIOD / 2
        dv = np.mod(v + phase, PERIOD) - PERIOD / 2
        return np.where(du * du + dv * dv < (PERIOD * 0.3) ** 2, 1.0, -1.0)
    if name == "diagonal":
        return np.sign(np.sin(w * (u + v) / math.sqrt(2) + phase))
    if name == "antidiagonal":
        return np.sign(np.sin(w * (u - v) / math.sqrt(2) + phase))
    if name == "rings":
        return np.sign(np.sin(w * np.sqrt(u * u + v * v) + phase))
    if name == "grid":
        a = np.abs(np.mod(u + phase, PERIOD) - PERIOD / 2) < 1.0
        b = np.abs(np.mod(v + phase, PERIOD) - PERIOD / 2) < 1.0
        return np.where(a | b, 1.0, -1.0)
    raise ValueError(f"unknown pattern {name!r}")


def image_shape(rng: np.random.Generator, cfg: SynthConfig) -> tuple[int, int]:
    """(height, width) of the next image: the long side from ``image_size`` or ``size_range``, the
    aspect from ``aspect_range``. A knob at its single value draws nothing from ``rng``, so the
    rest of the image is what it was without the knob."""
    long = cfg.image_size
    if cfg.size_range is not None and cfg.size_range[0] != cfg.size_range[1]:
        long = int(rng.integers(int(cfg.size_range[0]), int(cfg.size_range[1]) + 1))
    elif cfg.size_range is not None:
        long = int(cfg.size_range[0])
    lo, hi = cfg.aspect_range
    aspect = lo if lo == hi else math.exp(rng.uniform(math.log(lo), math.log(hi)))
    if aspect >= 1:
        return max(1, round(long / aspect)), long
    return long, max(1, round(long * aspect))


def _log_uniform(rng: np.random.Generator, pair) -> float:
    lo, hi = pair
    return float(lo) if lo == hi else math.exp(rng.uniform(math.log(lo), math.log(hi)))


def _object_classes(rng: np.random.Generator, n_obj: int, num_classes: int, per_image):
    """The class (0-based) of each of ``n_obj`` objects: ``per_image`` [lo, hi] distinct classes,
    each given to one object, the other objects drawn among them, in a random order."""
    top = min(int(per_image[1]), n_obj, num_classes)
    k = int(rng.integers(min(int(per_image[0]), top), top + 1))
    chosen = rng.choice(num_classes, size=k, replace=False)
    rest = rng.choice(chosen, size=n_obj - k) if k else np.zeros(0, np.int64)
    return [int(c) for c in rng.permutation(np.concatenate([chosen, rest]))]


def _background(rng: np.random.Generator, hw: tuple[int, int], cfg: SynthConfig) -> np.ndarray:
    hh, ww = hw
    # Smooth low-frequency colour field: a coarse random grid upsampled bilinearly.
    grey = rng.uniform(70, 170, size=(4, 4, 1))
    coarse = (grey + rng.uniform(-35, 35, size=(4, 4, 3))).clip(0, 255).astype(np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((ww, hh), Image.BILINEAR), dtype=np.float32)
    # Fine clutter: many short muted strokes and small blobs (sizes in pixels, as real texture is).
    canvas = Image.fromarray(img.astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    n = int(cfg.clutter_density * hh * ww / 90)
    for _ in range(n):
        h, sat, val = rng.uniform(0, 1), rng.uniform(0.0, 0.35), rng.uniform(0.25, 0.85)
        col = tuple(int(255 * x) for x in colorsys.hsv_to_rgb(h, sat, val))
        x, y = rng.uniform(0, (ww, hh))     # the same two draws as uniform(0, s, size=2) on a square
        if rng.uniform() < 0.6:
            ang, ln = rng.uniform(0, math.pi), rng.uniform(3, 10)
            draw.line([x, y, x + ln * math.cos(ang), y + ln * math.sin(ang)], fill=col,
                      width=int(rng.integers(1, 3)))
        else:
            r = rng.uniform(1, 3.5)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=col)
    return np.asarray(canvas, dtype=np.float32)


def _place_object(rng: np.random.Generator, hw: tuple[int, int], cfg: SynthConfig,
                  scale: float = 1.0):
    hh, ww = hw
    s = min(hh, ww)                         # sized on the short side: it fits at any aspect
    length = rng.uniform(0.45, 0.85) * s
    width = rng.uniform(*cfg.object_width) * s
    if scale != 1.0:
        length, width = length * scale, width * scale
    theta = rng.uniform(0, 2 * math.pi)     # direction of the discriminative end
    # Keep the centre where most of the object stays inside the image.
    half = 0.5 * length * 0.6
    cx = rng.uniform(half * abs(math.cos(theta)) * 0.5, ww - half * abs(math.cos(theta)) * 0.5)
    cy = rng.uniform(half * abs(math.sin(theta)) * 0.5, hh - half * abs(math.sin(theta)) * 0.5)
    return length, width, theta, cx, cy


def render(cfg: SynthConfig, split: str, index: int, objects: list | None = None
           ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """One sample: (image uint8 HxWx3, mask uint8 HxW with 0 = background, 1..C classes, class ids).

    ``objects``, when given a list, receives one dict per painted object (class id, whether its
    part is shown, its instance mask before later objects covered it): for diagnostics."""
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r} (expected one of {sorted(SPLIT_IDS)})")
    rng = np.random.default_rng([cfg.seed, SPLIT_IDS[split], index])
    names = class_names(cfg)
    hw = image_shape(rng, cfg)
    img = _background(rng, hw, cfg)
    mask = np.zeros(hw, np.uint8)
    inst = np.full(hw, -1, np.int32)            # visible instance per pixel (for occlusion checks)
    areas: list[float] = []
    yy, xx = np.mgrid[0:hw[0], 0:hw[1]].astype(np.float32) + 0.5
    n_obj = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    classes = (None if cfg.classes_per_image is None or n_obj == 0 else
               _object_classes(rng, n_obj, len(names), cfg.classes_per_image))
    for k in range(n_obj):
        cls = int(rng.integers(0, len(names))) if classes is None else classes[k]
        scale = _log_uniform(rng, cfg.object_scale)     # kept over the retries: small stays small
        for _attempt in range(20):
            length, width, theta, cx, cy = _place_object(rng, hw, cfg, scale)
            u = (xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)
            v = -(xx - cx) * math.sin(theta) + (yy - cy) * math.cos(theta)
            core = length / 2 - width / 2
            du = np.clip(np.abs(u) - core, 0, None)
            inside = du * du + v * v <= (width / 2) ** 2
            # Reject placements that hide more than 40% of an earlier object or leave little visible.
            ok = inside.sum() > 0.5 * length * width * 0.8
            for j, a in enumerate(areas):
                ok &= ((inst == j) & ~inside).sum() >= 0.6 * a
            if ok:
                break
        shade = (1.0 - 0.25 * np.clip(v / (width / 2), -1, 1) ** 2)[..., None]
        part = u > length / 2 - cfg.part_fraction * length
        if rng.uniform() >= cfg.part_prob:
            part = np.zeros_like(part)      # part hidden: only the faint body mark tells the class
        pat = _pattern(PATTERNS[cls % len(PATTERNS)], u, v, rng.uniform(0, PERIOD))
        if cfg.mark == "colour":
            # Body: a soft colour of its own. Mark: the class pattern in the class's own saturated
            # colour, fully on the part and blended at body_pattern over the rest of the body.
            base = np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.3, 0.55),
                                                rng.uniform(0.8, 1.0)), np.float32) * 255
            ink = np.array(colorsys.hsv_to_rgb(cls / len(names), 1.0, 1.0), np.float32) * 255
            mark = np.where(pat > 0, 1.0, 0.0)[..., None]
            marked = mark * ink + (1 - mark) * 0.3 * ink
            strength = np.where(part, 1.0, cfg.body_pattern)[..., None]
            colour = shade * ((1 - strength) * base + strength * marked)
        else:
            base = np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.75, 1.0),
                                                rng.uniform(0.75, 1.0)), np.float32) * 255
            strength = np.where(part, PART_STRENGTH, cfg.body_pattern)[..., None]
            colour = base * shade * (1 + strength * pat[..., None])
        img = np.where(inside[..., None], colour, img)
        if objects is not None:
            objects.append({"cls": cls + 1, "part_shown": bool(part.any()), "inside": inside})
        mask[inside] = cls + 1
        inst[inside] = k
        areas.append(float(inside.sum()))
    if cfg.clutter_noise > 0:
        img = img + rng.normal(0, cfg.clutter_noise, size=img.shape).astype(np.float32)
    image = np.clip(img, 0, 255).astype(np.uint8)
    present = sorted({int(c) for c in np.unique(mask) if c != 0})
    return image, mask, present


class _SynthSample:
    """Picklable (split, index) -> encoded sample, for the parallel dataset writer."""

    def __init__(self, cfg: SynthConfig):
        self.cfg = cfg

    def __call__(self, item: tuple[str, int]) -> dict:
        split, index = item
        image, mask, present = render(self.cfg, split, index)
        return {"__key__": f"synth_{split}_{index:06d}", "jpg": encode_image(image, "jpg", 92),
                "cls.json": encode_json(present), "mask.png": encode_mask(mask),
                "meta.json": encode_json({"source": f"synth:{self.cfg.seed}:{split}:{index}",
                                          "size": list(mask.shape)})}


def write_synth(cfg: SynthConfig, root, shard_size: int = 100, workers: int = 2, config=None,
                progress: bool = True) -> dict:
    """Generate the train and val splits of the synthetic dataset as shards under ``root``."""
    check(cfg)
    splits = {"train": [("train", i) for i in range(cfg.num_train)],
              "val": [("val", i) for i in range(cfg.num_val)]}
    return build_dataset(root, splits, _SynthSample(cfg), classes=class_names(cfg),
                         palette=palette(cfg.num_classes),
                         source={"kind": "synth", "synth": dataclasses.asdict(cfg)},
                         shard_size=shard_size, workers=workers, config=config, progress=progress)
