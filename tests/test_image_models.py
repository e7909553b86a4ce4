"""Text-to-image and inpainter roles on tiny random Stable Diffusion folders (the hub's layout,
written by ``save_pretrained``), built through the same role builder and loaders as a hub id.

Their images are meaningless; the tests check sizes, seeding, which pixels change, refusals and
the CLIP ranking.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from gen3d import PREPROCESSOR_ROLES, ConfigError
from gen3d.testing import make_tiny_clip, make_tiny_sd, make_tiny_stable_diffusion
from gen3d_plugins.image_models import cpu_cost_warning, working_size
from gen3d_plugins.preprocess_stage import build

pytest.importorskip("diffusers")

FAST = {"size": 32, "steps": 2, "device": "cpu"}  # the tiny VAE makes 32 px images
PROMPT = "a cosy living room"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("image-models")
    return {"sd": make_tiny_sd(root / "sd"), "inpainting": make_tiny_sd(root / "inpainting", inpainting=True),
            "clip": make_tiny_clip(root / "clip")}


def make(role: str, folder, **settings):
    name = {"text-to-image": "sd-text-to-image", "inpainter": "sd-inpainter"}[role]
    return build(role, {"type": name, "model": str(folder), "candidates": 1, **FAST, **settings})


@pytest.fixture(scope="module")
def t2i(folders):
    return make("text-to-image", folders["sd"])


@pytest.fixture(scope="module")
def inpainter(folders):
    return make("inpainter", folders["inpainting"], candidates=3, clip_model=str(folders["clip"]))


def noise(shape, seed, dtype=np.float32):
    return np.random.default_rng(seed).random(shape).astype(dtype)


def hole(shape, box):
    mask = np.zeros(shape, bool)
    y0, y1, x0, x1 = box
    mask[y0:y1, x0:x1] = True
    return mask


def test_the_folders_have_the_hub_layout(folders):
    index = json.loads((folders["inpainting"] / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInpaintPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"][1] == "CLIPImageProcessor"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "feature_extractor"):
        assert (folders["inpainting"] / part).is_dir(), part
    channels = [json.loads((folders[f] / "unet" / "config.json").read_text())["in_channels"]
                for f in ("sd", "inpainting")]
    assert channels == [4, 9]


def test_both_play_their_roles(t2i, inpainter):
    assert isinstance(t2i, PREPROCESSOR_ROLES["text-to-image"])
    assert isinstance(inpainter, PREPROCESSOR_ROLES["inpainter"])


# --- text to image -----------------------------------------------------------------------------


def test_generate_is_the_right_size_and_seeded(t2i):
    first, again, other = t2i.generate(PROMPT, 0), t2i.generate(PROMPT, 0), t2i.generate(PROMPT, 1)
    assert first.shape == (32, 32, 3) and first.dtype == np.float32
    assert first.min() >= 0 and first.max() <= 1
    assert np.array_equal(first, again)  # the same seed, the same image, bit for bit
    assert np.abs(first - other).mean() > 0.01  # another seed, another image


def test_generate_candidates_differ_from_each_other(folders):
    t2i = make("text-to-image", folders["sd"], candidates=2, clip_model=str(folders["clip"]))
    a, b = t2i.generate_candidates(PROMPT, 3)
    assert a.shape == b.shape == (32, 32, 3)
    assert np.abs(a - b).mean() > 0.01
    assert all(np.array_equal(x, y) for x, y in zip(t2i.generate_candidates(PROMPT, 3), (a, b)))


# --- inpainting --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, dtype", [((32, 32), np.float32), ((50, 70), np.float64)])
def test_inpaint_changes_only_the_masked_pixels(inpainter, shape, dtype):
    """The pipeline's own output changes unmasked pixels too (the VAE round trip); ours does not."""
    image = noise((*shape, 3), 1, dtype)
    mask = hole(shape, (8, 20, 10, 24))
    out = inpainter.inpaint(image, mask, PROMPT, seed=0)
    assert out.shape == image.shape and out.dtype == image.dtype
    assert np.array_equal(out[~mask], image[~mask])  # bit for bit
    assert np.abs(out[mask] - image[mask]).mean() > 0.01
    raw = inpainter.raw_inpaint(image, mask, PROMPT, 0, 1)[0]
    assert np.abs(raw[~mask] - image[~mask]).max() > 0.01  # what compositing removes
    assert np.array_equal(out[mask], raw[mask].astype(dtype))


def test_inpaint_candidates_keep_the_known_pixels_and_differ_in_the_hole(inpainter):
    image, mask = noise((32, 32, 3), 2), hole((32, 32), (0, 12, 0, 32))
    candidates = inpainter.inpaint_candidates(image, mask, PROMPT, seed=5)
    assert len(candidates) == 3
    assert all(np.array_equal(c[~mask], image[~mask]) for c in candidates)
    assert np.abs(candidates[0][mask] - candidates[1][mask]).mean() > 0.01
    assert np.array_equal(inpainter.inpaint_candidates(image, mask, PROMPT, seed=5)[2], candidates[2])


def test_inpaint_without_a_hole_returns_the_image_without_running_the_model(inpainter, monkeypatch):
    image = noise((32, 32, 3), 3)
    monkeypatch.setattr(inpainter, "pipe", None)  # any model call would fail
    out = inpainter.inpaint(image, np.zeros((32, 32), bool), PROMPT, seed=0)
    assert np.array_equal(out, image) and out is not image


