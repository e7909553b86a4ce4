"""``grabcut``: the embedded preprocessor that needs no weights (detector and segmenter in one).

Made for photos of one object on a plain or simple background (a table top, a wall, a
studio sweep), the kind image-to-3D works from:

1. Model the background from the image border: a smooth colour surface (quadratic in x and y
   per Lab channel, robustly fitted) so gradients and vignetting count as background too.
2. Pixels far from that surface seed the object, the border seeds the background, and
   OpenCV's GrabCut settles the rest (colour models plus edge-aware smoothing).
3. The object's box comes from the mask's connected regions.

It says when it is unsure instead of guessing silently: when the border is not plain (then
the background model is wrong), or the object breaks into several large pieces. The stage
adds its own checks (mask at the border, mask covering most of the photo).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import cv2
import numpy as np

from gen3d import Component, Detections, Segmentation, hookimpl


@dataclass
class GrabCutConfig:
    work_side: int = 320  # the first GrabCut pass sees the whole photo at this size (cost grows with pixels)
    refine_side: int = 384  # the second pass sees the object's surroundings at up to this size
    border: float = 0.04  # width of the border strip that models the background, fraction of the shorter side
    iterations: int = 4  # GrabCut iterations
    seed_contrast: float = 4.0  # object seeds: this many noise levels away from the background colour ...
    min_contrast: float = 10.0  # ... and at least this far (CIE Lab units, ~2 = barely visible)
    grow_contrast: float = 3.0  # weaker pixels, this many noise levels off, join the seeds they touch
    max_noise: float = 6.0  # unsure when the border strays more than this from a smooth colour (Lab units)
    max_clutter: float = 0.25  # unsure when more border pixels than this stray from the background model
    min_area: float = 0.002  # regions smaller than this fraction of the image are ignored
    max_pieces_ratio: float = 0.25  # unsure when a second region is at least this large relative to the first
    max_faint: float = 0.2  # unsure when more of the object's inside than this is no seed (too near the background colour)

    ROLES: ClassVar[tuple[str, ...]] = ("detector", "segmenter")

    def __post_init__(self) -> None:
        if self.work_side < 64:
            raise ValueError(f"work_side must be at least 64, got {self.work_side}")
        if not 0 < self.border < 0.5:
            raise ValueError(f"border must be between 0 and 0.5, got {self.border}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {self.iterations}")


@dataclass
class _Found:
    """One GrabCut pass over a whole image, kept so ``segment`` can reuse ``detect``'s work."""

    image: np.ndarray
    mask: np.ndarray  # bool, image pixels
    seeds: np.ndarray  # bool, the colour-contrast seeds (image pixels)
    unsure: list[str]


