"""``preprocess`` as a recipe loop: the same stage as ``gen3d preprocess``, run by ``gen3d run``.

    gen3d run recipes/preprocess.yaml image=photo.jpg --out runs/photo
    gen3d run recipes/preprocess.yaml image=photo.jpg prompt="a chair" detector=owlv2 segmenter=sam

The recipe's keys are the stage's settings (``detector``, ``segmenter``, ``depth``, ``size``,
``fill``, ``pick``, ``max_side``, ``use_alpha``, ``max_cover``) plus ``image`` (required; relative
to the recipe file, or to the current folder when given on the command line) and ``prompt``.
The run folder gets the command's outputs (``rgba.png``, ``mask.png``, ``detections.json``,
``overview.png``, with depth ``depth.npy``/``depth.png``) beside the trainer's ``recipe.yaml`` and
``metrics.json``. There is nothing to train: the work happens once, when the run finishes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gen3d import hookimpl
from gen3d.config import Context
from gen3d.errors import DataError
from gen3d.preprocess import (
    Preprocessor,
    PreprocessResult,
    PreprocessSettings,
    optional_choice,
    preprocess_file,
)
from gen3d.specs import Component


@dataclass(kw_only=True)
class PreprocessRecipeConfig(PreprocessSettings):
    image: Path  # the photo
    prompt: list[str] | str = field(default_factory=list)  # what to find, e.g. "a chair" (detectors that read text)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.depth = optional_choice(self.depth, Context(source="recipe"), "depth")

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class PreprocessLoop:
    """The loop protocol of :mod:`gen3d.trainer` around one preprocessing call."""

    def __init__(self, config: PreprocessRecipeConfig, run):
        self.config, self.run = config, run
        if config.image.is_dir():
            raise DataError(f"{config.image}: is a folder, not an image file")
        if not config.image.is_file():
            raise DataError(f"{config.image}: no such image file")
        self.stage = Preprocessor(config, where="recipe")  # models load (and fail) before any step
        self.result: PreprocessResult | None = None

    def step(self, step: int) -> dict[str, float]:
        return {"loss": 0.0}  # nothing to optimise

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def evaluate(self) -> dict[str, float]:
        return {}

    def finish(self, train) -> dict[str, Any]:
        config = self.config
        result = preprocess_file(config.image, config, self.run.out_dir, prompts=config.prompts, stage=self.stage)
        self.result = result
        for note in result.notes:
            self.run.log(f"note: {note}")
        for reason in result.unsure:
            self.run.log(f"unsure: {reason}")
        chosen = result.detections.labels[result.chosen] if result.chosen is not None else "alpha"
        return {"object": chosen, "object_box": result.object_box, "unsure": bool(result.unsure),
                "unsure_reasons": result.unsure, "notes": result.notes, "preprocess_seconds": result.seconds}


def build(config: PreprocessRecipeConfig, *, run) -> PreprocessLoop:
    return PreprocessLoop(config, run)


@hookimpl
def gen3d_loops():
    return [Component("preprocess", build, PreprocessRecipeConfig,
                      "find, cut out and centre the object of a photo (as `gen3d preprocess`); no training")]
