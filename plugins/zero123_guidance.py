"""``zero123``: view-conditioned score distillation from Zero-1-to-3 or Stable Zero123 (image-to-3D).

The model is a Stable Diffusion UNet fine-tuned to draw an object from another viewpoint, given
one reference image of it and the relative camera T (``gen3d.relative_camera``). For a rendering
x of a view with latents z = E(x) * scaling, noise eps and a timestep t:

    context  = P([CLIP image embedding of the reference, T])       (P: a Linear 772 -> 768)
    z_t      = sqrt(abar_t) z + sqrt(1 - abar_t) eps
    eps_c    = UNet([z_t, E(reference)], t, context)              (8 input channels)
    eps_u    = UNet([z_t, 0], t, 0)                               (the unconditional branch)
    grad_z   = w(t) (eps_u + s (eps_c - eps_u) - eps)

E(reference) is the mode of the VAE posterior, *not* multiplied by the scaling factor: that is
how the model was trained to read its reference. The UNet runs without gradients; the gradient
reaches the field through ``sds_loss`` as in ``stable-diffusion``.

Checkpoints are diffusers folders (hub id or local), in the layout of
``bennyguo/zero123-xl-diffusers``, ``ashawkey/zero123-xl-diffusers`` and
``ashawkey/stable-zero123-diffusers`` (``clip_camera_projection/``, keys ``proj.*``) or of the
community pipeline (``cc_projection/``, keys ``projection.*``). Every part is loaded with
diffusers / transformers ``from_pretrained``; the projection is our own ``nn.Linear`` whose
weights are read from safetensors (or a ``.bin`` with ``weights_only=True``). No Python file
of a model folder is ever imported (the pipelines are community code: we do not run them).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gen3d import (Component, ConfigError, Gen3DError, GuidanceInput, GuidanceOutput, annealed, hookimpl,
                   load_pretrained, pick_dtype, relative_camera, resolve, sample_timesteps, sds_loss, sds_weights)

KEY = "guidance.model"
PIPELINES = {"Zero123Pipeline", "Zero1to3StableDiffusionPipeline"}  # ashawkey/bennyguo, and the community's
PROJECTIONS = ("clip_camera_projection", "cc_projection")  # the subfolder, in either naming
PROJECTION_PREFIXES = ("proj.", "projection.", "")  # its weights' key prefix, in either naming
CAMERA_DIMS = 4  # T's entries


@dataclass
class Zero123Config:
    model: str = "ashawkey/zero123-xl-diffusers"  # hub id or local diffusers folder
    # zero123: T's last entry is the change of camera distance; stable-zero123: the reference's
    # absolute polar angle. auto: stable-zero123 when the model's name or folder says so.
    model_variant: Literal["auto", "zero123", "stable-zero123"] = "auto"
    dtype: str = "auto"  # auto: fp16 on CUDA, fp32 on CPU; or fp32 / fp16 / bf16
    # Classifier-free guidance: 3 is Stable Zero123's default; 5 sharper and more saturated.
    guidance_scale: float = 3.0
    # The sampled timestep range moves from [t_min_start, t_max_start] to [t_min_end, t_max_end]
    # over the first t_anneal_steps steps (threestudio's zero123 schedule): large noise levels early
    # settle the coarse shape, smaller ones later add detail without fighting it.
    t_min_start: float = 0.4
    t_min_end: float = 0.2
    t_max_start: float = 0.85
    t_max_end: float = 0.5
    t_anneal_steps: int = 200
    weighting: Literal["one_minus_alpha", "sigma_squared", "uniform"] = "one_minus_alpha"  # w(t) = 1 - abar_t
    grad_clip: float | None = None  # clip each element of the latent gradient to [-c, c]
    image_size: int = 256  # renderings (and the reference) are resized to this before the VAE: the model's size
    attention_slicing: bool = False  # less memory in the UNet's attention, a little slower
    cpu_offload: bool = False  # keep weights on the CPU, move each layer to the GPU when it runs (needs accelerate)
    weight: float = 1.0  # multiplies the loss (and so the gradient)

    def __post_init__(self) -> None:
        for low, high, when in ((self.t_min_start, self.t_max_start, "start"), (self.t_min_end, self.t_max_end, "end")):
            if not 0 <= low < high <= 1:
                raise ValueError(f"need 0 <= t_min < t_max <= 1 at the {when}, got t_min_{when}={low}, "
                                 f"t_max_{when}={high}")
        if self.t_anneal_steps < 0:
            raise ValueError(f"t_anneal_steps must be 0 or more, got {self.t_anneal_steps}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive, got {self.grad_clip}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {self.image_size}")


def timestep_range(config, step: int) -> tuple[float, float]:
    """This step's [low, high] fraction of the diffusion time (the annealed schedule)."""
    return (annealed(config.t_min_start, config.t_min_end, step, config.t_anneal_steps),
            annealed(config.t_max_start, config.t_max_end, step, config.t_anneal_steps))


