"""``clip``: CLIP guidance (DreamFields / PureCLIPNeRF): make renderings match the text in CLIP space.

Loss = weight x mean over views and augmentations of (1 - cos(image embedding, text embedding)).
Each rendered view is seen through several random crops (resized back to CLIP's input size):
without augmentations CLIP is easily fooled by adversarial high-frequency patterns. Background
randomisation, the other standard augmentation, is the loop's job (it owns the background).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gen3d import (Component, ConfigError, EmbeddingCache, GuidanceInput, GuidanceOutput, hookimpl,
                   load_pretrained, pick_dtype, resolve)

KEY = "guidance.model"
# CLIP's published normalisation, used when the folder has no image processor config.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass
class ClipGuidanceConfig:
    model: str = "openai/clip-vit-base-patch32"  # hub id or local transformers CLIP folder
    dtype: str = "auto"
    augmentations: int = 4  # random crops per rendered view
    crop_scale: list[float] = field(default_factory=lambda: [0.7, 1.0])  # crop side as a fraction of the view
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.augmentations < 1:
            raise ValueError(f"augmentations must be at least 1, got {self.augmentations}")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must be [low, high] with 0 < low <= high <= 1, got {self.crop_scale}")


class ClipGuidance:
    def __init__(self, config: ClipGuidanceConfig, device: torch.device, key: str = KEY):
        """``key``: the recipe key errors name (other plugins reuse this loader for their CLIP)."""
        from transformers import AutoConfig, AutoTokenizer, CLIPModel

        self.config, self.device = config, torch.device(device)
        self.dtype = pick_dtype(config.dtype, self.device)
        source = resolve(config.model, key)
        model_config = load_pretrained(AutoConfig.from_pretrained, source, key, "transformers model")
        if model_config.model_type != "clip":
            raise ConfigError(f"{key}: {config.model!r} is a {model_config.model_type!r} model, not a CLIP "
                              "model (model_type 'clip'), e.g. openai/clip-vit-base-patch32")
        self.model = load_pretrained(CLIPModel.from_pretrained, source, key, "CLIP model", dtype=self.dtype)
        self.model.eval().requires_grad_(False).to(self.device)
        self.tokenizer = load_pretrained(AutoTokenizer.from_pretrained, source, key, "CLIP tokenizer")
        self.input_size = self.model.config.vision_config.image_size
        mean, std = self._normalisation(source)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.embeddings = EmbeddingCache(self.encode_text)

    @staticmethod
    def _normalisation(source: str) -> tuple[list[float], list[float]]:
        from transformers import CLIPImageProcessor

        try:
            processor = CLIPImageProcessor.from_pretrained(source)
            return list(processor.image_mean), list(processor.image_std)
        except (OSError, ValueError):
            return CLIP_MEAN, CLIP_STD

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        features = self.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        return F.normalize(pooled(features).float(), dim=-1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.mean) / self.std
        features = self.model.get_image_features(pixel_values=x.to(self.dtype))
        return F.normalize(pooled(features).float(), dim=-1)

    def augment(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """``augmentations`` random square crops of every view, each resized to CLIP's input size."""
        b, _, h, w = images.shape
        low, high = self.config.crop_scale
        crops = []
        for _ in range(self.config.augmentations):
            for i in range(b):
                side = round(min(h, w) * (low + (high - low) * float(torch.rand(1, generator=generator))))
                side = max(1, side)
                top = int(torch.randint(0, h - side + 1, (1,), generator=generator))
                left = int(torch.randint(0, w - side + 1, (1,), generator=generator))
                crop = images[i:i + 1, :, top:top + side, left:left + side]
                crops.append(F.interpolate(crop, size=(self.input_size,) * 2, mode="bilinear",
                                           align_corners=False, antialias=side > self.input_size))
        return torch.cat(crops)

    def __call__(self, batch: GuidanceInput) -> GuidanceOutput:
        images, prompts, generator = batch.images, batch.prompts, batch.generator
        if images.shape[1] != 3:
            raise ConfigError(f"clip guidance needs RGB renderings, got {images.shape[1]} channels")
        image_features = self.encode_images(self.augment(images, generator))
        text = self.embeddings.get(prompts).repeat(self.config.augmentations, 1)  # crops are view-major per round
        similarity = (image_features * text).sum(dim=-1)
        loss = self.config.weight * (1 - similarity).mean()
        return GuidanceOutput(loss, {"clip_similarity": float(similarity.detach().mean())})


def pooled(features) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features; older versions a tensor."""
    return getattr(features, "pooler_output", features)


def build(config: ClipGuidanceConfig, *, device: torch.device | str = "cpu") -> ClipGuidance:
    return ClipGuidance(config, torch.device(device))


@hookimpl
def gen3d_guidance():
    return [Component("clip", build, ClipGuidanceConfig,
                      "CLIP similarity between augmented renderings and the prompt (DreamFields style)")]
