"""Box IoU and NMS against brute-force loops, degenerate boxes included."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gen3d.boxes import _tv_ops, batched_nms, box_iou, nms

# Both code paths when torchvision is installed; only ours when it is not.
PATHS = [False, True] if _tv_ops is not None else [False]


def iou_reference(a, b) -> float:
    ax0, ay0, ax1, ay1 = a
    bx0, by0, bx1, by1 = b
    area = lambda x0, y0, x1, y1: max(x1 - x0, 0.0) * max(y1 - y0, 0.0)
    inter = area(max(ax0, bx0), max(ay0, by0), min(ax1, bx1), min(ay1, by1))
    union = area(*a) + area(*b) - inter
    return inter / union if union > 0 else 0.0


def nms_reference(boxes, scores, classes, threshold) -> list[int]:
    order = sorted(range(len(boxes)), key=lambda i: -scores[i])  # sorted() is stable
    keep: list[int] = []
    for i in order:
        if all(classes[i] != classes[k] or iou_reference(boxes[i], boxes[k]) <= threshold for k in keep):
            keep.append(i)
    return keep


coordinate = st.integers(0, 40).map(float)  # small integers: many touching, nested and identical boxes


@st.composite
def box_lists(draw, max_size=25):
    n = draw(st.integers(0, max_size))
    boxes = []
    for _ in range(n):
        x0, y0 = draw(coordinate), draw(coordinate)
        kind = draw(st.sampled_from(["normal", "normal", "normal", "zero-width", "point", "inverted"]))
        w, h = draw(coordinate), draw(coordinate)
        if kind == "zero-width":
            w = 0.0
        elif kind == "point":
            w = h = 0.0
        elif kind == "inverted":
            w = -w - 1
        boxes.append((x0, y0, x0 + w, y0 + h))
    return boxes


@settings(max_examples=60, deadline=None, database=None)
@given(box_lists(), box_lists(), st.sampled_from(PATHS))
def test_box_iou_matches_reference(a, b, use_torchvision):
    got = box_iou(torch.tensor(a).reshape(-1, 4), torch.tensor(b).reshape(-1, 4), use_torchvision)
    assert got.shape == (len(a), len(b))
    expected = torch.tensor([[iou_reference(x, y) for y in b] for x in a]).reshape(len(a), len(b))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected.to(got.dtype), atol=1e-6, rtol=0)


@settings(max_examples=60, deadline=None, database=None)
@given(box_lists(), st.data(), st.sampled_from([0.0, 0.3, 0.5, 0.7, 1.0]), st.sampled_from(PATHS))
def test_nms_matches_reference(boxes, data, threshold, use_torchvision):
    n = len(boxes)
    # Distinct scores (a permutation), so the greedy order is unambiguous on every path.
    scores = data.draw(st.permutations(list(range(n)))) if n else []
    classes = data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    t_boxes = torch.tensor(boxes).reshape(-1, 4)
    t_scores = torch.tensor(scores, dtype=torch.float32)
    got = batched_nms(t_boxes, t_scores, torch.tensor(classes, dtype=torch.long), threshold, use_torchvision)
    assert got.tolist() == nms_reference(boxes, scores, classes, threshold)
    got_single = nms(t_boxes, t_scores, threshold, use_torchvision)
    assert got_single.tolist() == nms_reference(boxes, scores, [0] * n, threshold)


def test_nms_ties_keep_input_order_and_identical_boxes_collapse():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], dtype=torch.float32)
    scores = torch.tensor([0.5, 0.5, 0.5])
    assert nms(boxes, scores, 0.5, use_torchvision=False).tolist() == [0, 2]


def test_empty_boxes_have_zero_iou_not_nan():
    empty = torch.tensor([[5.0, 5.0, 5.0, 5.0], [3.0, 3.0, 1.0, 1.0]])
    assert box_iou(empty, empty).abs().sum() == 0


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match=r"shape \[N, 4\]"):
        box_iou(torch.zeros(3, 5), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="scores and classes must have shape"):
        nms(torch.zeros(3, 4), torch.zeros(2), 0.5)
