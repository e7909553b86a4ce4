"""Model preprocessors from transformers: ``owlv2``, ``detr`` (detectors), ``sam`` (segmenter),
``depth-anything`` (relative depth; DPT checkpoints load the same way, metric-depth models are refused).

Each loads a hub id or a local ``save_pretrained`` folder through :func:`gen3d.load_pretrained`,
so a missing download is one clear line, not a traceback. Weights are fetched only when a
preprocessor is named (never at install time): ``hf download google/owlv2-base-patch16-ensemble``
once on a machine with internet, or point ``detector.model=PATH`` at a folder.

All of them take and return pixels of the image they are given: the processors resize and pad
for the model, and the post-processing maps boxes and masks back (OWLv2 pads to a square at the
bottom and right, so its boxes are relative to the longer side; DETR's are relative to the unpadded
image; SAM's masks are cut out of its padding and scaled back). transformers is imported only
when a model preprocessor is built, so listing plugins stays fast.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from gen3d import (Component, ConfigError, DepthMap, Detections, Segmentation, hookimpl, load_pretrained,
                   pick_dtype)

# transformers' PIL image processors: the same results with or without torchvision installed.
BACKEND = "pil"


def _device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for a preprocessor but torch sees no CUDA GPU; use device=cpu")
    return torch.device(setting)


def _load(loader, model_id: str, key: str, what: str, kinds: tuple[str, ...], device: str, dtype: str,
          check: Callable[[Any], dict[str, Any]] | None = None, revision: str | None = None):
    """(model, processor) in eval mode on the device, both through the hub loader.

    ``kinds``: the config ``model_type`` values this preprocessor can run (empty: any the loader
    accepts). Checked first, because transformers would otherwise load, say, a depth model's
    folder as a SAM with random weights and only warn. ``check(config)`` may refuse the config
    (ConfigError) or answer other load arguments (a hub ``revision``); the config is then reloaded
    with them and checked again.
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor

    target = _device(device)
    extra: dict[str, Any] = {"revision": revision} if revision else {}
    config = _config(AutoConfig.from_pretrained, model_id, key, what, kinds, extra)
    more = check(config) if check is not None else {}
    try:
        if more:
            extra.update(more)
            config = _config(AutoConfig.from_pretrained, model_id, key, what, kinds, extra)
            check(config)
        model = load_pretrained(loader, model_id, f"{key}.model", what, config=config,
                                dtype=pick_dtype(dtype, target), **extra)
        processor_loader = AutoProcessor if what.startswith(("OWLv2", "SAM")) else AutoImageProcessor
        processor = load_pretrained(processor_loader.from_pretrained, model_id, f"{key}.model",
                                    f"{what} processor", backend=BACKEND, **extra)
    except ConfigError as exc:
        if "revision" not in more:
            raise
        raise ConfigError(f"{exc} [its {more['revision']!r} revision was asked for because timm is not installed: "
                          f"`hf download {model_id} --revision {more['revision']}`]") from None
    return model.to(target).eval(), processor


def _config(loader, model_id: str, key: str, what: str, kinds: tuple[str, ...], extra: dict[str, Any]):
    config = load_pretrained(loader, model_id, f"{key}.model", what, **extra)
    if kinds and config.model_type not in kinds:
        raise ConfigError(f"{key}.model: {model_id!r} holds a {config.model_type!r} model, not a {what} "
                          f"({' or '.join(kinds)})")
    return config


def _inputs(batch, model) -> dict[str, Any]:
    """Processor output moved to the model's device, images and prompt coordinates in the model's dtype."""
    out = {}
    for name, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(model.device)
            # SAM's processor answers float64 boxes and points: the model's own dtype, as for the image.
            if value.is_floating_point() and (name.endswith("pixel_values") or name in ("input_boxes", "input_points")):
                value = value.to(model.dtype)
        out[name] = value
    return out


