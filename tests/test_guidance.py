"""Guidance plugins on tiny random models loaded through the same code path as a hub id."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from gen3d.cameras import random_views
from gen3d.errors import ConfigError
from gen3d.plugins import get_component
from gen3d.prompts import EmbeddingCache, ViewPrompts, view_name, view_prompts
from gen3d.testing import guidance_batch, make_tiny_stable_diffusion


def build(kind_name: str, **settings):
    component = get_component("guidance", kind_name)
    return component.factory(component.config(**settings), device="cpu")


@pytest.fixture(scope="module")
def sd(tiny_sd):
    return build("stable-diffusion", model=str(tiny_sd), guidance_scale=7.5)


@pytest.fixture(scope="module")
def clip(tiny_clip):
    return build("clip", model=str(tiny_clip), augmentations=3)


# --- score distillation -----------------------------------------------------------------


def test_sds_gradient_is_weighted_noise_residual(sd):
    from gen3d_plugins.sd_guidance import sds_loss

    torch.manual_seed(0)
    latents = torch.randn(2, 4, sd.latent_size, sd.latent_size, requires_grad=True)
    noise = torch.randn_like(latents)
    t = torch.tensor([100, 700])
    cond, uncond = sd.text_embeddings(["a hamburger", "a hamburger, back view"])
    grad = sd.sds_gradient(latents, cond, uncond, t, noise)

    # Direct computation: forward process, two UNet calls, guidance, w(t) = 1 - abar_t.
    abar = sd.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * latents.detach() + (1 - abar).sqrt() * noise
    with torch.no_grad():
        eps_text = sd.unet(noisy, t, encoder_hidden_states=cond).sample
        eps_uncond = sd.unet(noisy, t, encoder_hidden_states=uncond).sample
    expected = (1 - abar) * (eps_uncond + 7.5 * (eps_text - eps_uncond) - noise)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5)

    # The reparameterised loss carries exactly that gradient (averaged over the batch) to the latents.
    sds_loss(latents, grad).backward()
    torch.testing.assert_close(latents.grad * len(latents), expected, rtol=1e-4, atol=1e-4)


def test_v_prediction_is_converted_to_noise(tmp_path):
    folder = make_tiny_stable_diffusion(tmp_path / "sd-v", prediction_type="v_prediction")
    g = build("stable-diffusion", model=str(folder), guidance_scale=3.0)
    noisy = torch.randn(1, 4, g.latent_size, g.latent_size)
    t = torch.tensor([600])
    cond, uncond = g.text_embeddings(["a cat"])
    eps_hat = g.predict_noise(noisy, t, cond, uncond)
    abar = g.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        v_text = g.unet(noisy, t, encoder_hidden_states=cond).sample
        v_uncond = g.unet(noisy, t, encoder_hidden_states=uncond).sample
    to_eps = lambda v: abar.sqrt() * v + (1 - abar).sqrt() * noisy  # noqa: E731
    expected = to_eps(v_uncond) + 3.0 * (to_eps(v_text) - to_eps(v_uncond))
    torch.testing.assert_close(eps_hat, expected, rtol=1e-4, atol=1e-5)


def test_half_precision_models_take_float32_renderings(tiny_sd):
    """On CUDA the default is fp16; bf16 on the CPU exercises the same casts here."""
    g = build("stable-diffusion", model=str(tiny_sd), dtype="bf16")
    assert g.unet.dtype == torch.bfloat16
    images = torch.rand(1, 3, 32, 32, requires_grad=True)
    out = g(guidance_batch(images, ["a cat"], 0, 10, generator=torch.Generator().manual_seed(0)))
    out.loss.backward()
    assert torch.isfinite(out.loss) and images.grad.abs().sum() > 0


def test_checkpoints_shipping_another_scheduler_load_their_noise_schedule(tiny_sd, tmp_path):
    """SD 2.1-base ships a PNDMScheduler config: score distillation reads its training schedule."""
    from diffusers import PNDMScheduler

    folder = tmp_path / "pndm"
    shutil.copytree(tiny_sd, folder)
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                  steps_offset=1).save_pretrained(folder / "scheduler")
    g = build("stable-diffusion", model=str(folder))
    torch.testing.assert_close(g.alphas, PNDMScheduler.from_pretrained(folder / "scheduler").alphas_cumprod)


def test_classifier_free_guidance_combines_as_specified():
    from gen3d_plugins.sd_guidance import combine_cfg

    uncond, text = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(combine_cfg(uncond, text, 0.0), uncond)
    torch.testing.assert_close(combine_cfg(uncond, text, 1.0), text)
    torch.testing.assert_close(combine_cfg(uncond, text, 100.0), uncond + 100 * (text - uncond))


def test_timesteps_stay_in_range_and_anneal(sd):
    from gen3d_plugins.sd_guidance import StableDiffusionConfig, t_range

    g = torch.Generator().manual_seed(0)
    t = sd.sample_t(4000, 0, 100, g)
    assert int(t.min()) >= round(0.02 * 999) and int(t.max()) <= round(0.98 * 999)
    assert (t <= 25).any() and (t >= 974).any()  # and it reaches both ends

    linear = StableDiffusionConfig(t_anneal="linear", t_max_end=0.5)
    root = StableDiffusionConfig(t_anneal="sqrt", t_max_end=0.5)
    assert t_range(linear, 0, 101) == (0.02, 0.98)
    assert t_range(linear, 100, 101) == pytest.approx((0.02, 0.5))
    assert t_range(linear, 50, 101)[1] == pytest.approx(0.74)
    assert t_range(root, 25, 101)[1] == pytest.approx(0.98 - 0.48 * 0.5)  # sqrt(0.25) of the way
    highs = [t_range(root, s, 101)[1] for s in range(101)]
    assert all(a >= b for a, b in zip(highs, highs[1:]))


def test_weightings(sd, tiny_sd):
    t = torch.tensor([10, 500, 990])
    abar = sd.scheduler.alphas_cumprod[t]
    torch.testing.assert_close(sd.weights(t), 1 - abar)
    uniform = build("stable-diffusion", model=str(tiny_sd), weighting="uniform")
    torch.testing.assert_close(uniform.weights(t), torch.ones(3))
    sigma = build("stable-diffusion", model=str(tiny_sd), weighting="sigma_squared")
    torch.testing.assert_close(sigma.weights(t), (1 - abar) / abar)


def test_guidance_step_reaches_images_without_keeping_unet_graphs(sd):
    images = torch.rand(2, 3, 48, 48, requires_grad=True)
    out = sd(guidance_batch(images, ["a", "b"], 3, 10, generator=torch.Generator().manual_seed(1)))
    assert not any(p.requires_grad for p in sd.unet.parameters())
    out.loss.backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert sd.unet.conv_in.weight.grad is None
    assert 0 <= out.metrics["sds_t"] <= 999


def test_rendered_latents_skip_the_vae(sd, monkeypatch):
    """A representation that renders 4-channel latents (Latent-NeRF style) is guided directly."""
    monkeypatch.setattr(sd, "encode_images", lambda *a, **k: pytest.fail("the VAE must not run on latents"))
    latents = torch.randn(1, 4, sd.latent_size, sd.latent_size, requires_grad=True)
    sd(guidance_batch(latents, ["a cat"], 0, 10, generator=torch.Generator().manual_seed(0))).loss.backward()
    assert latents.grad.abs().sum() > 0


def test_gradient_clipping(tiny_sd):
    clipped = build("stable-diffusion", model=str(tiny_sd), grad_clip=0.01)
    latents = torch.randn(1, 4, clipped.latent_size, clipped.latent_size)
    cond, uncond = clipped.text_embeddings(["x"])
    grad = clipped.sds_gradient(latents, cond, uncond, torch.tensor([900]), torch.randn_like(latents))
    assert grad.abs().max() <= 0.01 + 1e-7


def test_text_embeddings_are_cached(sd):
    calls = []
    cache = EmbeddingCache(lambda texts: (calls.append(list(texts)), sd.encode_text(texts))[1])
    first = cache.get(["a cat", "a dog", "a cat"])
    second = cache.get(["a dog", "a cat"])
    assert calls == [["a cat", "a dog"]]
    torch.testing.assert_close(first[0], second[1])
    assert first.shape[:2] == (3, sd.tokenizer.model_max_length)


# --- CLIP ---------------------------------------------------------------------------------


def test_clip_guidance_scores_augmented_views(clip):
    images = torch.rand(2, 3, 40, 40, requires_grad=True)
    out = clip(guidance_batch(images, ["a red ball, front view", "a red ball, side view"], 0, 10,
                              generator=torch.Generator().manual_seed(0)))
    assert -1 <= out.metrics["clip_similarity"] <= 1
    assert out.loss.item() == pytest.approx(1 - out.metrics["clip_similarity"], abs=1e-5)
    out.loss.backward()
    assert images.grad.abs().sum() > 0
    crops = clip.augment(torch.rand(2, 3, 40, 40), torch.Generator().manual_seed(0))
    assert crops.shape == (6, 3, clip.input_size, clip.input_size)


def test_clip_similarity_matches_transformers(clip, tiny_clip):
    """Our differentiable preprocessing gives the embedding that the model's own processor gives."""
    import numpy as np
    from transformers import CLIPImageProcessor

    array = np.random.default_rng(0).integers(0, 256, (clip.input_size, clip.input_size, 3), dtype=np.uint8)
    x = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255
    ours = clip.encode_images(x)
    pixel = CLIPImageProcessor.from_pretrained(tiny_clip)(images=array, return_tensors="pt").pixel_values
    with torch.no_grad():
        theirs = clip.model.get_image_features(pixel_values=pixel)
    theirs = torch.nn.functional.normalize(getattr(theirs, "pooler_output", theirs), dim=-1)
    torch.testing.assert_close(ours.detach(), theirs)