class GrabCut:
    def __init__(self, config: GrabCutConfig):
        self.config = config
        self._last: _Found | None = None

    # --- roles ---

    def detect(self, image: np.ndarray, prompts: Sequence[str] = ()) -> Detections:
        found = self._whole(image)
        boxes, scores = [], []
        for region in _regions(found.mask, self.config.min_area):
            x, y, w, h = cv2.boundingRect(region.astype(np.uint8))
            boxes.append([x, y, x + w, y + h])
            scores.append(_agreement(region, found.seeds))
        unsure = list(found.unsure)
        areas = sorted((float(r.sum()) for r in _regions(found.mask, self.config.min_area)), reverse=True)
        if len(areas) > 1 and areas[1] >= self.config.max_pieces_ratio * areas[0]:
            unsure.append(f"the foreground falls into {len(areas)} separate regions of similar size "
                          "(several objects, or background taken for object)")
        notes = []
        if prompts:
            notes.append(f"grabcut cannot read text prompts; ignored {' / '.join(map(repr, prompts))} "
                         "(use a detector such as owlv2 for that)")
        return Detections(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32),
                          ["object"] * len(boxes), unsure, notes)

    def segment(self, image: np.ndarray, box: Sequence[float] | None = None,
                points: Sequence[Sequence[float]] | None = None) -> Segmentation:
        found = self._whole(image)
        if box is None and points is not None:  # the regions under the points
            picked = [r for r in _regions(found.mask, 0) if any(_hit(r, p) for p in points)]
            mask = np.any(picked, axis=0) if picked else np.zeros_like(found.mask)
            return Segmentation(mask, _agreement(mask, found.seeds), list(found.unsure))
        if box is None:
            return Segmentation(found.mask, None, list(found.unsure))
        # The object is the part of the whole-image mask inside the box (a few pixels of slack).
        x0, y0, x1, y1 = (round(v) for v in box)
        pad = 2
        inside = np.zeros_like(found.mask)
        inside[max(y0 - pad, 0):y1 + pad, max(x0 - pad, 0):x1 + pad] = True
        mask = found.mask & inside
        if not mask.any():  # a box from another detector that our mask misses: segment inside it
            mask = self._in_box(image, (x0, y0, x1, y1))
        return Segmentation(mask, _agreement(mask, found.seeds), list(found.unsure))

    # --- the work ---

    def _whole(self, image: np.ndarray) -> _Found:
        if self._last is not None and self._last.image is image:
            return self._last
        config = self.config
        small, _ = _shrink(image, config.work_side)
        lab = cv2.cvtColor(cv2.GaussianBlur(small, (3, 3), 0), cv2.COLOR_RGB2LAB).astype(np.float32)
        strip = max(2, round(config.border * min(small.shape[:2])))
        border = _border_mask(small.shape[:2], strip)
        background = _Background.fit(lab, border, config.min_contrast)
        distance, noise, stray = background.distance(lab), background.noise, background.stray
        unsure = []
        if noise > config.max_noise or stray > config.max_clutter:
            unsure.append(f"the background is not plain: along the image border the colour strays {noise:.0f} "
                          f"Lab units from a smooth fit, {stray:.0%} of the border more than "
                          f"{config.min_contrast:g} off (plain: under {config.max_noise:g} and "
                          f"{config.max_clutter:.0%}), so the mask may be wrong; try a model detector and segmenter")
        # Seeds: clearly unlike the background. Capped, so a busy background still gets a (doubted) try.
        threshold = min(max(config.seed_contrast * noise, config.min_contrast), 3 * config.min_contrast)
        seeds = distance > threshold
        # A pale object on a pale background has parts (a thin handle, a spout, a rim in the light)
        # that are only a little off the background: grow the seeds into them, so GrabCut sees
        # them as probable object rather than probable background.
        grown = _grown(distance, seeds, self._low(noise))
        labels = np.full(small.shape[:2], cv2.GC_PR_BGD, np.uint8)
        labels[grown] = cv2.GC_PR_FGD
        labels[distance > 2 * threshold] = cv2.GC_FGD
        labels[border & ~seeds] = cv2.GC_BGD  # border pixels that look like background
        labels[_holes(grown, distance, noise)] = cv2.GC_BGD
        coarse = _clean(_grabcut(small, labels, config.iterations), config.min_area)
        full_size = (image.shape[1], image.shape[0])
        mask = _clean(_refine(image, _resize_bool(coarse, full_size), config, background, threshold, self._low),
                      config.min_area)
        # Where the object is barely off the background colour its outline is GrabCut's guess.
        inside = cv2.erode(_resize_bool(mask, small.shape[1::-1]).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        faint = float((inside & ~seeds).sum() / max(inside.sum(), 1))
        if faint > config.max_faint:
            unsure.append(f"the object is hard to tell from the background: {faint:.0%} of it is within "
                          f"{threshold:.0f} Lab units of the background colour (sure: under {config.max_faint:.0%}), "
                          "so thin or pale parts may be lost or background kept; try a model segmenter")
        found = _Found(image, mask, _resize_bool(seeds, full_size), unsure)
        self._last = found
        return found

    def _low(self, noise: float) -> float:
        return max(self.config.grow_contrast * noise, 0.3 * self.config.min_contrast)

    def _in_box(self, image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        small, factor = _shrink(image, self.config.work_side)
        h, w = small.shape[:2]
        x0, y0, x1, y1 = (round(v * factor) for v in box)
        x0, y0 = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
        x1, y1 = max(min(x1, w), x0 + 1), max(min(y1, h), y0 + 1)
        labels = np.full((h, w), cv2.GC_BGD, np.uint8)
        labels[y0:y1, x0:x1] = cv2.GC_PR_FGD
        mask = _grabcut(small, labels, self.config.iterations)
        return _resize_bool(mask, (image.shape[1], image.shape[0]))


def _refine(image: np.ndarray, coarse: np.ndarray, config: GrabCutConfig, background: _Background,
            threshold: float, low: Callable[[float], float]) -> np.ndarray:
    """GrabCut again around the coarse mask at up to ``refine_side`` pixels: sharper edges.

    The coarse pass ran on a small copy of the whole photo; this one sees only the object's
    surroundings, so a small object gets many more pixels for the same cost. The colour
    contrast to the background is measured again at this size and labels the object's thin
    parts: GrabCut's smoothing alone would cut a pale handle or spout off.
    """
    rows, cols = np.flatnonzero(coarse.any(axis=1)), np.flatnonzero(coarse.any(axis=0))
    if len(rows) == 0:
        return coarse
    h, w = coarse.shape
    margin = int(0.15 * max(rows[-1] - rows[0], cols[-1] - cols[0])) + 4
    y0, y1 = max(rows[0] - margin, 0), min(rows[-1] + 1 + margin, h)
    x0, x1 = max(cols[0] - margin, 0), min(cols[-1] + 1 + margin, w)
    crop, _ = _shrink(image[y0:y1, x0:x1], config.refine_side)
    near, _ = _shrink(coarse[y0:y1, x0:x1].astype(np.uint8), config.refine_side)
    near = near > 0
    # Unsure within a band around the coarse edge; sure background beyond it.
    band = max(3, round(0.04 * max(crop.shape[:2])))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * band + 1, 2 * band + 1))
    lab = cv2.cvtColor(cv2.GaussianBlur(crop, (3, 3), 0), cv2.COLOR_RGB2LAB).astype(np.float32)
    distance = background.distance(lab, (x0 / w, y0 / h, x1 / w, y1 / h))
    far = cv2.dilate(near.astype(np.uint8), kernel) == 0
    # The noise grows as the pixels get smaller: measure it here, on what is surely background.
    noise = max(1.4826 * float(np.median(distance[far])), background.noise) if far.any() else background.noise
    grown = _grown(distance, near & (distance > threshold), low(noise))
    strong = cv2.erode((grown & (distance > 2 * threshold)).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    reach = cv2.dilate((near | grown).astype(np.uint8), kernel) > 0
    core = cv2.erode(near.astype(np.uint8), kernel) > 0
    labels = np.full(near.shape, cv2.GC_BGD, np.uint8)
    labels[reach] = cv2.GC_PR_BGD
    labels[near | grown] = cv2.GC_PR_FGD
    labels[core | strong] = cv2.GC_FGD
    labels[_holes(grown, distance, noise)] = cv2.GC_BGD
    fine = _grabcut(crop, labels, config.iterations)
    out = np.zeros_like(coarse)
    out[y0:y1, x0:x1] = _resize_bool(fine, (x1 - x0, y1 - y0))
    return out


def _holes(grown: np.ndarray, distance: np.ndarray, noise: float) -> np.ndarray:
    """The enclosed gaps in the object (inside a handle, between legs) that are the background.

    A gap counts when its colour is as close to the background as the border's own noise;
    a stretch of the object that only happens to be lit near the background colour is
    further off on the whole, and stays for GrabCut to settle.
    """
    gaps = (~grown).astype(np.uint8)
    count, labels = cv2.connectedComponents(gaps, connectivity=4)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    # Judged on the gap's inside: its rim is blurred with the object around it.
    inside = (cv2.distanceTransform(gaps, cv2.DIST_L2, 3) > 2).ravel()
    index, values = labels.ravel()[inside], distance.ravel()[inside]
    order = np.argsort(index, kind="stable")
    index, values = index[order], values[order]
    starts = np.searchsorted(index, np.arange(count + 1))
    keep = np.zeros(count, bool)
    for i in range(1, count):
        if i not in edge and starts[i + 1] > starts[i]:
            keep[i] = np.median(values[starts[i]:starts[i + 1]]) < 1.5 * noise
    return keep[labels]


def _shrink(image: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    factor = min(1.0, side / max(image.shape[:2]))
    if factor == 1.0:
        return image, 1.0
    size = (max(1, round(image.shape[1] * factor)), max(1, round(image.shape[0] * factor)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), size[0] / image.shape[1]


def _border_mask(shape: tuple[int, int], strip: int) -> np.ndarray:
    border = np.ones(shape, bool)
    border[strip:-strip, strip:-strip] = False
    return border


def _background_distance(lab: np.ndarray, border: np.ndarray, far: float = 10.0) -> tuple[np.ndarray, float, float]:
    """Per pixel, the Lab distance to a smooth background fitted to the border.

    Returns (distance map, the border's noise level, the fraction of border pixels more than
    ``far`` Lab units off the model). ``far`` is fixed, not a multiple of the noise: measured
    against its own noise level a busy border would never look far off.
    """
    background = _Background.fit(lab, border, far)
    return background.distance(lab), background.noise, background.stray


@dataclass
class _Background:
    """The border's smooth colour surface: quadratic in x and y per Lab channel.

    Positions are fractions of the whole image, so the same surface serves the small copy
    of the photo and a sharper crop of it.
    """

    coeffs: np.ndarray  # [6, 3]
    noise: float  # robust sigma of the border's distance to the surface, Lab units
    stray: float  # fraction of border pixels more than ``far`` off

    @staticmethod
    def fit(lab: np.ndarray, border: np.ndarray, far: float) -> _Background:
        basis = _basis(lab.shape[:2], (0.0, 0.0, 1.0, 1.0))
        samples, colours = basis[border], lab[border]
        use = np.ones(len(samples), bool)
        for _ in range(3):  # refit without the outliers (an object touching the border, a stray shadow)
            coeffs, *_ = np.linalg.lstsq(samples[use], colours[use], rcond=None)
            residual = np.linalg.norm(colours - samples @ coeffs, axis=-1)
            noise = max(1.4826 * float(np.median(residual[use])), 0.5)  # robust sigma (MAD), floored
            use = residual < max(4 * noise, 3.0)
        return _Background(coeffs, noise, float((residual > far).mean()))

    def distance(self, lab: np.ndarray, window: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)) -> np.ndarray:
        """Distance of ``lab`` to the surface; ``lab`` covers ``window`` (x0, y0, x1, y1, fractions)."""
        return np.linalg.norm(lab - _basis(lab.shape[:2], window) @ self.coeffs, axis=-1)


def _basis(shape: tuple[int, int], window: tuple[float, float, float, float]) -> np.ndarray:
    h, w = shape
    x0, y0, x1, y1 = window
    xs = x0 + (x1 - x0) * (np.arange(w, dtype=np.float32) + 0.5) / w - 0.5
    ys = y0 + (y1 - y0) * (np.arange(h, dtype=np.float32) + 0.5) / h - 0.5
    ys, xs = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([np.ones_like(xs), xs, ys, xs * xs, xs * ys, ys * ys], axis=-1)


def _grown(distance: np.ndarray, seeds: np.ndarray, low: float) -> np.ndarray:
    """Hysteresis: pixels above ``low`` that connect to a seed (a weakly lit handle, a pale rim)."""
    count, labels = cv2.connectedComponents((distance > low).astype(np.uint8), connectivity=8)
    hit = np.zeros(count, bool)
    hit[np.unique(labels[seeds])] = True
    hit[0] = False
    grown = hit[labels]
    # Its outermost pixel is mostly the blur between object and background: leave that to GrabCut.
    return seeds | (cv2.erode(grown.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0)


def _grabcut(image: np.ndarray, labels: np.ndarray, iterations: int) -> np.ndarray:
    has_fg = np.isin(labels, (cv2.GC_FGD, cv2.GC_PR_FGD)).any()
    has_bg = np.isin(labels, (cv2.GC_BGD, cv2.GC_PR_BGD)).any()
    if not (has_fg and has_bg):  # GrabCut needs samples of both to fit its colour models
        return labels == cv2.GC_FGD
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    labels = labels.copy()
    # GrabCut seeds its colour models with k-means on OpenCV's global RNG: fix it, so the same
    # photo gives the same mask every time, not only in a fresh process.
    cv2.setRNGSeed(0)
    cv2.grabCut(np.ascontiguousarray(image), labels, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
    return np.isin(labels, (cv2.GC_FGD, cv2.GC_PR_FGD))


def _clean(mask: np.ndarray, min_area: float) -> np.ndarray:
    """Drop specks (opening) and regions below ``min_area`` of the image."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, kernel).astype(bool)
    out = np.zeros_like(mask)
    for region in _regions(mask, min_area):
        out |= region
    return out


def _regions(mask: np.ndarray, min_area: float) -> list[np.ndarray]:
    """Connected regions of at least ``min_area`` of the image, largest first."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = [i for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] >= min_area * mask.size]
    keep.sort(key=lambda i: -stats[i, cv2.CC_STAT_AREA])
    return [labels == i for i in keep]


def _hit(region: np.ndarray, point: Sequence[float]) -> bool:
    x, y = int(point[0]), int(point[1])
    return 0 <= y < region.shape[0] and 0 <= x < region.shape[1] and bool(region[y, x])


def _agreement(region: np.ndarray, seeds: np.ndarray) -> float:
    """Score: how well the region agrees with the colour-contrast seeds (IoU within its box)."""
    union = (region | seeds)
    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    if len(rows) == 0:
        return 0.0
    window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    inter = (region & seeds)[window].sum()
    return float(inter / max(union[window].sum(), 1))


def _resize_bool(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if mask.shape[::-1] == tuple(size):
        return mask
    return cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_LINEAR) >= 0.5


def make_grabcut(config: GrabCutConfig, role: str = "") -> GrabCut:
    return GrabCut(config)


@hookimpl
def gen3d_preprocessors():
    return [Component("grabcut", make_grabcut, GrabCutConfig,
                      "embedded default, no weights: object on a plain background via border model + GrabCut")]
