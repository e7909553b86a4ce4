"""Progressive scene generation's geometry (gen3d.scene), the shipped analytic room and scene-teacher."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

import gen3d
from gen3d import ConfigError, DataError, Gen3DError
from gen3d.scene import (AlignConfig, AnalyticScene, PinholeConfig, SplatConfig, TrajectoryConfig, align_depth,
                         coverage, holes, load_poses, pinhole, project, ray_to_z, trajectory, unproject, warp,
                         z_to_ray)
from gen3d_plugins.scene_teacher import SceneTeacher, SceneTeacherConfig

ROOT = Path(__file__).resolve().parents[1]
SCENE = ROOT / "assets" / "scene"
SMALL = PinholeConfig(60.0, 64, 64)


def load_generator():
    spec = importlib.util.spec_from_file_location("make_scene", ROOT / "assets" / "make_scene.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def room() -> AnalyticScene:
    return AnalyticScene.load(SCENE)


@pytest.fixture(scope="module")
def teacher() -> SceneTeacher:
    return SceneTeacher(SceneTeacherConfig(supersample=1))


def plane_camera(x: float = 0.0, z: float = 0.0, width: int = 64, fov: float = 90.0):
    """A camera at (x, 0, z) looking down -z (identity rotation), for fronto-parallel planes."""
    c2w = torch.eye(4)
    c2w[0, 3], c2w[2, 3] = x, z
    return pinhole(c2w, PinholeConfig(fov, width, width))


# --- cameras -----------------------------------------------------------------------------------


def test_unproject_then_project_returns_the_pixel_centres(room):
    camera = room.start_camera(SMALL)
    _, depth = room.render(camera)
    u, v, z = project(unproject(depth, camera), camera)
    cols, rows = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="xy")
    assert torch.allclose(u, cols, atol=1e-3) and torch.allclose(v, rows, atol=1e-3)
    assert torch.allclose(z, depth, rtol=1e-5)
    assert torch.allclose(ray_to_z(z_to_ray(depth, camera), camera), depth)


@pytest.mark.parametrize("make, key", [
    (lambda: PinholeConfig(fov_deg=0.0), "fov_deg"),
    (lambda: PinholeConfig(width=4), "width"),
    (lambda: SplatConfig(max_footprint=9), "max_footprint"),
    (lambda: SplatConfig(min_neighbours=0), "min_neighbours"),
    (lambda: AlignConfig(grid=1), "grid"),
    (lambda: AlignConfig(max_depth_ratio=1.0), "max_depth_ratio"),
    (lambda: SceneTeacherConfig(scale_range=[2.0, 1.0]), "scale_range"),
    (lambda: SceneTeacherConfig(supersample=0), "supersample"),
])
def test_settings_errors_are_one_line_naming_the_key(make, key):
    with pytest.raises(ValueError, match=key) as info:
        make()
    assert "\n" not in str(info.value)


# --- warping -----------------------------------------------------------------------------------


def test_warping_a_view_to_its_own_pose_is_the_identity(room):
    camera = room.start_camera(SMALL)
    rgb, depth = room.render(camera)
    image, warped_depth, valid = warp(rgb, depth, camera, camera)
    assert valid.float().mean() == 1.0  # every pixel lands on itself
    assert torch.equal(image[valid], rgb[valid])
    assert torch.allclose(warped_depth[valid], depth[valid], rtol=1e-5)
    left = torch.zeros(64, 64, dtype=torch.bool)
    left[:, :32] = True
    assert torch.equal(warp(rgb, depth, camera, camera, valid=left).valid, left)  # only the pixels asked for


@pytest.mark.parametrize("baseline", [0.5, 0.3])  # 8 px (whole) and 4.8 px (fractional) at f = 32, z = 2
def test_a_sideways_translation_moves_a_fronto_parallel_plane_by_f_b_over_z(baseline):
    src, dst = plane_camera(), plane_camera(x=baseline)
    z, f = 2.0, float(src.fx[0])
    depth = torch.full((64, 64), z)
    column = (torch.arange(64, dtype=torch.float32) + 0.5).expand(64, 64)[..., None]  # each pixel's own u
    image, warped_depth, valid = warp(column, depth, src, dst)
    disparity = f * baseline / z
    centres = (torch.arange(64, dtype=torch.float32) + 0.5).expand(64, 64)
    shift = image[..., 0] - centres
    # The camera moved right: the plane moved left by the disparity. A source centre lands in the
    # pixel that contains it, so every pixel shows the one source pixel within half a pixel of
    # its centre plus the disparity: a shift of round(f b / z) pixels, everywhere.
    whole = math.floor(disparity + 0.5)
    assert torch.equal(shift[valid], torch.full_like(shift[valid], float(whole)))
    assert torch.allclose(warped_depth[valid], depth[valid])
    # The holes are the columns at the right edge that the source never saw, as many as that shift.
    assert valid[:, : 64 - whole].all() and not valid[:, 64 - whole:].any()


def test_footprints_close_the_gaps_of_a_magnified_surface():
    src, dst = plane_camera(), plane_camera(z=-0.7)  # 0.7 nearer a plane 2 away: magnified 1.54x
    depth = torch.full((64, 64), 2.0)
    rgb = torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(0))
    plain = warp(rgb, depth, src, dst, config=SplatConfig(footprints=False, close_pinholes=False))
    closed = warp(rgb, depth, src, dst)
    assert plain.holes.float().mean() > 0.3  # one point a pixel leaves a regular grid of gaps
    assert closed.valid.all()  # the plane fills the destination's whole view
    assert torch.allclose(closed.depth, torch.full((64, 64), 1.3))


def test_footprints_do_not_bridge_a_disocclusion():
    """A near square in front of a far plane: moving sideways uncovers a strip behind its edge."""
    src, dst = plane_camera(), plane_camera(x=0.3)
    depth = torch.full((64, 64), 4.0)
    depth[16:48, 16:48] = 1.0
    warped = warp(torch.rand(64, 64, 3), depth, src, dst)
    # The near square moves 32 * 0.3 / 1 = 9.6 px left, the far plane 2.4 px: about 7 columns uncovered.
    uncovered = warped.holes[20:44, 30:60].sum(1)
    assert (uncovered >= 6).all() and (uncovered <= 8).all()


def test_holes_are_what_no_view_so_far_sees(room):
    start = room.start_camera(SMALL)
    poses = trajectory(TrajectoryConfig(), start.c2w[0])
    right, up_right = pinhole(poses[1], SMALL), pinhole(poses[2], SMALL)
    depth = [room.render(c)[1] for c in (start, right)]
    assert not holes([depth[0]], [start], start).any()
    only_start = holes(depth[:1], [start], up_right)
    both = holes(depth, [start, right], up_right)
    assert both.sum() < only_start.sum() and not (both & ~only_start).any()
    # What is known is where the scene really is: the union's depth matches the truth there, up to
    # the depth change within half a pixel (a splat keeps its point's depth, not the pixel centre's).
    known = coverage(depth, [start, right], up_right)
    truth = room.render(up_right)[1]
    error = ((known.depth - truth).abs() / truth)[known.valid]
    assert float(error.median()) < 0.005 and float((error > 0.05).float().mean()) < 0.03  # edges


# --- depth alignment ---------------------------------------------------------------------------


def smooth_depth(size: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, 6, 6, generator=g)
    field = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0, 0]
    return 1.0 + 4.0 * (field - field.min()) / (field.max() - field.min())  # 1 to 5 units


def test_alignment_recovers_a_known_scale_and_shift_exactly():
    z = smooth_depth()
    s, t = 0.37, 0.05
    disparity = (1 / z - t) / s  # so that 1 / z = s d + t
    mask = torch.zeros_like(z, dtype=torch.bool)
    mask[:, :60] = True  # known on the left, a "hole" on the right
    result = align_depth(disparity, torch.where(mask, z, torch.zeros_like(z)), mask)
    assert result.scale == pytest.approx(s, rel=1e-6) and result.shift == pytest.approx(t, rel=1e-5)
    assert torch.allclose(result.depth, z, rtol=1e-5)  # the hole too
    assert result.error < 1e-6 and result.inliers == 1.0


def test_alignment_is_within_one_percent_under_five_percent_outliers():
    z = smooth_depth(seed=1)
    s, t = 2.5, -0.1
    disparity = (1 / z - t) / s
    g = torch.Generator().manual_seed(2)
    bad = torch.rand(z.shape, generator=g) < 0.05
    disparity = torch.where(bad, disparity.max() * 2 * torch.rand(z.shape, generator=g), disparity)
    mask = torch.ones_like(z, dtype=torch.bool)
    result = align_depth(disparity, z, mask, AlignConfig(local=False))
    assert result.scale == pytest.approx(s, rel=0.01) and result.shift == pytest.approx(t, abs=0.01 * abs(s))
    assert result.error < 0.01
    # The outliers matter: a plain least-squares fit of the same pixels is off by more than that.
    design = torch.stack([disparity[mask], torch.ones(int(mask.sum()))], -1).double()
    plain = torch.linalg.lstsq(design, (1 / z[mask]).double()[:, None]).solution[:, 0]
    assert abs(float(plain[0]) - s) > 0.01 * s


def test_the_local_correction_removes_a_smooth_distortion():
    z = smooth_depth(seed=3)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 96), torch.linspace(-1, 1, 96), indexing="ij")
    warped = z * (1 + 0.08 * xx * yy)  # a low-frequency error no affine map of disparity can undo
    disparity = 2.0 / warped + 0.3
    result = align_depth(disparity, z, torch.ones_like(z, dtype=torch.bool))
    assert result.global_error > 0.01
    assert result.error < result.global_error / 3


def test_alignment_refuses_depth_that_grows_with_distance():
    z = smooth_depth()
    with pytest.raises(ValueError, match="not inverse depth") as info:
        align_depth(z * 3.0, z, torch.ones_like(z, dtype=torch.bool))  # a metric model's output
    assert "\n" not in str(info.value)


# --- trajectories ------------------------------------------------------------------------------


def test_forward_trajectory_turns_and_moves_toward_its_eight_directions(room):
    start = room.start_camera().c2w[0]
    config = TrajectoryConfig(translation=0.2, rotation_deg=10.0)
    poses = trajectory(config, start)
    assert poses.shape == (9, 4, 4) and torch.equal(poses[0], start)
    for k, pose in enumerate(poses[1:]):
        angle = math.radians(45 * k)
        along = torch.tensor([math.cos(angle), math.sin(angle), 0.0])  # in the start camera's axes
        moved = start[:3, :3].T @ (pose[:3, 3] - start[:3, 3])
        assert torch.allclose(moved, 0.2 * along, atol=1e-5)
        look = start[:3, :3].T @ -pose[:3, 2]  # the new viewing direction, in the start camera's axes
        assert math.degrees(math.acos(float(-look[2]))) == pytest.approx(10.0, abs=1e-3)
        assert float(look[:2] @ along[:2]) > 0.17  # sin(10 deg): it turned that way
        assert torch.allclose(pose[:3, :3].T @ pose[:3, :3], torch.eye(3), atol=1e-5)


def test_circle_trajectory_turns_on_the_spot_or_around_a_centre(room):
    start = room.start_camera().c2w[0]
    poses = trajectory(TrajectoryConfig(kind="circle", views=8), start)
    assert len(poses) == 8 and torch.allclose(poses[0], start)
    assert torch.allclose(poses[:, :3, 3], start[:3, 3].expand(8, 3))
    yaw = [math.degrees(math.atan2(float(-p[1, 2]), float(-p[0, 2]))) for p in poses]
    steps = [(b - a) % 360 for a, b in zip(yaw, yaw[1:])]
    assert steps == pytest.approx([45.0] * 7, abs=1e-3)
    wide = trajectory(TrajectoryConfig(kind="circle", views=4, radius=0.5), start)
    centre = start[:3, 3] - 0.5 * torch.nn.functional.normalize(torch.cat([-start[:2, 2], torch.zeros(1)]), dim=0)
    assert torch.allclose(wide[0], start, atol=1e-6)
    assert torch.allclose((wide[:, :3, 3] - centre).norm(dim=-1), torch.full((4,), 0.5), atol=1e-5)


def test_trajectory_file_is_read(tmp_path, room):
    start = room.start_camera().c2w[0]
    poses = trajectory(TrajectoryConfig(), start)
    listed = tmp_path / "poses.json"
    listed.write_text(json.dumps(poses.tolist()))
    frames = tmp_path / "transforms.json"
    frames.write_text(json.dumps({"frames": [{"transform_matrix": p} for p in poses.tolist()]}))
    for path in (listed, frames):
        assert torch.allclose(trajectory(TrajectoryConfig(kind="file", path=path), start), poses)


@pytest.mark.parametrize("bad, words", [
    ([[1, 0, 0], [0, 1, 0], [0, 0, 1]], "4x4 matrix"),
    ([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, float("nan")], [0, 0, 0, 1]], "non-finite"),
    ([[2, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], "not orthonormal"),
    ([[-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], "reflection"),
    ([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], "last row"),
    ("eye", "4x4 list of numbers"),
])
def test_a_malformed_pose_is_one_line_naming_the_file_and_pose(tmp_path, bad, words):
    path = tmp_path / "poses.json"
    good = torch.eye(4).tolist()
    path.write_text(json.dumps([good, bad]))  # json writes NaN, and reads it back
    with pytest.raises(DataError) as info:
        load_poses(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "pose 1" in message and words in message


def test_trajectory_config_errors_are_one_line():
    for kwargs, key in [({"kind": "spiral"}, "kind"), ({"views": 1}, "views"), ({"kind": "file"}, "path"),
                        ({"rotation_deg": 120}, "rotation_deg")]:
        with pytest.raises(ValueError, match=key) as info:
            TrajectoryConfig(**kwargs)
        assert "\n" not in str(info.value)


# --- the shipped scene -------------------------------------------------------------------------


def test_the_shipped_scene_is_what_its_generator_writes(room):
    generator = load_generator()
    assert AnalyticScene.from_dict(generator.layout()).to_dict() == room.to_dict()
    assert sum(p.stat().st_size for p in SCENE.iterdir()) < 400_000


@pytest.mark.parametrize("change, words", [
    (lambda d: d["objects"].append({"type": "cone"}), "objects[7].type"),
    (lambda d: d["objects"][1].update(radius=-1), "objects[1].radius"),
    (lambda d: d["objects"][0]["texture"].update(colors=[[2, 0, 0]]), "objects[0].texture.colors"),
    (lambda d: d["room"].update(max=[1, 1, -1]), "room"),
    (lambda d: d["camera"].update(c2w=[[1, 0], [0, 1]]), "camera.c2w"),
])
def test_a_malformed_scene_is_one_line_naming_the_file_and_key(tmp_path, change, words):
    data = json.loads((SCENE / "scene.json").read_text())
    change(data)
    path = tmp_path / "scene.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError) as info:
        AnalyticScene.load(tmp_path)
    assert "\n" not in str(info.value) and str(path) in str(info.value) and words in str(info.value)


def test_the_renderer_agrees_with_the_ground_truth_mesh(room):
    mesh = trimesh.load(SCENE / "mesh.ply", process=False)
    camera = room.start_camera(SMALL)
    _, depth = room.render(camera)
    pixels = torch.randperm(64 * 64, generator=torch.Generator().manual_seed(0))[:150]
    origins, dirs = camera.rays(torch.zeros_like(pixels), (pixels % 64).float() + 0.5, (pixels // 64).float() + 0.5)
    rendered = (z_to_ray(depth, camera).reshape(-1)[pixels]).numpy()
    cast, _ = load_generator().mesh_depth(mesh, origins.double().numpy(), dirs.double().numpy())
    diff = np.abs(cast - rendered)
    # Planes agree to float precision; the sphere's and cylinder's facets sit within a millimetre
    # (more along rays that graze them).
    assert np.median(diff) < 1e-5 and np.quantile(diff, 0.9) < 1e-3 and diff.max() < 0.02 * room.size


def test_the_mesh_faces_the_viewer(room):
    """The room's faces point inward and the objects' outward: every face a camera in the room
    sees first along a ray is a front face, so the mesh looks right with back faces culled."""
    mesh = trimesh.load(SCENE / "mesh.ply", process=False)
    poses = trajectory(TrajectoryConfig(kind="circle", views=4), room.start_camera().c2w[0])
    for pose in poses:
        camera = pinhole(pose, PinholeConfig(90.0, 8, 8))
        origins, dirs = camera.image_rays(0)
        _, face = load_generator().mesh_depth(mesh, origins.double().numpy(), dirs.double().numpy())
        assert (face >= 0).all()
        assert ((mesh.face_normals[face] * dirs.numpy()).sum(-1) < 0).all()


# --- scene-teacher -----------------------------------------------------------------------------


def test_the_teacher_is_registered_with_its_roles():
    component = gen3d.registry().get("preprocessor", "scene-teacher")
    assert set(gen3d.preprocessor_roles(component.config)) == {"text-to-image", "inpainter", "depth"}
    built = component.factory(SceneTeacherConfig(supersample=1), role="inpainter")
    for role in ("text-to-image", "inpainter", "depth"):
        assert isinstance(built, gen3d.PREPROCESSOR_ROLES[role])


def test_the_teachers_text_to_image_is_the_start_view(teacher, room):
    start = teacher.start_camera(SMALL)
    image = teacher.generate("a cosy living room", 0, start)
    assert image.shape == (64, 64, 3) and image.dtype == np.float32
    assert np.array_equal(image, room.render(start)[0].numpy())
    other = pinhole(trajectory(TrajectoryConfig(), start.c2w[0])[1], SMALL)
    with pytest.raises(Gen3DError, match="start camera") as info:
        teacher.generate("a cosy living room", 0, other)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="prompt is empty"):
        teacher.generate("  ", 0, start)


def test_the_teachers_inpainter_changes_only_masked_pixels(teacher, room):
    camera = pinhole(trajectory(TrajectoryConfig(), teacher.start_camera().c2w[0])[3], SMALL)
    g = np.random.default_rng(0)
    image = g.random((64, 64, 3)).astype(np.float32)
    mask = g.random((64, 64)) < 0.3
    out = teacher.inpaint(image, mask, "a cosy living room", 7, camera)
    assert out.dtype == image.dtype
    assert np.array_equal(out[~mask], image[~mask])  # bit for bit
    truth = room.render(camera)[0].numpy()
    assert np.array_equal(out[mask], truth[mask]) and not np.array_equal(out[mask], image[mask])
    with pytest.raises(Gen3DError, match="bool"):
        teacher.inpaint(image, mask.astype(np.float32), "a room", 0, camera)
    with pytest.raises(Gen3DError, match="needs the view's camera"):
        teacher.inpaint(image, mask, "a room", 0)


def test_the_teachers_depth_is_disparity_under_an_unknown_scale_and_shift(teacher, room):
    poses = trajectory(TrajectoryConfig(), teacher.start_camera().c2w[0])
    cams = [pinhole(p, SMALL) for p in poses[:3]]
    estimates = [teacher.estimate(np.zeros((64, 64, 3), np.float32), c) for c in cams]
    assert np.array_equal(estimates[0], teacher.estimate(np.zeros((64, 64, 3), np.float32), cams[0]))  # resumable
    draws = {teacher.affine(c) for c in cams}
    assert len(draws) == 3  # a new unknown map for every view
    for camera, estimate in zip(cams, estimates):
        truth = room.render(camera)[1]
        aligned = align_depth(torch.from_numpy(estimate), truth, torch.ones_like(truth, dtype=torch.bool))
        assert aligned.error < 1e-5
    depth_map = teacher.estimate_depth(np.zeros((64, 64, 3), np.uint8), camera=cams[0])
    assert depth_map.depth.min() == 0.0 and depth_map.depth.max() == 1.0
    assert depth_map.depth.reshape(-1)[room.render(cams[0])[1].reshape(-1).argmin()] == 1.0  # nearest is 1