def infer_variant(setting: str, model_id: str) -> str:
    if setting != "auto":
        return setting
    name = model_id.replace("_", "-").lower()
    return "stable-zero123" if "stable-zero123" in name or "stable-zero-123" in name else "zero123"


def check_pipeline(source: str, model_id: str) -> tuple[dict, str]:
    """Refuse what is not a Zero-1-to-3 checkpoint before loading weights; returns model_index.json
    and the projection's subfolder."""
    from diffusers import DiffusionPipeline

    index = load_pretrained(DiffusionPipeline.load_config, source, KEY, "diffusers pipeline (model_index.json)")
    name = index.get("_class_name", "?")
    if name not in PIPELINES:
        hint = " (a text-to-image model: use guidance.type=stable-diffusion)" if "StableDiffusion" in name else ""
        raise ConfigError(f"{KEY}: {model_id!r} is a {name} checkpoint{hint}; zero123 needs a Zero-1-to-3 model "
                          f"({' or '.join(sorted(PIPELINES))}), e.g. ashawkey/zero123-xl-diffusers")
    missing = [part for part in ("unet", "vae", "image_encoder", "feature_extractor", "scheduler") if part not in index]
    projection = next((p for p in PROJECTIONS if p in index), None)
    if missing or projection is None:
        parts = missing + ([] if projection else [f"{PROJECTIONS[0]} (or {PROJECTIONS[1]})"])
        raise ConfigError(f"{KEY}: {model_id!r} lacks {', '.join(parts)}: not a complete Zero-1-to-3 folder")
    return index, projection


def load_projection(source: str, subfolder: str, model_id: str, context_dim: int) -> nn.Linear:
    """The camera projection (embedding + T -> context) as our own Linear, from its weights file."""
    from huggingface_hub import hf_hub_download
    from safetensors.torch import load_file

    state, tried = None, []
    for filename in ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin"):
        path = Path(source) / subfolder / filename
        if not path.is_file() and not Path(source).is_dir():
            try:
                path = Path(hf_hub_download(source, filename, subfolder=subfolder))
            except Exception:  # noqa: BLE001 - not on the hub under this name: try the next
                path = None
        tried.append(filename)
        if path is not None and path.is_file():
            state = load_file(str(path)) if filename.endswith(".safetensors") else \
                torch.load(path, map_location="cpu", weights_only=True)
            break
    if state is None:
        raise ConfigError(f"{KEY}: {model_id!r}: {subfolder}/ holds no weights ({', '.join(tried)})")
    for prefix in PROJECTION_PREFIXES:
        weight, bias = state.get(prefix + "weight"), state.get(prefix + "bias")
        if torch.is_tensor(weight) and torch.is_tensor(bias):
            break
    else:
        raise ConfigError(f"{KEY}: {model_id!r}: {subfolder}/ has keys {sorted(state)[:4]}, not the camera "
                          "projection's (proj.weight / proj.bias)")
    if weight.dim() != 2 or weight.shape[0] != context_dim or weight.shape[1] != context_dim + CAMERA_DIMS:
        raise ConfigError(f"{KEY}: {model_id!r}: the camera projection is {list(weight.shape)}, expected "
                          f"[{context_dim}, {context_dim + CAMERA_DIMS}] for the UNet's {context_dim}-wide context")
    projection = nn.Linear(weight.shape[1], weight.shape[0])
    projection.load_state_dict({"weight": weight.float(), "bias": bias.float()})
    return projection


