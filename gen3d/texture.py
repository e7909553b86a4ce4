"""Colour textures for meshes: a UV atlas by xatlas, colours baked into it texel by texel.

:func:`unwrap` charts and packs the mesh (xatlas splits vertices along chart seams);
:func:`bake` rasterises every triangle in UV space, turns each texel centre into a point on the
surface (and its normal), asks a colour function for its colour and pads the charts so that
filtered and mipmapped reads never see the empty space between them. The result is a
:class:`MeshTexture`, which a mesh carries in ``mesh.metadata[TEXTURE_KEY]`` (documented for
exporters in :func:`gen3d.hookspecs.gen3d_exporters`).
"""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from .errors import Gen3DError

TEXTURE_KEY = "gen3d_texture"
CHUNK = 1 << 18  # points per colour-function call: memory stays flat at any texture size
# Texels outside the triangles but within this distance (centre to centre) of a texel inside one
# take their colour from the nearest point of that texel's triangle, not from a copied
# neighbour: a bilinear read anywhere inside a chart reaches no farther into the padding.
EDGE_REACH = 2.25
# Empty space xatlas leaves around each chart, in texels: room for EDGE_REACH and for the
# first mipmap levels before two charts share a texel.
PADDING = 4

ColorFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class MeshTexture:
    """A mesh's colour texture.

    ``uv``: [N, 2] float32, one pair per vertex of the mesh that carries it, in 0..1, (0, 0) at
    the image's top-left corner, u to the right, v down (glTF's convention; OBJ and OpenGL put
    v = 0 at the bottom: they get 1 - v). ``image``: [H, W, 3] uint8, sRGB like every image,
    row 0 at the top.
    """

    uv: np.ndarray
    image: np.ndarray

    def __post_init__(self) -> None:
        if self.uv.ndim != 2 or self.uv.shape[1] != 2:
            raise ValueError(f"uv must be [N, 2], got shape {self.uv.shape}")
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise ValueError(f"image must be [H, W, 3] uint8, got {self.image.shape} {self.image.dtype}")


def texture_of(mesh) -> MeshTexture | None:
    """The texture ``mesh`` carries (None: vertex colours only); checked against its vertices."""
    texture = mesh.metadata.get(TEXTURE_KEY)
    if texture is not None and len(texture.uv) != len(mesh.vertices):
        raise Gen3DError(f"the mesh's texture has {len(texture.uv)} UVs for {len(mesh.vertices)} vertices: "
                         "a mesh edited after baking must be baked again")
    return texture


