"""``preprocess`` as a recipe loop: the same stage as ``gen3d preprocess``, run by ``gen3d run``.

    gen3d run recipes/preprocess.yaml image=photo.jpg --out runs/photo
    gen3d run recipes/preprocess.yaml image=photo.jpg prompt="a chair" detector=owlv2 segmenter=sam

The recipe's keys are the stage's settings (``detector``, ``segmenter``, ``depth``, ``size``,
``fill``, ``pick``, ``max_side``, ``use_alpha``, ``max_cover``) plus ``image`` (required; relative
to the recipe file, or to the current folder when given on the command line) and ``prompt``.
The stage folder gets the command's outputs (``rgba.png``, ``mask.png``, ``detections.json``,
``overview.png``, with depth ``depth.npy``/``depth.png``) beside the core's ``recipe.yaml`` and
``metrics.json``. It is a stage that does not train (``run_stage``): no steps, no checkpoints;
in a recipe with ``stages:`` a later stage reads its ``rgba.png``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from gen3d import Component, Context, DataError, Run, hookimpl
from gen3d_plugins.preprocess_stage import (Preprocessor, PreprocessResult, PreprocessSettings, optional_choice,
                                           preprocess_file)


@dataclass(kw_only=True)
class PreprocessRecipeConfig(PreprocessSettings):
    TRAINS: ClassVar[bool] = False  # a stage without steps: the recipe may say steps: 0

    image: Path  # the photo
    prompt: list[str] | str = field(default_factory=list)  # what to find, e.g. "a chair" (detectors that read text)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.depth = optional_choice(self.depth, Context(source="recipe"), "depth")

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class PreprocessStage:
    """A stage that does not train (gen3d.StageLoop): one preprocessing call, when the core runs it."""

    def __init__(self, config: PreprocessRecipeConfig, run: Run):
        self.config, self.run = config, run
        if config.image.is_dir():
            raise DataError(f"{config.image}: is a folder, not an image file")
        if not config.image.is_file():
            raise DataError(f"{config.image}: no such image file")
        self.stage = Preprocessor(config, where="recipe")  # models load (and fail) before the run starts
        self.result: PreprocessResult | None = None

    def run_stage(self) -> dict[str, Any]:
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


def build(config: PreprocessRecipeConfig, *, run: Run) -> PreprocessStage:
    return PreprocessStage(config, run)


@hookimpl
def gen3d_loops():
    return [Component("preprocess", build, PreprocessRecipeConfig,
                      "find, cut out and centre the object of a photo (as `gen3d preprocess`); no training")]