def combine_cfg(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    return eps_uncond + scale * (eps_cond - eps_uncond)


class Zero123Guidance:
    def __init__(self, config: Zero123Config, device: torch.device):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        self.config, self.device = config, torch.device(device)
        self.dtype = pick_dtype(config.dtype, self.device)
        source = resolve(config.model, KEY)
        _, projection_folder = check_pipeline(source, config.model)
        self.variant = infer_variant(config.model_variant, config.model)
        load = lambda cls, sub, what, **kw: load_pretrained(cls.from_pretrained, source, KEY, what, subfolder=sub, **kw)
        self.processor = load(CLIPImageProcessor, "feature_extractor", "CLIP image processor")
        self.image_encoder = load(CLIPVisionModelWithProjection, "image_encoder", "CLIP image encoder",
                                  dtype=self.dtype)
        self.vae = load(AutoencoderKL, "vae", "VAE", torch_dtype=self.dtype)
        self.unet = load(UNet2DConditionModel, "unet", "UNet", torch_dtype=self.dtype)
        # The training noise schedule, whatever sampler the folder ships (DDIM): SDS noises as training did.
        self.scheduler = load(DDPMScheduler, "scheduler", "scheduler")
        latent = self.vae.config.latent_channels
        if self.unet.config.in_channels != 2 * latent:
            raise ConfigError(f"{KEY}: {config.model!r} has a UNet with {self.unet.config.in_channels} input channels; "
                              f"Zero-1-to-3 reads its noisy latent and the reference's ({2 * latent})")
        context = self.unet.config.cross_attention_dim
        if self.image_encoder.config.projection_dim != context:
            raise ConfigError(f"{KEY}: {config.model!r}: the image encoder gives {self.image_encoder.config.projection_dim}"
                              f"-wide embeddings but the UNet reads a {context}-wide context")
        self.projection = load_projection(source, projection_folder, config.model, context).to(self.dtype)
        for module in (self.image_encoder, self.vae, self.unet, self.projection):
            module.eval().requires_grad_(False)
        parameters = sum(p.numel() for p in self.unet.parameters())
        if self.device.type == "cpu" and parameters > 100_000_000:
            print(f"gen3d: warning: Zero-1-to-3 with a {parameters / 1e6:.0f} M-parameter UNet on the CPU takes "
                  "about a minute a step; run it on a CUDA GPU (--device cuda)", file=sys.stderr)
        if config.attention_slicing:
            self.unet.set_attention_slice("auto")
        self._place_modules()
        self.alphas = self.scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self.scaling = self.vae.config.scaling_factor
        self._reference: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (id of the image, embedding, latent)

    def _place_modules(self) -> None:
        if self.config.cpu_offload and self.device.type == "cuda":
            from accelerate import cpu_offload

            for module in (self.unet, self.vae, self.image_encoder):
                cpu_offload(module, execution_device=self.device)
            self.projection.to(self.device)
            return
        for module in (self.image_encoder, self.vae, self.unet, self.projection):
            module.to(self.device)

    # --- the reference ----------------------------------------------------------------------

    @staticmethod
    def on_white(image: torch.Tensor) -> torch.Tensor:
        """[3|4, H, W] -> [3, H, W]: a cut-out composited on white, as Zero-1-to-3's training images."""
        if image.shape[0] == 4:
            return image[:3] * image[3:] + (1 - image[3:])
        return image[:3]

    @torch.no_grad()
    def encode_reference(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's CLIP image embedding [1, 1, C] (the folder's processor: 224 px, CLIP's
        normalisation) and its VAE latent [1, 4, h, w]: the posterior's mode, unscaled."""
        rgb = self.on_white(image.float().cpu()).clamp(0, 1)
        pixels = self.processor(images=rgb.permute(1, 2, 0).numpy().astype(np.float32), do_rescale=False,
                                return_tensors="pt").pixel_values
        embedding = self.image_encoder(pixels.to(self.device, self.dtype)).image_embeds[:, None]
        x = F.interpolate(rgb[None], size=(self.config.image_size,) * 2, mode="bilinear", align_corners=False)
        latent = self.vae.encode((x * 2 - 1).to(self.device, self.dtype)).latent_dist.mode()
        return embedding.float(), latent.float()

    def reference(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoded once per reference image (the same tensor every step)."""
        if self._reference is None or self._reference[0] != id(image):
            self._reference = (id(image), *self.encode_reference(image))
        return self._reference[1], self._reference[2]

    def context(self, embedding: torch.Tensor, cameras: torch.Tensor) -> torch.Tensor:
        """The cross-attention context [B, 1, C]: P([embedding, T]) for each view's T [B, 4]."""
        joined = torch.cat([embedding.expand(len(cameras), -1, -1), cameras[:, None].to(embedding)], dim=-1)
        return self.projection(joined.to(self.device, self.dtype)).float()

    # --- score distillation -------------------------------------------------------------------

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B,3,H,W] in 0..1 -> scaled latents, differentiable (the VAE encoder is in the graph)."""
        x = F.interpolate(images, size=(self.config.image_size,) * 2, mode="bilinear", align_corners=False)
        posterior = self.vae.encode((x * 2 - 1).to(self.dtype)).latent_dist
        return posterior.sample(generator=generator) * self.scaling

    def unet_inputs(self, noisy: torch.Tensor, context: torch.Tensor, latent: torch.Tensor):
        """The doubled batch of one UNet call: conditional views first, then the unconditional
        branch with zeros for both the context and the reference latent."""
        reference = latent.expand(len(noisy), -1, -1, -1)
        x = torch.cat([torch.cat([noisy, reference], dim=1), torch.cat([noisy, torch.zeros_like(reference)], dim=1)])
        return x, torch.cat([context, torch.zeros_like(context)])

    def predict_noise(self, noisy: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                      latent: torch.Tensor) -> torch.Tensor:
        """Classifier-free guided noise prediction, in float32."""
        x, hidden = self.unet_inputs(noisy.float(), context, latent)
        with torch.inference_mode():
            out = self.unet(x.to(self.dtype), torch.cat([t] * 2), encoder_hidden_states=hidden.to(self.dtype)).sample
        out = out.float().clone()
        if self.scheduler.config.prediction_type == "v_prediction":
            alpha = self.alphas[torch.cat([t] * 2)].view(-1, 1, 1, 1)
            out = alpha.sqrt() * out + (1 - alpha).sqrt() * x[:, :noisy.shape[1]].float()
        eps_cond, eps_uncond = out.chunk(2)
        return combine_cfg(eps_uncond, eps_cond, self.config.guidance_scale)

    def sds_gradient(self, latents: torch.Tensor, context: torch.Tensor, latent: torch.Tensor, t: torch.Tensor,
                     noise: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            noisy = self.scheduler.add_noise(latents.detach().float(), noise.float(), t)
            eps_hat = self.predict_noise(noisy, t, context, latent)
            grad = sds_weights(self.alphas, t, self.config.weighting).view(-1, 1, 1, 1) * (eps_hat - noise.float())
            grad = torch.nan_to_num(grad)
            if self.config.grad_clip is not None:
                grad = grad.clamp(-self.config.grad_clip, self.config.grad_clip)
        return grad

    def __call__(self, batch: GuidanceInput) -> GuidanceOutput:
        if batch.reference is None:
            raise Gen3DError("zero123 guidance needs a reference view (an image-to-3D loop such as image-to-3d)")
        if batch.images.dim() != 4 or batch.images.shape[1] != 3:
            raise Gen3DError(f"zero123 scores RGB renderings [B, 3, H, W]; got {list(batch.images.shape)}")
        embedding, latent = self.reference(batch.reference.image)
        cameras = relative_camera(batch.angles, batch.reference.angles, self.variant)
        context = self.context(embedding, cameras)
        latents = self.encode_images(batch.images, batch.generator).float()
        low, high = timestep_range(self.config, batch.step)
        t = sample_timesteps(low, high, self.num_train_timesteps, len(latents), batch.generator).to(self.device)
        noise = torch.randn(latents.shape, generator=batch.generator).to(latents.device)
        grad = self.sds_gradient(latents, context, latent, t, noise)
        loss = self.config.weight * sds_loss(latents, grad)
        return GuidanceOutput(loss, {"sds_t": float(t.float().mean()), "sds_grad": float(grad.norm())})


def build(config: Zero123Config, *, device: torch.device | str = "cpu") -> Zero123Guidance:
    return Zero123Guidance(config, torch.device(device))


@hookimpl
def gen3d_guidance():
    return [Component("zero123", build, Zero123Config,
                      "view-conditioned score distillation (Zero-1-to-3, Stable Zero123) from a diffusers folder")]
