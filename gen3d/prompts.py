"""Prompts for text-guided recipes: view-dependent suffixes and a cache of text embeddings.

DreamFusion appends "front view" / "side view" / "back view" / "overhead view" to the prompt
according to the sampled camera, which helps the guidance model agree on one object instead of
painting a face on every side (the "Janus" problem). Text encoders are slow compared with a
lookup, and a run only ever needs a handful of distinct prompts, so embeddings are cached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class ViewPrompts:
    enabled: bool = True
    overhead_elevation: float = 60.0  # degrees: above this it is an overhead view
    front_width: float = 45.0  # degrees either side of azimuth 0 counted as the front
    back_width: float = 45.0  # degrees either side of azimuth 180 counted as the back
    template: str = "{prompt}, {view} view"

    def __post_init__(self) -> None:
        if "{prompt}" not in self.template or "{view}" not in self.template:
            raise ValueError(f"template must contain {{prompt}} and {{view}}, got {self.template!r}")
        if self.front_width + self.back_width > 180:
            raise ValueError("front_width + back_width must not exceed 180 degrees")


def view_name(azimuth: float, elevation: float, settings: ViewPrompts) -> str:
    """front / side / back / overhead for a camera at ``azimuth`` (degrees, 0 = front) and ``elevation``."""
    if elevation >= settings.overhead_elevation:
        return "overhead"
    a = abs((azimuth + 180) % 360 - 180)  # 0..180 from the front
    if a <= settings.front_width:
        return "front"
    if a >= 180 - settings.back_width:
        return "back"
    return "side"


def view_prompts(prompt: str, azimuth: torch.Tensor, elevation: torch.Tensor, settings: ViewPrompts) -> list[str]:
    if not settings.enabled:
        return [prompt] * len(azimuth)
    return [settings.template.format(prompt=prompt, view=view_name(float(a), float(e), settings))
            for a, e in zip(azimuth, elevation)]


class EmbeddingCache:
    """``get(texts)`` -> stacked embeddings, encoding each distinct text once with ``encode``."""

    def __init__(self, encode: Callable[[list[str]], torch.Tensor]):
        self.encode = encode
        self.cache: dict[str, torch.Tensor] = {}

    def get(self, texts: list[str]) -> torch.Tensor:
        missing = sorted({t for t in texts if t not in self.cache})
        if missing:
            with torch.no_grad():
                for text, embedding in zip(missing, self.encode(missing)):
                    self.cache[text] = embedding
        return torch.stack([self.cache[t] for t in texts])
