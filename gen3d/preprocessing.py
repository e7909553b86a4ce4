"""The preprocessing roles: what a detector, segmenter or depth estimator returns and offers.

Detectors, segmenters and depth estimators are all components of the kind ``preprocessor``
(hook ``gen3d_preprocessors``). What one can *do* is its role, a small protocol below:
``detect``, ``segment`` or ``estimate_depth``; scene generation's image models ``generate``
(text-to-image) or ``inpaint`` (inpainter) (:data:`PREPROCESSOR_ROLES` maps each role to its
protocol). A component may play several roles and says which in a ``ROLES`` tuple on its config
class (:func:`preprocessor_roles` reads it), so a stage can refuse a wrong choice before loading
anything. Factories are called as ``factory(config, role="detector")``. Images are uint8 RGB
[h, w, 3] arrays; answers are in that image's pixels.

The preprocessing stage itself (``gen3d preprocess``, ``loop: preprocess``) is a plugin; only
this contract is part of the core.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch

from .boxes import batched_nms, box_area

KIND = "preprocessor"  # the component kind of every detector, segmenter and depth estimator

# --- what components return --------------------------------------------------------------


@dataclass
class Detections:
    """Boxes ``[N, 4]`` (x0, y0, x1, y1, float32 pixels), scores ``[N]`` and one label per box."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: list[str]
    unsure: list[str] = field(default_factory=list)  # why the detector doubts its answer
    notes: list[str] = field(default_factory=list)  # anything else worth telling the user

    def __post_init__(self) -> None:
        self.boxes = torch.as_tensor(self.boxes, dtype=torch.float32).reshape(-1, 4)
        self.scores = torch.as_tensor(self.scores, dtype=torch.float32).reshape(-1)
        if not (len(self.boxes) == len(self.scores) == len(self.labels)):
            raise ValueError(f"detections: {len(self.boxes)} boxes, {len(self.scores)} scores and "
                             f"{len(self.labels)} labels should be as many")

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, index: torch.Tensor | Sequence[int]) -> Detections:
        index = torch.as_tensor(index, dtype=torch.long)
        return Detections(self.boxes[index], self.scores[index], [self.labels[i] for i in index.tolist()],
                          list(self.unsure), list(self.notes))

    def suppress(self, iou_threshold: float) -> Detections:
        """Non-maximum suppression within each label, highest score first."""
        names = sorted(set(self.labels))
        classes = torch.tensor([names.index(label) for label in self.labels], dtype=torch.long)
        return self.select(batched_nms(self.boxes, self.scores, classes, iou_threshold))

    def clipped(self, width: int, height: int) -> Detections:
        """Boxes clipped to the image; those left empty (wholly in a model's padding) are dropped."""
        limit = torch.tensor([width, height, width, height], dtype=torch.float32)
        boxes = torch.minimum(self.boxes.clamp(min=0), limit)
        clipped = Detections(boxes, self.scores, list(self.labels), list(self.unsure), list(self.notes))
        return clipped.select(torch.nonzero(box_area(boxes) > 0).flatten())


@dataclass
class Segmentation:
    mask: np.ndarray  # bool [h, w] in the pixels of the image the segmenter was given
    score: float | None = None
    unsure: list[str] = field(default_factory=list)


@dataclass
class DepthMap:
    """Relative depth in the pixels of the image the estimator was given.

    ``depth`` is the model's affine-invariant *inverse* depth (disparity-like: larger is
    nearer), normalised per image to [0, 1]: 0 at the farthest pixel, 1 at the nearest.
    ``raw_range`` is the model's own (min, max), so ``raw = depth * (max - min) + min``.
    A metric depth ``z`` relates to it by ``1 / z = s * depth + t`` for unknown s > 0, t.
    """

    depth: np.ndarray  # float32 [h, w]
    raw_range: tuple[float, float]
    model: str = ""

    CONVENTION: ClassVar[str] = ("relative inverse depth (larger = nearer), normalised per image to [0, 1]; "
                                 "metric depth z satisfies 1/z = s*depth + t for unknown scale s > 0 and shift t")


# --- roles: what a preprocessor can do ----------------------------------------------------


@runtime_checkable
class Detector(Protocol):
    def detect(self, image: np.ndarray, prompts: Sequence[str]) -> Detections:
        """Boxes in ``image`` (uint8 RGB [h, w, 3]); ``prompts``: text queries, maybe empty."""


@runtime_checkable
class Segmenter(Protocol):
    def segment(self, image: np.ndarray, box: Sequence[float] | None = None,
                points: Sequence[Sequence[float]] | None = None) -> Segmentation:
        """The mask of the object in ``box`` (x0, y0, x1, y1) or at ``points`` ([[x, y], ...])."""


@runtime_checkable
class DepthEstimator(Protocol):
    def estimate_depth(self, image: np.ndarray) -> DepthMap: ...


@runtime_checkable
class TextToImage(Protocol):
    def generate(self, prompt: str, seed: int, camera: Any = None) -> np.ndarray:
        """An RGB image (float32 [h, w, 3] in 0..1) of ``prompt``; the same seed gives the same image.
        ``camera``: the view's camera, for components that need it (a teacher); models ignore it."""


@runtime_checkable
class Inpainter(Protocol):
    def inpaint(self, image: np.ndarray, mask: np.ndarray, prompt: str, seed: int, camera: Any = None) -> np.ndarray:
        """``image`` (float [h, w, 3] in 0..1) with the pixels where ``mask`` (bool [h, w]) is True
        filled in; every other pixel is returned exactly as given."""


# Each role and the protocol a component must satisfy to play it. text-to-image and inpainter
# are scene generation's image models (progressive Text2NeRF), chosen like any preprocessor.
PREPROCESSOR_ROLES: dict[str, type] = {"detector": Detector, "segmenter": Segmenter, "depth": DepthEstimator,
                                       "text-to-image": TextToImage, "inpainter": Inpainter}
ROLES = tuple(PREPROCESSOR_ROLES)


def preprocessor_roles(component_config: type | None) -> tuple[str, ...] | None:
    """The roles a preprocessor declares (``ROLES`` on its config class), or None if it doesn't."""
    return getattr(component_config, "ROLES", None)
