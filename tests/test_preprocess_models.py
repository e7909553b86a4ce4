"""OWLv2, DETR, SAM and Depth Anything preprocessors on tiny random-initialised models.

Each model is built from a small config, saved with ``save_pretrained`` (with its processor)
into a temporary folder and loaded by the plugin through the same loader a hub id uses. Their
outputs are meaningless; the tests check shapes, dtypes and coordinate frames. Where a frame is
checked, the box head is set so the model's answer is known: OWLv2 then predicts its patch grid
(over the *padded square* image), DETR one chosen box (relative to the *unpadded* image).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from gen3d import ConfigError
from gen3d.cli import main
from gen3d_plugins.preprocess_stage import Preprocessor, build, load_settings, mask_box, preprocess_file
from gen3d.testing import tiny_text_config, write_clip_tokenizer

transformers = pytest.importorskip("transformers")

IMAGE = np.random.default_rng(0).integers(0, 256, (50, 100, 3), dtype=np.uint8)  # wide: padding matters


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    return {"owlv2": make_owlv2(root / "owlv2"), "detr": make_detr(root / "detr"), "sam": make_sam(root / "sam"),
            "depth": make_depth(root / "depth")}


def make_owlv2(folder):
    from transformers import (
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
        Owlv2VisionConfig,
    )

    tokenizer = write_clip_tokenizer(folder, max_length=16)
    config = Owlv2Config(text_config=tiny_text_config(len(tokenizer), max_length=16).to_dict(),
                         vision_config=Owlv2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                         num_attention_heads=4, image_size=64,
                                                         patch_size=16).to_dict(),
                         projection_dim=32)
    model = Owlv2ForObjectDetection(config)
    with torch.no_grad():  # no box offsets: every patch predicts its own grid cell
        model.box_head.dense2.weight.zero_()
        model.box_head.dense2.bias.zero_()
    model.save_pretrained(folder)
    Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}),
                   tokenizer=tokenizer).save_pretrained(folder)
    return folder


DETR_BOX = (0.3, 0.6, 0.4, 0.5)  # cx, cy, w, h relative to the image


def make_detr(folder):
    from transformers import (
        DetrConfig,
        DetrForObjectDetection,
        DetrImageProcessor,
        ResNetConfig,
    )

    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1],
                            out_features=["stage4"])
    names = ["cat", "chair", "dining table"]
    config = DetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False,
                        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=6,
                        id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    model = DetrForObjectDetection(config)
    with torch.no_grad():  # every query predicts DETR_BOX
        last = model.bbox_predictor.layers[-1]
        last.weight.zero_()
        last.bias.copy_(torch.logit(torch.tensor(DETR_BOX)))
    model.save_pretrained(folder)
    DetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(folder)
    return folder


def make_sam(folder):
    from transformers import (
        SamConfig,
        SamImageProcessor,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    config = SamConfig(
        # The prompt encoder's width = the vision neck's output channels = 2 * num_pos_feats.
        vision_config=SamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                                      image_size=64, patch_size=8, window_size=4, global_attn_indexes=[1],
                                      mlp_dim=64, num_pos_feats=8).to_dict(),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=8,
                                                     mask_input_channels=4).to_dict(),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=16, mlp_dim=32, num_hidden_layers=2,
                                                 num_attention_heads=2, iou_head_hidden_dim=16).to_dict())
    SamModel(config).save_pretrained(folder)
    processor = SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
                                  mask_size={"longest_edge": 16}, mask_pad_size={"height": 16, "width": 16})
    SamProcessor(image_processor=processor).save_pretrained(folder)
    return folder


def make_depth(folder):
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        DPTImageProcessor,
    )

    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                            image_size=56, patch_size=14, reshape_hidden_states=False,
                            out_features=["stage1", "stage2", "stage3", "stage4"])
    config = DepthAnythingConfig(backbone_config=backbone, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                                 head_hidden_size=8, reassemble_hidden_size=32)
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14,
                      do_pad=False).save_pretrained(folder)
    return folder


def make(role: str, name: str, folder, **settings):
    return build(role, {"type": name, "model": str(folder), "device": "cpu", **settings})


# --- detectors ----------------------------------------------------------------------------


def test_owlv2_boxes_are_in_input_pixels_despite_square_padding(models):
    detector = make("detector", "owlv2", models["owlv2"], threshold=0.0, nms_iou=1.0, max_detections=100)
    found = detector.detect(IMAGE, ["a cat", "a dog"])
    assert found.boxes.dtype == torch.float32 and found.boxes.shape[1] == 4
    assert found.scores.shape == (len(found),) and set(found.labels) <= {"a cat", "a dog"}
    # With the box head zeroed each patch predicts sigmoid(box_bias): its place on the patch grid,
    # relative to the padded 100x100 square. In input pixels that is x100 for x *and* y (clipped to
    # the 50 px tall image); the wrong frame (x100, y50) would squash every box to half height.
    from transformers import Owlv2ForObjectDetection

    model = Owlv2ForObjectDetection.from_pretrained(models["owlv2"])
    grid = torch.sigmoid(model.box_bias.reshape(-1, 4))
    cells = torch.cat([grid[:, :2] - grid[:, 2:] / 2, grid[:, :2] + grid[:, 2:] / 2], dim=1) * 100
    cells = torch.minimum(cells.clamp(min=0), torch.tensor([100.0, 50.0, 100.0, 50.0]))
    cells = cells[(cells[:, 3] > cells[:, 1])]  # patches wholly in the padding are dropped
    for box in found.boxes:
        assert (cells - box).abs().max(dim=1).values.min() < 0.01, box
    assert len(found) == len(cells) == 8  # the two top rows of patches; no NMS at iou 1.0
    assert (found.boxes[:, [0, 2]] <= 100).all() and (found.boxes[:, [1, 3]] <= 50).all()
    assert torch.all(found.scores[:-1] >= found.scores[1:])


def test_owlv2_nms_and_threshold(models):
    detector = make("detector", "owlv2", models["owlv2"], threshold=0.0, nms_iou=0.3, max_detections=3)
    found = detector.detect(IMAGE, ["a cat"])
    assert 0 < len(found) <= 3
    everything = make("detector", "owlv2", models["owlv2"], threshold=1.0).detect(IMAGE, [])
    assert len(everything) == 0 and everything.boxes.shape == (0, 4)


def test_detr_boxes_are_relative_to_the_unpadded_image(models):
    detector = make("detector", "detr", models["detr"], threshold=0.0, nms_iou=1.0)
    found = detector.detect(IMAGE, [])
    cx, cy, w, h = DETR_BOX
    expected = torch.tensor([(cx - w / 2) * 100, (cy - h / 2) * 50, (cx + w / 2) * 100, (cy + h / 2) * 50])
    assert len(found) > 0 and set(found.labels) <= {"cat", "chair", "dining table"}
    torch.testing.assert_close(found.boxes, expected.expand_as(found.boxes), atol=0.05, rtol=0)
    # identical boxes of one class collapse to one under NMS
    suppressed = make("detector", "detr", models["detr"], threshold=0.0, nms_iou=0.5).detect(IMAGE, [])
    assert sorted(suppressed.labels) == sorted(set(found.labels))


def test_detr_prompts_pick_classes_or_say_why_not(models):
    detector = make("detector", "detr", models["detr"], threshold=0.0, nms_iou=1.0)
    found = detector.detect(IMAGE, ["find the Dining Table, please"])
    assert set(found.labels) <= {"dining table"}
    with pytest.raises(ConfigError, match="detr knows only its 3 classes .* none is in the prompt 'a giraffe'"):
        detector.detect(IMAGE, ["a giraffe"])
    assert detector._classes_in(["two Chairs"]) == {"chair"}
    assert detector._classes_in(["an apple", "a cat"]) == {"cat"}
    assert detector._classes_in(["dining tables", "cats"]) == {"dining table", "cat"}
    with pytest.raises(ConfigError, match="none is in the prompt 'a chairman'"):
        detector._classes_in(["a chairman"])  # whole words only


def make_timm_detr(folder):
    """A DETR folder whose config asks for a timm backbone, as facebook/detr-resnet-50's main branch does."""
    from transformers import DetrConfig

    folder.mkdir(parents=True, exist_ok=True)
    config = DetrConfig(use_timm_backbone=True, d_model=32, encoder_layers=1, decoder_layers=1, num_queries=6)
    config.save_pretrained(folder)
    data = json.loads((folder / "config.json").read_text())
    data["use_timm_backbone"] = True  # what the hub's config.json says (transformers 5 folds it into backbone_config)
    (folder / "config.json").write_text(json.dumps(data))
    return folder


