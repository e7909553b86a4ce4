"""Zero-1-to-3 guidance: the camera convention, loading the downloaded layouts, the conditioning and
the SDS gradient against direct computations, and the view-teacher's camera recovery."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from gen3d import ConfigError, Gen3DError, ReferenceView, ViewAngles, random_views, relative_camera
from gen3d.testing import guidance_batch, make_tiny_stable_diffusion, make_tiny_zero123
from gen3d_plugins import zero123_guidance as z123
from gen3d_plugins.view_teacher import camera_position, cameras_from_relative


def angles(elevation, azimuth, distance):
    t = lambda v: torch.tensor(v, dtype=torch.float32).reshape(-1)
    return ViewAngles(t(elevation), t(azimuth), t(distance))


# --- T, against the numbers and against Zero-1-to-3's own computation ------------------------------


def test_relative_camera_of_known_pairs():
    ref = angles(0.0, 0.0, 3.8)
    same = relative_camera(angles(0.0, 0.0, 3.8), ref)
    torch.testing.assert_close(same, torch.tensor([[0.0, 0.0, 1.0, 0.0]]))
    above = relative_camera(angles(30.0, 0.0, 4.0), ref)  # polar = 90 - elevation: 30 deg up is -30 deg of polar
    torch.testing.assert_close(above, torch.tensor([[-math.radians(30), 0.0, 1.0, 0.2]]), atol=1e-6, rtol=0)
    ccw = relative_camera(angles(0.0, 90.0, 3.8), ref)  # counter-clockwise seen from above: +sin
    torch.testing.assert_close(ccw, torch.tensor([[0.0, 1.0, 0.0, 0.0]]), atol=1e-6, rtol=0)


def test_relative_camera_wraps_around_180():
    across = relative_camera(angles(0.0, 170.0, 1.0), angles(0.0, -170.0, 1.0))  # 340 deg = -20 deg
    short = relative_camera(angles(0.0, -10.0, 1.0), angles(0.0, 10.0, 1.0))
    torch.testing.assert_close(across, short, atol=1e-6, rtol=0)
    assert float(across[0, 1]) == pytest.approx(-math.sin(math.radians(20)), abs=1e-6)


def test_stable_zero123_ends_with_the_reference_polar_angle():
    t = relative_camera(angles([10.0, 40.0], [0.0, 45.0], [3.0, 5.0]), angles(10.0, 0.0, 3.0), "stable-zero123")
    torch.testing.assert_close(t[:, 3], torch.full((2,), math.radians(80.0)))
    torch.testing.assert_close(t[:, 0], torch.tensor([0.0, -math.radians(30.0)]))
    with pytest.raises(ValueError, match="variant"):
        relative_camera(angles(0, 0, 1), angles(0, 0, 1), "zero-2-3")


def zero123_get_t(target_c2w: np.ndarray, cond_c2w: np.ndarray) -> np.ndarray:
    """Zero-1-to-3's training-data code (``get_T`` of ldm/data/simple.py), written out: camera
    positions from world-to-camera [R|T] as -R^T T, spherical with the polar angle from +z."""
    def spherical(xyz):
        xy = xyz[0] ** 2 + xyz[1] ** 2
        return np.arctan2(np.sqrt(xy), xyz[2]), np.arctan2(xyz[1], xyz[0]), np.sqrt(xy + xyz[2] ** 2)

    def position(c2w):
        w2c = np.linalg.inv(c2w)
        return -w2c[:3, :3].T @ w2c[:3, 3]

    theta_t, azimuth_t, z_t = spherical(position(target_c2w))
    theta_c, azimuth_c, z_c = spherical(position(cond_c2w))
    d_azimuth = (azimuth_t - azimuth_c) % (2 * math.pi)
    return np.array([theta_t - theta_c, math.sin(d_azimuth), math.cos(d_azimuth), z_t - z_c])


def test_relative_camera_matches_zero123s_own_computation_from_poses():
    g = torch.Generator().manual_seed(3)
    views = random_views(16, 8, (-10, 80), (-180, 180), (3.0, 4.5), (20, 20), g)
    reference = random_views(1, 8, (-5, 20), (-180, 180), (3.0, 4.5), (20, 20), g)
    ours = relative_camera(ViewAngles.of(views.cameras), ViewAngles.of(reference.cameras))
    theirs = np.stack([zero123_get_t(c.numpy().astype(np.float64), reference.cameras.c2w[0].numpy().astype(np.float64))
                       for c in views.cameras.c2w])
    np.testing.assert_allclose(ours.numpy(), theirs, atol=2e-5)


# --- the view-teacher's camera recovery ---------------------------------------------------------


def test_view_teacher_recovers_the_cameras_the_loop_rendered():
    g = torch.Generator().manual_seed(0)
    views = random_views(8, 16, (-10, 80), (-180, 180), (3.8, 3.8), (20, 20), g)
    ref = angles(5.0, 0.0, 3.8)
    t = relative_camera(ViewAngles.of(views.cameras), ref)
    back = cameras_from_relative(t, camera_position(5.0, 0.0, 3.8), "zero123", 20.0, 16)
    torch.testing.assert_close(back.c2w, views.cameras.c2w, atol=1e-4, rtol=0)


def test_view_teacher_reference_elsewhere_turns_every_view_with_it():
    g = torch.Generator().manual_seed(1)
    views = random_views(6, 16, (-10, 80), (-180, 180), (3.8, 3.8), (20, 20), g)
    t = relative_camera(ViewAngles.of(views.cameras), angles(0.0, 0.0, 3.8))
    back = cameras_from_relative(t, camera_position(0.0, 90.0, 3.8), "zero123", 20.0, 16)
    turned = ViewAngles.of(back)
    expected = (ViewAngles.of(views.cameras).azimuth + 90 + 180) % 360 - 180
    torch.testing.assert_close(turned.azimuth, expected, atol=1e-3, rtol=0)
    torch.testing.assert_close(turned.elevation, ViewAngles.of(views.cameras).elevation, atol=1e-3, rtol=0)


def test_mirrored_azimuth_recovers_the_mirrored_view():
    t = relative_camera(angles(20.0, 60.0, 3.8), angles(0.0, 0.0, 3.8))
    mirrored = t * torch.tensor([1.0, -1.0, 1.0, 1.0])
    back = ViewAngles.of(cameras_from_relative(mirrored, camera_position(0.0, 0.0, 3.8), "zero123", 20.0, 8))
    assert float(back.azimuth[0]) == pytest.approx(-60.0, abs=1e-3)


# --- loading the layouts users download ---------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero123")
    return {"ashawkey": make_tiny_zero123(root / "zero123-xl-diffusers"),
            "community": make_tiny_zero123(root / "community", naming="community", weights="bin"),
            "stable": make_tiny_zero123(root / "stable-zero123-diffusers", seed=1)}


@pytest.fixture(scope="module")
def guidance(folders):
    return z123.build(z123.Zero123Config(model=str(folders["ashawkey"]), image_size=32, guidance_scale=3.0))


def reference_batch(n: int = 2, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g, requires_grad=True)
    batch = guidance_batch(images, [""] * n, generator=torch.Generator().manual_seed(seed), distance=3.8)
    ref_cam = batch.cameras[0]
    cutout = torch.rand(4, 48, 48, generator=g)
    batch.reference = ReferenceView(cutout, ref_cam, ViewAngles.of(ref_cam))
    return batch


@pytest.mark.parametrize("naming", ["ashawkey", "community", "stable"])
def test_both_projection_namings_and_variants_load_and_guide(folders, naming):
    g = z123.build(z123.Zero123Config(model=str(folders[naming]), image_size=32))
    assert g.variant == ("stable-zero123" if naming == "stable" else "zero123")
    assert isinstance(g.projection, torch.nn.Linear) and g.projection.in_features == 36
    batch = reference_batch()
    out = g(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and batch.images.grad.abs().sum() > 0


def test_projection_weights_are_the_files(folders):
    from safetensors.torch import load_file

    g = z123.build(z123.Zero123Config(model=str(folders["ashawkey"]), image_size=32))
    saved = load_file(str(folders["ashawkey"] / "clip_camera_projection" / "diffusion_pytorch_model.safetensors"))
    torch.testing.assert_close(g.projection.weight, saved["proj.weight"])
    community = z123.build(z123.Zero123Config(model=str(folders["community"]), image_size=32))
    saved = torch.load(folders["community"] / "cc_projection" / "diffusion_pytorch_model.bin", weights_only=True)
    torch.testing.assert_close(community.projection.bias, saved["projection.bias"])


def test_reference_latent_is_the_unscaled_posterior_mode(guidance):
    cutout = torch.rand(4, 40, 40, generator=torch.Generator().manual_seed(5))
    embedding, latent = guidance.encode_reference(cutout)
    rgb = cutout[:3] * cutout[3:] + (1 - cutout[3:])  # on white
    x = torch.nn.functional.interpolate(rgb[None], size=(32, 32), mode="bilinear", align_corners=False) * 2 - 1
    with torch.no_grad():
        mode = guidance.vae.encode(x).latent_dist.mode()
    torch.testing.assert_close(latent, mode)
    assert guidance.scaling == pytest.approx(0.18215)
    assert embedding.shape == (1, 1, 32)


def test_cfg_batch_zeroes_context_and_reference_in_the_unconditional_half(guidance):
    noisy = torch.randn(3, 4, 16, 16)
    context = torch.randn(3, 1, 32)
    latent = torch.randn(1, 4, 16, 16)
    x, hidden = guidance.unet_inputs(noisy, context, latent)
    assert x.shape == (6, 8, 16, 16) and hidden.shape == (6, 1, 32)
    torch.testing.assert_close(x[:3, :4], noisy)
    torch.testing.assert_close(x[3:, :4], noisy)
    torch.testing.assert_close(x[:3, 4:], latent.expand(3, -1, -1, -1))
    assert not x[3:, 4:].any() and not hidden[3:].any()
    torch.testing.assert_close(hidden[:3], context)


def test_context_is_the_projection_of_embedding_and_t(guidance):
    embedding = torch.randn(1, 1, 32)
    t = torch.randn(2, 4)
    expected = guidance.projection(torch.cat([embedding.expand(2, -1, -1), t[:, None]], dim=-1))
    torch.testing.assert_close(guidance.context(embedding, t), expected)


def test_sds_gradient_matches_two_explicit_unet_calls(guidance):
    batch = reference_batch(n=2)
    embedding, latent = guidance.reference(batch.reference.image)
    cameras = relative_camera(batch.angles, batch.reference.angles)
    context = guidance.context(embedding, cameras)
    latents = torch.randn(2, 4, 16, 16)
    t = torch.tensor([300, 700])
    noise = torch.randn(2, 4, 16, 16)
    grad = guidance.sds_gradient(latents, context, latent, t, noise)
    with torch.no_grad():
        noisy = guidance.scheduler.add_noise(latents, noise, t)
        unet = guidance.unet
        eps_c = unet(torch.cat([noisy, latent.expand(2, -1, -1, -1)], 1), t, encoder_hidden_states=context).sample
        eps_u = unet(torch.cat([noisy, torch.zeros(2, 4, 16, 16)], 1), t,
                     encoder_hidden_states=torch.zeros_like(context)).sample
    abar = guidance.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = (1 - abar) * (eps_u + 3.0 * (eps_c - eps_u) - noise)
    torch.testing.assert_close(grad, expected, atol=1e-4, rtol=1e-4)


def test_timestep_schedule_anneals_over_the_first_steps():
    config = z123.Zero123Config(model="x/y")
    assert z123.timestep_range(config, 0) == pytest.approx((0.4, 0.85))
    assert z123.timestep_range(config, 100) == pytest.approx((0.3, 0.675))
    assert z123.timestep_range(config, 5000) == pytest.approx((0.2, 0.5))


# --- bad input: one line, before any optimisation -----------------------------------------------------


def test_a_stable_diffusion_folder_is_refused(tmp_path):
    folder = make_tiny_stable_diffusion(tmp_path / "sd")
    with pytest.raises(ConfigError, match="StableDiffusionPipeline checkpoint.*stable-diffusion") as err:
        z123.build(z123.Zero123Config(model=str(folder)))
    assert "\n" not in str(err.value)


def test_a_folder_without_the_projection_is_refused(folders, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(folders["ashawkey"], folder)
    shutil.rmtree(folder / "clip_camera_projection")
    with pytest.raises(ConfigError, match="holds no weights"):
        z123.build(z123.Zero123Config(model=str(folder), image_size=32))
    index = (folder / "model_index.json").read_text().replace('"clip_camera_projection"', '"other"')
    (folder / "model_index.json").write_text(index)
    with pytest.raises(ConfigError, match="lacks clip_camera_projection"):
        z123.build(z123.Zero123Config(model=str(folder), image_size=32))


def test_guidance_without_a_reference_says_so(guidance):
    batch = reference_batch()
    batch.reference = None
    with pytest.raises(Gen3DError, match="needs a reference view"):
        guidance(batch)


def test_folders_never_run_their_own_code(folders, tmp_path):
    """A model folder's Python (community pipeline code) is never imported."""
    folder = tmp_path / "with-code"
    shutil.copytree(folders["ashawkey"], folder)
    (folder / "pipeline_zero1to3.py").write_text("raise SystemExit('model folder code ran')\n")
    (folder / "clip_camera_projection" / "zero123.py").write_text("raise SystemExit('model folder code ran')\n")
    g = z123.build(z123.Zero123Config(model=str(folder), image_size=32))
    assert g(reference_batch()).loss.isfinite()


def test_model_variant_is_inferred_from_the_name():
    assert z123.infer_variant("auto", "ashawkey/stable-zero123-diffusers") == "stable-zero123"
    assert z123.infer_variant("auto", "bennyguo/zero123-xl-diffusers") == "zero123"
    assert z123.infer_variant("zero123", "/models/stable_zero123") == "zero123"


def test_hub_id_offline_and_not_cached_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match="hf download ashawkey/zero123-xl-diffusers"):
        z123.build(z123.Zero123Config())


def test_image_size_follows_the_setting(folders):
    g = z123.build(z123.Zero123Config(model=str(folders["ashawkey"]), image_size=64))
    latents = g.encode_images(torch.rand(1, 3, 40, 40))
    assert latents.shape[-1] == 32  # resized to 64 px; the tiny VAE downsamples by 2
