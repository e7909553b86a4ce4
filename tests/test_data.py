"""The multi-view loader: both camera conventions, odd images, and clear errors for bad data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from gen3d.cameras import look_at
from gen3d.errors import DataError
from gen3d_plugins.nerf_data import NerfDataConfig, estimate_box, load, read_rgba


def poses(n, radius=4.0, center=(0.0, 0.0, 0.0)):
    out = []
    for i in range(n):
        az, el = 2 * math.pi * i / n, math.radians(20 + 10 * (i % 3))
        eye = torch.tensor(center) + radius * torch.tensor(
            [math.cos(az) * math.cos(el), math.sin(az) * math.cos(el), math.sin(el)])
        out.append(look_at(eye, torch.tensor(center)).tolist())
    return out


def write_image(path, size=16, mode="RGBA"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(0).integers(0, 255, (size, size, 4), dtype=np.uint8)
    Image.fromarray(arr, "RGBA").convert(mode).save(path)


def nerf_synthetic(root, n_train=6, n_test=2, size=16):
    for split, n in (("train", n_train), ("test", n_test)):
        frames = []
        for i, pose in enumerate(poses(n)):
            write_image(root / split / f"r_{i}.png", size)
            frames.append({"file_path": f"./{split}/r_{i}", "transform_matrix": pose})
        (root / f"transforms_{split}.json").write_text(json.dumps({"camera_angle_x": 0.69, "frames": frames}))
    return root


def test_nerf_synthetic_layout(tmp_path):
    data = load(NerfDataConfig(path=nerf_synthetic(tmp_path)))
    assert data.train.images.shape == (6, 16, 16, 4) and data.test.images.shape == (2, 16, 16, 4)
    assert data.train.cameras.fx[0] == pytest.approx(0.5 * 16 / math.tan(0.345))
    assert data.has_alpha
    # Estimated box: centred on the point all cameras look at, inside the nearest camera's view.
    centre = (data.aabb[:3] + data.aabb[3:]) / 2
    assert torch.allclose(centre, torch.zeros(3), atol=1e-4)
    assert 0.5 < float(data.aabb[3]) < 2.0


def test_instant_ngp_layout_with_intrinsics_and_holdout(tmp_path):
    frames = []
    for i, pose in enumerate(poses(16)):
        write_image(tmp_path / "images" / f"{i:03d}.jpg", 20, mode="RGB")
        frames.append({"file_path": f"images/{i:03d}.jpg", "transform_matrix": pose})
    (tmp_path / "transforms.json").write_text(json.dumps(
        {"fl_x": 40.0, "fl_y": 42.0, "cx": 10.5, "cy": 9.5, "w": 20, "h": 20, "frames": frames}))
    data = load(NerfDataConfig(path=tmp_path, aabb=[-1, -1, -1, 1, 1, 1], downscale=2))
    assert len(data.train.names) == 14 and len(data.test.names) == 2
    assert data.train.images.shape[1:] == (10, 10, 4)
    assert float(data.train.cameras.fx[0]) == pytest.approx(20.0) and float(data.train.cameras.cy[0]) == pytest.approx(4.75)
    assert not data.has_alpha
    assert data.aabb.tolist() == [-1, -1, -1, 1, 1, 1]


def test_sixteen_bit_grayscale_and_palette_images(tmp_path):
    gray16 = tmp_path / "g16.png"
    Image.fromarray((np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)).save(gray16)
    arr = read_rgba(gray16)
    assert arr.shape == (8, 8, 4) and arr.dtype == np.float32
    assert arr[..., 0].max() == pytest.approx(63000 / 65535, abs=1e-4)
    palette = tmp_path / "p.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).convert("P").save(palette)
    assert read_rgba(palette).shape == (8, 8, 4)


def test_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="data set folder not found"):
        load(NerfDataConfig(path=tmp_path / "nope"))
    with pytest.raises(DataError, match="no transforms_train.json"):
        load(NerfDataConfig(path=tmp_path))
    root = nerf_synthetic(tmp_path / "a")
    (root / "train" / "r_3.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"r_3.png: cannot read image"):
        load(NerfDataConfig(path=root))
    (root / "train" / "r_3.png").unlink()
    with pytest.raises(DataError, match=r"image './train/r_3' not found"):
        load(NerfDataConfig(path=root))
    (root / "transforms_test.json").write_text("{broken")
    with pytest.raises(DataError, match="transforms_test.json: not valid JSON"):
        load(NerfDataConfig(path=root))


def test_bad_pose_and_size_mismatch(tmp_path):
    root = nerf_synthetic(tmp_path / "a")
    meta = json.loads((root / "transforms_train.json").read_text())
    meta["frames"][1]["transform_matrix"] = [[1, 0], [0, 1]]
    (root / "transforms_train.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="transform_matrix must be a finite 4x4"):
        load(NerfDataConfig(path=root))
    root = nerf_synthetic(tmp_path / "b")
    write_image(root / "train" / "r_2.png", size=24)
    with pytest.raises(DataError, match="r_2.png: size 24x24 differs"):
        load(NerfDataConfig(path=root))


def test_estimate_box_follows_off_centre_cameras():
    c2w = torch.tensor(poses(12, radius=3.0, center=(1.0, -2.0, 0.5)))
    from gen3d.cameras import Cameras

    cams = Cameras(c2w, torch.full((12,), 50.0), torch.full((12,), 50.0), torch.full((12,), 32.0),
                   torch.full((12,), 32.0), 64, 64)
    box = estimate_box(cams)
    assert torch.allclose((box[:3] + box[3:]) / 2, torch.tensor([1.0, -2.0, 0.5]), atol=1e-3)


def test_blender_renders_load_with_matching_cameras(blender, tmp_path):
    """Our loader against what Blender itself writes (assets/blender_dataset.py): the ground-truth
    mesh, projected through the loaded cameras, lands on the rendered silhouettes."""
    import subprocess

    import trimesh

    from conftest import ROOT

    proc = subprocess.run([blender, "-b", "--factory-startup", "--python", str(ROOT / "assets" / "blender_dataset.py"),
                           "--", "--object", "spot", "--texture", "none", "--size", "48", "--train", "4", "--val", "1",
                           "--test", "1", "--samples", "64", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "wrote 4/1/1 views" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = load(NerfDataConfig(path=tmp_path))
    assert data.has_alpha and data.train.images.shape == (4, 48, 48, 4)
    points, _ = trimesh.sample.sample_surface(trimesh.load(tmp_path / "mesh.ply"), 20000, seed=0)
    vertices = torch.tensor(points, dtype=torch.float32)
    box = data.aabb
    assert bool(((vertices >= box[:3]) & (vertices <= box[3:])).all())  # the estimated box holds the object
    cams = data.train.cameras
    for i in range(4):
        local = (vertices - cams.c2w[i, :3, 3]) @ cams.c2w[i, :3, :3]  # world -> camera (OpenGL: looks down -z)
        u = cams.cx[i] + cams.fx[i] * local[:, 0] / -local[:, 2]
        v = cams.cy[i] - cams.fy[i] * local[:, 1] / -local[:, 2]
        alpha = data.train.images[i, ..., 3]
        hit = alpha[v.long().clamp(0, 47), u.long().clamp(0, 47)]
        # Every surface point on the object's pixels (flipping v leaves 15 % off them, a -0.5 pixel shift 2 %).
        assert (hit > 0).float().mean() > 0.999
        covered = torch.zeros(48, 48, dtype=torch.bool)
        covered[v.long().clamp(0, 47), u.long().clamp(0, 47)] = True
        assert (covered[alpha > 0.5]).float().mean() > 0.9  # and the object's pixels all reached
