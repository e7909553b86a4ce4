"""Helpers for tests, benchmarks and plugin authors; never imported by a run.

Tiny random-initialised models in the real formats, written with ``save_pretrained``.

They let tests, benchmarks and new users exercise the exact loading and guidance code a real
checkpoint goes through, on a CPU and with no download. Their outputs are meaningless (random
weights): they check plumbing, shapes and speed, not quality.

    python -m gen3d.testing stable-diffusion DIR   # a diffusers Stable Diffusion folder
    python -m gen3d.testing sd-inpainting DIR      # a diffusers Stable Diffusion inpainting folder (9-channel UNet)
    python -m gen3d.testing sd2-sized DIR          # random weights of SD 2.x's full size (also sd2-sized-inpainting)
    python -m gen3d.testing clip DIR               # a transformers CLIP folder
    python -m gen3d.testing zero123 DIR            # a diffusers Zero-1-to-3 folder (ashawkey's layout)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (CLIP's tokenizer uses it too)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def write_clip_tokenizer(folder: Path, max_length: int = 77):
    """A byte-level CLIP tokenizer with no merges: every character is a token. Needs no download."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab_list)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_text_config(vocab_size: int, hidden: int = 32, max_length: int = 77):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=max_length, projection_dim=hidden,
                          bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)


