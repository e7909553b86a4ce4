"""The preprocessing stage with the embedded ``grabcut`` default: composites with known masks,
the crop/centre step, the output folder, the CLI, and every kind of awkward input."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

import gen3d
from gen3d import Component, ConfigError, DataError, DepthMap
from gen3d.cli import main
from gen3d_plugins.photo_io import read_image
from gen3d_plugins.preprocess_stage import (
    Preprocessor,
    centre_object,
    load_settings,
    mask_box,
    preprocess,
    preprocess_file,
)

ROOT = Path(__file__).resolve().parents[1]
OBJECTS = [("toy", 0), ("toy", 7), ("toy", 20), ("plain", 3), ("plain", 12)]
PHOTOS = ["coffee", "chelsea", "astronaut", "rocket"]


# --- composites: a project-rendered object with alpha pasted on a background --------------------


def load_object(name: str, index: int) -> np.ndarray:
    """float RGBA of a shipped rendering, cropped to its alpha's box."""
    rgba = np.asarray(Image.open(ROOT / "assets" / name / "train" / f"r_{index}.png").convert("RGBA"))
    rgba = rgba.astype(np.float32) / 255
    rows, cols = np.nonzero(rgba[..., 3] > 0.01)
    return rgba[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def plain_background(rng, height: int, width: int, kind: str) -> np.ndarray:
    """Plain or simple: one colour, a gradient or a vignette, with sensor noise."""
    colour = rng.uniform(0.1, 0.95, 3)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    if kind == "flat":
        bg = np.broadcast_to(colour, (height, width, 3))
    elif kind == "gradient":
        bg = colour + rng.uniform(-0.25, 0.25, 3) * (2 * yy[..., None] - 1)
    else:
        radius = np.hypot(xx - xx.mean(), yy - yy.mean())
        bg = colour * (1 - 0.35 * radius[..., None] ** 2)
    return np.clip(bg + rng.normal(0, 0.012, (height, width, 3)), 0, 1)


def composite(rng, background: np.ndarray, obj: np.ndarray, fraction: float, margin: float = 0.06):
    """Paste ``obj`` scaled to ``fraction`` of the shorter side at a random place; (uint8 RGB, true mask)."""
    h, w = background.shape[:2]
    scale = fraction * min(h, w) / max(obj.shape[:2])
    size = (max(1, round(obj.shape[1] * scale)), max(1, round(obj.shape[0] * scale)))
    obj = cv2.resize(obj, size, interpolation=cv2.INTER_LINEAR if scale > 1 else cv2.INTER_AREA)
    oh, ow = obj.shape[:2]
    m = int(margin * min(h, w))
    x, y = rng.integers(m, w - ow - m + 1), rng.integers(m, h - oh - m + 1)
    out = background.copy()
    alpha = obj[..., 3:]
    out[y:y + oh, x:x + ow] = obj[..., :3] * alpha + out[y:y + oh, x:x + ow] * (1 - alpha)
    mask = np.zeros((h, w), bool)
    mask[y:y + oh, x:x + ow] = obj[..., 3] >= 0.5
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8), mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def save(path: Path, rgb: np.ndarray, **kwargs) -> Path:
    Image.fromarray(rgb).save(path, **kwargs)
    return path


@pytest.fixture(scope="module")
def stage():
    return Preprocessor(load_settings({}))


@pytest.fixture(scope="module")
def plain_composites():
    rng = np.random.default_rng(7)
    out = []
    for i in range(8):
        h, w = rng.integers(300, 640, 2)
        background = plain_background(rng, h, w, ["flat", "gradient", "vignette"][i % 3])
        out.append(composite(rng, background, load_object(*OBJECTS[i % len(OBJECTS)]), rng.uniform(0.3, 0.7)))
    return out


# A white teapot on a pale background: its handle and spout are only a little off the background.
PALE_VIEWS = [3, 16, 24, 29, 37, 54, 62]  # views of `plain` that show the spout and the handle
PALE_BLUE, PALE_GREY = (0.74, 0.84, 0.96), (0.86, 0.87, 0.88)


def whitened(obj: np.ndarray, keep: float = 0.35) -> np.ndarray:
    """The object's shading squeezed towards white (a white glaze instead of the blue-grey render)."""
    out = obj.copy()
    out[..., :3] = 1 - (1 - obj[..., :3]) * keep
    return out


