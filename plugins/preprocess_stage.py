"""The preprocessing stage: a photo in, the object found, cut out and centred out (plus depth).

    detect -> pick one box -> segment it -> crop, centre, scale -> RGBA of ``size`` px

The detector, segmenter and depth estimator are preprocessor components, each chosen by name;
the roles they play (``detect``, ``segment``, ``estimate_depth``) are the core's contract
(``gen3d.Detector``, ``gen3d.Segmenter``, ``gen3d.DepthEstimator``; the ``ROLES`` a component's
config declares are checked before anything loads). Factories are called as
``factory(config, role="detector")``.

Coordinate frames: components see the *working* image (the input turned upright and shrunk
to ``max_side``) and answer in its pixels; everything this stage writes is in the *input's*
pixels (the upright photo at full size): boxes, ``mask.png``, ``depth.npy``.

:func:`preprocess` runs the stage on a loaded image; :func:`preprocess_file` adds reading the
photo and writing the output folder. Both front ends use it: the ``gen3d preprocess`` command,
registered here through the ``gen3d_commands`` hook, and ``loop: preprocess``
(:mod:`gen3d_plugins.preprocess_recipe`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch

from gen3d import (PREPROCESSOR_ROLES, Choice, ConfigError, Context, DataError, DepthMap, Detections, Segmenter,
                   apply_override, choice, from_dict, hookimpl, parse_override, preprocessor_roles, registry,
                   write_json)
from gen3d_plugins.photo_io import LoadedImage, read_image, write_png

KIND = "preprocessor"  # the component kind of detectors, segmenters and depth estimators


# --- settings -----------------------------------------------------------------------------


@dataclass
class PreprocessSettings:
    # choice() returns a dataclasses.field (a default factory), which RUF009 cannot see.
    detector: Any = choice(KIND, "grabcut")  # noqa: RUF009
    segmenter: Any = choice(KIND, "grabcut")  # noqa: RUF009
    depth: str | dict | None = None  # a depth preprocessor, e.g. depth-anything; none by default
    pick: Literal["score", "largest"] = "score"  # which detection becomes the object
    size: int = 256  # side of the square RGBA output
    fill: float = 0.85  # the object's longer side as a fraction of the output side
    max_side: int = 1024  # larger inputs are shrunk to this before detection
    use_alpha: bool = True  # an input with transparency is already cut out: its alpha is the mask
    max_cover: float = 0.7  # a mask covering more of the photo than this is "unsure"

    def __post_init__(self) -> None:
        if not 0 < self.fill <= 1:
            raise ValueError(f"fill must be in (0, 1], got {self.fill}")
        if self.size < 8:
            raise ValueError(f"size must be at least 8 pixels, got {self.size}")
        if self.max_side < 64:
            raise ValueError(f"max_side must be at least 64 pixels, got {self.max_side}")
        if not 0 < self.max_cover <= 1:
            raise ValueError(f"max_cover must be in (0, 1], got {self.max_cover}")


def load_settings(data: dict | None, ctx: Context | None = None) -> PreprocessSettings:
    """Settings from plain data (YAML, command line), every component name and key checked
    against the installed plugins (``ctx.registry``; gen3d's own when not given)."""
    ctx = with_registry(ctx or Context(source="preprocess"))
    settings = from_dict(PreprocessSettings, data or {}, ctx)
    settings.depth = optional_choice(settings.depth, ctx, "depth")
    return settings


def with_registry(ctx: Context) -> Context:
    """``ctx``, with the installed plugins to resolve component names when it has none."""
    return ctx if ctx.registry is not None else dataclasses.replace(ctx, registry=registry())


def optional_choice(raw: Any, ctx: Context, key: str) -> Choice | None:
    """The preprocessor named at ``key`` (a name or ``{type: NAME, settings...}``), resolved and its
    settings checked; None stays None (depth is optional, which a ``choice()`` field cannot be)."""
    if raw is None or isinstance(raw, Choice):
        return raw
    parent, _, name = key.rpartition(".")
    name = name.replace("-", "_")  # a role such as text-to-image: its recipe key is text_to_image
    # A one-field settings class with a choice() field: resolved, and its errors worded, as any recipe's.
    holder = dataclasses.make_dataclass("Picked", [(name, Any, choice(KIND, ""))])
    return getattr(from_dict(holder, {name: raw}, with_registry(ctx), parent), name)


def build(role: str, picked: Choice | str | dict, where: str = "preprocess") -> Any:
    """Build the preprocessor ``picked`` for ``role``, refusing one that cannot play it."""
    picked = optional_choice(picked, Context(source=where), role)
    component = picked.component or registry().get(KIND, picked.type, where=f"{where}: {role}")
    declared = preprocessor_roles(component.config)
    if declared is not None and role not in declared:
        raise ConfigError(f"{where}: {role}: {picked.type!r} is a {' and '.join(declared)}, not a {role}. "
                          f"{role.capitalize()}s: {', '.join(names_for(role)) or '(none installed)'}")
    # Factories get the role as context: model loaders name "detector.model" etc. in their errors.
    obj = dataclasses.replace(picked, component=component).build(role=role)
    if not isinstance(obj, PREPROCESSOR_ROLES[role]):
        raise ConfigError(f"{where}: {role}: {picked.type!r} cannot act as a {role}")
    return obj


def names_for(role: str) -> list[str]:
    """The installed preprocessors that declare ``role``."""
    installed = registry()
    return [name for name in installed.names(KIND)
            if role in (preprocessor_roles(installed.get(KIND, name).config) or ())]


# --- the stage ----------------------------------------------------------------------------


@dataclass
class PreprocessResult:
    rgba: np.ndarray  # uint8 [size, size, 4], the object centred, straight alpha
    mask: np.ndarray  # bool [H, W] in input pixels
    detections: Detections  # in input pixels
    chosen: int | None  # index into detections; None when the input's alpha was the mask
    object_box: list[float]  # the mask's box in input pixels
    unsure: list[str]
    notes: list[str]
    depth: DepthMap | None  # in input pixels
    image: LoadedImage
    seconds: dict[str, float] = field(default_factory=dict)


class Preprocessor:
    """The stage with its components built once (models load once for many images)."""

    def __init__(self, settings: PreprocessSettings, where: str = "preprocess"):
        self.settings = settings
        self.detector = build("detector", settings.detector, where)
        same = _same_choice(settings.detector, settings.segmenter)
        # One object for both roles when they are the same component: grabcut reuses its mask.
        self.segmenter = self.detector if same and isinstance(self.detector, Segmenter) else build(
            "segmenter", settings.segmenter, where)
        self.depth = build("depth", settings.depth, where) if settings.depth is not None else None

    def __call__(self, image: LoadedImage, prompts: Sequence[str] = ()) -> PreprocessResult:
        return preprocess(image, self, prompts)


def _same_choice(a: Any, b: Any) -> bool:
    return isinstance(a, Choice) and isinstance(b, Choice) and a.type == b.type and a.config == b.config


def preprocess(image: LoadedImage, stage: Preprocessor, prompts: Sequence[str] = ()) -> PreprocessResult:
    """Run the stage on a loaded upright image; nothing is written.

    ``image.rgb`` may be smaller than the input (a large JPEG decoded at reduced scale): the
    components see it shrunk further to ``max_side``, the crop is cut from it, and the mask,
    boxes and depth are returned in the input's own pixels all the same.
    """
    settings, seconds = stage.settings, {}
    clock = time.perf_counter()
    decoded = (image.rgb.shape[1], image.rgb.shape[0])
    work, work_scale = shrink(image.rgb, settings.max_side)
    notes: list[str] = []
    if image.scale < 1:
        notes.append(f"the input ({image.input_size[0]}x{image.input_size[1]}) was decoded at {decoded[0]}x"
                     f"{decoded[1]} for speed; mask, boxes and depth are in input pixels")
    alpha = image.alpha if settings.use_alpha else None
    if alpha is not None:
        why_not = alpha_is_not_a_cutout(alpha)
        if why_not:
            notes.append(f"the input has an alpha channel, but {why_not}: it is segmented like a photo")
            alpha = None
    if alpha is not None:
        local = alpha >= 128  # decoded pixels
        box = mask_box(local)
        if box is None:
            raise DataError(f"{image.path}: its alpha channel holds no opaque object")
        detections = _to_input_pixels(Detections(torch.tensor([box]), torch.ones(1), ["alpha"]), image.scale,
                                      image.input_size)
        chosen, unsure = None, []
        mask = upsample_mask(local, image.input_size)
        notes.append("the input has transparency: its alpha channel is the mask (use_alpha=false to segment it)")
    else:
        detections, chosen, work_mask, unsure = _find_object(work, image.path, stage, prompts, seconds)
        notes += detections.notes
        detections = _to_input_pixels(detections, image.scale * work_scale, image.input_size)
        local = upsample_mask(work_mask, decoded)
        mask = upsample_mask(work_mask, image.input_size)
    object_box = mask_box(mask)
    if object_box is None or not local.any():
        raise DataError(f"{image.path}: the segmenter returned an empty mask: no object found")
    if alpha is None:  # a cut-out's alpha is the user's own mask: border and cover are no reason to doubt it
        unsure += mask_doubts(mask, settings.max_cover)
    clock = _lap(seconds, "segment", clock)
    rgba = centre_object(image.rgb, local, settings.size, settings.fill, alpha=alpha)
    clock = _lap(seconds, "crop", clock)
    depth = None
    if stage.depth is not None:
        found = stage.depth.estimate_depth(work)
        depth = DepthMap(resize_float(found.depth, image.input_size), found.raw_range, found.model)
        _lap(seconds, "depth", clock)
    return PreprocessResult(rgba, mask, detections, chosen, object_box, unsure, notes, depth, image, seconds)


# An alpha channel is a cut-out (and becomes the mask) only when this share of pixels is transparent.
MIN_TRANSPARENT = 0.01


def alpha_is_not_a_cutout(alpha: np.ndarray) -> str | None:
    """Why an alpha channel is not an object's cut-out, or None when it is one.

    A PNG with a few semi-transparent pixels, or transparent rounded corners, is a photo; a
    cut-out has a real transparent background around the object.
    """
    transparent = float((alpha < 128).mean())
    if transparent < MIN_TRANSPARENT:
        return f"only {transparent:.1%} of its pixels are transparent (a cut-out has at least {MIN_TRANSPARENT:.0%})"
    opaque = mask_box(alpha >= 128)
    height, width = alpha.shape
    if opaque is not None and opaque == [0.0, 0.0, float(width), float(height)]:
        return "its opaque part spans the whole picture (transparency at the corners or edges only)"
    return None


def _lap(seconds: dict[str, float], name: str, since: float) -> float:
    now = time.perf_counter()
    seconds[name] = round(seconds.get(name, 0.0) + now - since, 4)
    return now


def _find_object(work: np.ndarray, path: Path, stage: Preprocessor, prompts: Sequence[str],
                 seconds: dict[str, float]):
    """Detect, pick and segment in working pixels: (detections, chosen, mask, unsure reasons)."""
    height, width = work.shape[:2]
    detections = stage.detector.detect(work, list(prompts)).clipped(width, height)
    if len(detections) == 0:
        asked = f" matching {' / '.join(map(repr, prompts))}" if prompts else ""
        why = "; ".join(detections.unsure + detections.notes)
        raise DataError(f"{path}: no object{asked} found" + (f" ({why})" if why else ""))
    chosen = pick(detections, stage.settings.pick)
    box = detections.boxes[chosen].tolist()
    segmentation = stage.segmenter.segment(work, box=box)
    mask = np.asarray(segmentation.mask, dtype=bool)
    if mask.shape != (height, width):
        raise DataError(f"{path}: the segmenter returned a {mask.shape} mask for a {height}x{width} image")
    return detections, chosen, mask, list(dict.fromkeys(detections.unsure + segmentation.unsure))


def pick(detections: Detections, how: str) -> int:
    """Index of the detection that becomes the object: highest score, or largest box."""
    if how == "largest":
        wh = (detections.boxes[:, 2:] - detections.boxes[:, :2]).clamp(min=0)
        return int(torch.argmax(wh[:, 0] * wh[:, 1]))
    return int(torch.argmax(detections.scores))


def _to_input_pixels(detections: Detections, scale: float, input_size: tuple[int, int]) -> Detections:
    scaled = Detections(detections.boxes / scale, detections.scores, list(detections.labels),
                        list(detections.unsure), list(detections.notes))
    return scaled.clipped(*input_size)


# --- image helpers ------------------------------------------------------------------------


def shrink(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """The image with its longer side at most ``max_side``, and the factor applied."""
    height, width = rgb.shape[:2]
    factor = min(1.0, max_side / max(height, width))
    if factor == 1.0:
        return rgb, 1.0
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA), size[0] / width


def upsample_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A bool mask resized to ``size`` (width, height) with smooth edges, not blocky ones.

    Through uint8, not float: a 100-megapixel mask then needs 100 MB, not 400.
    """
    if mask.shape[::-1] == tuple(size):
        return mask
    shrinking = size[0] < mask.shape[1]
    soft = cv2.resize(np.asarray(mask, bool).view(np.uint8) * np.uint8(255), size,
                      interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return soft >= 128


def resize_float(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if values.shape[::-1] == tuple(size):
        return values.astype(np.float32)
    return cv2.resize(values.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)


def mask_box(mask: np.ndarray) -> list[float] | None:
    """(x0, y0, x1, y1) enclosing the mask's pixels (pixel i spans [i, i+1)), or None if empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return None
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def mask_doubts(mask: np.ndarray, max_cover: float) -> list[str]:
    """Reasons to distrust any mask: it touches the photo's edge, or covers most of it."""
    doubts = []
    edge = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
    if edge.mean() > 0.01:
        doubts.append(f"the mask touches the image border along {edge.mean():.0%} of it: "
                      "the object may be cut off, or background was taken for object")
    cover = float(mask.mean())
    if cover > max_cover:
        doubts.append(f"the mask covers {cover:.0%} of the image (more than max_cover={max_cover:g})")
    return doubts


def centre_object(rgb: np.ndarray, mask: np.ndarray, size: int, fill: float,
                  alpha: np.ndarray | None = None) -> np.ndarray:
    """RGBA ``size`` x ``size``: the mask's box centred, its longer side ``fill`` of the frame.

    ``alpha``: a soft uint8 alpha (a cut-out's own) carried into the output instead of the mask.
    """
    x0, y0, x1, y1 = mask_box(mask)
    side = max(x1 - x0, y1 - y0) / fill  # the square of the input that becomes the output
    left, top = (x0 + x1 - side) / 2, (y0 + y1 - side) / 2
    scale = size / side
    # Cut that square in whole pixels (zeros outside the photo); the sub-pixel rest goes into the warp.
    ix, iy, iside = int(np.floor(left)), int(np.floor(top)), int(np.ceil(side)) + 1
    coverage = mask.astype(np.float32) if alpha is None else alpha.astype(np.float32) / 255.0
    alpha = _cut(coverage[..., None], ix, iy, iside)
    # Premultiplied colour, so edge pixels don't pick up the background's colour when resampled.
    crop = np.concatenate([_cut(rgb, ix, iy, iside).astype(np.float32) * alpha, alpha * 255.0], axis=-1)
    k = scale
    if scale < 1:  # shrink with area averaging first: no aliasing; the warp then scales by ~1
        out_side = max(1, round(iside * scale))
        crop = cv2.resize(crop, (out_side, out_side), interpolation=cv2.INTER_AREA)
        k = scale * iside / out_side
    # Output u = k * c + shift in edge coordinates; warpAffine works with pixel centres (+0.5).
    shift = np.array([ix - left, iy - top]) * scale + 0.5 * (k - 1)
    warp = np.float32([[k, 0, shift[0]], [0, k, shift[1]]])
    out = cv2.warpAffine(crop, warp, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=0)
    a = out[..., 3:] / 255.0
    colour = np.where(a > 1e-3, out[..., :3] / np.maximum(a, 1e-3), 0.0)
    return np.clip(np.concatenate([colour, out[..., 3:]], axis=-1) + 0.5, 0, 255).astype(np.uint8)


def _cut(image: np.ndarray, x: int, y: int, side: int) -> np.ndarray:
    """``image[y:y+side, x:x+side]`` with zeros where the square leaves the image."""
    out = np.zeros((side, side, image.shape[2]), dtype=image.dtype)
    h, w = image.shape[:2]
    sx0, sy0, sx1, sy1 = max(x, 0), max(y, 0), min(x + side, w), min(y + side, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y:sy1 - y, sx0 - x:sx1 - x] = image[sy0:sy1, sx0:sx1]
    return out


# --- files ----------------------------------------------------------------------------------

OUTPUTS = ("rgba.png", "mask.png", "detections.json", "overview.png", "depth.npy", "depth.png")


def preprocess_file(path: Path | str, settings: PreprocessSettings, out_dir: Path | str,
                    prompts: Sequence[str] = (), stage: Preprocessor | None = None) -> PreprocessResult:
    """Read ``path``, run the stage, write the output folder; returns the result.

    The folder is checked (and made) first, before any model loads, and this stage's outputs
    from an earlier run are removed: a run that fails leaves none that could pass for its own.
    """
    out_dir = prepare_out_dir(out_dir)
    clear_outputs(out_dir)
    stage = stage or Preprocessor(settings)
    clock = time.perf_counter()
    # A large JPEG is decoded at 1/2, 1/4 or 1/8 scale (twice max_side at least, for the crop's detail).
    image = read_image(path, reduce_to=2 * settings.max_side)
    result = preprocess(image, stage, prompts)
    result.seconds = {"read": round(time.perf_counter() - clock - sum(result.seconds.values()), 4),
                      **result.seconds}
    clock = time.perf_counter()
    write_outputs(result, out_dir, settings, prompts)
    result.seconds["write"] = round(time.perf_counter() - clock, 4)
    return result


def prepare_out_dir(out_dir: Path | str) -> Path:
    """The output folder, made if missing; a DataError naming it when it cannot be one."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: the output folder is an existing file; pick another --out")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{out_dir}: cannot make the output folder ({exc.strerror or exc})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise DataError(f"{out_dir}: the output folder is not writable")
    return out_dir


def clear_outputs(out_dir: Path | str) -> None:
    """Remove this stage's outputs from ``out_dir`` (only those names; nothing else is touched)."""
    try:
        for name in OUTPUTS:
            (Path(out_dir) / name).unlink(missing_ok=True)
    except OSError as exc:
        raise DataError(f"{out_dir}: cannot remove an earlier run's outputs ({exc})") from None


def write_outputs(result: PreprocessResult, out_dir: Path | str, settings: PreprocessSettings,
                  prompts: Sequence[str] = ()) -> dict[str, Path]:
    """Write every output into a scratch folder inside ``out_dir``, then move them all into place.

    Outputs of an earlier run that this one does not write (depth) are removed, so the folder
    never mixes two runs.
    """
    out_dir = prepare_out_dir(out_dir)
    paths = {name: out_dir / name for name in OUTPUTS}
    try:
        with tempfile.TemporaryDirectory(prefix=".preprocess-", dir=out_dir) as scratch:
            scratch = Path(scratch)
            write_png(scratch / "rgba.png", result.rgba)
            write_png(scratch / "mask.png", result.mask.astype(np.uint8) * 255)
            if result.depth is not None:
                # np.save on a path would add a second ".npy" to the temporary name: hand it a file.
                with open(scratch / "depth.npy", "wb") as f:
                    np.save(f, result.depth.depth.astype(np.float32))
                write_png(scratch / "depth.png", depth_picture(result.depth.depth))
            write_png(scratch / "overview.png", overview(result))
            write_json(scratch / "detections.json", describe(result, settings, prompts))
            clear_outputs(out_dir)
            for name in OUTPUTS:
                if (scratch / name).exists():
                    os.replace(scratch / name, paths[name])
    except OSError as exc:
        raise DataError(f"{out_dir}: cannot write the outputs ({exc})") from None
    return {name: path for name, path in paths.items() if path.exists()}


def describe(result: PreprocessResult, settings: PreprocessSettings, prompts: Sequence[str]) -> dict:
    """What ``detections.json`` holds: every box in input pixels, the chosen one, the doubts."""
    dets = result.detections
    items = [{"box": [round(v, 2) for v in box], "score": round(score, 4), "label": label}
             for box, score, label in zip(dets.boxes.tolist(), dets.scores.tolist(), dets.labels)]
    name = lambda picked: None if picked is None else getattr(picked, "type", picked)
    data = {
        "input": str(result.image.path),
        "input_size": list(result.image.input_size),
        "exif_rotated": result.image.exif_rotated,
        "prompts": list(prompts),
        "detector": "alpha" if result.chosen is None else name(settings.detector),
        "segmenter": "alpha" if result.chosen is None else name(settings.segmenter),
        "detections": items,
        "chosen": None if result.chosen is None else {**items[result.chosen], "index": result.chosen,
                                                      "picked_by": settings.pick},
        "object_box": result.object_box,
        "unsure": bool(result.unsure),
        "unsure_reasons": result.unsure,
        "notes": result.notes,
        "output": {"size": settings.size, "fill": settings.fill},
        "seconds": result.seconds,
    }
    if result.depth is not None:
        data["depth"] = {"model": result.depth.model, "file": "depth.npy", "convention": DepthMap.CONVENTION,
                         "raw_range": [float(v) for v in result.depth.raw_range]}
    return data


def depth_picture(depth: np.ndarray) -> np.ndarray:
    """A viewable colour picture of a [0, 1] relative depth map (bright = near)."""
    grey = np.clip(depth * 255 + 0.5, 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(grey, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)


def overview(result: PreprocessResult, max_side: int = 768) -> np.ndarray:
    """The input with the mask tinted, every box with its score, the chosen box thicker; + the result."""
    picture, scale = shrink(result.image.rgb, max_side)
    scale *= result.image.scale  # picture pixels per input pixel (the boxes are in input pixels)
    mask = upsample_mask(result.mask, picture.shape[1::-1])
    tinted = picture.astype(np.float32)
    tinted[mask] = 0.55 * tinted[mask] + 0.45 * np.array([40, 200, 255])
    picture = np.ascontiguousarray(tinted.astype(np.uint8))
    thick = max(1, round(max(picture.shape[:2]) / 300))
    dets = result.detections
    for i, (box, score, label) in enumerate(zip(dets.boxes.tolist(), dets.scores.tolist(), dets.labels)):
        x0, y0, x1, y1 = (round(v * scale) for v in box)
        chosen = i == result.chosen
        colour = (255, 60, 40) if chosen else (255, 220, 0)
        cv2.rectangle(picture, (x0, y0), (max(x1 - 1, x0), max(y1 - 1, y0)), colour, thick * (2 if chosen else 1))
        _label(picture, f"{label} {score:.2f}", (x0, y0), colour)
    if result.unsure:
        _label(picture, "UNSURE: " + result.unsure[0][:70], (0, picture.shape[0]), (255, 60, 40), above=True)
    # The centred result beside it, on a grey checkerboard so its transparency shows.
    side = picture.shape[0]
    cut = cv2.resize(result.rgba, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32)
    check = ((np.indices((side, side)) // max(side // 16, 1)).sum(0) % 2)[..., None] * 40.0 + 180.0
    a = cut[..., 3:] / 255.0
    framed = (cut[..., :3] * a + check * (1 - a)).astype(np.uint8)
    return np.concatenate([picture, np.full((side, 4, 3), 255, np.uint8), framed], axis=1)


def _label(picture: np.ndarray, text: str, corner: tuple[int, int], colour, above: bool = False) -> None:
    font, size = cv2.FONT_HERSHEY_SIMPLEX, max(0.4, max(picture.shape[:2]) / 1400)
    (w, h), base = cv2.getTextSize(text, font, size, 1)
    x = min(max(corner[0], 0), max(picture.shape[1] - w, 0))
    y = corner[1] - base if above else min(max(corner[1], 0) + h + base, picture.shape[0] - base)
    y = max(y, h + base)
    cv2.rectangle(picture, (x, y - h - base), (x + w, y + base), colour, -1)
    cv2.putText(picture, text, (x, y), font, size, (0, 0, 0), 1, cv2.LINE_AA)


# --- the command: gen3d preprocess ----------------------------------------------------------


@hookimpl
def gen3d_commands():
    return [("preprocess", "find, cut out and centre the object in a photo", setup_command)]


def setup_command(parser: argparse.ArgumentParser):
    """``gen3d preprocess IMAGE [key=value ...]``: its arguments; returns the function that runs it."""
    parser.description = ("Detect -> segment -> centre the object of a photo; writes rgba.png, "
                          "mask.png, detections.json, overview.png (and depth.npy/png).")
    parser.add_argument("image", help="input photo (JPEG, PNG, WebP, ...)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="settings, e.g. detector.model=PATH pick=largest max_side=2048")
    parser.add_argument("--prompt", action="append", help="what to find, e.g. 'a chair' (repeatable)")
    parser.add_argument("--out", help="output folder (default: runs/preprocess/<image name>)")
    parser.add_argument("--detector", help="detector preprocessor (default: grabcut)")
    parser.add_argument("--segmenter", help="segmenter preprocessor (default: grabcut)")
    parser.add_argument("--depth", help="depth preprocessor (default: none)")
    parser.add_argument("--size", type=int, help="output side in pixels (default 256)")
    parser.add_argument("--fill", type=float, help="object's share of the output side (default 0.85)")
    return run_command


def run_command(args: argparse.Namespace) -> int:
    data: dict = {key: {"type": getattr(args, key)} for key in ("detector", "segmenter", "depth")
                  if getattr(args, key) is not None}
    data.update({key: getattr(args, key) for key in ("size", "fill") if getattr(args, key) is not None})
    for text in args.overrides:
        apply_override(data, *parse_override(text))
    settings = load_settings(data, Context(source="gen3d preprocess", base_dir=Path.cwd(), registry=registry()))
    out = Path(args.out) if args.out else Path("runs") / "preprocess" / Path(args.image).stem
    result = preprocess_file(Path(args.image), settings, out, prompts=args.prompt or [])
    chosen = result.detections.labels[result.chosen] if result.chosen is not None else "alpha"
    print(json.dumps({"out": str(out), "object": chosen, "object_box": result.object_box,
                      "unsure": result.unsure, "seconds": result.seconds}, indent=2))
    for note in result.notes:
        print(f"gen3d: note: {note}", file=sys.stderr)
    for reason in result.unsure:
        print(f"gen3d: unsure: {reason}", file=sys.stderr)
    return 0