# --- prompts and cameras ----------------------------------------------------------------------


def test_view_dependent_prompts():
    s = ViewPrompts()
    assert [view_name(a, 10, s) for a in (0, 44, 90, -90, 150, 180, -170)] == \
        ["front", "front", "side", "side", "back", "back", "back"]
    assert view_name(0, 75, s) == "overhead"
    assert view_prompts("a corgi", torch.tensor([0.0, 180.0]), torch.tensor([0.0, 0.0]), s) == \
        ["a corgi, front view", "a corgi, back view"]
    assert view_prompts("a corgi", torch.tensor([0.0]), torch.tensor([0.0]), ViewPrompts(enabled=False)) == ["a corgi"]


def test_random_views_look_at_the_centre():
    views = random_views(16, 32, (-10, 60), (-180, 180), (1.5, 2.0), (40, 70), torch.Generator().manual_seed(0))
    c = views.cameras
    distance = c.c2w[:, :3, 3].norm(dim=-1)
    assert ((distance >= 1.5 - 1e-5) & (distance <= 2.0 + 1e-5)).all()
    torch.testing.assert_close(distance, views.distance)
    # The centre ray of every camera passes through the origin.
    origins, dirs = c.rays(torch.arange(16), c.cx, c.cy)
    closest = origins - (origins * dirs).sum(-1, keepdim=True) * dirs
    assert closest.norm(dim=-1).max() < 1e-4
    elevation = torch.rad2deg(torch.asin(c.c2w[:, 2, 3] / distance))
    torch.testing.assert_close(elevation, views.elevation, atol=1e-3, rtol=0)
    assert ((views.azimuth >= -180) & (views.azimuth <= 180)).all()