def unwrap(vertices: np.ndarray, faces: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A UV atlas of the mesh for a ``size`` x ``size`` texture: ``(vmapping, faces, uv)`` where
    new vertex i is old vertex ``vmapping[i]`` (seams split vertices), ``faces`` index the new
    vertices and ``uv`` [N, 2] are in 0..1 (v down, as in :class:`MeshTexture`).

    xatlas runs in a child process: on some meshes (an icosphere of 82 k faces here; users of
    TRELLIS and stable-dreamfusion report others) it crashes with a segmentation fault, which
    in this process would end the run without a word. The child's crash becomes a Gen3DError."""
    payload = io.BytesIO()
    np.savez(payload, vertices=np.ascontiguousarray(vertices, dtype=np.float32),
             faces=np.ascontiguousarray(faces, dtype=np.uint32), size=np.array(size))
    proc = subprocess.run([sys.executable, "-c", UNWRAP_SCRIPT], input=payload.getvalue(), capture_output=True)
    if proc.returncode != 0:
        why = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        if proc.returncode < 0:
            why = [f"it crashed (signal {-proc.returncode}), a known xatlas fault on some meshes"]
        raise Gen3DError(f"xatlas could not unwrap the mesh ({len(faces)} faces) into a texture atlas: {why[0]}; "
                         "try another export.target_faces or export.colors: vertex")
    result = np.load(io.BytesIO(proc.stdout))
    if int(result["atlas_count"]) != 1:
        raise Gen3DError(f"xatlas packed the mesh into {int(result['atlas_count'])} atlases, not one {size} px texture")
    # xatlas' atlas comes out near `size` but not at it (its chart scale is an estimate); the
    # texture is `size` square, a power of two for mipmaps, so the UVs are scaled to fit it.
    width, height = int(result["width"]), int(result["height"])
    scale = np.array([width, height], dtype=np.float64) / max(size, width, height)
    return (result["vmapping"].astype(np.int64), result["faces"].astype(np.int64),
            (result["uv"] * scale).astype(np.float32))


# Run by unwrap() in a child process (numpy and xatlas only): the mesh in, the atlas out, as .npz.
UNWRAP_SCRIPT = f"""
import io, sys
import numpy as np
import xatlas
mesh = np.load(io.BytesIO(sys.stdin.buffer.read()))
atlas = xatlas.Atlas()
atlas.add_mesh(mesh["vertices"], mesh["faces"])
pack = xatlas.PackOptions()
pack.resolution = int(mesh["size"])  # with texels_per_unit left 0, xatlas scales the charts to about this
pack.padding = {PADDING}
pack.bilinear = True
atlas.generate(pack_options=pack)
vmapping, faces, uv = atlas[0] if atlas.atlas_count == 1 else (np.zeros(0), np.zeros((0, 3)), np.zeros((0, 2)))
out = io.BytesIO()
np.savez(out, vmapping=vmapping, faces=faces, uv=uv, width=atlas.width, height=atlas.height,
         atlas_count=atlas.atlas_count)
sys.stdout.buffer.write(out.getvalue())
"""


def bake(vertices: np.ndarray, normals: np.ndarray, faces: np.ndarray, uv: np.ndarray, size: int,
         color_fn: ColorFn) -> np.ndarray:
    """The [size, size, 3] uint8 texture of ``color_fn`` over the mesh laid out by ``uv`` (0..1,
    v down): the texels of the triangles and of their rim (:func:`rasterize`) get the colour of
    their point on the surface, every other texel the colour of its nearest such texel."""
    texel, face, bary = rasterize(uv * size, faces, size, size)
    corners = faces[face]
    points = np.einsum("kc,kcd->kd", bary, vertices[corners])
    normal = np.einsum("kc,kcd->kd", bary, normals[corners])
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)
    flat = np.zeros((size * size, 3), dtype=np.float32)
    flat[texel] = colors_at(color_fn, points, normal)
    filled = np.zeros(size * size, dtype=bool)
    filled[texel] = True
    image = pad_charts(flat.reshape(size, size, 3), filled.reshape(size, size))
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def colors_at(color_fn: ColorFn, points: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """``color_fn`` at the points (outward unit normals beside them), in chunks, as [N, 3] floats in 0..1."""
    p = torch.as_tensor(np.ascontiguousarray(points), dtype=torch.float32)
    n = torch.as_tensor(np.ascontiguousarray(normals), dtype=torch.float32)
    with torch.no_grad():
        rgb = [color_fn(a, b).detach().float().cpu() for a, b in zip(p.split(CHUNK), n.split(CHUNK))]
    if not rgb:
        return np.zeros((0, 3), dtype=np.float32)
    return torch.cat(rgb).clamp(0, 1).numpy()


def pad_charts(image: np.ndarray, filled: np.ndarray) -> np.ndarray:
    """Every texel outside the charts takes the colour of its nearest texel inside one.

    Filling all the empty space (not a few texels' rim) keeps every mipmap level free of the
    background: a coarse level's texel averages only chart colours, whatever its size."""
    if filled.all() or not filled.any():
        return image
    _, (rows, cols) = ndimage.distance_transform_edt(~filled, return_indices=True)
    return image[rows, cols]


def rasterize(uv_px: np.ndarray, faces: np.ndarray, width: int, height: int,
              budget: int = 1 << 21) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The texels of a mesh laid out in texel units (``uv_px``; texel (x, y) spans [x, x+1] x
    [y, y+1]), as flat indices ``y * width + x``, each with a triangle and barycentrics: the
    texels whose centre lies in a triangle (that triangle, the centre's barycentrics), then the
    rim around them within EDGE_REACH (the triangle of the nearest covered texel, the
    barycentrics of its point nearest the rim texel's centre).

    Written here with numpy (no rasteriser library works in UV space on a CPU): every texel of
    each triangle's bounding box is a candidate, in chunks of at most ``budget`` candidates."""
    tri = uv_px[faces].astype(np.float64)  # [F, 3, 2]
    texel, face, bary = covered_texels(tri, width, height, budget)
    rim, rim_face, rim_bary = rim_texels(texel, face, tri, width, height)
    return np.concatenate([texel, rim]), np.concatenate([face, rim_face]), np.concatenate([bary, rim_bary])


def covered_texels(tri: np.ndarray, width: int, height: int, budget: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Texels whose centre lies in one of the triangles ``tri`` [F, 3, 2]: flat index, triangle,
    barycentrics (a centre on an edge two triangles share goes to one of them)."""
    lo = np.clip(np.ceil(tri.min(1) - 0.5), 0, [width - 1, height - 1]).astype(np.int64)
    hi = np.clip(np.floor(tri.max(1) - 0.5), -1, [width - 1, height - 1]).astype(np.int64)
    span = np.maximum(hi - lo + 1, 0)
    counts = span[:, 0] * span[:, 1]
    ends = np.cumsum(counts)
    found, start = [], 0
    while start < len(tri):
        done = ends[start - 1] if start else 0  # candidates of the chunks before this one
        stop = max(int(np.searchsorted(ends, done + budget, side="right")), start + 1)
        f = np.repeat(np.arange(start, stop), counts[start:stop])
        # k: the candidate's index within its triangle's bounding box
        k = np.arange(len(f)) + done - np.repeat(ends[start:stop] - counts[start:stop], counts[start:stop])
        x = lo[f, 0] + k % np.maximum(span[f, 0], 1)
        y = lo[f, 1] + k // np.maximum(span[f, 0], 1)
        bary = barycentrics(np.stack([x + 0.5, y + 0.5], axis=1), tri[f])
        inside = (bary >= 0).all(axis=1)
        found.append(((y * width + x)[inside], f[inside], bary[inside]))
        start = stop
    texel, face, bary = (np.concatenate(parts) for parts in zip(*found))
    _, first = np.unique(texel, return_index=True)
    return texel[first], face[first], bary[first]


def rim_texels(texel: np.ndarray, face: np.ndarray, tri: np.ndarray, width: int,
               height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Texels outside every triangle within EDGE_REACH of a covered texel's centre: flat index,
    the covered texel's triangle and the barycentrics of that triangle's point nearest them."""
    covered = np.zeros(width * height, dtype=bool)
    covered[texel] = True
    owner = np.zeros(width * height, dtype=np.int64)
    owner[texel] = face
    distance, (rows, cols) = ndimage.distance_transform_edt(~covered.reshape(height, width), return_indices=True)
    rim = np.flatnonzero((distance.ravel() > 0) & (distance.ravel() <= EDGE_REACH))
    rim_face = owner[rows.ravel()[rim] * width + cols.ravel()[rim]]
    centres = np.stack([rim % width + 0.5, rim // width + 0.5], axis=1)
    _, bary = nearest_on_triangles(centres, tri[rim_face])
    return rim, rim_face, bary


def barycentrics(p: np.ndarray, tri: np.ndarray) -> np.ndarray:
    """Barycentrics [K, 3] of points p [K, 2] in triangles tri [K, 3, 2]; -1s for a triangle of no area."""
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    v0, v1, v2 = b - a, c - a, p - a
    det = v0[:, 0] * v1[:, 1] - v1[:, 0] * v0[:, 1]
    flat = np.abs(det) <= 1e-12
    det = np.where(flat, 1.0, det)
    l1 = (v2[:, 0] * v1[:, 1] - v1[:, 0] * v2[:, 1]) / det
    l2 = (v0[:, 0] * v2[:, 1] - v2[:, 0] * v0[:, 1]) / det
    bary = np.stack([1 - l1 - l2, l1, l2], axis=1)
    bary[flat] = -1.0
    return bary


def nearest_on_triangles(p: np.ndarray, tri: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For points p [K, 2] and triangles tri [K, 3, 2]: the distance to the triangle (0 inside) and
    the barycentrics of its nearest point. Triangles of no area have no inside, only edges."""
    bary = barycentrics(p, tri)
    inside = (bary >= 0).all(axis=1)
    dist = np.where(inside, 0.0, np.inf)
    bary = np.where(inside[:, None], bary, 0.0)
    for i, j in ((0, 1), (1, 2), (2, 0)):  # outside: the nearest point of the nearest edge
        start, edge = tri[:, i], tri[:, j] - tri[:, i]
        t = np.clip(np.einsum("kd,kd->k", p - start, edge) / np.maximum(np.einsum("kd,kd->k", edge, edge), 1e-24), 0, 1)
        d = np.linalg.norm(start + t[:, None] * edge - p, axis=1)
        closer = ~inside & (d < dist)
        dist = np.where(closer, d, dist)
        edge_bary = np.zeros_like(bary)
        edge_bary[:, i], edge_bary[:, j] = 1 - t, t
        bary = np.where(closer[:, None], edge_bary, bary)
    return dist, bary
