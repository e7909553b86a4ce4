"""``stable-diffusion``: score distillation sampling (SDS) from a Stable Diffusion model, as in DreamFusion.

For a rendered image x with latents z = E(x), noise eps and a timestep t:
    z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps
    eps_hat = eps_uncond + s (eps_text - eps_uncond)        (classifier-free guidance, scale s)
    grad_z = w(t) (eps_hat - eps)
The UNet runs without gradients; the gradient reaches the field through the reparameterised
loss 0.5 ||z - stopgrad(z - grad_z)||^2, whose derivative w.r.t. z is exactly grad_z. Only the
VAE encoder (and the renderer) are differentiated.

Any diffusers Stable Diffusion checkpoint (hub id or local folder) works; components are loaded
one by one from their subfolders, so nothing else of the pipeline (safety checker, ...) is read.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from gen3d import (Component, ConfigError, EmbeddingCache, GuidanceInput, GuidanceOutput, hookimpl,
                   load_pretrained, pick_dtype, resolve, sample_timesteps, sds_loss, sds_weights, t_range)

KEY = "guidance.model"
TEXT_TO_IMAGE = {"StableDiffusionPipeline"}  # SD 1.x / 2.x layout: one CLIP text encoder, a 4-channel UNet


@dataclass
class StableDiffusionConfig:
    model: str = "stabilityai/stable-diffusion-2-1-base"  # hub id or local diffusers folder
    dtype: str = "auto"  # auto: fp16 on CUDA, fp32 on CPU; or fp32 / fp16 / bf16
    guidance_scale: float = 100.0  # DreamFusion's large classifier-free guidance
    negative_prompt: str = ""
    t_min: float = 0.02  # timesteps sampled uniformly in [t_min, t_max] x num_train_timesteps
    t_max: float = 0.98
    # Annealing lowers t_max over the run (coarse shape early, details late): none, linear or sqrt.
    t_anneal: Literal["none", "linear", "sqrt"] = "none"
    t_max_end: float = 0.5  # t_max at the last step when annealing
    # one_minus_alpha: DreamFusion's w(t) = 1 - abar_t (the VP noise variance); sigma_squared: the
    # VE/EDM noise variance (1 - abar_t) / abar_t, ~200x larger at t = 0.98 (pair it with
    # grad_clip); uniform: w = 1.
    weighting: Literal["one_minus_alpha", "sigma_squared", "uniform"] = "one_minus_alpha"
    grad_clip: float | None = None  # clip each element of the latent gradient to [-c, c]
    image_size: int | None = None  # renderings are resized to this before the VAE; None: the model's size
    attention_slicing: bool = False  # less memory in the UNet's attention, a little slower
    cpu_offload: bool = False  # keep weights on the CPU, move each layer to the GPU when it runs (needs accelerate)
    weight: float = 1.0  # multiplies the loss (and so the gradient)

    def __post_init__(self) -> None:
        if not 0 <= self.t_min < self.t_max <= 1:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={self.t_min}, t_max={self.t_max}")
        if not self.t_min <= self.t_max_end <= self.t_max:
            raise ValueError(f"t_max_end must lie in [t_min, t_max], got {self.t_max_end}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive, got {self.grad_clip}")


def check_pipeline(source: str, model_id: str) -> None:
    """Refuse what is not a text-to-image Stable Diffusion checkpoint, before loading weights."""
    from diffusers import DiffusionPipeline

    index = load_pretrained(DiffusionPipeline.load_config, source, KEY, "diffusers pipeline (model_index.json)")
    name = index.get("_class_name", "?")
    missing = [part for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if part not in index]
    if name not in TEXT_TO_IMAGE or missing:
        raise ConfigError(f"{KEY}: {model_id!r} is a {name} checkpoint; score distillation needs a text-to-image "
                          f"Stable Diffusion model (StableDiffusionPipeline with unet, vae, text_encoder, "
                          f"tokenizer, scheduler), e.g. stabilityai/stable-diffusion-2-1-base")


def cpu_cost_warning(unet_parameters: int, device: torch.device) -> str | None:
    """Full-size UNets on a CPU take minutes a step: say so before the user waits for nothing."""
    if device.type == "cpu" and unet_parameters > 100_000_000:
        return (f"score distillation with a {unet_parameters / 1e6:.0f} M-parameter UNet on the CPU takes about "
                "100 s a step on 2 cores (measured); run it on a CUDA GPU (--device cuda)")
    return None


def combine_cfg(eps_uncond: torch.Tensor, eps_text: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: move from the unconditional prediction towards the text one."""
    return eps_uncond + scale * (eps_text - eps_uncond)