def pale_background(rng, height: int, width: int, colour, kind: str) -> np.ndarray:
    yy = np.mgrid[0:height, 0:width][0] / max(height, width)
    bg = np.broadcast_to(np.asarray(colour), (height, width, 3))
    if kind == "gradient":
        bg = bg + np.array([-0.06, -0.05, -0.03]) * (2 * yy[..., None] - 1)
    return np.clip(bg + rng.normal(0, 0.012, (height, width, 3)), 0, 1)


@pytest.fixture(scope="module")
def pale_composites():
    """(view, background colour, kind, fraction, rgb, true mask): blue and grey alternate."""
    rng = np.random.default_rng(20)
    out = []
    for i, view in enumerate(PALE_VIEWS * 2):
        colour = ["blue", "grey"][i % 2]
        kind, fraction = ["flat", "gradient"][(i // 2) % 2], [0.35, 0.5, 0.7][i % 3]
        h, w = rng.integers(300, 560, 2)
        background = pale_background(rng, h, w, PALE_BLUE if colour == "blue" else PALE_GREY, kind)
        out.append((view, colour, kind, fraction,
                    *composite(rng, background, whitened(load_object("plain", view)), fraction)))
    return out


def thin_parts(mask: np.ndarray) -> np.ndarray:
    """What an opening a tenth of the object's size removes: the handle, the spout, the knob."""
    x0, y0, x1, y1 = mask_box(mask)
    side = max(3, round(0.1 * max(x1 - x0, y1 - y0)) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side))
    return mask & ~(cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, kernel) > 0)


def run_on(stage, tmp_path, rgb: np.ndarray, name="photo.jpg", **kwargs):
    path = save(tmp_path / name, rgb, **kwargs)
    return preprocess(read_image(path), stage)


# --- quality ----------------------------------------------------------------------------------


def test_plain_backgrounds_reach_iou_09(stage, plain_composites, tmp_path):
    ious = []
    for i, (rgb, truth) in enumerate(plain_composites):
        result = run_on(stage, tmp_path, rgb, name=f"plain{i}.jpg", quality=92)  # JPEG, like a camera
        ious.append(iou(result.mask, truth))
        assert not result.unsure, (i, result.unsure)
    print("plain-background mask IoU:", [round(v, 3) for v in ious], "min", round(min(ious), 3))
    assert min(ious) >= 0.9, ious


def test_pale_object_keeps_its_handle_and_spout(stage, pale_composites, tmp_path):
    ious, kept = [], []
    for i, (view, colour, kind, fraction, rgb, truth) in enumerate(pale_composites):
        if colour != "blue":
            continue
        result = run_on(stage, tmp_path, rgb, name=f"pale{i}.jpg", quality=92)
        thin = thin_parts(truth)
        ious.append(iou(result.mask, truth))
        kept.append(float((result.mask & thin).sum() / thin.sum()))
        assert not result.unsure, (view, kind, fraction, result.unsure)
    print("white on pale blue, mask IoU:", [round(v, 3) for v in ious], "thin parts kept:", [round(v, 2) for v in kept])
    assert min(ious) >= 0.95, ious
    assert min(kept) >= 0.85, kept


def test_object_near_the_background_colour_is_kept_or_unsure(stage, pale_composites, tmp_path):
    for i, (view, colour, kind, fraction, rgb, truth) in enumerate(pale_composites):
        if colour != "grey":
            continue
        result = run_on(stage, tmp_path, rgb, name=f"pale{i}.jpg", quality=92)
        score = iou(result.mask, truth)
        print(f"white on pale grey, view {view}, {kind}, {fraction}: IoU {score:.3f}, unsure: {result.unsure}")
        assert score >= 0.95 or any("hard to tell from the background" in r for r in result.unsure), (view, score)
        assert score >= 0.85, (view, score)  # doubted, yet still the object


@pytest.mark.parametrize("photo", PHOTOS)
def test_cluttered_backgrounds_are_unsure_rather_than_wrong(stage, photo, tmp_path):
    rng = np.random.default_rng(PHOTOS.index(photo))
    background = getattr(skdata, photo)().astype(np.float32) / 255
    rgb, truth = composite(rng, background, load_object(*OBJECTS[PHOTOS.index(photo)]), rng.uniform(0.3, 0.6))
    try:
        result = run_on(stage, tmp_path, rgb, name=f"{photo}.png")
    except DataError as exc:  # "no object found" is also an honest answer
        assert "no object" in str(exc)
        return
    score = iou(result.mask, truth)
    print(f"{photo}: IoU {score:.3f}, unsure: {result.unsure}")
    assert result.unsure or score >= 0.9