def _check_image(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 RGB image [h, w, 3], got {image.dtype} {image.shape}")
    return image


# --- OWLv2: text-prompted detection ----------------------------------------------------------


@dataclass
class Owlv2Config:
    model: str = "google/owlv2-base-patch16-ensemble"
    threshold: float = 0.1  # OWLv2 scores are low by design; 0.1 is the paper's usual cut
    nms_iou: float = 0.3  # boxes of one prompt overlapping more than this are one object
    max_detections: int = 20
    default_prompt: str = "an object"  # the query when no --prompt is given
    device: str = "auto"
    dtype: str = "auto"

    ROLES: ClassVar[tuple[str, ...]] = ("detector",)


class Owlv2Detector:
    def __init__(self, config: Owlv2Config, role: str = "detector"):
        from transformers import Owlv2ForObjectDetection

        self.config = config
        self.model, self.processor = _load(Owlv2ForObjectDetection.from_pretrained, config.model, role,
                                           "OWLv2 detector", ("owlv2",), config.device, config.dtype)

    @torch.no_grad()
    def detect(self, image: np.ndarray, prompts: Sequence[str] = ()) -> Detections:
        height, width = _check_image(image).shape[:2]
        queries = [p.strip() for p in prompts if p.strip()] or [self.config.default_prompt]
        batch = self.processor(text=[queries], images=[image], return_tensors="pt", truncation=True)
        outputs = self.model(**_inputs(batch, self.model))
        # target_sizes (h, w): the processor scales by the longer side, undoing its square padding.
        found = self.processor.post_process_grounded_object_detection(
            outputs, threshold=self.config.threshold, target_sizes=[(height, width)], text_labels=[queries])[0]
        detections = Detections(found["boxes"].float().cpu(), found["scores"].float().cpu(),
                                list(found["text_labels"]))
        detections = detections.clipped(width, height).suppress(self.config.nms_iou)
        return detections.select(range(min(len(detections), self.config.max_detections)))


# --- DETR: closed-set detection --------------------------------------------------------------


@dataclass
class DetrConfig:
    model: str = "facebook/detr-resnet-50"
    revision: str | None = None  # a hub branch or commit; facebook/detr-resnet-* use "no_timm" without timm
    threshold: float = 0.7
    nms_iou: float = 0.5
    max_detections: int = 20
    device: str = "auto"
    dtype: str = "auto"

    ROLES: ClassVar[tuple[str, ...]] = ("detector",)


class DetrDetector:
    def __init__(self, config: DetrConfig, role: str = "detector"):
        from transformers import DetrForObjectDetection

        self.config, self.role = config, role
        check = lambda loaded: _detr_backbone(loaded, config.model, role, config.revision)
        self.model, self.processor = _load(DetrForObjectDetection.from_pretrained, config.model, role,
                                           "DETR detector", ("detr",), config.device, config.dtype,
                                           check=check, revision=config.revision)
        self.classes = {int(i): name for i, name in self.model.config.id2label.items()}

    @torch.no_grad()
    def detect(self, image: np.ndarray, prompts: Sequence[str] = ()) -> Detections:
        height, width = _check_image(image).shape[:2]
        wanted = self._classes_in(prompts)
        batch = self.processor(images=[image], return_tensors="pt")
        outputs = self.model(**_inputs(batch, self.model))
        # DETR's boxes are relative to the image before padding: scale by its own (h, w).
        found = self.processor.post_process_object_detection(
            outputs, threshold=self.config.threshold, target_sizes=[(height, width)])[0]
        labels = [self.classes.get(int(i), str(int(i))) for i in found["labels"]]
        detections = Detections(found["boxes"].float().cpu(), found["scores"].float().cpu(), labels)
        if wanted is not None:
            detections = detections.select([i for i, label in enumerate(labels) if label in wanted])
        detections = detections.clipped(width, height).suppress(self.config.nms_iou)
        return detections.select(range(min(len(detections), self.config.max_detections)))

    def _classes_in(self, prompts: Sequence[str]) -> set[str] | None:
        """The model's class names that the prompts mention (DETR knows only its own classes)."""
        if not prompts:
            return None
        # Whole words only ("a chair", "an apple", "two chairs"; not "chairman"), singular or plural.
        text = " " + " ".join(_words(p) for p in prompts) + " "
        named = {name for name in self.classes.values() if any(f" {form} " in text for form in _forms(name))}
        if not named:
            some = ", ".join(sorted(self.classes.values())[:12])
            raise ConfigError(f"{self.role}: detr knows only its {len(self.classes)} classes ({some}, ...) and "
                              f"none is in the prompt {' / '.join(map(repr, prompts))}; "
                              "use owlv2 for free-text prompts")
        return named


def _words(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


IRREGULAR_PLURALS = {"person": "people", "knife": "knives", "mouse": "mice", "wine glass": "wine glasses"}


def _forms(name: str) -> set[str]:
    """A class name as a prompt may say it: singular and simple plurals ("bus" -> "buses", "sky" -> "skies")."""
    name = _words(name)
    if not name:
        return set()
    forms = {name, name + "s", name + "es"}
    if name.endswith("y") and name[-2:-1] not in "aeiou":
        forms.add(name[:-1] + "ies")
    for singular, plural in IRREGULAR_PLURALS.items():
        if name == singular or name.endswith(" " + singular):
            forms.add(name[: len(name) - len(singular)] + plural)
    return forms


# The official DETR checkpoints keep a branch whose backbone is transformers' own ResNet.
NO_TIMM_REVISION = {"facebook/detr-resnet-50": "no_timm", "facebook/detr-resnet-101": "no_timm"}


def has_timm() -> bool:
    return importlib.util.find_spec("timm") is not None


def uses_timm_backbone(config) -> bool:
    """A DETR config that builds its backbone with timm (``use_timm_backbone: true`` in config.json)."""
    backbone = getattr(config, "backbone_config", None)
    return bool(getattr(config, "use_timm_backbone", False)) or getattr(backbone, "model_type", "") == "timm_backbone"


def _detr_backbone(config, model_id: str, role: str, revision: str | None) -> dict[str, Any]:
    """Load arguments that avoid timm when it is missing; a clear error when nothing can."""
    if not uses_timm_backbone(config) or has_timm():
        return {}
    if revision is None and model_id in NO_TIMM_REVISION:
        return {"revision": NO_TIMM_REVISION[model_id]}
    raise ConfigError(f"{role}.model: {model_id!r} uses a timm backbone (use_timm_backbone: true in its config) "
                      "and timm is not installed: `pip install timm`, or use a DETR checkpoint with a "
                      "transformers backbone (facebook/detr-resnet-50 and -101 load their 'no_timm' revision "
                      "by themselves)")


# --- SAM: box- or point-prompted segmentation ------------------------------------------------


@dataclass
class SamConfig:
    model: str = "facebook/sam-vit-base"
    # Point prompts are ambiguous (a point on a shirt: the shirt or the person?): ask for 3 candidate
    # masks and keep the one SAM rates best. A box is not, and SAM's authors ask for one mask then.
    multimask: bool = True
    min_score: float = 0.6  # below this predicted IoU the stage is "unsure"
    device: str = "auto"
    dtype: str = "auto"

    ROLES: ClassVar[tuple[str, ...]] = ("segmenter",)


class SamSegmenter:
    def __init__(self, config: SamConfig, role: str = "segmenter"):
        from transformers import SamModel

        self.config = config
        self.model, self.processor = _load(SamModel.from_pretrained, config.model, role, "SAM segmenter",
                                           ("sam",), config.device, config.dtype)

    @torch.no_grad()
    def segment(self, image: np.ndarray, box: Sequence[float] | None = None,
                points: Sequence[Sequence[float]] | None = None) -> Segmentation:
        _check_image(image)
        prompt: dict[str, Any] = {}
        if box is not None:
            prompt["input_boxes"] = [[[float(v) for v in box]]]
        if points is not None:
            prompt["input_points"] = [[[[float(x), float(y)] for x, y in points]]]
            prompt["input_labels"] = [[[1] * len(points)]]
        if not prompt:
            raise ValueError("sam needs a box or points to segment")
        # The processor rescales the prompt's pixel coordinates the way it resizes the image.
        batch = self.processor(images=[image], return_tensors="pt", **prompt)
        multimask = self.config.multimask and box is None
        outputs = self.model(**_inputs(batch, self.model), multimask_output=multimask)
        masks = self.processor.post_process_masks(outputs.pred_masks.float().cpu(), batch["original_sizes"],
                                                  batch["reshaped_input_sizes"])[0][0]  # [candidates, h, w]
        scores = outputs.iou_scores[0, 0].float().cpu()
        best = int(torch.argmax(scores))
        mask = masks[best].numpy().astype(bool)  # [height, width]: the image's own pixels
        score = float(scores[best])
        unsure = [] if score >= self.config.min_score else [
            f"SAM rates its own mask at {score:.2f} predicted IoU (below min_score={self.config.min_score:g})"]
        return Segmentation(mask, score, unsure)


# --- Depth Anything / DPT: relative depth -----------------------------------------------------


# Models whose output is affine-invariant inverse depth (larger = nearer), the convention of DepthMap.
# ZoeDepth, GLPN, Depth Pro and metric Depth Anything predict metric depth (larger = farther): refused,
# not mislabelled.
RELATIVE_DEPTH = ("depth_anything", "dpt")


def _relative_only(config, model_id: str, role: str) -> dict[str, Any]:
    kind = getattr(config, "depth_estimation_type", "relative")
    if kind != "relative":
        raise ConfigError(f"{role}.model: {model_id!r} predicts {kind} depth (depth_estimation_type: {kind}); "
                          "depth-anything writes relative inverse depth and takes only relative checkpoints, "
                          "e.g. depth-anything/Depth-Anything-V2-Small-hf")
    return {}


@dataclass
class DepthConfig:
    model: str = "depth-anything/Depth-Anything-V2-Small-hf"
    device: str = "auto"
    dtype: str = "auto"

    ROLES: ClassVar[tuple[str, ...]] = ("depth",)


class DepthEstimator:
    def __init__(self, config: DepthConfig, role: str = "depth"):
        from transformers import AutoModelForDepthEstimation

        self.config = config
        self.model, self.processor = _load(AutoModelForDepthEstimation.from_pretrained, config.model, role,
                                           "relative depth model", RELATIVE_DEPTH, config.device, config.dtype,
                                           check=lambda loaded: _relative_only(loaded, config.model, role))

    @torch.no_grad()
    def estimate_depth(self, image: np.ndarray) -> DepthMap:
        height, width = _check_image(image).shape[:2]
        batch = self.processor(images=[image], return_tensors="pt")
        outputs = self.model(**_inputs(batch, self.model))
        outputs["predicted_depth"] = outputs.predicted_depth.float()
        raw = self.processor.post_process_depth_estimation(outputs, target_sizes=[(height, width)])[0]
        raw = raw["predicted_depth"].cpu().numpy().astype(np.float32)
        low, high = float(raw.min()), float(raw.max())
        # Depth Anything and DPT predict inverse depth up to scale and shift: normalise it per image.
        normalised = (raw - low) / (high - low) if high > low else np.zeros_like(raw)
        return DepthMap(normalised.astype(np.float32), (low, high), self.config.model)


@hookimpl
def gen3d_preprocessors():
    return [
        Component("owlv2", Owlv2Detector, Owlv2Config,
                  "text-prompted detection (transformers OWLv2; --prompt 'a chair')"),
        Component("detr", DetrDetector, DetrConfig, "closed-set detection of the COCO classes (transformers DETR)"),
        Component("sam", SamSegmenter, SamConfig, "box/point-prompted segmentation (transformers SAM)"),
        Component("depth-anything", DepthEstimator, DepthConfig,
                  "relative inverse depth (transformers Depth Anything V2 or DPT, relative checkpoints only)"),
    ]