class StableDiffusionGuidance:
    def __init__(self, config: StableDiffusionConfig, device: torch.device):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        self.config, self.device = config, torch.device(device)
        self.dtype = pick_dtype(config.dtype, self.device)
        source = resolve(config.model, KEY)
        check_pipeline(source, config.model)
        load = lambda cls, sub, what, **kw: load_pretrained(
            cls.from_pretrained, source, KEY, what, subfolder=sub, **kw)
        self.tokenizer = load(AutoTokenizer, "tokenizer", "tokenizer")
        offload = config.cpu_offload and self.device.type == "cuda"
        # Offloaded, the text encoder stays on the CPU, where half precision is slow or missing.
        self.text_encoder = load(CLIPTextModel, "text_encoder", "CLIP text encoder",
                                 dtype=torch.float32 if offload else self.dtype)
        self.vae = load(AutoencoderKL, "vae", "VAE", torch_dtype=self.dtype)
        self.unet = load(UNet2DConditionModel, "unet", "UNet", torch_dtype=self.dtype)
        # Training noise schedule, whatever sampler the checkpoint ships: SDS noises like training does.
        self.scheduler = load(DDPMScheduler, "scheduler", "scheduler")
        if self.unet.config.in_channels != self.vae.config.latent_channels:
            raise ConfigError(f"{KEY}: {config.model!r} has a UNet with {self.unet.config.in_channels} input "
                              f"channels (an inpainting or image-conditioned model); score distillation needs "
                              f"a text-to-image model with {self.vae.config.latent_channels}")
        for module in (self.text_encoder, self.vae, self.unet):
            module.eval().requires_grad_(False)
        warning = cpu_cost_warning(sum(p.numel() for p in self.unet.parameters()), self.device)
        if warning:
            print(f"gen3d: warning: {warning}", file=sys.stderr)
        if config.attention_slicing:
            self.unet.set_attention_slice("auto")
        self._place_modules()
        self.alphas = self.scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self.latent_size = self.unet.config.sample_size
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_size = config.image_size or self.latent_size * scale
        self.embeddings = EmbeddingCache(self.encode_text)

    def _place_modules(self) -> None:
        if self.config.cpu_offload and self.device.type == "cuda":
            from accelerate import cpu_offload

            for module in (self.unet, self.vae):
                cpu_offload(module, execution_device=self.device)
            return  # the text encoder stays on the CPU: it runs once per distinct prompt
        for module in (self.text_encoder, self.vae, self.unet):
            module.to(self.device)

    # --- text -----------------------------------------------------------------------------

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        encoder_device = next(self.text_encoder.parameters()).device
        hidden = self.text_encoder(tokens.input_ids.to(encoder_device))[0]
        return hidden.to(self.device, self.dtype)

    def text_embeddings(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        cond = self.embeddings.get(prompts)
        uncond = self.embeddings.get([self.config.negative_prompt] * len(prompts))
        return cond, uncond

    # --- score distillation -------------------------------------------------------------------

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B,3,H,W] in 0..1 -> scaled latents, differentiable (the VAE encoder is in the graph)."""
        x = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = (x * 2 - 1).to(self.dtype)
        posterior = self.vae.encode(x).latent_dist
        return posterior.sample(generator=generator) * self.vae.config.scaling_factor

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        return sds_weights(self.alphas, t, self.config.weighting)

    def sample_t(self, batch: int, step: int, total_steps: int, generator: torch.Generator | None = None):
        low, high = t_range(self.config, step, total_steps)
        return sample_timesteps(low, high, self.num_train_timesteps, batch, generator).to(self.device)

    def predict_noise(self, latents_noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                      uncond: torch.Tensor) -> torch.Tensor:
        """Classifier-free guided noise prediction (one UNet call on the doubled batch), in float32."""
        noisy = torch.cat([latents_noisy] * 2).float()
        with torch.inference_mode():  # no graph, no saved activations: the UNet is never differentiated
            out = self.unet(noisy.to(self.dtype), torch.cat([t] * 2),
                            encoder_hidden_states=torch.cat([cond, uncond])).sample
        out = out.float().clone()  # clone: an ordinary tensor again, usable next to autograd
        if self.scheduler.config.prediction_type == "v_prediction":  # v -> eps (SD 2.x 768 models)
            alpha = self.alphas[torch.cat([t] * 2)].view(-1, 1, 1, 1)
            out = alpha.sqrt() * out + (1 - alpha).sqrt() * noisy
        eps_text, eps_uncond = out.chunk(2)
        return combine_cfg(eps_uncond, eps_text, self.config.guidance_scale)

    def sds_gradient(self, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                     t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """w(t) (eps_hat - eps) for given noise and timesteps; no graph is kept."""
        with torch.no_grad():
            noisy = self.scheduler.add_noise(latents.detach().float(), noise.float(), t)
            eps_hat = self.predict_noise(noisy, t, cond, uncond)
            grad = self.weights(t).view(-1, 1, 1, 1) * (eps_hat - noise.float())
            grad = torch.nan_to_num(grad)
            if self.config.grad_clip is not None:
                grad = grad.clamp(-self.config.grad_clip, self.config.grad_clip)
        return grad

    def __call__(self, batch: GuidanceInput) -> GuidanceOutput:
        images, prompts, generator = batch.images, batch.prompts, batch.generator
        step, total_steps = batch.step, batch.total_steps
        if images.shape[1] == 4:  # the representation renders latents: use them as they are
            latents = F.interpolate(images, size=(self.latent_size,) * 2, mode="bilinear", align_corners=False)
        else:
            latents = self.encode_images(images, generator)
        latents = latents.float()
        cond, uncond = self.text_embeddings(prompts)
        t = self.sample_t(len(latents), step, total_steps, generator)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        grad = self.sds_gradient(latents, cond, uncond, t, noise)
        loss = self.config.weight * sds_loss(latents, grad)
        return GuidanceOutput(loss, {"sds_t": float(t.float().mean()), "sds_grad": float(grad.norm())})


def build(config: StableDiffusionConfig, *, device: torch.device | str = "cpu") -> StableDiffusionGuidance:
    return StableDiffusionGuidance(config, torch.device(device))


@hookimpl
def gen3d_guidance():
    return [Component("stable-diffusion", build, StableDiffusionConfig,
                      "score distillation (DreamFusion SDS) from any diffusers Stable Diffusion checkpoint")]