def test_border_clutter_is_measured_against_a_fixed_colour_distance(plain_composites):
    from gen3d_plugins.preprocess_classic import _background_distance, _border_mask

    def stray(rgb):
        lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
        return _background_distance(lab, _border_mask(lab.shape[:2], 8), far=10.0)[2]

    assert max(stray(rgb) for rgb, _ in plain_composites[:3]) < 0.01
    assert stray(skdata.coffee()) > 0.5  # was 0% whatever the photo: the threshold grew with the noise


def test_object_cut_by_the_frame_is_unsure(stage, tmp_path):
    rng = np.random.default_rng(3)
    rgb, _ = composite(rng, plain_background(rng, 400, 400, "flat"), load_object("toy", 0), 0.6)
    rows = np.flatnonzero((np.abs(rgb.astype(int) - rgb[0, 0]).sum(-1) > 60).any(axis=1))
    result = run_on(stage, tmp_path, np.ascontiguousarray(rgb[rows[len(rows) // 2]:]), name="cut.png")
    assert any("border" in reason for reason in result.unsure)


# --- crop and centre ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_centre_puts_the_box_centre_in_the_middle_at_the_fill_fraction(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(40, 1500, 2)
    bw = rng.integers(12, w + 1)
    bh = rng.integers(max(12, bw // 3), min(h, 3 * bw) + 1)  # object-like shapes, not hair-thin lines
    x0, y0 = rng.integers(0, w - bw + 1), rng.integers(0, h - bh + 1)
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    mask = ((xx - x0 - bw / 2) / (bw / 2)) ** 2 + ((yy - y0 - bh / 2) / (bh / 2)) ** 2 <= 1  # an ellipse ...
    mask[y0 + bh // 2 - 1:y0 + bh // 2 + 2, x0:x0 + bw] = True  # ... whose box is exactly bw x bh
    mask[y0:y0 + bh, x0 + bw // 2 - 1:x0 + bw // 2 + 2] = True
    size, fill = int(rng.choice([64, 256, 320])), float(rng.uniform(0.5, 0.95))
    rgba = centre_object(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mask, size, fill)
    assert rgba.shape == (size, size, 4) and rgba.dtype == np.uint8
    box = mask_box(rgba[..., 3] >= 128)
    centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    assert abs(centre[0] - size / 2) <= 2 and abs(centre[1] - size / 2) <= 2, (centre, size)
    assert abs(max(box[2] - box[0], box[3] - box[1]) - fill * size) <= 2


def test_pipeline_output_is_centred_at_085(stage, plain_composites, tmp_path):
    result = run_on(stage, tmp_path, plain_composites[0][0], name="p.png")
    box = mask_box(result.rgba[..., 3] >= 128)
    assert abs((box[0] + box[2]) / 2 - 128) <= 2 and abs((box[1] + box[3]) / 2 - 128) <= 2
    assert abs(max(box[2] - box[0], box[3] - box[1]) / 256 - 0.85) <= 2 / 256


# --- the output folder and the command --------------------------------------------------------


def test_cli_writes_the_output_folder(plain_composites, tmp_path, capsys):
    rgb, truth = plain_composites[1]
    photo = save(tmp_path / "photo.webp", rgb, quality=95)
    out = tmp_path / "out"
    assert main(["preprocess", str(photo), "--out", str(out), "--prompt", "a toy", "size=128"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["detections.json", "mask.png", "overview.png", "rgba.png"]
    rgba = Image.open(out / "rgba.png")
    assert rgba.mode == "RGBA" and rgba.size == (128, 128)
    mask = np.asarray(Image.open(out / "mask.png")) > 127
    assert mask.shape == truth.shape and iou(mask, truth) >= 0.9
    info = json.loads((out / "detections.json").read_text())
    assert info["input_size"] == [rgb.shape[1], rgb.shape[0]]
    assert info["unsure"] is False and info["unsure_reasons"] == []
    assert info["chosen"]["box"] == info["detections"][info["chosen"]["index"]]["box"]
    x0, y0, x1, y1 = info["chosen"]["box"]
    tx0, ty0, tx1, ty1 = mask_box(truth)
    assert abs(x0 - tx0) < 6 and abs(y0 - ty0) < 6 and abs(x1 - tx1) < 6 and abs(y1 - ty1) < 6
    assert any("cannot read text prompts" in note for note in info["notes"])
    assert Image.open(out / "overview.png").size[1] == min(768, max(rgb.shape[:2]))
    assert json.loads(capsys.readouterr().out)["object"] == "object"


def test_large_input_is_shrunk_but_mask_keeps_input_size(tmp_path, plain_composites):
    rgb, truth = plain_composites[2]
    big = cv2.resize(rgb, (rgb.shape[1] * 4, rgb.shape[0] * 4), interpolation=cv2.INTER_LINEAR)
    big_truth = cv2.resize(truth.astype(np.uint8), big.shape[1::-1], interpolation=cv2.INTER_NEAREST) > 0
    settings = load_settings({"max_side": 512})
    result = preprocess_file(save(tmp_path / "big.jpg", big, quality=90), settings, tmp_path / "out")
    assert result.mask.shape == big.shape[:2]
    assert iou(result.mask, big_truth) >= 0.9
    info = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert max(info["chosen"]["box"]) > 512  # boxes are in input pixels, not the shrunk working ones


# --- awkward inputs -------------------------------------------------------------------------


def test_exif_rotated_photo_is_read_upright(stage, plain_composites, tmp_path):
    rgb, truth = plain_composites[3]
    stored = np.ascontiguousarray(np.rot90(rgb, k=1))  # what the camera sensor wrote ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... and the tag that says "turn me 90 degrees clockwise to view"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    image = read_image(path)
    assert image.exif_rotated and image.input_size == (rgb.shape[1], rgb.shape[0])
    result = preprocess(image, stage)
    assert iou(result.mask, truth) >= 0.9


def test_grey_palette_and_16bit_inputs(stage, plain_composites, tmp_path):
    rgb, truth = plain_composites[4]
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    for name, image in [("grey.png", Image.fromarray(grey)),
                        ("palette.png", Image.fromarray(rgb).quantize(64)),
                        ("grey16.png", Image.fromarray(grey.astype(np.uint16) * 257))]:
        image.save(tmp_path / name)
        loaded = read_image(tmp_path / name)
        assert loaded.rgb.dtype == np.uint8 and loaded.rgb.shape == rgb.shape, name
        assert loaded.alpha is None
        if name == "grey16.png":  # scaled from 16 to 8 bits, not clipped at 255
            assert np.abs(loaded.rgb[..., 0].astype(int) - grey).max() <= 1
        result = preprocess(loaded, stage)
        assert result.mask.shape == truth.shape
    assert read_image(tmp_path / "grey.png").rgb.std() > 0


def test_rgba_input_uses_its_alpha_as_the_mask(stage, tmp_path):
    obj = load_object("toy", 7)
    canvas = np.zeros((300, 260, 4), np.float32)
    canvas[40:40 + obj.shape[0], 70:70 + obj.shape[1]] = obj
    path = save(tmp_path / "cutout.png", (canvas * 255 + 0.5).astype(np.uint8))
    result = preprocess(read_image(path), stage)
    assert np.array_equal(result.mask, canvas[..., 3] * 255 + 0.5 >= 128)
    assert result.chosen is None and "alpha" in result.notes[0]
    settings = load_settings({"use_alpha": False})
    assert preprocess(read_image(path), Preprocessor(settings)).chosen == 0  # segmented instead


def test_a_stray_translucent_pixel_does_not_make_a_photo_a_cutout(stage, plain_composites, tmp_path):
    rgb, truth = plain_composites[0]
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[5, 5, 3] = 250  # one pixel off fully opaque: an editor's leftover, not a cut-out
    result = preprocess(read_image(save(tmp_path / "speck.png", rgba)), stage)
    assert result.chosen == 0 and iou(result.mask, truth) >= 0.9
    assert any("only 0.0% of its pixels are transparent" in note for note in result.notes)
    # Transparent rounded corners (a few % of the picture): still a photo, not a cut-out.
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    r = int(0.15 * min(h, w))
    cx, cy = np.clip(xx, r, w - 1 - r), np.clip(yy, r, h - 1 - r)
    rgba[..., 3] = np.where(np.hypot(xx - cx, yy - cy) > r, 0, 255)
    assert (rgba[..., 3] == 0).mean() > 0.01
    result = preprocess(read_image(save(tmp_path / "rounded.png", rgba)), stage)
    assert result.chosen == 0 and iou(result.mask, truth) >= 0.9
    assert any("spans the whole picture" in note for note in result.notes)


def test_cutout_keeps_its_soft_alpha_and_may_touch_the_border(stage, tmp_path):
    canvas = np.zeros((200, 200, 4), np.uint8)
    canvas[..., :3] = (200, 40, 40)
    canvas[60:200, 50:100, 3] = 255  # opaque, standing on the bottom edge
    canvas[60:200, 100:150, 3] = 100  # a translucent part (glass): under 128, yet part of the cut-out
    result = preprocess(read_image(save(tmp_path / "cutout.png", canvas)), stage)
    assert result.chosen is None and result.unsure == []  # touching the border is no doubt for a cut-out
    alpha = result.rgba[..., 3].astype(int)
    assert (np.abs(alpha - 100) <= 3).sum() > 2000  # carried through, not thresholded to 0
    assert alpha.max() == 255


def test_large_jpeg_is_decoded_small_but_outputs_stay_in_input_pixels(tmp_path, plain_composites):
    rgb, truth = plain_composites[2]
    big = cv2.resize(rgb, (rgb.shape[1] * 4, rgb.shape[0] * 4), interpolation=cv2.INTER_LINEAR)
    big_truth = cv2.resize(truth.astype(np.uint8), big.shape[1::-1], interpolation=cv2.INTER_NEAREST) > 0
    settings = load_settings({"max_side": 256})  # decoded at 1/2 or 1/4: at least 512 px on the longer side
    result = preprocess_file(save(tmp_path / "big.jpg", big, quality=90), settings, tmp_path / "out")
    assert result.image.scale <= 0.5 and max(result.image.rgb.shape[:2]) >= 512
    assert result.image.input_size == (big.shape[1], big.shape[0])
    assert result.mask.shape == big.shape[:2] and iou(result.mask, big_truth) >= 0.9
    assert Image.open(tmp_path / "out" / "mask.png").size == (big.shape[1], big.shape[0])
    x0, y0, x1, y1 = json.loads((tmp_path / "out" / "detections.json").read_text())["chosen"]["box"]
    tx0, ty0, tx1, ty1 = mask_box(big_truth)
    assert max(abs(x0 - tx0), abs(y0 - ty0), abs(x1 - tx1), abs(y1 - ty1)) < 24  # input pixels, 4x the photo's
    assert any("decoded at" in note for note in result.notes)


def test_pixel_limits(tmp_path, monkeypatch):
    import gen3d_plugins.photo_io as photo_io

    path = save(tmp_path / "photo.png", np.full((100, 120, 3), 90, np.uint8))
    # PIL's own guard (here lowered to 1000 px; ~179 MP by default) does not refuse big photos ...
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert read_image(path).input_size == (120, 100)
    assert Image.MAX_IMAGE_PIXELS == 1000  # ... and is restored after reading
    # ... ours does, in one line that says why.
    monkeypatch.setattr(photo_io, "MAX_PIXELS", 10000)
    with pytest.raises(DataError, match=r"photo.png: the image is too large to read \(120x100"):
        read_image(path)


def test_folder_and_dark_16bit_inputs(tmp_path):
    with pytest.raises(DataError, match="is a folder, not an image file"):
        read_image(tmp_path)
    dark = np.tile(np.arange(0, 256, dtype=np.uint16), (16, 1))  # a 16-bit picture whose values are all <= 255
    Image.fromarray(dark).save(tmp_path / "dark16.png")
    loaded = read_image(tmp_path / "dark16.png")
    assert loaded.rgb.max() <= 1  # 255 of 65535 is nearly black, not white


@pytest.mark.parametrize("content, message", [
    (None, "no such image file"),
    (b"", "cannot read image"),
    (b"this is not a picture", "cannot read image"),
    ("truncated", "cannot read image"),
    ("transparent", "fully transparent"),
    ("blank", "no object found"),
])
def test_bad_inputs_are_clear_errors(stage, tmp_path, content, message):
    path = tmp_path / "bad.png"
    if content == "truncated":
        save(tmp_path / "whole.jpg", np.full((64, 64, 3), 128, np.uint8), quality=90)
        path.write_bytes((tmp_path / "whole.jpg").read_bytes()[:200])
    elif content == "transparent":
        save(path, np.zeros((32, 32, 4), np.uint8))
    elif content == "blank":
        save(path, np.full((200, 300, 3), 200, np.uint8))
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message) as caught:
        preprocess_file(path, stage.settings, tmp_path / "out", stage=stage)
    assert str(path) in str(caught.value)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["preprocess", str(tmp_path / "missing.jpg")]) == 2
    assert main(["preprocess", str(tmp_path / "missing.jpg"), "fill=1.5"]) == 2
    assert main(["preprocess", str(tmp_path / "missing.jpg"), "--detector", "grabcat"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].endswith("missing.jpg: no such image file")
    assert "fill must be in (0, 1], got 1.5" in lines[1]
    assert "unknown preprocessor 'grabcat'. Did you mean 'grabcut'?" in lines[2]
    assert len(lines) == 3


def test_out_that_is_a_file_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import gen3d_plugins.preprocess_stage as stage_module

    photo = save(tmp_path / "photo.png", np.full((64, 64, 3), 90, np.uint8))
    taken = tmp_path / "taken"
    taken.write_text("not a folder")

    def never(*args, **kwargs):
        raise AssertionError("the photo was read before the output folder was checked")

    monkeypatch.setattr(stage_module, "read_image", never)
    monkeypatch.setattr(stage_module, "Preprocessor", never)
    with pytest.raises(DataError, match="taken: the output folder is an existing file"):
        preprocess_file(photo, load_settings({}), taken)
    with pytest.raises(DataError, match=r"taken/sub: cannot make the output folder"):
        preprocess_file(photo, load_settings({}), taken / "sub")
    assert main(["preprocess", str(photo), "--out", str(taken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gen3d: error: ") and str(taken) in err[0]
    assert taken.read_text() == "not a folder"


def test_a_failed_run_leaves_no_earlier_outputs_behind(stage, plain_composites, tmp_path):
    out = tmp_path / "out"
    (out).mkdir()
    (out / "notes.txt").write_text("mine")
    preprocess_file(save(tmp_path / "good.png", plain_composites[0][0]), stage.settings, out, stage=stage)
    assert {"rgba.png", "mask.png", "detections.json"} <= {p.name for p in out.iterdir()}
    blank = save(tmp_path / "blank.png", np.full((200, 300, 3), 200, np.uint8))
    with pytest.raises(DataError, match="no object found"):
        preprocess_file(blank, stage.settings, out, stage=stage)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # nothing stale, nothing else touched


def test_settings_are_checked_before_any_work():
    with pytest.raises(ConfigError, match="pick: expected one of 'score', 'largest'"):
        load_settings({"pick": "biggest"})
    with pytest.raises(ConfigError, match="segmenter.itterations: unknown key 'itterations'. Did you mean 'iterations'"):
        load_settings({"segmenter": {"type": "grabcut", "itterations": 3}})


class DepthOnly:
    """A test plugin: a preprocessor that can only estimate depth (a constant plane)."""

    @gen3d.hookimpl
    def gen3d_preprocessors(self):
        from dataclasses import make_dataclass

        config = make_dataclass("FlatDepthConfig", [], namespace={"ROLES": ("depth",)})
        return [Component("flat-depth", lambda config, role: FlatDepth(), config, "test depth")]


class FlatDepth:
    def estimate_depth(self, image):
        h, w = image.shape[:2]
        return DepthMap(np.tile(np.linspace(0, 1, w, dtype=np.float32), (h, 1)), (0.0, 1.0), "flat")


@pytest.fixture
def depth_plugin(register):
    register(DepthOnly())


def test_role_mismatch_is_named_and_depth_is_written(depth_plugin, plain_composites, tmp_path):
    with pytest.raises(ConfigError, match="detector: 'flat-depth' is a depth, not a detector. Detectors: .*grabcut"):
        Preprocessor(load_settings({"detector": "flat-depth"}))
    with pytest.raises(ConfigError, match="depth: 'grabcut' is a detector and segmenter, not a depth"):
        Preprocessor(load_settings({"depth": "grabcut"}))
    rgb, _ = plain_composites[5]
    out = tmp_path / "out"
    preprocess_file(save(tmp_path / "p.png", rgb), load_settings({"depth": "flat-depth"}), out)
    depth = np.load(out / "depth.npy")
    assert depth.shape == rgb.shape[:2] and depth.dtype == np.float32
    assert Image.open(out / "depth.png").size == (rgb.shape[1], rgb.shape[0])
    info = json.loads((out / "detections.json").read_text())
    assert "1/z = s*depth + t" in info["depth"]["convention"]
    # A second run without depth must not leave the first run's depth behind.
    preprocess_file(tmp_path / "p.png", load_settings({}), out)
    assert not (out / "depth.npy").exists()
