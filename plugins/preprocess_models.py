"""Model preprocessors (transformers): owlv2, detr, sam, depth-anything."""

from __future__ import annotations

from gen3d import hookimpl


@hookimpl
def gen3d_preprocessors():
    return []
