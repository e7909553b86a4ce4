"""Scene generation's image models: ``sd-text-to-image`` (role ``text-to-image``) and
``sd-inpainter`` (role ``inpainter``), diffusers Stable Diffusion pipelines, with CLIP ranking
of candidates. The building blocks of progressive Text2NeRF (one view from the prompt, then each
new view's holes inpainted, the candidate closest to the first view in CLIP space kept).

Both load a hub id or a local ``save_pretrained`` folder through :func:`gen3d.load_pretrained`,
one part at a time from its subfolder (unet, vae, text_encoder, tokenizer, scheduler), and build
the pipeline from those parts: nothing else the folder holds is read, so a folder's Python files
(community pipeline code) are never imported and no safety checker is loaded (below). Before any
weights load, the folder's UNet is checked: text-to-image takes a 4-channel UNet (latents), the
inpainter a 9-channel one (latents, mask, masked-image latents); the other kind is refused.

Images are float RGB arrays [h, w, 3] in 0..1; masks are bool [h, w], True where the inpainter
must fill. Candidates of one call come from one seeded generator (``num_images_per_prompt``), so
a seed gives the same candidates on any machine. Weights are fetched only when a component is
built: ``hf download stabilityai/stable-diffusion-2-1-base`` (and ``...-2-inpainting``) once.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

from gen3d import Component, ConfigError, hookimpl, load_pretrained, pick_dtype, resolve
from gen3d_plugins.preprocess_models import _device

TEXT_TO_IMAGE_MODEL = "stabilityai/stable-diffusion-2-1-base"
INPAINTING_MODEL = "stabilityai/stable-diffusion-2-inpainting"
PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
LATENT_CHANNELS = 4
INPAINT_CHANNELS = 9  # latents (4) + the mask (1) + the masked image's latents (4)
# Samplers a recipe may pick instead of the one the checkpoint ships (diffusers class names).
SCHEDULERS = {"ddim": "DDIMScheduler", "dpm-solver": "DPMSolverMultistepScheduler",
              "euler": "EulerDiscreteScheduler", "pndm": "PNDMScheduler"}


@dataclass
class DiffusionImageConfig:
    model: str = TEXT_TO_IMAGE_MODEL  # hub id or local diffusers folder
    negative_prompt: str = ""  # what the images should not show (classifier-free guidance's other branch)
    steps: int = 50  # denoising steps an image
    guidance_scale: float = 7.5  # classifier-free guidance; <= 1 turns it off
    size: int = 512  # side of generated images; inpainting works with the image's longer side at this size
    candidates: int = 1  # images per call for *_candidates; above 1 the CLIP ranker is loaded too
    clip_model: str = "openai/clip-vit-base-patch32"  # ranks candidates by similarity to the first view
    scheduler: Literal["checkpoint", "ddim", "dpm-solver", "euler", "pndm"] = "checkpoint"
    device: str = "auto"
    dtype: str = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    attention_slicing: bool = False  # less memory in the UNet's attention, a little slower
    cpu_offload: bool = False  # keep each model on the CPU until it runs (needs accelerate; CUDA only)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.size < 8:
            raise ValueError(f"size must be at least 8 pixels, got {self.size}")
        if self.candidates < 1:
            raise ValueError(f"candidates must be at least 1, got {self.candidates}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")


@dataclass
class TextToImageConfig(DiffusionImageConfig):
    ROLES: ClassVar[tuple[str, ...]] = ("text-to-image",)


@dataclass
class InpainterConfig(DiffusionImageConfig):
    model: str = INPAINTING_MODEL
    candidates: int = 4  # Text2NeRF keeps the best of several inpaintings of each new view
    # The model sees the mask at latent resolution (1/8): holes thinner than that would vanish there
    # and come back as the masked image's black. The mask given to the model is grown by this many
    # pixels; the composite still fills only the pixels asked for.
    mask_dilation: int = 8

    ROLES: ClassVar[tuple[str, ...]] = ("inpainter",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mask_dilation < 0:
            raise ValueError(f"mask_dilation must be >= 0, got {self.mask_dilation}")


# --- loading -------------------------------------------------------------------------------


def check_folder(source: str, model_id: str, key: str, inpainting: bool) -> None:
    """Refuse a folder that is not a Stable Diffusion pipeline of the wanted kind, before any weights load."""
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    role, default = ("the inpainter", INPAINTING_MODEL) if inpainting else ("text-to-image", TEXT_TO_IMAGE_MODEL)
    index = load_pretrained(DiffusionPipeline.load_config, source, key, "diffusers pipeline (model_index.json)")
    name = index.get("_class_name", "?")
    missing = [part for part in PARTS if part not in index]
    if missing:
        raise ConfigError(f"{key}: {model_id!r} is a {name} folder without {', '.join(missing)}; {role} needs a "
                          f"Stable Diffusion pipeline ({', '.join(PARTS)}), e.g. {default}")
    unet = load_pretrained(UNet2DConditionModel.load_config, source, key, "UNet config", subfolder="unet")
    channels = unet.get("in_channels")
    if inpainting and channels == LATENT_CHANNELS:
        raise ConfigError(f"{key}: {model_id!r} is a text-to-image model ({name}, a UNet with 4 input channels); "
                          f"the inpainter needs an inpainting model (9 input channels), e.g. {default}")
    if not inpainting and channels == INPAINT_CHANNELS:
        raise ConfigError(f"{key}: {model_id!r} is an inpainting model ({name}, a UNet with 9 input channels); "
                          f"text-to-image needs a text-to-image model (4 input channels), e.g. {default}")
    wanted = INPAINT_CHANNELS if inpainting else LATENT_CHANNELS
    if channels != wanted:
        raise ConfigError(f"{key}: {model_id!r} is a {name} model whose UNet takes {channels} input channels "
                          f"(an image-conditioned model); {role} needs {wanted}, e.g. {default}")


def load_scheduler(source: str, key: str, setting: str):
    """The checkpoint's own sampler, or the one the recipe names, configured from the checkpoint's schedule."""
    import diffusers
    from diffusers import SchedulerMixin

    config = load_pretrained(diffusers.DDIMScheduler.load_config, source, key, "scheduler config",
                             subfolder="scheduler")
    name = SCHEDULERS.get(setting) or config.get("_class_name", "")
    cls = getattr(diffusers, name, None)
    # Only diffusers' own samplers: a folder's config cannot name code to run.
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ConfigError(f"{key}: its scheduler {name!r} is not a diffusers scheduler; set scheduler to one of "
                          f"{', '.join(SCHEDULERS)}")
    return cls.from_config(config)


def load_pipeline(config: DiffusionImageConfig, key: str, inpainting: bool, device: torch.device):
    """A diffusers (inpainting) pipeline built from the folder's parts, on ``device``."""
    from diffusers import AutoencoderKL, StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    dtype = pick_dtype(config.dtype, device)
    source = resolve(config.model, key)
    check_folder(source, config.model, key, inpainting)
    load = lambda cls, sub, what, **kw: load_pretrained(cls.from_pretrained, source, key, what, subfolder=sub, **kw)
    parts = {"tokenizer": load(AutoTokenizer, "tokenizer", "tokenizer"),
             "text_encoder": load(CLIPTextModel, "text_encoder", "CLIP text encoder", dtype=dtype),
             "vae": load(AutoencoderKL, "vae", "VAE", torch_dtype=dtype),
             "unet": load(UNet2DConditionModel, "unet", "UNet", torch_dtype=dtype),
             "scheduler": load_scheduler(source, key, config.scheduler)}
    cls = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    # No safety checker: SD 2.x checkpoints ship none, and where an SD 1.x folder does, it replaces a
    # flagged image by a black one, which the scene loop would fit as geometry. Users remain bound by
    # the model licence's use restrictions.
    pipe = cls(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if config.attention_slicing:
        pipe.enable_attention_slicing()
    if config.cpu_offload and device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


def cpu_cost_warning(unet_parameters: int, steps: int, device: torch.device) -> str | None:
    """A full-size UNet on a CPU takes many seconds a call: say so before the user waits."""
    if device.type == "cpu" and unet_parameters > 100_000_000:
        return (f"a {unet_parameters / 1e6:.0f} M-parameter UNet on the CPU: {steps} denoising steps an image, "
                "each a UNet call of about 20 s on 2 cores at 512 px (measured); run it on a CUDA GPU (device=cuda)")
    return None


# --- images in and out ----------------------------------------------------------------------


def check_prompt(prompt: str, role: str) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError(f"{role}: the prompt is empty; say what the scene shows, e.g. prompt=\"a cosy living room\"")
    return prompt


def as_image(image: Any, what: str = "image") -> np.ndarray:
    """A float RGB array [h, w, 3] (a tensor is converted without changing a value)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"{what}: expected a float RGB image [h, w, 3] in 0..1, got {image.dtype} {image.shape}")
    return image


def as_mask(mask: Any, shape: tuple[int, int]) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"mask: expected a bool [h, w] mask of the image's size {shape}, got {mask.shape}")
    return mask.astype(bool) if mask.dtype == bool else mask > 0.5


def to_chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)


def working_size(height: int, width: int, size: int, multiple: int) -> tuple[int, int]:
    """The image's size with its longer side at ``size``, both sides a multiple of the VAE's factor."""
    scale = size / max(height, width)
    return tuple(max(multiple, round(side * scale / multiple) * multiple) for side in (height, width))


def grow(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Dilate a [1, 1, h, w] 0/1 mask by ``pixels`` (a square neighbourhood)."""
    if pixels == 0:
        return mask
    return F.max_pool2d(mask, kernel_size=2 * pixels + 1, stride=1, padding=pixels)


# --- the components ---------------------------------------------------------------------------


class ClipRanker:
    """Scores candidates by the cosine similarity of their CLIP image embeddings to a reference's."""

    def __init__(self, model: str, device: torch.device, dtype: str, key: str):
        from gen3d_plugins.clip_guidance import ClipGuidance, ClipGuidanceConfig

        self.clip = ClipGuidance(ClipGuidanceConfig(model=model, dtype=dtype), device, key=key)

    @torch.no_grad()
    def scores(self, candidates: Sequence[np.ndarray], reference: np.ndarray) -> list[float]:
        side = self.clip.input_size
        # Squares are resized whole (CLIP's processor would crop the centre of other shapes).
        images = [F.interpolate(to_chw(as_image(image, "candidate"))[None], size=(side, side), mode="bilinear",
                                align_corners=False, antialias=True) for image in [reference, *candidates]]
        features = self.clip.encode_images(torch.cat(images).to(self.clip.device))  # one batch: same arithmetic
        return (features[1:] @ features[0]).tolist()


class DiffusionImageModel:
    """What both roles share: the pipeline, seeded generation, candidates and their ranking."""

    INPAINTING: ClassVar[bool] = False

    def __init__(self, config: DiffusionImageConfig, role: str):
        self.config, self.role = config, role
        self.section = role.replace("-", "_")  # the role's recipe key: text-to-image is text_to_image
        self.key = f"{self.section}.model"
        self.device = _device(config.device)
        self.pipe = load_pipeline(config, self.key, self.INPAINTING, self.device)
        self.vae_factor = self.pipe.vae_scale_factor
        if config.size % self.vae_factor:
            raise ConfigError(f"{self.section}.size: {config.size} is not a multiple of the model's VAE factor "
                              f"{self.vae_factor}")
        warning = cpu_cost_warning(sum(p.numel() for p in self.pipe.unet.parameters()), config.steps, self.device)
        if warning:
            print(f"gen3d: warning: {warning}", file=sys.stderr)
        # Loaded now when candidates will be ranked, so a missing CLIP download stops the run before any work.
        self.ranker = self._ranker() if config.candidates > 1 else None

    def _ranker(self) -> ClipRanker:
        return ClipRanker(self.config.clip_model, self.device, self.config.dtype, f"{self.section}.clip_model")

    def _sample(self, count: int, seed: int, height: int, width: int, **inputs) -> np.ndarray:
        """``count`` images [n, h, w, 3] float32 in 0..1 straight from the pipeline."""
        # A CPU generator: the same noise, so the same images for a seed, on any device.
        generator = torch.Generator("cpu").manual_seed(int(seed))
        return self.pipe(negative_prompt=self.config.negative_prompt or None,
                         num_inference_steps=self.config.steps, guidance_scale=self.config.guidance_scale,
                         height=height, width=width, num_images_per_prompt=count, generator=generator,
                         output_type="np", **inputs).images.astype(np.float32)

    def candidate_scores(self, candidates: Sequence[np.ndarray], first_view: np.ndarray) -> list[float]:
        """Each candidate's CLIP image-embedding cosine similarity to the first view."""
        if self.ranker is None:
            self.ranker = self._ranker()
        return self.ranker.scores(candidates, first_view)

    def rank_candidates(self, candidates: Sequence[np.ndarray], first_view: np.ndarray) -> int:
        """The index of the candidate CLIP finds closest to the first view (the scene's look)."""
        if not candidates:
            raise ValueError("rank_candidates: no candidates")
        if len(candidates) == 1:
            return 0
        return int(np.argmax(self.candidate_scores(candidates, first_view)))


class TextToImageModel(DiffusionImageModel):
    def __init__(self, config: TextToImageConfig, role: str = "text-to-image"):
        super().__init__(config, role)

    def generate_candidates(self, prompt: str, seed: int, camera: Any = None) -> list[np.ndarray]:
        """``candidates`` images of ``prompt`` ([size, size, 3] float32 in 0..1); ``camera`` is not used."""
        return self._generate(prompt, seed, self.config.candidates)

    def generate(self, prompt: str, seed: int, camera: Any = None) -> np.ndarray:
        """One image of ``prompt`` ([size, size, 3] float32 in 0..1); the same seed, the same image."""
        return self._generate(prompt, seed, 1)[0]

    def _generate(self, prompt: str, seed: int, count: int) -> list[np.ndarray]:
        check_prompt(prompt, self.role)
        side = self.config.size
        return list(self._sample(count, seed, side, side, prompt=prompt))


class InpainterModel(DiffusionImageModel):
    INPAINTING = True

    def __init__(self, config: InpainterConfig, role: str = "inpainter"):
        super().__init__(config, role)

    def raw_inpaint(self, image: np.ndarray, hole: np.ndarray, prompt: str, seed: int, count: int) -> np.ndarray:
        """The pipeline's own outputs [n, h, w, 3] at the image's size, before compositing.

        A real inpainter decodes the whole image through the VAE, so even its unmasked pixels come
        back slightly changed; :meth:`inpaint` keeps only its masked pixels.
        """
        height, width = image.shape[:2]
        h, w = working_size(height, width, self.config.size, self.vae_factor)
        x = to_chw(image)[None]
        m = torch.from_numpy(hole.astype(np.float32))[None, None]
        if (h, w) != (height, width):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
            m = (F.interpolate(m, size=(h, w), mode="area") > 0).float()  # any hole in a cell keeps it a hole
        m = grow(m, self.config.mask_dilation)
        out = torch.from_numpy(self._sample(count, seed, h, w, prompt=prompt, image=x.clamp(0, 1), mask_image=m))
        if (h, w) != (height, width):
            out = F.interpolate(out.permute(0, 3, 1, 2), size=(height, width), mode="bilinear",
                                align_corners=False).permute(0, 2, 3, 1)
        return out.numpy()

    def inpaint_candidates(self, image: np.ndarray, mask: np.ndarray, prompt: str, seed: int,
                           camera: Any = None) -> list[np.ndarray]:
        """``candidates`` fillings of the pixels where ``mask`` is True; every other pixel is ``image``'s
        own value, bit for bit, in its dtype. ``camera`` is not used."""
        return self._fill(image, mask, prompt, seed, self.config.candidates)

    def inpaint(self, image: np.ndarray, mask: np.ndarray, prompt: str, seed: int, camera: Any = None) -> np.ndarray:
        """One filling of the pixels where ``mask`` is True; the others are returned exactly as given."""
        return self._fill(image, mask, prompt, seed, 1)[0]

    def _fill(self, image: np.ndarray, mask: np.ndarray, prompt: str, seed: int, count: int) -> list[np.ndarray]:
        check_prompt(prompt, self.role)
        image = as_image(image)
        hole = as_mask(mask, image.shape[:2])
        if not hole.any():  # nothing to fill: no model call
            return [image.copy() for _ in range(count)]
        fills = self.raw_inpaint(image, hole, prompt, seed, count)
        return [np.where(hole[..., None], fill.astype(image.dtype), image) for fill in fills]


@hookimpl
def gen3d_preprocessors():
    return [
        Component("sd-text-to-image", TextToImageModel, TextToImageConfig,
                  "text-to-image (diffusers Stable Diffusion, e.g. stabilityai/stable-diffusion-2-1-base)"),
        Component("sd-inpainter", InpainterModel, InpainterConfig,
                  "inpainting of masked pixels (diffusers Stable Diffusion inpainting, 9-channel UNet)"),
    ]