# --- errors ---------------------------------------------------------------------------------------


def test_missing_model_folder(tmp_path):
    with pytest.raises(ConfigError, match="guidance.model: no model folder"):
        build("stable-diffusion", model=str(tmp_path / "nowhere"))


def test_hub_id_not_cached_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("gen3d.hub.hub_cache", lambda: tmp_path)
    with pytest.raises(ConfigError, match=r"cannot load 'stabilityai/stable-diffusion-2-1-base'.*hf download"):
        build("stable-diffusion")
    with pytest.raises(ConfigError, match=r"openai/clip-vit-base-patch32.*guidance.model=PATH"):
        build("clip")


def test_wrong_model_kinds(tiny_sd, tiny_clip, tmp_path):
    with pytest.raises(ConfigError, match="not a diffusers pipeline"):
        build("stable-diffusion", model=str(tiny_clip))
    with pytest.raises(ConfigError, match="is not a transformers model folder|does not hold"):
        build("clip", model=str(tiny_sd))
    inpaint = tmp_path / "inpaint"
    shutil.copytree(tiny_sd, inpaint)
    index = json.loads((inpaint / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionInpaintPipeline"
    (inpaint / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="StableDiffusionInpaintPipeline checkpoint; score distillation needs"):
        build("stable-diffusion", model=str(inpaint))


def test_nine_channel_unet_is_refused(tmp_path):
    folder = make_tiny_stable_diffusion(tmp_path / "sd9", in_channels=9)
    with pytest.raises(ConfigError, match="9 input channels"):
        build("stable-diffusion", model=str(folder))


def test_full_size_models_on_cpu_are_warned_about():
    from gen3d_plugins.sd_guidance import cpu_cost_warning

    assert "CUDA GPU" in cpu_cost_warning(865_000_000, torch.device("cpu"))
    assert cpu_cost_warning(865_000_000, torch.device("cuda")) is None
    assert cpu_cost_warning(2_000_000, torch.device("cpu")) is None


def test_fp16_on_cpu_is_refused(tiny_sd):
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        build("stable-diffusion", model=str(tiny_sd), dtype="fp16")


def test_bad_settings_are_refused():
    from gen3d_plugins.sd_guidance import StableDiffusionConfig

    with pytest.raises(ValueError, match="t_min < t_max"):
        StableDiffusionConfig(t_min=0.5, t_max=0.4)
    assert math.isclose(StableDiffusionConfig().guidance_scale, 100.0)


def test_weights_that_do_not_fit_their_config(tiny_sd, tmp_path):
    folder = tmp_path / "mismatch"
    shutil.copytree(tiny_sd, folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["cross_attention_dim"] = 48
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="guidance.model"):
        build("stable-diffusion", model=str(folder))