@pytest.fixture
def no_timm(monkeypatch):
    import gen3d_plugins.preprocess_models as plugin

    monkeypatch.setattr(plugin, "has_timm", lambda: False)
    return plugin


def test_detr_with_a_timm_backbone_and_no_timm_is_a_clear_error(no_timm, tmp_path, capsys):
    folder = make_timm_detr(tmp_path / "detr-timm")
    with pytest.raises(ConfigError, match=r"detector\.model: .*detr-timm.* uses a timm backbone .*`pip install timm`"):
        make("detector", "detr", folder)
    photo = tmp_path / "photo.png"
    Image.fromarray(IMAGE).save(photo)
    assert main(["preprocess", str(photo), "--detector", "detr", f"detector.model={folder}",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install timm" in err[0], err


def test_detr_resnet_hub_ids_load_their_no_timm_revision(no_timm, models, tmp_path, monkeypatch):
    # Stand-ins for the hub: the main branch needs timm, the no_timm branch has a transformers ResNet.
    timm_folder = make_timm_detr(tmp_path / "main")
    calls = []
    real = no_timm.load_pretrained

    def hub(loader, model_id, key, what, **kwargs):
        revision = kwargs.pop("revision", None)
        calls.append((model_id, revision))
        return real(loader, str(models["detr"] if revision == "no_timm" else timm_folder), key, what, **kwargs)

    monkeypatch.setattr(no_timm, "load_pretrained", hub)
    detector = build("detector", {"type": "detr", "device": "cpu", "threshold": 0.0})
    assert calls[0] == ("facebook/detr-resnet-50", None)
    assert all(call == ("facebook/detr-resnet-50", "no_timm") for call in calls[1:]) and len(calls) == 4
    assert len(detector.detect(IMAGE, [])) > 0


def test_hub_loader_turns_a_missing_library_into_one_line(tmp_path):
    import importlib.util

    if importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed here")
    from transformers import AutoConfig, DetrForObjectDetection

    from gen3d.hub import load_pretrained

    folder = make_timm_detr(tmp_path / "detr-timm")
    build_it = lambda source, **kw: DetrForObjectDetection(AutoConfig.from_pretrained(source))
    with pytest.raises(ConfigError, match=r"detector\.model: .*detr-timm.* needs the timm library, which is not "
                                          r"installed \(`pip install timm`\)") as caught:
        load_pretrained(build_it, str(folder), "detector.model", "DETR detector")
    assert "\n" not in str(caught.value)

    def missing(source, **kw):
        raise ModuleNotFoundError("No module named 'einops'", name="einops")

    with pytest.raises(ConfigError, match=r"depth\.model: .* needs the einops library"):
        load_pretrained(missing, str(folder), "depth.model", "depth model")


# --- segmenter and depth ------------------------------------------------------------------


def test_sam_masks_are_in_input_pixels(models):
    segmenter = make("segmenter", "sam", models["sam"])
    for prompt in ({"box": [10.0, 5.0, 60.0, 40.0]}, {"points": [[30.0, 20.0]]},
                   {"box": [10.0, 5.0, 60.0, 40.0], "points": [[30.0, 20.0], [40, 25]]}):
        result = segmenter.segment(IMAGE, **prompt)
        assert result.mask.shape == (50, 100) and result.mask.dtype == bool
        assert isinstance(result.score, float)
    single = make("segmenter", "sam", models["sam"], multimask=False).segment(IMAGE, box=[0, 0, 100, 50])
    assert single.mask.shape == (50, 100)


def test_sam_prompts_are_rescaled_to_the_model_input_and_masks_come_back_in_input_pixels(models):
    segmenter = make("segmenter", "sam", models["sam"])
    seen = {}

    def known_mask(module, args, kwargs, output):
        # SAM's low-res masks cover its padded 64x64 input: mark the cells inside the box it was given.
        seen.clear()
        seen.update(kwargs)
        cells = seen["cells"] = output.pred_masks.shape[-1]
        if kwargs.get("input_boxes") is None:
            return output
        x0, y0, x1, y1 = (kwargs["input_boxes"][0, 0] * cells / 64).tolist()
        centres = torch.arange(cells) + 0.5
        inside = ((centres[None, :] >= x0) & (centres[None, :] <= x1) & (centres[:, None] >= y0)
                  & (centres[:, None] <= y1))
        logits = torch.where(inside, 10.0, -10.0).expand_as(output.pred_masks).clone()
        output.pred_masks = logits
        return output

    handle = segmenter.model.register_forward_hook(known_mask, with_kwargs=True)
    try:
        box = [10.0, 5.0, 60.0, 40.0]  # input pixels of the 100x50 image; SAM sees it at 64x32 (x0.64)
        result = segmenter.segment(IMAGE, box=box)
        torch.testing.assert_close(seen["input_boxes"][0, 0], torch.tensor(box) * 0.64, atol=1e-3, rtol=0)
        assert seen["multimask_output"] is False  # one mask for a box prompt
        found = mask_box(result.mask)
        cell = 64 / seen["cells"] / 0.64  # one low-res cell in input pixels
        assert max(abs(a - b) for a, b in zip(found, box)) <= cell + 0.5, found
        segmenter.segment(IMAGE, points=[[30.0, 20.0]])
        torch.testing.assert_close(seen["input_points"][0, 0, 0], torch.tensor([30.0, 20.0]) * 0.64, atol=1e-3,
                                   rtol=0)
        assert seen["multimask_output"] is True  # a point is ambiguous: three candidates
    finally:
        handle.remove()


def test_depth_is_normalised_relative_inverse_depth_in_input_pixels(models):
    estimator = make("depth", "depth-anything", models["depth"])
    depth = estimator.estimate_depth(IMAGE)
    assert depth.depth.shape == (50, 100) and depth.depth.dtype == np.float32
    assert np.isfinite(depth.depth).all() and depth.depth.min() == 0 and math.isclose(depth.depth.max(), 1)
    low, high = depth.raw_range
    assert low < high and depth.model == str(models["depth"])


def test_metric_depth_models_are_refused_not_mislabelled(models, tmp_path):
    from transformers import GLPNConfig

    metric = tmp_path / "metric"
    metric.mkdir()
    data = json.loads((models["depth"] / "config.json").read_text())
    (metric / "config.json").write_text(json.dumps({**data, "depth_estimation_type": "metric", "max_depth": 20}))
    with pytest.raises(ConfigError, match=r"depth\.model: .*metric.* predicts metric depth .* only relative checkpoints"):
        make("depth", "depth-anything", metric)
    GLPNConfig(hidden_sizes=[8, 16, 32, 64]).save_pretrained(tmp_path / "glpn")  # metric depth, larger = farther
    with pytest.raises(ConfigError, match=r"holds a 'glpn' model, not a relative depth model \(depth_anything or dpt\)"):
        make("depth", "depth-anything", tmp_path / "glpn")


# --- loading, roles, the whole stage ----------------------------------------------------------


def test_missing_or_wrong_model_folders_are_clear(models, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ConfigError, match=r"detector\.model: cannot load 'google/owlv2-base-patch16-ensemble'.*"
                                          r"hf download google/owlv2-base-patch16-ensemble"):
        build("detector", "owlv2")
    with pytest.raises(ConfigError, match=r"segmenter\.model: no model folder"):
        build("segmenter", {"type": "sam", "model": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match=r"segmenter\.model: .* holds a .depth_anything. model, not a SAM segmenter"):
        build("segmenter", {"type": "sam", "model": str(models["depth"])})


def test_roles_are_checked_before_loading():
    with pytest.raises(ConfigError, match="detector: 'depth-anything' is a depth, not a detector. "
                                          "Detectors: detr, grabcut, owlv2"):
        Preprocessor(load_settings({"detector": "depth-anything"}))
    with pytest.raises(ConfigError, match="segmenter: 'owlv2' is a detector, not a segmenter. Segmenters: grabcut, sam"):
        Preprocessor(load_settings({"segmenter": "owlv2"}))


def test_stage_with_owlv2_sam_and_depth(models, tmp_path):
    settings = load_settings({
        "detector": {"type": "owlv2", "model": str(models["owlv2"]), "threshold": 0.0, "device": "cpu"},
        "segmenter": {"type": "sam", "model": str(models["sam"]), "device": "cpu"},
        "depth": {"type": "depth-anything", "model": str(models["depth"]), "device": "cpu"},
        "max_side": 64, "size": 32})
    photo = tmp_path / "photo.png"
    big = np.kron(IMAGE, np.ones((3, 3, 1), np.uint8))  # 150 x 300: shrunk to 64 px for the models
    Image.fromarray(big).save(photo)
    result = preprocess_file(photo, settings, tmp_path / "out", prompts=["a cat"])
    assert result.mask.shape == (150, 300) and result.depth.depth.shape == (150, 300)
    info = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert info["detector"] == "owlv2" and info["segmenter"] == "sam" and "depth" in info
    assert all(0 <= b[0] <= b[2] <= 300 and 0 <= b[1] <= b[3] <= 150 for b in (d["box"] for d in info["detections"]))
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "rgba.png", "mask.png", "detections.json", "overview.png", "depth.npy", "depth.png"}


def test_cli_with_model_plugins(models, tmp_path, capsys):
    # A red block on grey, inside the box the tiny DETR always predicts; grabcut segments in that box.
    picture = np.full((50, 100, 3), 128, np.uint8)
    picture[25:40, 18:42] = (220, 30, 30)
    photo = tmp_path / "photo.png"
    Image.fromarray(picture).save(photo)
    code = main(["preprocess", str(photo), "--out", str(tmp_path / "out"), "--detector", "detr",
                 "--depth", "depth-anything", f"detector.model={models['detr']}", "detector.threshold=0",
                 f"depth.model={models['depth']}", "--prompt", "a chair"])
    assert code == 0, capsys.readouterr().err
    info = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert {d["label"] for d in info["detections"]} == {"chair"}
    assert np.load(tmp_path / "out" / "depth.npy").shape == (50, 100)
