"""What a guidance component offers a text-guided loop (kind ``guidance``).

A guidance scores rendered views against prompts and returns a loss whose gradient pushes the
renderings towards what its model expects: score distillation (a diffusion model) or CLIP
similarity. Loops stay model-agnostic: they render, call the guidance, and back-propagate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class GuidanceOutput:
    loss: torch.Tensor  # scalar; its gradient w.r.t. the images is the guidance signal
    metrics: dict[str, float] = field(default_factory=dict)


class Guidance(Protocol):
    def __call__(self, images: torch.Tensor, prompts: list[str], step: int, total_steps: int,
                 generator: torch.Generator | None = None) -> GuidanceOutput:
        """``images`` [B,3,H,W] in 0..1 (or [B,4,h,w] latents where the guidance accepts them),
        one prompt per image (view suffixes already added); ``generator`` (a CPU one) makes the
        guidance's random draws (timesteps, noise, crops) part of the run's reproducible state."""
        ...
