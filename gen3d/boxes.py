"""Axis-aligned boxes: pairwise IoU and non-maximum suppression, vectorised in torch.

Boxes are ``[N, 4]`` tensors ``(x0, y0, x1, y1)`` in pixels, with pixel ``i`` covering ``[i, i+1)``.
``torchvision.ops`` is used when it is installed (it has compiled kernels); otherwise the
versions here, which give the same answers (the tests check both against a brute-force loop).

Degenerate boxes are allowed: a box with ``x1 <= x0`` or ``y1 <= y0`` has zero area and an IoU
of 0 with everything, itself included (never NaN). NMS drops a box whose IoU with a
higher-scoring kept box is *greater than* the threshold, as torchvision does; equal scores keep
their input order.
"""

from __future__ import annotations

import torch

try:  # optional: faster kernels, same results
    from torchvision import ops as _tv_ops
except ImportError:  # pragma: no cover - depends on the environment
    _tv_ops = None


def _check(boxes: torch.Tensor, name: str) -> torch.Tensor:
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [N, 4] (x0, y0, x1, y1), got {tuple(boxes.shape)}")
    return boxes


def _flatten_inverted(boxes: torch.Tensor) -> torch.Tensor:
    # An inverted box (x1 < x0) becomes a zero-width one, so areas are never negative.
    return torch.cat([boxes[:, :2], torch.maximum(boxes[:, 2:], boxes[:, :2])], dim=1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    _check(boxes, "boxes")
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)
    return wh[:, 0] * wh[:, 1]


def box_iou(a: torch.Tensor, b: torch.Tensor, use_torchvision: bool = True) -> torch.Tensor:
    """``[N, M]`` intersection over union of every box in ``a`` with every box in ``b``."""
    a, b = _flatten_inverted(_check(a, "a")), _flatten_inverted(_check(b, "b"))
    if use_torchvision and _tv_ops is not None:
        iou = _tv_ops.box_iou(a, b)
    else:
        top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
        bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
        wh = (bottom_right - top_left).clamp(min=0)
        inter = wh[..., 0] * wh[..., 1]
        union = box_area(a)[:, None] + box_area(b)[None, :] - inter
        iou = inter / union
    # 0/0 for two empty boxes: call it no overlap rather than NaN.
    return torch.nan_to_num(iou, nan=0.0)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
        use_torchvision: bool = True) -> torch.Tensor:
    """Indices of the boxes kept by greedy NMS, highest score first."""
    return batched_nms(boxes, scores, torch.zeros(len(boxes), dtype=torch.long), iou_threshold, use_torchvision)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_threshold: float,
                use_torchvision: bool = True) -> torch.Tensor:
    """NMS within each class only: boxes of different classes never suppress each other."""
    _check(boxes, "boxes")
    if scores.shape != boxes.shape[:1] or classes.shape != boxes.shape[:1]:
        raise ValueError(f"scores and classes must have shape [{boxes.shape[0]}], "
                         f"got {tuple(scores.shape)} and {tuple(classes.shape)}")
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    # Sort stably so equal scores keep their input order (torchvision's own sort is not stable).
    order = torch.sort(scores, descending=True, stable=True).indices
    boxes, classes = _flatten_inverted(boxes[order]), classes[order].to(boxes.device)
    if use_torchvision and _tv_ops is not None:
        return order[_tv_ops.batched_nms(boxes.float(), scores[order].float(), classes, iou_threshold)]
    # One IoU matrix up front; the greedy pass is then one row lookup per kept box.
    same_class = classes[:, None] == classes[None, :]
    overlaps = (box_iou(boxes, boxes, use_torchvision=False) > iou_threshold) & same_class
    removed = torch.zeros(len(order), dtype=torch.bool, device=boxes.device)
    keep = []
    for i in range(len(order)):
        if not removed[i]:
            keep.append(i)
            removed |= overlaps[i]
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]