def tiny_sd_parts(folder: Path, seed: int = 0, latent_size: int = 16, in_channels: int = 4,
                  prediction_type: str = "epsilon") -> dict:
    """The random parts of a tiny Stable Diffusion pipeline (unet, vae, text_encoder, tokenizer,
    scheduler), as keyword arguments of a diffusers pipeline. The tokenizer needs files: it is
    written into ``folder/tokenizer``, where the pipeline's ``save_pretrained`` puts it too."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = write_clip_tokenizer(Path(folder) / "tokenizer")
    text_encoder = CLIPTextModel(tiny_text_config(len(tokenizer)))
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[32, 64],
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=32, sample_size=latent_size * 2)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, prediction_type=prediction_type,
                              clip_sample=False, steps_offset=1)
    return {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet, "scheduler": scheduler}


def make_tiny_stable_diffusion(folder: Path, seed: int = 0, latent_size: int = 16,
                               in_channels: int = 4, prediction_type: str = "epsilon") -> Path:
    """A Stable-Diffusion-shaped pipeline folder (model_index.json, unet, vae, text_encoder,
    tokenizer, scheduler). Images are ``latent_size * 2`` pixels (the VAE downsamples twice)."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    parts = tiny_sd_parts(folder, seed, latent_size, in_channels, prediction_type)
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def sd2_sized_parts(folder: Path, seed: int = 0, in_channels: int = 4) -> dict:
    """Random parts with the shapes of stabilityai/stable-diffusion-2-1-base (UNet 866 M parameters,
    VAE 84 M, OpenCLIP-H text encoder 340 M), for timing and memory: what a full-size run costs.
    The text encoder's vocabulary is the byte-level tokenizer's 514 tokens, not 49408 (an embedding
    table 0.1 GB smaller at fp16; the same compute)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = write_clip_tokenizer(Path(folder) / "tokenizer")
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                          num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
                          bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1,
                          pad_token_id=len(tokenizer) - 1)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=in_channels, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, scaling_factor=0.18215)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    # Stored in half precision, as the hub's fp16 weights: half the disk, and load with any dtype.
    return {"vae": vae.half(), "text_encoder": CLIPTextModel(text).half(), "tokenizer": tokenizer,
            "unet": unet.half(), "scheduler": scheduler}


def make_tiny_sd(folder: Path, inpainting: bool = False, seed: int = 0, latent_size: int = 16,
                 architecture: str = "tiny") -> Path:
    """A tiny Stable Diffusion folder in the layout of the hub's SD 2.x checkpoints, as
    ``save_pretrained`` writes it: ``model_index.json`` (StableDiffusionPipeline, or
    StableDiffusionInpaintPipeline with ``inpainting``), ``unet/`` (4 input channels, or 9:
    latents, mask, masked-image latents), ``vae/``, ``text_encoder/``, ``tokenizer/``,
    ``scheduler/`` (PNDM, as stabilityai/stable-diffusion-2-1-base ships) and
    ``feature_extractor/``; no safety checker (SD 2.x ships none). Tiny images are
    ``latent_size * 2`` px. ``architecture="sd2"``: random weights of SD 2.x's full size
    (:func:`sd2_sized_parts`; 512 px, ~2.6 GB on disk) instead."""
    from diffusers import PNDMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from transformers import CLIPImageProcessor

    folder = Path(folder)
    channels = 9 if inpainting else 4
    if architecture == "sd2":
        parts = sd2_sized_parts(folder, seed, channels)
    elif architecture == "tiny":
        parts = tiny_sd_parts(folder, seed, latent_size, channels)
        parts["scheduler"] = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1,
                                           set_alpha_to_one=False)
    else:
        raise ValueError(f"architecture must be tiny or sd2, got {architecture!r}")
    cls = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    pipe = cls(**parts, safety_checker=None, feature_extractor=CLIPImageProcessor(), requires_safety_checker=False)
    pipe.save_pretrained(folder)
    # Without torchvision transformers hands back its PIL variant, and the index would name it;
    # the hub's folders name the class every install has.
    index = json.loads((folder / "model_index.json").read_text())
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return folder


def make_tiny_clip(folder: Path, seed: int = 0, image_size: int = 32) -> Path:
    """A transformers CLIP folder: model, tokenizer and image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = write_clip_tokenizer(folder)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_size, patch_size=8, projection_dim=32)
    config = CLIPConfig(text_config=tiny_text_config(len(tokenizer)).to_dict(), vision_config=vision.to_dict(),
                        projection_dim=32)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}) \
        .save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_zero123(folder: Path, seed: int = 0, latent_size: int = 16, naming: str = "ashawkey",
                      weights: str = "safetensors", architecture: str = "tiny") -> Path:
    """A Zero-1-to-3 folder in the layout users download: ``model_index.json`` (Zero123Pipeline),
    ``unet/`` (8 input channels), ``vae/``, ``image_encoder/`` (CLIPVisionModelWithProjection),
    ``feature_extractor/``, ``scheduler/`` (DDIM) and the camera projection. ``naming``:
    ``ashawkey`` (``clip_camera_projection/``, keys ``proj.*``, as ashawkey/zero123-xl-diffusers and
    ashawkey/stable-zero123-diffusers) or ``community`` (``cc_projection/``, keys ``projection.*``,
    the diffusers community pipeline's). ``weights``: the projection's file, safetensors or bin."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if architecture == "zero123-xl":  # Zero-1-to-3 XL's published configs: SD 1.x's UNet at 256 px, CLIP ViT-L/14
        context, image_size = 768, 224
        unet = UNet2DConditionModel(
            sample_size=32, in_channels=8, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=context, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256, scaling_factor=0.18215)
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=image_size, patch_size=14, projection_dim=context,
                                  hidden_act="quick_gelu")
    else:
        context, image_size = 32, 32
        unet = UNet2DConditionModel(
            sample_size=latent_size, in_channels=8, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=context,
            attention_head_dim=8, norm_num_groups=32)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[32, 64],
                            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                            norm_num_groups=32, sample_size=latent_size * 2, scaling_factor=0.18215)
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=image_size, patch_size=8, projection_dim=context)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    CLIPVisionModelWithProjection(vision).save_pretrained(folder / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}) \
        .save_pretrained(folder / "feature_extractor")
    scheduler.save_pretrained(folder / "scheduler")
    sub, prefix, projection_class = (("clip_camera_projection", "proj.", ["zero123", "CLIPCameraProjection"])
                                     if naming == "ashawkey" else
                                     ("cc_projection", "projection.", ["pipeline_zero1to3", "CCProjection"]))
    linear = torch.nn.Linear(context + 4, context)
    (folder / sub).mkdir(exist_ok=True)
    state = {prefix + "weight": linear.weight.detach().contiguous(), prefix + "bias": linear.bias.detach().contiguous()}
    if weights == "safetensors":
        save_file(state, str(folder / sub / "diffusion_pytorch_model.safetensors"))
    else:
        torch.save(state, folder / sub / "diffusion_pytorch_model.bin")
    (folder / sub / "config.json").write_text(json.dumps(
        {"_class_name": projection_class[1], "embedding_dim": context, "additional_embeddings": 4}
        if naming == "ashawkey" else {"_class_name": projection_class[1], "in_channel": context + 4,
                                      "out_channel": context}))
    pipeline = "Zero123Pipeline" if naming == "ashawkey" else "Zero1to3StableDiffusionPipeline"
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": pipeline, "_diffusers_version": "0.24.0", sub: projection_class,
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
    return folder


def guidance_batch(images: torch.Tensor, prompts: list[str], step: int = 0, total_steps: int = 1,
                   generator: torch.Generator | None = None, distance: float = 2.5,
                   elevation: float = 15.0):
    """A :class:`gen3d.guidance.GuidanceInput` for ``images``, seen from cameras evenly spaced
    around the origin: what a loop would pass, for calling a guidance directly."""
    from .cameras import orbit
    from .guidance import GuidanceInput, ViewAngles

    size = images.shape[-1]
    cameras = orbit(len(images), distance, elevation, math.radians(40), size)
    return GuidanceInput(images, list(prompts), cameras, ViewAngles.of(cameras), step, total_steps,
                         generator=generator)


def build_loop(recipe, out_dir: Path, device: str = "cpu", stage: int = 0):
    """The loop of one stage of ``recipe``, built as the core builds it (no training): for tests
    and benchmarks that drive ``step`` themselves."""
    from .api import registry
    from .run import Run

    chosen = recipe.stages[stage]
    run = Run(Path(out_dir), recipe, chosen.settings, torch.device(device), registry().hooks, quiet=True)
    return chosen.component.factory(chosen.loop, run=run)


def main(argv: list[str]) -> int:
    makers = {"stable-diffusion": make_tiny_stable_diffusion, "clip": make_tiny_clip, "zero123": make_tiny_zero123,
              "sd-inpainting": lambda folder: make_tiny_sd(folder, inpainting=True),
              "sd2-sized": lambda folder: make_tiny_sd(folder, architecture="sd2"),
              "sd2-sized-inpainting": lambda folder: make_tiny_sd(folder, inpainting=True, architecture="sd2")}
    if len(argv) != 2 or argv[0] not in makers:
        print(f"usage: python -m gen3d.testing {{{','.join(makers)}}} DIR", file=sys.stderr)
        return 2
    print(makers[argv[0]](Path(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