def test_a_mask_of_another_size_is_refused(inpainter):
    with pytest.raises(ValueError, match=r"mask: expected a bool \[h, w\] mask of the image's size \(32, 32\)"):
        inpainter.inpaint(noise((32, 32, 3), 0), np.ones((16, 16), bool), PROMPT, seed=0)


def test_the_working_size_keeps_the_aspect_on_the_vae_grid():
    assert working_size(480, 640, 512, 8) == (384, 512)
    assert working_size(512, 512, 512, 8) == (512, 512)
    assert working_size(50, 70, 32, 2) == (22, 32)


# --- refusals ----------------------------------------------------------------------------------


def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text, text
    return text


def test_a_text_to_image_folder_is_refused_as_inpainter(folders):
    with pytest.raises(ConfigError) as excinfo:
        make("inpainter", folders["sd"])
    text = one_line(excinfo)
    assert text.startswith(f"inpainter.model: {str(folders['sd'])!r} is a text-to-image model")
    assert "4 input channels" in text and "stabilityai/stable-diffusion-2-inpainting" in text


def test_an_inpainting_folder_is_refused_as_text_to_image(folders):
    with pytest.raises(ConfigError) as excinfo:
        make("text-to-image", folders["inpainting"])
    text = one_line(excinfo)
    assert text.startswith(f"text_to_image.model: {str(folders['inpainting'])!r} is an inpainting model")
    assert "9 input channels" in text and "stabilityai/stable-diffusion-2-1-base" in text


def test_an_image_conditioned_unet_is_refused_by_both(tmp_path):
    folder = make_tiny_stable_diffusion(tmp_path / "sd8", in_channels=8)
    for role in ("text-to-image", "inpainter"):
        with pytest.raises(ConfigError, match="whose UNet takes 8 input channels") as excinfo:
            make(role, folder)
        one_line(excinfo)


def test_a_component_of_the_other_role_is_refused_before_loading(folders):
    with pytest.raises(ConfigError, match="'sd-text-to-image' is a text-to-image, not a inpainter"):
        build("inpainter", {"type": "sd-text-to-image", "model": "/nonexistent"})


@pytest.mark.parametrize("prompt", ["", "   "])
def test_an_empty_prompt_is_refused_before_any_work(t2i, inpainter, monkeypatch, prompt):
    for model in (t2i, inpainter):
        monkeypatch.setattr(model, "pipe", None)  # any model call would fail with another error
    for call in (lambda: t2i.generate(prompt, 0), lambda: t2i.generate_candidates(prompt, 0),
                 lambda: inpainter.inpaint(noise((32, 32, 3), 0), np.ones((32, 32), bool), prompt, 0),
                 lambda: inpainter.inpaint_candidates(None, None, prompt, 0)):
        with pytest.raises(ConfigError, match="the prompt is empty") as excinfo:
            call()
        one_line(excinfo)


def test_hub_id_offline_and_not_cached_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match="hf download stabilityai/stable-diffusion-2-inpainting") as excinfo:
        build("inpainter", {"type": "sd-inpainter", "device": "cpu"})
    one_line(excinfo)


def test_a_folders_python_is_never_imported(folders, tmp_path):
    """Code in a model folder, even named by its model_index.json, never runs."""
    folder = tmp_path / "with-code"
    shutil.copytree(folders["inpainting"], folder)
    ran = tmp_path / "code-ran"
    code = f"open({str(ran)!r}, 'w').close()\nraise SystemExit('model folder code ran')\n"
    for path in ("pipeline.py", "unet/unet.py", "scheduler/my_scheduler.py"):
        (folder / path).write_text(code)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"], index["scheduler"] = ["pipeline", "Evil"], ["my_scheduler", "MyScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    model = make("inpainter", folder, scheduler="ddim")
    out = model.inpaint(noise((32, 32, 3), 0), hole((32, 32), (4, 12, 4, 12)), PROMPT, seed=0)
    assert np.isfinite(out).all()
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "_class_name": "MyScheduler"}))
    with pytest.raises(ConfigError, match="its scheduler 'MyScheduler' is not a diffusers scheduler") as excinfo:
        make("inpainter", folder)
    one_line(excinfo)
    assert not ran.exists()


# --- ranking -----------------------------------------------------------------------------------


@pytest.mark.parametrize("at", [0, 2])
def test_clip_ranking_picks_the_candidate_identical_to_the_first_view(inpainter, at):
    first_view = noise((32, 32, 3), 10)
    candidates = [noise((32, 32, 3), 20 + i) for i in range(4)]
    candidates.insert(at, first_view.copy())
    scores = inpainter.candidate_scores(candidates, first_view)
    assert inpainter.rank_candidates(candidates, first_view) == at
    assert scores[at] == pytest.approx(1.0, abs=1e-5) and max(np.delete(scores, at)) < scores[at] - 1e-5


def test_ranking_one_candidate_needs_no_clip(t2i):
    assert t2i.ranker is None and t2i.rank_candidates([noise((32, 32, 3), 0)], noise((32, 32, 3), 1)) == 0
    assert t2i.ranker is None


def test_full_size_models_on_cpu_are_warned_about():
    assert "CUDA GPU" in cpu_cost_warning(865_910_724, 50, torch.device("cpu"))
    assert cpu_cost_warning(865_910_724, 50, torch.device("cuda")) is None
    assert cpu_cost_warning(2_000_000, 50, torch.device("cpu")) is None
